//! Differential privacy on the request path: the privacy configuration, the per-request
//! plan (budget split, per-pick epsilon, sensitivity), the private pool selection (one-shot
//! Gumbel top-m over every scored item), noisy score release, and the ledger charge that
//! precedes every release.
//!
//! # What is protected and how
//!
//! With DP on, the user's embedding `u` is clipped to L2 norm `C_u`
//! ([`PrivacyConfig::user_norm_bound`]); items have norm at most `C_v`, the item table's
//! certified `max_row_norm` (never below the exact largest row norm: the store sums squares
//! in f64 and rounds up to f32), widened by `(dim + 2)` f32 epsilons relative as a margin.
//! Two users then change any score `<u, v>` by at most `2 C_u C_v`, plus the f32
//! dot-product rounding slack of [`privacy::score_sensitivity`] (the factor
//! `1 + gamma_dim`, and `dim 2^-149` for products that underflow). A table whose certified
//! norm is 0, subnormal or not finite, or whose dimension the rounding bound does not cover,
//! is refused for DP requests (`FAILED_PRECONDITION`) rather than given a token
//! sensitivity. Every candidate (the whole catalog
//! when the request lists none) is scored exactly, pre-generated Gumbel noise is added and
//! the `m = pool_size` largest noisy scores are kept in order ([`privacy::GumbelTopK`]),
//! which is `m` rounds of the exponential mechanism at `epsilon` per pick and costs
//! `m epsilon^2 / 8` in zCDP. Only the order is released: the pool carries pseudo-scores
//! from rank (`m - position`), so fairness re-ranking, explanations and reports are
//! post-processing of the released order and public item data.
//!
//! Noisy scores (`release_noisy_scores`) are released for the answer's items only, on a
//! `2^-k` grid with discrete Gaussian noise (rho and per-pick budgets) or discrete Laplace
//! noise (pure epsilon budgets), and charged too.
//!
//! # Accounting
//!
//! The ledger is charged, durably, before anything is released; a ledger failure fails the
//! request closed. Whether the caller can deliver the answer is decided before the charge:
//! the answer is built whole and measured by the setup's [`AnswerLimit`], and one too large
//! is refused uncharged (`answer_limit.rs`). The charge stores the released order and noisy
//! scores, so a retry with the same request id gets the same answer with no new noise and
//! no second charge, also after a restart or an upgrade: the record holds a stable digest of
//! the request's content (`fingerprint.rs`: XXH3-128 over a documented encoding), and a
//! retry whose content differs is refused instead of replayed.

mod answer_limit;
mod fingerprint;
mod ledger;
mod record;
mod state_ledger;
mod workers;

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kernels::{ScoredItem, score_candidates};
use privacy::{
    ExponentialMechanism, GaussianRelease, GumbelTopK, LaplaceRelease, SecureRng, clip_to_norm,
    rho_pure_dp, rho_to_epsilon, score_sensitivity,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use store::Table;

pub use answer_limit::AnswerLimit;
pub(crate) use fingerprint::{RequestDigest, StoredFingerprint};
pub use ledger::{
    LedgerCharge, LedgerFailure, LedgerOutcome, MemoryLedger, PrivacyLedger, Spend, round_up_rho,
};
pub use state_ledger::StateLedger;
pub(crate) use workers::PrivateWorkers;

use crate::error::{EngineError, PreconditionReason};
use crate::request::{PrivacyBudget, PrivacyMechanism, PrivacyPolicy, RankRequest, UserRef};
use crate::response::{FairnessReport, PrivacyReport, RankResponse};

/// Mechanism of requests that leave it unspecified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultMechanism {
    /// No differential privacy.
    #[default]
    None,
    /// One-shot Gumbel top-k pool selection.
    GumbelTopK,
}

/// What to do when a subject's budget cannot cover a charge (requests may override it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExhaustedPolicy {
    /// Refuse with `PrivacyBudgetExhausted` (gRPC `RESOURCE_EXHAUSTED`).
    #[default]
    Reject,
    /// Answer without personalization (item prior, no charge), flagged in the answer.
    NonPersonalized,
}

/// Largest per-subject budget the ledgers can count (fixed point, nano-rho in a u64).
pub const MAX_RHO_CAP: f64 = 1e9;

/// Longest budget window, in seconds: 100 years of 365.25 days. Longer windows are
/// refused (use 0 for a lifetime budget); near `u64::MAX` seconds the window's end does
/// not fit a `SystemTime`.
pub const MAX_BUDGET_WINDOW_SECS: u64 = 36_525 * 86_400;

