//! Engine-native answer types: ranked items, explanations, fairness and privacy reports,
//! table versions and stage timings (the shape of `fairrank.v1.RankResponse`).

use std::time::{Duration, SystemTime};

use crate::request::{ExplainLevel, PrivacyMechanism};

/// Identity of the table content that served a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TableVersion {
    /// Generation in this process: 1 at start-up, +1 on every successful reload or
    /// rollback of that table.
    pub generation: u64,
    /// Data checksum recorded in the table file header (equal content, equal checksum).
    pub checksum: u64,
}

/// Meaning of [`RankedItem::score`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreKind {
    /// Exact inner product of the user's and the item's embeddings.
    DotProduct,
    /// Inner product plus DP noise (`PrivacyReport::score_noise_stddev`).
    NoisyDotProduct,
    /// The item's non-personalized prior from the item table.
    Prior,
    /// No scores are released (DP without noisy scores, or a non-personalized answer from
    /// a table without a prior).
    Withheld,
}

/// Why an answer is not personalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonPersonalizedReason {
    /// The user denied consent (or gave none where explicit consent is required).
    ConsentDenied,
    /// An operator paused personalization.
    PersonalizationPaused,
    /// The user id is unknown and the request asked for the fallback.
    UserNotFound,
    /// The subject's privacy budget is exhausted and the policy asked for a
    /// non-personalized answer.
    PrivacyBudgetExhausted,
}

impl NonPersonalizedReason {
    /// Clause for explanation texts and fallback reasons ("... because {clause}").
    pub fn describe(self) -> &'static str {
        match self {
            NonPersonalizedReason::ConsentDenied => "you have not consented to personalization",
            NonPersonalizedReason::PersonalizationPaused => {
                "personalization is paused by the operator"
            }
            NonPersonalizedReason::UserNotFound => "we have no profile for you yet",
            NonPersonalizedReason::PrivacyBudgetExhausted => {
                "your privacy budget for personalization is used up for now"
            }
        }
    }
}

/// Why an item is where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasonCode {
    /// Strong match between the item and the user's profile (`personalized_match`).
    ProfileMatch,
    /// Ranked by the item's non-personalized prior (`popular_non_personalized`).
    ItemPrior,
    /// Ranked in catalog (row) order: not personalized and the item table has no prior
    /// (`catalog_order_non_personalized`).
    CatalogOrder,
    /// Placed higher than its unconstrained position by the fairness policy.
    FairnessPromoted,
    /// Placed lower than its unconstrained position by the fairness policy.
    FairnessDemoted,
    /// Chosen by a differentially private randomized selection (`privacy_randomized`).
    PrivacyRandomized,
}

impl ReasonCode {
    /// Stable snake-case code.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::ProfileMatch => "personalized_match",
            ReasonCode::ItemPrior => "popular_non_personalized",
            ReasonCode::CatalogOrder => "catalog_order_non_personalized",
            ReasonCode::FairnessPromoted => "fairness_promoted",
            ReasonCode::FairnessDemoted => "fairness_demoted",
            ReasonCode::PrivacyRandomized => "privacy_randomized",
        }
    }
}

/// One reason, with its sentence at level `Text` and above.
#[derive(Debug, Clone, PartialEq)]
pub struct Reason {
    /// Machine-readable code.
    pub code: ReasonCode,
    /// Human-readable sentence in English; empty below level `Text`.
    pub text: String,
}

/// Contribution of one embedding dimension to an item's score.
#[derive(Debug, Clone, PartialEq)]
pub struct DimensionContribution {
    /// Dimension index, 0-based.
    pub dimension: u32,
    /// Dimension name from the item table, if it names its dimensions.
    pub name: Option<String>,
    /// `user[dimension] * item[dimension]`; all dimensions' contributions sum to the score.
    pub contribution: f32,
}

/// Layered explanation of one ranked item.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// Reasons, most important first.
    pub reasons: Vec<Reason>,
    /// Dimensions with the largest absolute contribution, largest first (level
    /// `Dimensions`, personalized answers only).
    pub contributions: Vec<DimensionContribution>,
}

/// One item of an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct RankedItem {
    /// Item id from the item table.
    pub id: String,
    /// Position in the answer, 1-based.
    pub rank: u32,
    /// Score where releasable; its meaning is [`RankResponse::score_kind`].
    pub score: Option<f32>,
    /// Position in the unconstrained order of the pool, 1-based.
    pub unconstrained_rank: u32,
    /// The item's group labels, one per name in [`RankResponse::group_attributes`].
    pub group_labels: Vec<u32>,
    /// Explanation, when one was requested.
    pub explanation: Option<Explanation>,
}

