//! The stages of one request: prepare (validate, resolve user, consent), score, and finish
//! (select pool, re-rank, explain, report). Pure functions over a table snapshot; the
//! [`Engine`](crate::Engine) decides on which thread each runs.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Instant;

use kernels::{ScoredItem, TopKScratch, candidates_topk, par_scan_topk, quantized_candidates_topk};

use crate::config::EngineConfig;
use crate::error::{DeadlineStage, EngineError, NotFoundReason, PreconditionReason};
use crate::explain::{Basis, Explainer, ItemFacts};
use crate::private::{self, LedgerOutcome, Plan, PrivacySetup, StoredRelease};
use crate::request::{ConsentDecision, ExplainLevel, ExplainOptions, RankRequest, UserRef};
use crate::rerank::{FairnessInput, FairnessOutcome, FairnessRuntime, rerank_and_report};
use crate::response::{
    NonPersonalizedReason, PrivacyReport, RankResponse, RankedItem, ScoreKind, StageTimings,
    TableVersion, micros,
};
use crate::tables::{Served, top_ranked};
use crate::validate::{self, ResolvedFairness};

/// The tables and switches one request (or one batch) uses from start to end.
///
/// [`prepare`] takes it by value and moves the table references it keeps into the
/// [`Prepared`] request, so a request touches each shared reference count once.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot<'a> {
    pub items: Arc<Served>,
    pub users: Option<Arc<Served>>,
    pub paused: bool,
    /// Fairness registry, re-ranker cache and amortized state.
    pub fairness: &'a FairnessRuntime,
}

/// A user embedding: inline, or a row of a user table snapshot. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) enum Query {
    Inline(Arc<[f32]>),
    UserRow { users: Arc<Served>, row: usize },
}

impl Query {
    pub fn as_slice(&self) -> &[f32] {
        match self {
            Query::Inline(values) => values,
            Query::UserRow { users, row } => users.data.table.get_row(*row).unwrap_or(&[]),
        }
    }
}

/// Whether and how the answer is personalized.
#[derive(Debug, Clone)]
pub(crate) enum Personalization {
    Personalized(Query),
    NonPersonalized(NonPersonalizedReason),
}

/// What is scored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scope {
    /// The whole item table.
    Catalog,
    /// These rows, in request order.
    Candidates(Vec<u32>),
}

/// A validated request with its user resolved, ready to score.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub request_id: String,
    pub k: usize,
    pub pool: usize,
    pub explain: ExplainOptions,
    pub fairness: ResolvedFairness,
    pub items: Arc<Served>,
    pub users_version: Option<TableVersion>,
    pub personalization: Personalization,
    pub scope: Scope,
    pub skipped: Vec<String>,
    /// The differential privacy plan, when DP applies (personalized answers only).
    pub private: Option<Plan>,
    pub deadline: Option<Instant>,
    pub timings: StageTimings,
    /// When the engine received the request (for `total_us`).
    pub received: Instant,
}

impl Prepared {
    /// The query of a personalized whole-catalog request without DP: such requests go to
    /// the micro-batcher; all others are scored inline (DP requests on the DP workers).
    pub fn catalog_query(&self) -> Option<&Query> {
        if self.private.is_some() {
            return None;
        }
        match (&self.personalization, &self.scope) {
            (Personalization::Personalized(query), Scope::Catalog) => Some(query),
            _ => None,
        }
    }

    /// Fails with `DeadlineExceeded` if the deadline has passed.
    pub fn check_deadline(&self, stage: DeadlineStage) -> Result<(), EngineError> {
        check_deadline(self.deadline, stage)
    }

    fn scored_items(&self) -> usize {
        match &self.scope {
            Scope::Catalog => self.items.data.table.len(),
            Scope::Candidates(rows) => rows.len(),
        }
    }
}

/// Fails with `DeadlineExceeded` if `deadline` has passed.
pub(crate) fn check_deadline(
    deadline: Option<Instant>,
    stage: DeadlineStage,
) -> Result<(), EngineError> {
    match deadline {
        Some(deadline) if Instant::now() >= deadline => {
            Err(EngineError::DeadlineExceeded { stage })
        }
        _ => Ok(()),
    }
}