/// `[privacy]`: differential privacy defaults, limits and per-subject budgets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacyConfig {
    /// Mechanism of requests that name none: `none` or `gumbel-top-k` (default `none`).
    pub default_mechanism: DefaultMechanism,
    /// Refuse requests that ask for mechanism `none` (default false).
    pub require_dp: bool,
    /// L2 norm bound `C_u` user embeddings are clipped to under DP (default 1.0).
    pub user_norm_bound: f32,
    /// Per-pick epsilon of requests that set no budget (default 0.1): a pool of `m` items
    /// costs `m * epsilon^2 / 8` zCDP.
    pub default_epsilon_per_pick: f64,
    /// Delta at which reports state the (epsilon, delta) equivalent (default 1e-6).
    pub default_delta: f64,
    /// Largest zCDP charge one answer may cost; larger requests are refused with
    /// `PrivacyPolicyNotAllowed` (default 2.0).
    pub max_request_rho: f64,
    /// Share of a request's budget spent on noisy scores when it asks for them, in (0, 1)
    /// (default 0.5). With a per-pick budget the scores cost
    /// `order * share / (1 - share)` on top of the order.
    pub score_budget_share: f64,
    /// Each subject's zCDP budget per window (default 10.0).
    pub subject_rho_cap: f64,
    /// Budget window in seconds, at most [`MAX_BUDGET_WINDOW_SECS`] (100 years); 0: a
    /// lifetime budget that never resets (default 86400).
    pub budget_window_secs: u64,
    /// Behaviour when the budget is exhausted: `reject` or `non-personalized` (default
    /// `reject`).
    pub on_budget_exhausted: ExhaustedPolicy,
    /// Threads that run DP requests (scoring, selection, the blocking ledger charge), so
    /// ledger commits never block the shared compute pool (default 16).
    pub workers: usize,
    /// Gumbel samples each DP worker keeps pre-generated (default 65536); refilled after
    /// each request, off the request path.
    pub noise_buffer: usize,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig {
            default_mechanism: DefaultMechanism::None,
            require_dp: false,
            user_norm_bound: 1.0,
            default_epsilon_per_pick: 0.1,
            default_delta: 1e-6,
            max_request_rho: 2.0,
            score_budget_share: 0.5,
            subject_rho_cap: 10.0,
            budget_window_secs: 86_400,
            on_budget_exhausted: ExhaustedPolicy::Reject,
            workers: 16,
            noise_buffer: 1 << 16,
        }
    }
}

impl PrivacyConfig {
    /// Checks every value's range.
    pub fn validate(&self) -> Result<(), EngineError> {
        let refuse = |field, message: String| Err(EngineError::InvalidConfig { field, message });
        let positive = [
            ("privacy.user_norm_bound", f64::from(self.user_norm_bound)),
            (
                "privacy.default_epsilon_per_pick",
                self.default_epsilon_per_pick,
            ),
            ("privacy.max_request_rho", self.max_request_rho),
            ("privacy.subject_rho_cap", self.subject_rho_cap),
        ];
        for (field, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return refuse(field, format!("{value} is not a finite number above 0"));
            }
        }
        // The ledgers count rho in fixed point (nano units in a u64).
        if self.subject_rho_cap > MAX_RHO_CAP {
            return refuse(
                "privacy.subject_rho_cap",
                format!(
                    "{} exceeds the ledger's limit of {MAX_RHO_CAP}",
                    self.subject_rho_cap
                ),
            );
        }
        if !(self.default_delta > 0.0 && self.default_delta < 1.0) {
            return refuse(
                "privacy.default_delta",
                format!("{} is not in (0, 1)", self.default_delta),
            );
        }
        if !(self.score_budget_share > 0.0 && self.score_budget_share < 1.0) {
            return refuse(
                "privacy.score_budget_share",
                format!("{} is not in (0, 1)", self.score_budget_share),
            );
        }
        if self.budget_window_secs > MAX_BUDGET_WINDOW_SECS {
            return refuse(
                "privacy.budget_window_secs",
                format!(
                    "{} exceeds the maximum of {MAX_BUDGET_WINDOW_SECS} (100 years); use 0 for a \
                     lifetime budget that never resets",
                    self.budget_window_secs
                ),
            );
        }
        if self.workers == 0 {
            return refuse("privacy.workers", "must be at least 1".to_owned());
        }
        Ok(())
    }

    /// The budget window, `None` for lifetime budgets.
    pub fn window(&self) -> Option<Duration> {
        (self.budget_window_secs > 0).then(|| Duration::from_secs(self.budget_window_secs))
    }
}

/// The privacy configuration together with the ledger it charges.
#[derive(Debug, Clone)]
pub struct PrivacySetup {
    /// Defaults, limits and budgets.
    pub config: PrivacyConfig,
    /// The budget ledger.
    pub ledger: Arc<dyn PrivacyLedger>,
    /// What the caller can deliver of an answer, checked before each charge (`None`: no
    /// limit). The server's is its message limit.
    pub answer_limit: Option<Arc<dyn AnswerLimit>>,
}

impl Default for PrivacySetup {
    /// The default configuration with an in-memory ledger, no answer limit.
    fn default() -> Self {
        PrivacySetup {
            config: PrivacyConfig::default(),
            ledger: Arc::new(MemoryLedger::new()),
            answer_limit: None,
        }
    }
}

/// How the noisy scores of a DP answer are released.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum ScoreNoise {
    /// Discrete Gaussian noise; `rho` in total over the answer's scores.
    Gaussian { rho: f64 },
    /// Discrete Laplace noise; pure `epsilon` in total over the answer's scores.
    Laplace { epsilon: f64 },
}