/// The fallback an answer's fairness step took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FairnessFallback {
    /// The constraint was applied as requested.
    None,
    /// The constraint could not be fully met; the closest ranking is returned.
    BestEffort,
    /// The constraint was abandoned; the unconstrained top-k is returned.
    Unconstrained,
    /// The answer is not personalized; the constraint was applied to the prior ranking.
    NonPersonalized,
}

/// How a constraint was violated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ViolationKind {
    /// Fewer items of the group in the prefix than the minimum.
    BelowMinCount,
    /// More items of the group in the prefix than the maximum.
    AboveMaxCount,
    /// The group's exposure share is below the minimum share.
    BelowMinExposure,
}

/// One way in which the returned ranking misses its constraint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FairnessViolation {
    /// Kind; fixes the unit of `required` and `actual`.
    pub kind: ViolationKind,
    /// Prefix length (1-based) where it occurs; 0 for the ranking as a whole.
    pub position: u32,
    /// Group label concerned.
    pub group: u32,
    /// Required value.
    pub required: f64,
    /// Actual value.
    pub actual: f64,
    /// Human-readable description.
    pub description: String,
}

/// Exposure of one group in one answer. Exposure of rank r (1-based) is
/// `1 / log2(1 + r)` (Singh and Joachims, KDD 2018).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupExposure {
    /// Group label.
    pub group: u32,
    /// This group's items in the returned ranking.
    pub items_returned: u32,
    /// This group's items in the re-ranking pool.
    pub items_in_pool: u32,
    /// Share of the returned ranking's total exposure that went to this group.
    pub exposure_share: f64,
    /// The same share for the unconstrained top-k of the same pool.
    pub unconstrained_exposure_share: f64,
    /// The constraint's target share, where it has one.
    pub target_share: Option<f64>,
}

/// What the fairness step did to one answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FairnessReport {
    /// Constraint applied (defaults resolved), `none` if none.
    pub constraint: String,
    /// Group attribute used; empty when the item table has no such attribute (the
    /// configured default missing, constraint `none`).
    pub group_attribute: String,
    /// Whether the returned ranking meets the constraint (`none`: always).
    pub satisfied: bool,
    /// Ways the ranking misses the constraint, earliest positions first (at most 32).
    pub violations: Vec<FairnessViolation>,
    /// Fallback taken.
    pub fallback: FairnessFallback,
    /// Why the fallback was taken; empty for `FairnessFallback::None`.
    pub fallback_reason: String,
    /// DCG@k of the answer over DCG@k of the unconstrained top-k of the same pool; gains
    /// are the re-ranker's input scores shifted so the lowest pool score is 0. 1 when both
    /// are 0.
    pub ndcg_vs_unconstrained: f64,
    /// Exposure by group, one entry per group present in the pool, ascending label.
    pub groups: Vec<GroupExposure>,
    /// Amortized scope (constraints acting across requests); empty otherwise.
    pub exposure_scope: String,
    /// Cumulative exposure and merit by group in `exposure_scope` after this answer
    /// (amortized constraints only), ascending label.
    pub amortized: Vec<AmortizedGroupExposure>,
    /// For amortized constraints: after this answer, the largest difference between two
    /// groups' cumulative exposure per unit of cumulative merit (0 is perfectly fair).
    pub amortized_disparity: Option<f64>,
    /// For optimizing constraints (`min-exposure`): utility of the answer against a proven
    /// upper bound on the utility of any ranking meeting the constraint.
    pub optimality: Option<FairnessOptimality>,
    /// The seed of the random generator of a stochastic constraint (`plackett-luce`): the
    /// request's seed, or the one the server drew; sending it back reproduces the answer
    /// on the same pool.
    pub seed: Option<u64>,
    /// Remarks of the re-ranker (infeasibility, adjusted parameters); usually empty.
    pub notes: Vec<String>,
}

/// Cumulative exposure of one group in an amortized scope, including this answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AmortizedGroupExposure {
    /// Group label.
    pub group: u32,
    /// Share of all exposure given in the scope that went to this group.
    pub exposure_share: f64,
    /// Share of all merit (relevance mass of the pools) in the scope of this group.
    pub merit_share: f64,
}

/// How close an optimizing re-ranker's answer is to the best feasible utility. Utility is
/// `sum_r score_r / log2(1 + r)` over the re-ranker's input scores.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FairnessOptimality {
    /// Utility of the answer.
    pub utility: f64,
    /// Proven upper bound on the utility of any ranking meeting the constraint.
    pub upper_bound: f64,
    /// `upper_bound - utility` (>= 0); 0 means the answer is proven optimal.
    pub gap: f64,
    /// Whether the answer was found by exhaustive search (then it is optimal).
    pub exact: bool,
}