/// Validates `request` against `snapshot` and resolves its user. `timings.queue_us` is
/// kept; the validate and resolve stages are filled in.
pub(crate) fn prepare(
    config: &EngineConfig,
    privacy: &PrivacySetup,
    snapshot: Snapshot<'_>,
    request: RankRequest,
    mut timings: StageTimings,
    received: Instant,
) -> Result<Prepared, EngineError> {
    let started = Instant::now();
    let items = &snapshot.items.data.table;
    validate::request_id(&request.request_id)?;
    validate::user(&request.user, items.dim(), items.max_row_norm())?;
    let pool = validate::k_and_pool(request.k, request.pool_size, config)?;
    let fairness = validate::fairness(&request.fairness, config, items, snapshot.fairness)?;
    validate::privacy(&request.privacy)?;
    validate::consent(&request.consent)?;
    let explain = validate::explain(request.explain)?;
    let (scope, skipped) = if request.candidate_ids.is_empty() {
        (Scope::Catalog, Vec::new())
    } else {
        // Private requests score every candidate exactly: their f32 rows are what to warm.
        let quantized = match private::is_private(&request, privacy) {
            true => None,
            false => snapshot.items.data.quantized.get(),
        };
        let candidates = validate::candidates(
            &request.candidate_ids,
            request.skip_unknown_candidates,
            items,
            quantized,
            config.max_candidates,
        )?;
        (Scope::Candidates(candidates.rows), candidates.skipped)
    };
    let scored_items = match &scope {
        Scope::Catalog => items.len(),
        Scope::Candidates(rows) => rows.len(),
    };
    let plan = private::plan(&request, privacy, items, pool, scored_items);
    let resolve_started = Instant::now();
    timings.validate_us = micros(resolve_started - started);

    let consented = match request.consent.personalization {
        ConsentDecision::Granted => true,
        ConsentDecision::Denied => false,
        ConsentDecision::Unspecified => !config.require_explicit_consent,
    };
    let mut users_version = None;
    let personalization = if snapshot.paused {
        Personalization::NonPersonalized(NonPersonalizedReason::PersonalizationPaused)
    } else if !consented {
        Personalization::NonPersonalized(NonPersonalizedReason::ConsentDenied)
    } else {
        match request.user {
            UserRef::Inline { embedding, .. } => {
                Personalization::Personalized(Query::Inline(embedding.into()))
            }
            UserRef::Id(id) => {
                let Some(users) = snapshot.users else {
                    return Err(EngineError::FailedPrecondition {
                        field: Some("user_id".to_owned()),
                        reason: PreconditionReason::TableNotLoaded,
                        message: "no user table is loaded; send the embedding inline".to_owned(),
                    });
                };
                match users.data.table.index_of(&id) {
                    Some(row) => {
                        users_version = Some(users.version());
                        Personalization::Personalized(Query::UserRow {
                            users,
                            row: row as usize,
                        })
                    }
                    None if request.fallback_for_unknown_user => {
                        Personalization::NonPersonalized(NonPersonalizedReason::UserNotFound)
                    }
                    None => {
                        return Err(EngineError::NotFound {
                            field: "user_id".to_owned(),
                            reason: NotFoundReason::User,
                            message: format!("user {id:?} is not in the user table"),
                        });
                    }
                }
            }
        }
    };
    // Differential privacy applies to personalized answers only: clip the embedding.
    let (personalization, private) = match personalization {
        Personalization::Personalized(query) => match plan? {
            Some(plan) => {
                let clipped = private::clip(query.as_slice(), plan.user_norm_bound)?;
                (
                    Personalization::Personalized(Query::Inline(clipped)),
                    Some(plan),
                )
            }
            None => (Personalization::Personalized(query), None),
        },
        other => (other, None),
    };
    timings.resolve_user_us = micros(resolve_started.elapsed());
    Ok(Prepared {
        request_id: request.request_id,
        k: request.k,
        pool,
        explain,
        fairness,
        items: snapshot.items,
        users_version,
        personalization,
        scope,
        skipped,
        private,
        deadline: request.deadline,
        timings,
        received,
    })
}

thread_local! {
    /// Per-thread scratch of candidate scoring, reused across requests.
    static CANDIDATE_SCRATCH: RefCell<TopKScratch> = RefCell::new(TopKScratch::new());
}