/// A DP request's resolved plan: everything fixed before scoring.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// The privacy subject (ledger key before pseudonymization).
    pub subject: String,
    /// Items selected privately: `min(pool, scored items)`.
    pub picks: usize,
    /// Items whose noisy scores may be released: `min(k, picks)` (0: scores withheld).
    pub score_count: usize,
    /// The per-pick exponential mechanism (its sensitivity is the score sensitivity).
    pub mechanism: Option<ExponentialMechanism>,
    /// Cost of the order.
    pub rho_order: f64,
    /// Noisy score release, if asked for.
    pub scores: Option<ScoreNoise>,
    /// Pure epsilon of the whole answer, for pure-epsilon budgets.
    pub pure_epsilon: Option<f64>,
    /// Delta of the reported (epsilon, delta).
    pub delta: f64,
    /// Behaviour on an exhausted budget.
    pub on_exhausted: ExhaustedPolicy,
    /// `C_u`.
    pub user_norm_bound: f32,
    /// Score sensitivity `(2 C_u C_v + dim 2^-149) (1 + gamma)`.
    pub sensitivity: f64,
    /// Digest of the request content, to refuse a request id reused for other content.
    pub fingerprint: RequestDigest,
    /// The subject's cap per window.
    pub cap: f64,
    /// The budget window (`None`: lifetime).
    pub window: Option<Duration>,
    /// Gumbel samples each thread keeps pre-generated.
    pub noise_buffer: usize,
    /// The ledger to charge.
    pub ledger: Arc<dyn PrivacyLedger>,
    /// What the caller can deliver, checked before the charge.
    pub answer_limit: Option<Arc<dyn AnswerLimit>>,
}

/// Whether `request` is answered under differential privacy (its scores then come from the
/// exact kernel over every candidate, never from the quantized copy).
pub(crate) fn is_private(request: &RankRequest, setup: &PrivacySetup) -> bool {
    matches!(
        effective_mechanism(&request.privacy, &setup.config),
        PrivacyMechanism::GumbelTopK
    )
}

/// The mechanism a request gets: its own, or the configured default.
fn effective_mechanism(policy: &PrivacyPolicy, config: &PrivacyConfig) -> PrivacyMechanism {
    match (policy.mechanism, config.default_mechanism) {
        (PrivacyMechanism::Unspecified, DefaultMechanism::None) => PrivacyMechanism::None,
        (PrivacyMechanism::Unspecified, DefaultMechanism::GumbelTopK) => {
            PrivacyMechanism::GumbelTopK
        }
        (mechanism, _) => mechanism,
    }
}

fn not_allowed(message: String) -> EngineError {
    EngineError::FailedPrecondition {
        field: Some("privacy".to_owned()),
        reason: PreconditionReason::PrivacyPolicyNotAllowed,
        message,
    }
}

/// A DP request refused because the serving item table cannot give its scores a usable
/// sensitivity (`FAILED_PRECONDITION`, reason `PrivacyPolicyNotAllowed`: the requested
/// mechanism cannot be honoured on this table). Names the table by its file name.
fn unfit_items(items: &Table, why: String) -> EngineError {
    let name = items.path().file_name().map_or_else(
        || items.path().display().to_string(),
        |name| name.to_string_lossy().into_owned(),
    );
    EngineError::FailedPrecondition {
        field: Some("privacy".to_owned()),
        reason: PreconditionReason::PrivacyPolicyNotAllowed,
        message: format!(
            "the item table {name:?} cannot be ranked under differential privacy: {why}"
        ),
    }
}

/// The score sensitivity `Delta` for users clipped to `user_norm_bound` and the rows of
/// `items`, whose norms are at most the table's certified `max_row_norm` (never below the
/// exact largest norm: the store sums squares in f64 and rounds up), widened by `(dim + 2)`
/// f32 epsilons as a margin.
///
/// Refuses (see [`unfit_items`]) a certified norm that is 0 (every row zero, or no rows),
/// subnormal or not finite: the sensitivity would be 0 or meaningless and the "private"
/// selection the exact top-k. Also refuses a dimension the f32 rounding bound does not
/// cover (above [`privacy::MAX_SCORE_DIMENSION`]), which the store accepts.
fn item_sensitivity(items: &Table, user_norm_bound: f32) -> Result<f64, EngineError> {
    let certified = items.max_row_norm();
    if !certified.is_normal() {
        let why = if certified == 0.0 {
            "its largest row norm is 0 (every row is zero, or it has no rows): there is no \
             score sensitivity to calibrate the noise to"
                .to_owned()
        } else if certified.is_finite() {
            format!(
                "its largest row norm {certified:e} is subnormal in f32 (below {:e}): scores \
                 this small lose their precision in f32, and no noise can be calibrated to them",
                f32::MIN_POSITIVE
            )
        } else {
            format!("its largest row norm is {certified}, not a finite number")
        };
        return Err(unfit_items(items, why));
    }
    let item_norm =
        f64::from(certified) * (1.0 + (items.dim() as f64 + 2.0) * f64::from(f32::EPSILON));
    score_sensitivity(f64::from(user_norm_bound), item_norm, items.dim()).map_err(|error| {
        unfit_items(
            items,
            format!("the score sensitivity is undefined: {error}"),
        )
    })
}