/// The privacy outcome of one answer.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivacyReport {
    /// Whether a DP mechanism produced this answer.
    pub dp_applied: bool,
    /// Mechanism applied (`None` when `dp_applied` is false).
    pub mechanism: PrivacyMechanism,
    /// zCDP rho charged for this answer.
    pub rho_charged: f64,
    /// Epsilon of an (epsilon, delta) guarantee for this answer, when DP applied.
    pub epsilon: Option<f64>,
    /// Its delta, when DP applied.
    pub delta: Option<f64>,
    /// The subject's remaining budget after this answer, when DP applied with a ledger.
    pub rho_remaining: Option<f64>,
    /// The subject's budget per period, when a ledger is enabled.
    pub rho_budget: Option<f64>,
    /// When the subject's budget next resets.
    pub budget_resets_at: Option<SystemTime>,
    /// Whether the released scores carry noise.
    pub scores_noised: bool,
    /// Standard deviation of the score noise, when scores are noised.
    pub score_noise_stddev: Option<f64>,
    /// L2 bound the user's embedding was clipped to, when DP applied.
    pub user_norm_bound: Option<f64>,
    /// Whether this is the answer the ledger stored for an earlier request with the same
    /// id (a retry: same order and scores, no new noise, no new charge).
    pub ledger_replay: bool,
}

impl PrivacyReport {
    /// The report of an answer produced without differential privacy.
    pub fn not_applied() -> PrivacyReport {
        PrivacyReport {
            dp_applied: false,
            mechanism: PrivacyMechanism::None,
            rho_charged: 0.0,
            epsilon: None,
            delta: None,
            rho_remaining: None,
            rho_budget: None,
            budget_resets_at: None,
            scores_noised: false,
            score_noise_stddev: None,
            user_norm_bound: None,
            ledger_replay: false,
        }
    }
}

/// Server-side time per stage, in whole microseconds. A stage that did not run is 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageTimings {
    /// From [`Engine::submit`](crate::Engine::submit) to the answer being ready.
    pub total_us: u64,
    /// Waiting for a compute thread and in the whole-catalog batch queue.
    pub queue_us: u64,
    /// Validation of the request fields and policies (including candidate lookup).
    pub validate_us: u64,
    /// User lookup or inline embedding check, consent and pause checks.
    pub resolve_user_us: u64,
    /// Scoring (for batched scans: the wall time of the shared scan).
    pub score_us: u64,
    /// Selecting the re-ranking pool, and starting to load the pool's group labels and
    /// likely answer ids that re-ranking and the answer read next.
    pub select_pool_us: u64,
    /// Fairness re-ranking of the pool to k items.
    pub rerank_us: u64,
    /// Building explanations.
    pub explain_us: u64,
    /// Computing the fairness and privacy reports.
    pub report_us: u64,
    /// Durable bookkeeping before release (privacy ledger, audit); 0 in this version.
    pub ledger_us: u64,
}

/// Whole microseconds of `duration`, saturating.
pub(crate) fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// The answer to one [`RankRequest`](crate::RankRequest).
#[derive(Debug, Clone, PartialEq)]
pub struct RankResponse {
    /// The request's id.
    pub request_id: String,
    /// Ranked items, best first, at most k.
    pub items: Vec<RankedItem>,
    /// Meaning of the items' scores.
    pub score_kind: ScoreKind,
    /// Names of the item group attributes, in table order (labels in
    /// [`RankedItem::group_labels`]).
    pub group_attributes: Vec<String>,
    /// Whether the user's embedding was used.
    pub personalized: bool,
    /// Why not, when not personalized.
    pub non_personalized_reason: Option<NonPersonalizedReason>,
    /// What the fairness step did.
    pub fairness: FairnessReport,
    /// Privacy outcome.
    pub privacy: PrivacyReport,
    /// Explanation level actually applied (`Dimensions` becomes `Text` for answers
    /// without a user embedding).
    pub explain_level: ExplainLevel,
    /// Version of the item table that served the request.
    pub items_table: TableVersion,
    /// Version of the user table read, if one was read.
    pub users_table: Option<TableVersion>,
    /// Number of items scored (candidates found, or the catalog size).
    pub scored_items: usize,
    /// Pool size actually used.
    pub pool_size: usize,
    /// Candidate ids skipped as unknown (`skip_unknown_candidates`), in request order.
    pub skipped_candidate_ids: Vec<String>,
    /// Time per stage.
    pub timings: StageTimings,
}

/// The answer to a [`Engine::rank_batch`](crate::Engine::rank_batch) call.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchResponse {
    /// One result per request, in request order.
    pub results: Vec<Result<RankResponse, crate::EngineError>>,
    /// Time of the whole batch (`score_us` is the wall time of all scoring).
    pub timings: StageTimings,
}