/// Scores a prepared request on the calling thread (a rayon worker): the candidate kernel,
/// the prior order, or, for a personalized whole-catalog request that is not batched, the
/// parallel scan. Returns the top `pool` items, best first.
pub(crate) fn score_inline(prepared: &Prepared) -> Result<Vec<ScoredItem>, EngineError> {
    let data = &prepared.items.data;
    let pool = prepared.pool;
    if let (Some(plan), Personalization::Personalized(query)) =
        (&prepared.private, &prepared.personalization)
    {
        if prepared.scored_items() == 0 {
            return Ok(Vec::new());
        }
        let rows = match &prepared.scope {
            Scope::Catalog => None,
            Scope::Candidates(rows) => Some(rows.as_slice()),
        };
        return private::select_pool(
            plan,
            data.matrix()?,
            query.as_slice(),
            rows,
            plan.noise_buffer,
        );
    }
    let mut out = Vec::with_capacity(pool);
    match (&prepared.personalization, &prepared.scope) {
        (Personalization::Personalized(query), Scope::Candidates(rows)) => {
            if rows.is_empty() {
                return Ok(out);
            }
            let matrix = data.matrix()?;
            let query = query.as_slice();
            // The int8 copy, once built, prunes; the answer is the f32 kernel's either way.
            let score =
                |scratch: &mut TopKScratch, out: &mut Vec<ScoredItem>| match data.quantized.get() {
                    Some(quantized) => quantized_candidates_topk(
                        matrix, quantized, query, rows, pool, scratch, out,
                    )
                    .map(drop),
                    None => candidates_topk(matrix, query, rows, pool, scratch, out),
                };
            CANDIDATE_SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
                Ok(mut scratch) => score(&mut scratch, &mut out),
                Err(_) => score(&mut TopKScratch::new(), &mut out),
            })?;
        }
        (Personalization::Personalized(query), Scope::Catalog) => {
            if data.table.is_empty() {
                return Ok(out);
            }
            par_scan_topk(data.matrix()?, query.as_slice(), pool, &mut out)?;
        }
        (Personalization::NonPersonalized(_), Scope::Catalog) => {
            out.extend_from_slice(&data.prior_order[..pool.min(data.prior_order.len())]);
        }
        (Personalization::NonPersonalized(_), Scope::Candidates(rows)) => {
            match data.table.prior() {
                Some(prior) => out.extend(rows.iter().map(|&row| {
                    ScoredItem::new(row, prior.get(row as usize).copied().unwrap_or(0.0))
                })),
                // Catalog order: the row index is the rank key (equal scores, index ties).
                None => out.extend(rows.iter().map(|&row| ScoredItem::new(row, 0.0))),
            }
            top_ranked(&mut out, pool);
        }
    }
    Ok(out)
}

/// The fairness stage: re-ranks the pool (best first) to at most `k` items under the
/// request's policy (positions into the pool, best first) and reports on the answer.
fn rerank(
    fairness: &ResolvedFairness,
    items: &Served,
    personalization: &Personalization,
    pool: &[ScoredItem],
    k: usize,
    defer_state_update: bool,
) -> Result<FairnessOutcome, EngineError> {
    let non_personalized = match personalization {
        Personalization::NonPersonalized(reason) => {
            Some(format!("not personalized because {}", reason.describe()))
        }
        Personalization::Personalized(_) => None,
    };
    let groups = fairness.group_attribute.as_ref().and_then(|(name, index)| {
        items
            .data
            .table
            .get_group_labels(*index)
            .map(|labels| (name.as_str(), labels))
    });
    rerank_and_report(&FairnessInput {
        policy: &fairness.run,
        groups,
        pool,
        k,
        exposure_scope: &fairness.exposure_scope,
        non_personalized: non_personalized.as_deref(),
        defer_state_update,
    })
}

/// Turns the scored pool into the answer: select the pool, re-rank and report (the
/// fairness stage), explain; under DP, charge the ledger before anything is released.
pub(crate) fn finish(
    mut prepared: Prepared,
    mut scored: Vec<ScoredItem>,
) -> Result<RankResponse, EngineError> {
    prepared.check_deadline(DeadlineStage::AfterScoring)?;
    let scored_items = prepared.scored_items();
    let timings = &mut prepared.timings;

    // Select: the kernels return the top `pool` (batched scans: the top of the largest
    // pool in the batch), best first.
    let stage = Instant::now();
    scored.truncate(prepared.pool);
    let pool = scored;
    // What re-ranking and the answer read from the table next: start loading it now.
    let group_attribute = prepared.fairness.group_attribute.as_ref();
    crate::warm::warm_pool(
        &prepared.items.data.table,
        group_attribute.map(|(_, index)| *index),
        &pool,
        prepared.k,
    );
    let now = Instant::now();
    timings.select_pool_us = micros(now - stage);

    // Re-rank and report: positions into the pool, best first. A DP answer may still be
    // discarded (replayed, refused ledger charge, too large to deliver), so its amortized
    // state update waits for the charge: only a released answer counts.
    let outcome = rerank(
        &prepared.fairness,
        &prepared.items,
        &prepared.personalization,
        &pool,
        prepared.k,
        prepared.private.is_some(),
    )?;
    timings.rerank_us = outcome.rerank_us;
    timings.report_us = outcome.report_us;
    let released = released_items(&pool, &outcome.answer)?;
    match prepared.private.take() {
        None => respond(
            &mut prepared,
            &released,
            pool.len(),
            scored_items,
            None,
            outcome.report,
        ),
        Some(plan) => release_private(prepared, &plan, &pool, outcome, &released, scored_items),
    }
}