/// Resolves the privacy plan of a personalized request scoring `scored_items` items into a
/// pool of `pool` (`None`: DP does not apply).
pub(crate) fn plan(
    request: &RankRequest,
    setup: &PrivacySetup,
    items: &Table,
    pool: usize,
    scored_items: usize,
) -> Result<Option<Plan>, EngineError> {
    let policy = &request.privacy;
    let config = &setup.config;
    match effective_mechanism(policy, config) {
        PrivacyMechanism::GumbelTopK => {}
        _ if config.require_dp => {
            return Err(not_allowed(
                "this server requires differential privacy (mechanism gumbel-top-k)".to_owned(),
            ));
        }
        _ => return Ok(None),
    }
    let subject = match &request.user {
        UserRef::Id(id) => id.clone(),
        UserRef::Inline { subject_id, .. } if !subject_id.is_empty() => subject_id.clone(),
        UserRef::Inline { .. } => {
            return Err(EngineError::invalid(
                "inline_user.subject_id",
                "is required under differential privacy (the budget ledger is keyed by it)",
            ));
        }
    };
    let picks = pool.min(scored_items);
    let score_count = if policy.release_noisy_scores {
        request.k.min(picks)
    } else {
        0
    };
    let share = if score_count > 0 {
        config.score_budget_share
    } else {
        0.0
    };
    let sensitivity = item_sensitivity(items, config.user_norm_bound)?;
    let m = picks.max(1) as f64;
    let (epsilon_per_pick, rho_order, scores, pure_epsilon) = match policy.budget {
        Some(PrivacyBudget::Rho(rho)) => {
            let rho_order = (1.0 - share) * rho;
            let scores = (score_count > 0).then_some(ScoreNoise::Gaussian { rho: share * rho });
            ((8.0 * rho_order / m).sqrt(), rho_order, scores, None)
        }
        Some(PrivacyBudget::Epsilon(epsilon)) => {
            let per_pick = (1.0 - share) * epsilon / m;
            let scores = (score_count > 0).then_some(ScoreNoise::Laplace {
                epsilon: share * epsilon,
            });
            (
                per_pick,
                m * per_pick * per_pick / 8.0,
                scores,
                Some(epsilon),
            )
        }
        Some(PrivacyBudget::EpsilonPerPick(per_pick)) => {
            let rho_order = m * per_pick * per_pick / 8.0;
            let scores = (score_count > 0).then_some(ScoreNoise::Gaussian {
                rho: rho_order * share / (1.0 - share),
            });
            (per_pick, rho_order, scores, None)
        }
        None => {
            let per_pick = config.default_epsilon_per_pick;
            let rho_order = m * per_pick * per_pick / 8.0;
            let scores = (score_count > 0).then_some(ScoreNoise::Gaussian {
                rho: rho_order * share / (1.0 - share),
            });
            (per_pick, rho_order, scores, None)
        }
    };
    let rho_total = rho_order
        + match scores {
            Some(ScoreNoise::Gaussian { rho }) => rho,
            Some(ScoreNoise::Laplace { epsilon }) => {
                score_count as f64 * (epsilon / score_count as f64).powi(2) / 2.0
            }
            None => 0.0,
        };
    if rho_total > config.max_request_rho {
        return Err(not_allowed(format!(
            "the request would cost rho {rho_total:.6} for a pool of {picks}, above this server's \
             per-request maximum of {}",
            config.max_request_rho
        )));
    }
    let mechanism = if picks > 0 {
        Some(
            ExponentialMechanism::new(epsilon_per_pick, sensitivity).map_err(|error| {
                EngineError::invalid(
                    "privacy",
                    format!("cannot calibrate the mechanism: {error}"),
                )
            })?,
        )
    } else {
        None
    };
    Ok(Some(Plan {
        subject,
        picks,
        score_count,
        mechanism,
        rho_order,
        scores,
        pure_epsilon,
        delta: policy.delta.unwrap_or(config.default_delta),
        on_exhausted: match policy.on_budget_exhausted {
            crate::request::BudgetExhaustedAction::Unspecified => config.on_budget_exhausted,
            crate::request::BudgetExhaustedAction::Reject => ExhaustedPolicy::Reject,
            crate::request::BudgetExhaustedAction::NonPersonalized => {
                ExhaustedPolicy::NonPersonalized
            }
        },
        user_norm_bound: config.user_norm_bound,
        sensitivity,
        fingerprint: RequestDigest::of(request),
        cap: config.subject_rho_cap,
        window: config.window(),
        noise_buffer: config.noise_buffer,
        ledger: Arc::clone(&setup.ledger),
        answer_limit: setup.answer_limit.clone(),
    }))
}