/// The answer's items with their positions in the pool.
fn released_items(
    pool: &[ScoredItem],
    answer: &[usize],
) -> Result<Vec<(ScoredItem, usize)>, EngineError> {
    let mut released = Vec::with_capacity(answer.len());
    for &pool_position in answer {
        let Some(scored) = pool.get(pool_position) else {
            return Err(EngineError::internal(
                "re-ranker returned a position outside the pool",
            ));
        };
        released.push((*scored, pool_position));
    }
    Ok(released)
}

/// A DP answer: builds the fresh release and the whole answer, refuses it (uncharged) if the
/// caller cannot deliver it, then charges the ledger; only then may it leave the engine.
///
/// The size is decided before the charge, so budget is never spent on an answer that is
/// never released; the noisy scores are drawn and the answer built first, but nothing
/// leaves the engine until the ledger has durably charged it. Should the ledger already
/// hold an answer for this request id (a retry), the stored answer is released instead,
/// without a charge, as the charge would replay it.
fn release_private(
    mut prepared: Prepared,
    plan: &Plan,
    pool: &[ScoredItem],
    outcome: FairnessOutcome,
    released: &[(ScoredItem, usize)],
    scored_items: usize,
) -> Result<RankResponse, EngineError> {
    let stage = Instant::now();
    let record = fresh_release(&prepared, plan, pool, &outcome.answer)?;
    let mut ledger_us = micros(stage.elapsed());
    let fresh = Release {
        record: &record,
        spend: None,
        replay: false,
    };
    let mut response = respond(
        &mut prepared,
        released,
        pool.len(),
        scored_items,
        Some(fresh),
        outcome.report,
    )?;
    // Free (nothing was selected): released without a charge.
    let charged = if plan.mechanism.is_none() || record.tail.rho <= 0.0 {
        Charged::Fresh(None)
    } else {
        let stage = Instant::now();
        // Deliverable? Decided before the charge; a stored answer for the id is a replay.
        let charged = match private::check_deliverable(plan, &response) {
            Ok(()) => charge(plan, &response.request_id, &record, &response.fairness)?,
            Err(too_large) => match private::stored_answer(plan, &response.request_id)? {
                Some(answer) => Charged::Replay(Box::new(StoredRelease::decode(&answer)?)),
                None => return Err(too_large),
            },
        };
        ledger_us += micros(stage.elapsed());
        charged
    };
    match charged {
        Charged::Fresh(spend) => {
            if let Some(update) = outcome.pending_state {
                update.commit()?;
            }
            response.privacy = record.report(spend, false);
            response.timings.ledger_us = ledger_us;
            response.timings.total_us = micros(prepared.received.elapsed());
            Ok(response)
        }
        Charged::Replay(stored) => {
            // The answer released first, built again from its record.
            prepared.request_id = std::mem::take(&mut response.request_id);
            prepared.skipped = std::mem::take(&mut response.skipped_candidate_ids);
            prepared.timings.ledger_us = ledger_us;
            let (released, pool_size) = restore_release(&prepared, plan, &stored)?;
            // The report of the answer released first, not of this attempt's pool.
            let fairness = match &stored.tail.fairness {
                Some(report) => report.clone(),
                None => response.fairness,
            };
            let replay = Release {
                record: &stored,
                spend: None,
                replay: true,
            };
            respond(
                &mut prepared,
                &released,
                pool_size,
                scored_items,
                Some(replay),
                fairness,
            )
        }
        Charged::Exhausted => {
            prepared.request_id = std::mem::take(&mut response.request_id);
            prepared.skipped = std::mem::take(&mut response.skipped_candidate_ids);
            prepared.timings.ledger_us = ledger_us;
            prepared.personalization =
                Personalization::NonPersonalized(NonPersonalizedReason::PrivacyBudgetExhausted);
            prepared.users_version = None;
            let scored = score_inline(&prepared)?;
            finish(prepared, scored)
        }
    }
}

/// A DP release an answer is built from: its record, the subject's spend after the charge
/// (none before it, for a free release and for a replay), whether it is a replay.
#[derive(Clone, Copy)]
struct Release<'a> {
    record: &'a StoredRelease,
    spend: Option<private::Spend>,
    replay: bool,
}

/// Explains and builds the answer of `released` (items with their pool positions, best
/// first) from a pool of `pool_size`. Takes the request id and the skipped candidate ids out
/// of `prepared`; the timings to here (explain and total) are the answer's.
fn respond(
    prepared: &mut Prepared,
    released: &[(ScoredItem, usize)],
    pool_size: usize,
    scored_items: usize,
    release: Option<Release<'_>>,
    fairness: crate::response::FairnessReport,
) -> Result<RankResponse, EngineError> {
    let stage = Instant::now();
    let data = &prepared.items.data;
    let table = &data.table;
    let has_prior = table.prior().is_some();
    let (basis, score_kind) = match &prepared.personalization {
        Personalization::Personalized(_) if release.is_some() => (
            Basis::Private { picks: pool_size },
            match &release {
                Some(release) if release.record.tail.scores.is_some() => ScoreKind::NoisyDotProduct,
                _ => ScoreKind::Withheld,
            },
        ),
        Personalization::Personalized(query) => (
            Basis::Personalized {
                user: query.as_slice(),
            },
            ScoreKind::DotProduct,
        ),
        Personalization::NonPersonalized(reason) => (
            Basis::NonPersonalized {
                reason: *reason,
                has_prior,
            },
            if has_prior {
                ScoreKind::Prior
            } else {
                ScoreKind::Withheld
            },
        ),
    };
    let explain_level = match basis {
        Basis::NonPersonalized { .. } | Basis::Private { .. } => {
            prepared.explain.level.min(ExplainLevel::Text)
        }
        Basis::Personalized { .. } => prepared.explain.level,
    };
    let explainer = Explainer {
        level: explain_level,
        max_dimensions: prepared.explain.max_dimensions,
        dim_names: table.dim_names(),
        scored_items,
        basis,
    };
    let attributes = table.group_attribute_names().len();
    let mut items = Vec::with_capacity(released.len());
    for (position, &(scored, pool_position)) in released.iter().enumerate() {
        let row = scored.index as usize;
        let (Some(id), Some(embedding)) = (table.get_id(row), table.get_row(row)) else {
            return Err(EngineError::internal(format!(
                "scored row {row} is not in the item table"
            )));
        };
        let rank = position as u32 + 1;
        let unconstrained_rank = pool_position as u32 + 1;
        let explanation = explainer.explain(&ItemFacts {
            rank,
            unconstrained_rank,
            score: scored.score,
            item: embedding,
        });
        let group_labels = (0..attributes)
            .map(|attribute| {
                table
                    .get_group_labels(attribute)
                    .and_then(|labels| labels.get(row).copied())
                    .unwrap_or_default()
            })
            .collect();
        let score = match &release {
            Some(release) => release
                .record
                .tail
                .scores
                .as_ref()
                .and_then(|scores| scores.get(position).copied()),
            None => (score_kind != ScoreKind::Withheld).then_some(scored.score),
        };
        items.push(RankedItem {
            id: id.to_owned(),
            rank,
            score,
            unconstrained_rank,
            group_labels,
            explanation,
        });
    }
    let now = Instant::now();
    let timings = &mut prepared.timings;
    timings.explain_us = micros(now - stage);

    let personalized = matches!(prepared.personalization, Personalization::Personalized(_));
    let non_personalized_reason = match &prepared.personalization {
        Personalization::NonPersonalized(reason) => Some(*reason),
        Personalization::Personalized(_) => None,
    };
    timings.total_us = micros(now - prepared.received);

    Ok(RankResponse {
        request_id: std::mem::take(&mut prepared.request_id),
        items,
        score_kind,
        group_attributes: table.group_attribute_names().to_vec(),
        personalized,
        non_personalized_reason,
        fairness,
        privacy: match release {
            Some(release) => release.record.report(release.spend, release.replay),
            None => PrivacyReport::not_applied(),
        },
        explain_level,
        items_table: prepared.items.version(),
        users_table: prepared.users_version,
        scored_items,
        pool_size,
        skipped_candidate_ids: std::mem::take(&mut prepared.skipped),
        timings: prepared.timings,
    })
}