/// Clips a user embedding to the plan's norm bound (a copy; the table row is untouched).
pub(crate) fn clip(embedding: &[f32], bound: f32) -> Result<Arc<[f32]>, EngineError> {
    let mut clipped = embedding.to_vec();
    clip_to_norm(&mut clipped, bound).map_err(|error| {
        EngineError::invalid(
            "inline_user.embedding",
            format!("cannot be clipped: {error}"),
        )
    })?;
    Ok(clipped.into())
}

/// Per-thread DP state: a CSPRNG seeded from the OS, pre-generated Gumbel noise, scratch.
struct DpThread {
    rng: SecureRng,
    selector: GumbelTopK,
    scores: Vec<f32>,
    order: Vec<usize>,
}

thread_local! {
    static DP_THREAD: RefCell<Option<DpThread>> = const { RefCell::new(None) };
}

/// Runs `work` with this thread's DP state, creating it (OS-seeded) on first use.
fn with_dp_thread<T>(
    noise_buffer: usize,
    work: impl FnOnce(&mut DpThread) -> Result<T, EngineError>,
) -> Result<T, EngineError> {
    DP_THREAD.with(|cell| {
        let mut slot = cell
            .try_borrow_mut()
            .map_err(|_| EngineError::internal("DP thread state re-entered"))?;
        if slot.is_none() {
            let mut rng = SecureRng::from_os().map_err(|error| EngineError::Unavailable {
                message: format!("cannot seed the DP random generator from the OS: {error}"),
            })?;
            let selector = GumbelTopK::with_noise(noise_buffer, &mut rng);
            *slot = Some(DpThread {
                rng,
                selector,
                scores: Vec::new(),
                order: Vec::new(),
            });
        }
        match slot.as_mut() {
            Some(state) => work(state),
            None => Err(EngineError::internal("DP thread state missing")),
        }
    })
}

/// Refills this thread's Gumbel noise buffer (called between requests).
pub(crate) fn refill_noise() {
    DP_THREAD.with(|cell| {
        if let Ok(mut slot) = cell.try_borrow_mut()
            && let Some(state) = slot.as_mut()
        {
            state.selector.refill(&mut state.rng);
        }
    });
}

/// Rows per parallel task when scoring the whole catalog.
const CATALOG_CHUNK: usize = 8192;

/// Scores every candidate (`rows`, or the whole catalog when `None`) exactly, then selects
/// the plan's pool by one-shot Gumbel top-m. Returns the pool in released order with
/// pseudo-scores `picks - position` (the raw scores never leave this function).
pub(crate) fn select_pool(
    plan: &Plan,
    matrix: kernels::RowMatrix<'_>,
    query: &[f32],
    rows: Option<&[u32]>,
    noise_buffer: usize,
) -> Result<Vec<ScoredItem>, EngineError> {
    let Some(mechanism) = plan.mechanism else {
        return Ok(Vec::new());
    };
    with_dp_thread(noise_buffer, |state| {
        match rows {
            Some(rows) => score_candidates(matrix, query, rows, &mut state.scores)?,
            None => {
                state.scores.clear();
                state.scores.resize(matrix.rows(), 0.0);
                state
                    .scores
                    .par_chunks_mut(CATALOG_CHUNK)
                    .enumerate()
                    .for_each(|(chunk, out)| {
                        let first = chunk * CATALOG_CHUNK;
                        for (offset, score) in out.iter_mut().enumerate() {
                            *score = kernels::dot(matrix.row(first + offset), query);
                        }
                    });
            }
        }
        let DpThread {
            rng,
            selector,
            scores,
            order,
        } = state;
        selector
            .select(scores, &mechanism, plan.picks, rng, order)
            .map_err(|error| EngineError::internal(format!("private selection: {error}")))?;
        let picks = order.len();
        let mut pool = Vec::with_capacity(picks);
        for (position, &index) in order.iter().enumerate() {
            let row = match rows {
                Some(rows) => rows.get(index).copied().ok_or_else(|| {
                    EngineError::internal("private selection returned an unknown index")
                })?,
                None => index as u32,
            };
            pool.push(ScoredItem::new(row, (picks - position) as f32));
        }
        Ok(pool)
    })
}

/// The record a DP answer leaves in the ledger: what a replay of the released answer shows
/// (format version 4). A replay shows the answer's items, each with its position in the
/// privately selected pool (its unconstrained rank) and that pool's size; it never needs the
/// ids of the pool's other items.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredRelease {
    /// Format version (4; 1 to 3 for records of earlier releases, converted on decoding).
    pub version: u32,
    /// Request content digest (a format version 1 record holds a legacy hash instead).
    pub fingerprint: StoredFingerprint,
    /// The size of the privately selected pool.
    pub picks: u32,
    /// The answer, best first: each item's position in the pool's released order, and its id.
    pub answer: Vec<(u32, String)>,
    /// Everything after the answer: scores, privacy figures, fairness report.
    pub tail: ReleaseTail,
}