/// The ledger's answer to a DP release.
enum Charged {
    /// Charged (or free: nothing was selected, `None`); the fresh record may be released.
    Fresh(Option<private::Spend>),
    /// The request id was charged before: release its stored record.
    Replay(Box<StoredRelease>),
    /// The budget is exhausted and the policy asks for a non-personalized answer.
    Exhausted,
}

/// The record of a fresh DP release: the answer's ids and, if asked for, noisy scores. No
/// charge yet: see [`charge`].
fn fresh_release(
    prepared: &Prepared,
    plan: &Plan,
    pool: &[ScoredItem],
    answer: &[usize],
) -> Result<StoredRelease, EngineError> {
    let table = &prepared.items.data.table;
    let Personalization::Personalized(query) = &prepared.personalization else {
        return Err(EngineError::internal("a DP plan without a user embedding"));
    };
    // The record keeps the answer's ids only (a replay needs no other pooled id).
    let mut answer_ids = Vec::with_capacity(answer.len());
    for &position in answer {
        let id = pool
            .get(position)
            .and_then(|item| table.get_id(item.index as usize))
            .ok_or_else(|| {
                EngineError::internal(format!("answer position {position} is not in the pool"))
            })?;
        answer_ids.push((position as u32, id.to_owned()));
    }
    let scores = if plan.score_count > 0 {
        let exact: Vec<f32> = answer
            .iter()
            .filter_map(|&position| pool.get(position))
            .filter_map(|item| table.get_row(item.index as usize))
            .map(|row| kernels::dot(row, query.as_slice()))
            .collect();
        private::noisy_scores(plan, &exact, plan.noise_buffer)?
    } else {
        None
    };
    private::release_record(plan, pool.len(), answer_ids, scores)
}

/// Charges the ledger for `record` (the fresh release of `request_id`, whose answer's
/// fairness report is `fairness`).
fn charge(
    plan: &Plan,
    request_id: &str,
    record: &StoredRelease,
    fairness: &crate::response::FairnessReport,
) -> Result<Charged, EngineError> {
    match private::charge(plan.ledger.as_ref(), plan, request_id, record, fairness)? {
        LedgerOutcome::Charged(spend) => Ok(Charged::Fresh(Some(spend))),
        LedgerOutcome::Replayed { answer } => {
            Ok(Charged::Replay(Box::new(StoredRelease::decode(&answer)?)))
        }
        LedgerOutcome::Exceeded(spend) => match plan.on_exhausted {
            private::ExhaustedPolicy::Reject => {
                Err(private::exhausted_error(plan, record.tail.rho, spend))
            }
            private::ExhaustedPolicy::NonPersonalized => Ok(Charged::Exhausted),
        },
    }
}

/// The answer of a stored release mapped onto the serving table: each item's row with its
/// pseudo-score from rank (as at release) and its position in the pool; and the pool's size.
fn restore_release(
    prepared: &Prepared,
    plan: &Plan,
    record: &StoredRelease,
) -> Result<(Vec<(ScoredItem, usize)>, usize), EngineError> {
    if record.fingerprint != plan.fingerprint {
        return Err(EngineError::FailedPrecondition {
            field: Some("request_id".to_owned()),
            reason: PreconditionReason::RequestIdReused,
            message: format!(
                "request id {:?} was already charged for a request with different content; use a \
                 fresh request id for a new request",
                prepared.request_id
            ),
        });
    }
    let table = &prepared.items.data.table;
    let picks = record.picks as usize;
    let mut released = Vec::with_capacity(record.answer.len());
    for (position, id) in &record.answer {
        let position = *position as usize;
        if position >= picks {
            continue;
        }
        let row = table
            .index_of(id)
            .ok_or_else(|| EngineError::LedgerUnavailable {
                message: format!(
                    "the stored answer of request {:?} names item {id:?}, which the serving item \
                 table no longer has",
                    prepared.request_id
                ),
            })?;
        released.push((ScoredItem::new(row, (picks - position) as f32), position));
    }
    Ok((released, picks))
}