/// The fields of a record after its answer (shared by every format version; in a JSON record
/// of versions 1 and 2 they sit at the top level beside the pool).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ReleaseTail {
    /// Noisy scores of the answer's items, in answer order.
    pub scores: Option<Vec<f32>>,
    /// rho charged.
    pub rho: f64,
    /// Reported epsilon and delta.
    pub epsilon: f64,
    pub delta: f64,
    /// Noise standard deviation of the scores.
    pub score_noise_stddev: Option<f64>,
    /// `C_u`.
    pub user_norm_bound: f64,
    /// The fairness report of the released answer (a replay reports it unchanged). `None` in
    /// a freshly built record: the release path passes the report to the encoder instead.
    #[serde(default)]
    pub fairness: Option<FairnessReport>,
}

/// A record of format versions 1 to 3 (JSON or binary): the ids of the whole pool, and the
/// answer as positions into it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct LegacyRelease {
    pub version: u32,
    pub fingerprint: StoredFingerprint,
    pub pool: Vec<String>,
    pub answer: Vec<u32>,
    #[serde(flatten)]
    pub tail: ReleaseTail,
}

impl StoredRelease {
    /// The record of a pool's ids and the answer's positions into it (earlier formats). A
    /// position outside the pool is dropped (as the replay of those formats did).
    pub(crate) fn from_pool(
        version: u32,
        fingerprint: StoredFingerprint,
        pool: Vec<String>,
        positions: &[u32],
        tail: ReleaseTail,
    ) -> StoredRelease {
        let answer = positions
            .iter()
            .filter_map(|&position| {
                let id = pool.get(position as usize)?;
                Some((position, id.clone()))
            })
            .collect();
        StoredRelease {
            version,
            fingerprint,
            picks: u32::try_from(pool.len()).unwrap_or(u32::MAX),
            answer,
            tail,
        }
    }

    /// Encodes the record for the ledger (binary, format version 4: `record.rs`) with the
    /// fairness report `fairness` (the record's own `fairness` field is not read).
    pub fn encode(&self, fairness: Option<&FairnessReport>) -> Vec<u8> {
        record::encode(self, fairness)
    }

    /// Decodes a ledger record: binary (versions 3 and 4) or JSON (versions 1 and 2, written
    /// by earlier releases; a JSON record starts with `{`, a binary one with `FRR`).
    pub fn decode(bytes: &[u8]) -> Result<StoredRelease, EngineError> {
        let unreadable = |reason: String| EngineError::LedgerUnavailable {
            message: format!("the ledger holds an unreadable answer record: {reason}"),
        };
        if bytes.starts_with(&record::MAGIC[..3]) {
            return record::decode(bytes)
                .ok_or_else(|| unreadable("a damaged binary record".to_owned()));
        }
        let legacy: LegacyRelease =
            serde_json::from_slice(bytes).map_err(|error| unreadable(error.to_string()))?;
        Ok(StoredRelease::from_pool(
            legacy.version,
            legacy.fingerprint,
            legacy.pool,
            &legacy.answer,
            legacy.tail,
        ))
    }

    /// The privacy report of this record: freshly charged (with the subject's spend, if
    /// the ledger was charged) or replayed (no charge).
    pub fn report(&self, spend: Option<Spend>, replay: bool) -> PrivacyReport {
        PrivacyReport {
            dp_applied: true,
            mechanism: PrivacyMechanism::GumbelTopK,
            rho_charged: if replay { 0.0 } else { self.tail.rho },
            epsilon: Some(self.tail.epsilon),
            delta: Some(self.tail.delta),
            rho_remaining: spend.map(|spend| spend.remaining()),
            rho_budget: spend.map(|spend| spend.cap),
            budget_resets_at: spend.and_then(|spend| spend.resets_at),
            scores_noised: self.tail.scores.is_some(),
            score_noise_stddev: self.tail.score_noise_stddev,
            user_norm_bound: Some(self.tail.user_norm_bound),
            ledger_replay: replay,
        }
    }
}

/// The grid exponent that puts a noise of standard deviation `sigma` at about `2^12`
/// grid units (well inside the samplers' ranges).
fn grid_for(sigma: f64) -> i32 {
    let k = 12.0 - sigma.log2().ceil();
    k.clamp(
        f64::from(privacy::MIN_GRID_K),
        f64::from(privacy::MAX_GRID_K),
    ) as i32
}

/// Noisy scores of an answer's items and what releasing them costs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NoisyScores {
    /// The noisy scores, in answer order.
    pub scores: Vec<f32>,
    /// zCDP cost of all of them (grid rounding included).
    pub rho: f64,
    /// Pure epsilon of all of them (discrete Laplace only).
    pub epsilon: Option<f64>,
    /// Standard deviation of the noise of each score.
    pub stddev: f64,
}

/// Noisy scores of `exact` (the answer items' exact scores) and their actual cost.
pub(crate) fn noisy_scores(
    plan: &Plan,
    exact: &[f32],
    noise_buffer: usize,
) -> Result<Option<NoisyScores>, EngineError> {
    let (Some(noise), count) = (plan.scores, exact.len()) else {
        return Ok(None);
    };
    if count == 0 {
        return Ok(None);
    }
    let calibration = |error: privacy::PrivacyError| {
        EngineError::invalid(
            "privacy",
            format!("cannot calibrate the score noise: {error}"),
        )
    };
    let sensitivity = plan.sensitivity;
    with_dp_thread(noise_buffer, |state| match noise {
        ScoreNoise::Gaussian { rho } => {
            let each = rho / count as f64;
            let sigma = sensitivity / (2.0 * each).sqrt();
            let release = GaussianRelease::for_rho(each, sensitivity, grid_for(sigma))
                .map_err(calibration)?;
            let out = noisy_each(exact, |score| release.release(score, &mut state.rng))?;
            let rho = release.rho(sensitivity).map_err(calibration)? * count as f64;
            Ok(Some(NoisyScores {
                scores: out,
                rho,
                epsilon: None,
                stddev: release.sigma(),
            }))
        }
        ScoreNoise::Laplace { epsilon } => {
            let each = epsilon / count as f64;
            let scale = sensitivity / each;
            let release = LaplaceRelease::for_epsilon(each, sensitivity, grid_for(scale))
                .map_err(calibration)?;
            let out = noisy_each(exact, |score| release.release(score, &mut state.rng))?;
            let actual = release.epsilon(sensitivity).map_err(calibration)?;
            let rho = rho_pure_dp(actual).map_err(calibration)? * count as f64;
            Ok(Some(NoisyScores {
                scores: out,
                rho,
                epsilon: Some(actual * count as f64),
                stddev: release.noise().variance().sqrt() * (-f64::from(release.grid_k())).exp2(),
            }))
        }
    })
}

/// `release` applied to every exact score, in order (one fresh noise draw each).
fn noisy_each(
    exact: &[f32],
    mut release: impl FnMut(f64) -> Result<f64, privacy::PrivacyError>,
) -> Result<Vec<f32>, EngineError> {
    exact
        .iter()
        .map(|&score| {
            release(f64::from(score))
                .map(|noisy| noisy as f32)
                .map_err(|error| EngineError::internal(format!("noisy score release: {error}")))
        })
        .collect()
}

/// Conversions remembered per thread by [`epsilon_of`].
const EPSILON_MEMO: usize = 8;

/// `(rho bits, delta bits, epsilon)` of recent conversions, and the slot to replace next.
type EpsilonMemo = ([(u64, u64, f64); EPSILON_MEMO], usize);

thread_local! {
    /// Recent conversions of this thread.
    static EPSILON_OF: RefCell<EpsilonMemo> =
        const { RefCell::new(([(u64::MAX, u64::MAX, 0.0); EPSILON_MEMO], 0)) };
}

/// [`rho_to_epsilon`], remembered for the last few `(rho, delta)` of this thread. The tight
/// conversion searches over Renyi orders (about 47 000 instructions); requests under one
/// policy charge the same rho, so a DP request usually finds it here. The function is pure:
/// a remembered value is bit-identical to a fresh one (inputs compared by their bits).
fn epsilon_of(rho: f64, delta: f64) -> Result<f64, privacy::PrivacyError> {
    // Empty slots hold the bits of a NaN: non-finite inputs never look them up.
    if !(rho.is_finite() && delta.is_finite()) {
        return rho_to_epsilon(rho, delta);
    }
    let key = (rho.to_bits(), delta.to_bits());
    let found = EPSILON_OF.with(|memo| {
        memo.try_borrow().ok().and_then(|memo| {
            memo.0
                .iter()
                .find(|entry| (entry.0, entry.1) == key)
                .map(|entry| entry.2)
        })
    });
    if let Some(epsilon) = found {
        return Ok(epsilon);
    }
    let epsilon = rho_to_epsilon(rho, delta)?;
    EPSILON_OF.with(|memo| {
        if let Ok(mut memo) = memo.try_borrow_mut() {
            let slot = memo.1;
            memo.0[slot] = (key.0, key.1, epsilon);
            memo.1 = (slot + 1) % EPSILON_MEMO;
        }
    });
    Ok(epsilon)
}

/// Builds the ledger record of a fresh DP answer: a pool of `picks` items and the answer as
/// (pool position, item id), best first. The fairness report is not copied in: pass it to
/// [`StoredRelease::encode`].
pub(crate) fn release_record(
    plan: &Plan,
    picks: usize,
    answer: Vec<(u32, String)>,
    scores: Option<NoisyScores>,
) -> Result<StoredRelease, EngineError> {
    let (scores, rho_scores, epsilon_scores, stddev) = match scores {
        Some(noisy) => (
            Some(noisy.scores),
            noisy.rho,
            noisy.epsilon,
            Some(noisy.stddev),
        ),
        None => (None, 0.0, None, None),
    };
    let rho = round_up_rho(plan.rho_order + rho_scores);
    let (epsilon, delta) = match plan.pure_epsilon {
        Some(_) => {
            let per_pick = plan
                .mechanism
                .map_or(0.0, |mechanism| mechanism.epsilon_per_pick());
            (
                per_pick * plan.picks as f64 + epsilon_scores.unwrap_or(0.0),
                0.0,
            )
        }
        None => (
            epsilon_of(rho, plan.delta)
                .map_err(|error| EngineError::internal(format!("epsilon conversion: {error}")))?,
            plan.delta,
        ),
    };
    Ok(StoredRelease {
        version: record::VERSION,
        fingerprint: StoredFingerprint::Digest(plan.fingerprint),
        picks: u32::try_from(picks).unwrap_or(u32::MAX),
        answer,
        tail: ReleaseTail {
            scores,
            rho,
            epsilon,
            delta,
            score_noise_stddev: stddev,
            user_norm_bound: f64::from(plan.user_norm_bound),
            fairness: None,
        },
    })
}

/// The error of a request refused for an exhausted budget.
pub(crate) fn exhausted_error(plan: &Plan, rho: f64, spend: Spend) -> EngineError {
    EngineError::PrivacyBudgetExhausted {
        rho_remaining: spend.remaining(),
        message: format!(
            "this answer costs rho {rho:.6} but the subject has {:.6} of {:.6} left{}",
            spend.remaining(),
            plan.cap,
            match spend.resets_at {
                Some(at) => format!(
                    " (the budget resets in {} s)",
                    at.duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .as_secs()
                ),
                None => " (a lifetime budget)".to_owned(),
            }
        ),
    }
}

/// Refuses (uncharged) a fresh answer the plan's [`AnswerLimit`] cannot deliver.
pub(crate) fn check_deliverable(plan: &Plan, answer: &RankResponse) -> Result<(), EngineError> {
    answer_limit::check(plan.answer_limit.as_deref(), answer)
}

/// The answer the ledger stores for the plan's subject and `request_id`, read without a
/// charge (fails closed on ledger errors).
pub(crate) fn stored_answer(plan: &Plan, request_id: &str) -> Result<Option<Vec<u8>>, EngineError> {
    plan.ledger
        .stored_answer(&plan.subject, request_id)
        .map_err(|failure| EngineError::LedgerUnavailable {
            message: failure.message,
        })
}

/// Charges the ledger for a fresh release (fails closed on ledger errors).
pub(crate) fn charge(
    ledger: &dyn PrivacyLedger,
    plan: &Plan,
    request_id: &str,
    record: &StoredRelease,
    fairness: &FairnessReport,
) -> Result<LedgerOutcome, EngineError> {
    let bytes = record.encode(Some(fairness));
    ledger
        .charge(&LedgerCharge {
            subject: &plan.subject,
            request_id,
            rho: record.tail.rho,
            cap: plan.cap,
            window: plan.window,
            now: SystemTime::now(),
            answer: &bytes,
        })
        .map_err(|failure| EngineError::LedgerUnavailable {
            message: failure.message,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_windows_longer_than_a_hundred_years_are_refused() {
        let window = |budget_window_secs| PrivacyConfig {
            budget_window_secs,
            ..PrivacyConfig::default()
        };
        for accepted in [0, 1, 86_400, MAX_BUDGET_WINDOW_SECS] {
            assert_eq!(window(accepted).validate(), Ok(()), "{accepted}");
        }
        assert_eq!(MAX_BUDGET_WINDOW_SECS, 3_155_760_000);
        for refused in [
            MAX_BUDGET_WINDOW_SECS + 1,
            9_300_000_000_000_000_000,
            u64::MAX,
        ] {
            let error = window(refused).validate().expect_err("refused");
            assert!(
                matches!(
                    &error,
                    EngineError::InvalidConfig { field: "privacy.budget_window_secs", message }
                        if message.contains("100 years")
                ),
                "{error}"
            );
        }
    }

    #[test]
    fn remembered_epsilons_are_bit_identical_to_fresh_conversions() {
        // More distinct inputs than the memo holds, each asked several times in a mixed order.
        let inputs: Vec<(f64, f64)> = (0..2 * EPSILON_MEMO)
            .map(|index| {
                (
                    0.001 * (index + 1) as f64,
                    if index % 2 == 0 { 1e-6 } else { 1e-9 },
                )
            })
            .collect();
        for round in 0..3 {
            for (index, &(rho, delta)) in inputs.iter().enumerate() {
                let (rho, delta) = if round == 1 {
                    inputs[inputs.len() - 1 - index]
                } else {
                    (rho, delta)
                };
                let remembered = epsilon_of(rho, delta).expect("converts");
                let fresh = rho_to_epsilon(rho, delta).expect("converts");
                assert_eq!(
                    remembered.to_bits(),
                    fresh.to_bits(),
                    "rho {rho}, delta {delta}"
                );
                assert_eq!(
                    epsilon_of(rho, delta).expect("converts").to_bits(),
                    fresh.to_bits()
                );
            }
        }
        // Errors are not remembered.
        assert!(epsilon_of(0.1, 1.5).is_err());
        assert!(epsilon_of(0.1, 1.5).is_err());
    }
}
