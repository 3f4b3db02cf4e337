//! The fairness stage of the request path: re-rankers built from request policies through
//! the `fairness` registry (and cached), the re-ranking of the pool with a per-worker
//! seeded RNG and reused buffers, amortized state kept per exposure scope, and the
//! per-answer fairness report (`fairness::answer_report`).

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use fairness::{
    AmortizedState, AnswerReport, Candidate, ConstraintInfo, FairnessError, Measure, Registry,
    RerankOutput, RerankReport, Reranker, answer_report,
};
use kernels::ScoredItem;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

use crate::config::EngineConfig;
use crate::error::{EngineError, InvalidReason, PreconditionReason};
use crate::exposure_state::{ExposureStateStore, InMemoryExposureStore};
use crate::request::{InfeasibleAction, ParamValue};
use crate::response::{
    AmortizedGroupExposure, FairnessFallback, FairnessOptimality, FairnessReport,
    FairnessViolation, GroupExposure, ViolationKind, micros,
};

/// Pieces of the fairness stage an embedder may replace: the constraint registry (to add
/// research constraints) and the store of amortized state (to make it durable).
#[derive(Debug)]
pub struct FairnessSetup {
    /// Constraints by name; [`Registry::with_builtins`] by default.
    pub registry: Registry,
    /// Amortized (FairCo) state per exposure scope; in memory by default (bounded by
    /// [`EngineConfig::max_exposure_scopes`]).
    pub store: Arc<dyn ExposureStateStore>,
}

impl FairnessSetup {
    /// The built-in constraints and an in-memory state store sized by `config`.
    pub fn in_memory(config: &EngineConfig) -> FairnessSetup {
        FairnessSetup {
            registry: Registry::with_builtins(),
            store: Arc::new(InMemoryExposureStore::new(config.max_exposure_scopes)),
        }
    }
}

/// A re-ranker built from one policy, with what the report needs from its configuration.
#[derive(Debug)]
pub(crate) struct BuiltReranker {
    /// The re-ranker.
    pub reranker: Box<dyn Reranker>,
    /// Target share per group label, ascending label: the `targets` of det-* and
    /// min-exposure, FA*IR's `p` for its protected group.
    pub targets: Vec<(u32, f64)>,
}

impl BuiltReranker {
    fn new(reranker: Box<dyn Reranker>) -> BuiltReranker {
        let config = reranker.config();
        let mut targets: Vec<(u32, f64)> = match config.get("targets") {
            Some(Value::Object(shares)) => shares
                .iter()
                .filter_map(|(label, share)| Some((label.parse().ok()?, share.as_f64()?)))
                .collect(),
            _ => match (
                config.get("protected").and_then(Value::as_u64),
                config.get("p").and_then(Value::as_f64),
            ) {
                (Some(protected), Some(p)) => u32::try_from(protected)
                    .map(|protected| vec![(protected, p)])
                    .unwrap_or_default(),
                _ => Vec::new(),
            },
        };
        targets.sort_by_key(|&(label, _)| label);
        BuiltReranker { reranker, targets }
    }

    /// The registry name of the constraint.
    pub fn name(&self) -> &str {
        self.reranker.name()
    }

    fn target(&self, label: u32) -> Option<f64> {
        self.targets
            .binary_search_by_key(&label, |&(target, _)| target)
            .ok()
            .map(|slot| self.targets[slot].1)
    }
}

/// Built re-rankers by canonical specification, least recently used evicted first.
#[derive(Debug)]
struct RerankerCache {
    capacity: usize,
    clock: u64,
    entries: HashMap<String, (Arc<BuiltReranker>, u64)>,
}

impl RerankerCache {
    fn get(&mut self, key: &str) -> Option<Arc<BuiltReranker>> {
        self.clock += 1;
        let now = self.clock;
        self.entries.get_mut(key).map(|(built, used)| {
            *used = now;
            Arc::clone(built)
        })
    }

    fn insert(&mut self, key: String, built: Arc<BuiltReranker>) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
        self.clock += 1;
        self.entries.insert(key, (built, self.clock));
    }
}

/// The engine's fairness machinery: registry, re-ranker cache, default policy, state store.
#[derive(Debug)]
pub(crate) struct FairnessRuntime {
    registry: Registry,
    cache: Mutex<RerankerCache>,
    store: Arc<dyn ExposureStateStore>,
    default_name: String,
    default_policy: Arc<BuiltReranker>,
}

impl FairnessRuntime {
    /// Builds the configured default policy; a bad one is an `InvalidConfig` error.
    pub fn new(
        config: &EngineConfig,
        setup: FairnessSetup,
    ) -> Result<FairnessRuntime, EngineError> {
        let default_params: Map<String, Value> = config
            .default_fairness_params
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        let default_policy = setup
            .registry
            .build_named(&config.default_fairness_constraint, &default_params)
            .map_err(|error| {
                let field = match error {
                    FairnessError::UnknownConstraint { .. } => "default_fairness_constraint",
                    _ => "default_fairness_params",
                };
                EngineError::InvalidConfig {
                    field,
                    message: error.to_string(),
                }
            })?;
        Ok(FairnessRuntime {
            registry: setup.registry,
            cache: Mutex::new(RerankerCache {
                capacity: config.reranker_cache_capacity,
                clock: 0,
                entries: HashMap::new(),
            }),
            store: setup.store,
            default_name: config.default_fairness_constraint.clone(),
            default_policy: Arc::new(BuiltReranker::new(default_policy)),
        })
    }

    /// The store of amortized state.
    pub fn store(&self) -> &Arc<dyn ExposureStateStore> {
        &self.store
    }

    /// Documentation of every registered constraint, by name.
    pub fn constraints(&self) -> Vec<ConstraintInfo> {
        self.registry.constraints().cloned().collect()
    }

    /// The re-ranker of a request's policy: the configured default for an empty
    /// `constraint` without parameters, otherwise built through the registry (an empty
    /// `constraint` with parameters builds the default constraint with those parameters)
    /// and cached by canonical specification.
    pub fn resolve(
        &self,
        constraint: &str,
        params: &BTreeMap<String, ParamValue>,
    ) -> Result<Arc<BuiltReranker>, EngineError> {
        if constraint.is_empty() && params.is_empty() {
            return Ok(Arc::clone(&self.default_policy));
        }
        let name = if constraint.is_empty() {
            self.default_name.as_str()
        } else {
            constraint
        };
        let spec: Map<String, Value> = params
            .iter()
            .map(|(key, value)| (key.clone(), json_value(value)))
            .collect();
        let mut key = name.trim().to_ascii_lowercase();
        key.push('\u{1f}');
        key.push_str(&Value::Object(spec.clone()).to_string());
        if let Some(built) = self.lock_cache().get(&key) {
            return Ok(built);
        }
        let reranker = self
            .registry
            .build_named(name, &spec)
            .map_err(policy_error)?;
        let built = Arc::new(BuiltReranker::new(reranker));
        self.lock_cache().insert(key, Arc::clone(&built));
        Ok(built)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, RerankerCache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A request parameter as JSON; integral numbers become JSON integers (group labels such as
/// FA*IR's `protected` must be integers), non-finite numbers become null.
fn json_value(value: &ParamValue) -> Value {
    match value {
        ParamValue::Null => Value::Null,
        ParamValue::Bool(flag) => Value::Bool(*flag),
        ParamValue::Number(number) => {
            // Integers up to 2^53 are exact in f64.
            const EXACT: f64 = 9_007_199_254_740_992.0;
            if number.fract() == 0.0 && number.abs() <= EXACT {
                if *number >= 0.0 {
                    Value::from(*number as u64)
                } else {
                    Value::from(*number as i64)
                }
            } else {
                serde_json::Number::from_f64(*number)
                    .map(Value::Number)
                    .unwrap_or(Value::Null)
            }
        }
        ParamValue::String(text) => Value::String(text.clone()),
        ParamValue::List(items) => Value::Array(items.iter().map(json_value).collect()),
        ParamValue::Map(map) => Value::Object(
            map.iter()
                .map(|(key, value)| (key.clone(), json_value(value)))
                .collect(),
        ),
    }
}

/// A registry refusal as a request error naming `fairness.constraint` or
/// `fairness.params.<name>`.
fn policy_error(error: FairnessError) -> EngineError {
    let message = error.to_string();
    match error {
        FairnessError::UnknownConstraint { .. } => EngineError::InvalidArgument {
            field: "fairness.constraint".to_owned(),
            reason: InvalidReason::UnknownConstraint,
            message,
        },
        FairnessError::MissingParameter { parameter, .. }
        | FairnessError::InvalidParameter { parameter, .. }
        | FairnessError::UnknownParameter { parameter, .. } => EngineError::InvalidArgument {
            field: format!("fairness.params.{parameter}"),
            reason: InvalidReason::InvalidConstraintParams,
            message,
        },
        _ => EngineError::InvalidArgument {
            field: "fairness.params".to_owned(),
            reason: InvalidReason::InvalidConstraintParams,
            message,
        },
    }
}

/// A re-ranking failure on a validated request.
fn rerank_error(error: FairnessError) -> EngineError {
    match error {
        FairnessError::KTooLarge { .. } => EngineError::limit("k", error.to_string()),
        other => EngineError::internal(format!("fairness re-ranking failed: {other}")),
    }
}

/// The fairness policy of one request, resolved.
#[derive(Debug, Clone)]
pub(crate) struct PolicyRun {
    /// The re-ranker.
    pub built: Arc<BuiltReranker>,
    /// What to do when the constraint cannot be met (never `Unspecified`).
    pub on_infeasible: InfeasibleAction,
    /// Seed of a stochastic re-ranker, if the request carries one.
    pub seed: Option<u64>,
    /// Store key of the amortized scope (amortized constraints only).
    pub scope_key: Option<String>,
    /// Where amortized state lives.
    pub store: Arc<dyn ExposureStateStore>,
}

/// What the fairness stage works on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FairnessInput<'a> {
    /// The resolved policy.
    pub policy: &'a PolicyRun,
    /// Name of the group attribute and its labels (one per item table row), if used.
    pub groups: Option<(&'a str, &'a [u32])>,
    /// The pool, best first.
    pub pool: &'a [ScoredItem],
    /// Requested answer length.
    pub k: usize,
    /// Amortized scope name (as the request gave it).
    pub exposure_scope: &'a str,
    /// For a non-personalized answer: why (the fallback reason when the constraint holds).
    pub non_personalized: Option<&'a str>,
}

/// The answer (positions into the pool, best first) and its fairness report.
#[derive(Debug)]
pub(crate) struct FairnessOutcome {
    /// Pool positions of the answer, best first.
    pub answer: Vec<usize>,
    /// The report.
    pub report: FairnessReport,
    /// Time spent re-ranking (including the amortized state update).
    pub rerank_us: u64,
    /// Time spent on the report.
    pub report_us: u64,
}

/// Per-thread buffers of the fairness stage, reused across requests.
#[derive(Debug, Default)]
struct Workspace {
    candidates: Vec<Candidate>,
    shifted: Vec<Candidate>,
    output: RerankOutput,
    answer_report: AnswerReport,
    unconstrained_report: AnswerReport,
    prefix: Vec<usize>,
    pool_groups: Vec<(u32, u32)>,
    sorted_labels: Vec<u32>,
    seeds: Option<ChaCha8Rng>,
}

thread_local! {
    static WORKSPACE: RefCell<Workspace> = RefCell::new(Workspace::default());
}

/// Distinct groups counted by insertion into a sorted list before switching to a sort.
const FEW_GROUPS: usize = 64;

/// How the answer relates to the constraint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// The re-ranker's answer meets the constraint.
    Constrained,
    /// The re-ranker's answer is the closest it could build.
    BestEffort,
    /// The constraint could not be met; the unconstrained top-k is returned.
    Unconstrained,
}

fn decide(
    report: &RerankReport,
    action: InfeasibleAction,
    constraint: &str,
) -> Result<Decision, EngineError> {
    if report.satisfied && !report.fallback {
        return Ok(Decision::Constrained);
    }
    match action {
        InfeasibleAction::Unconstrained => Ok(Decision::Unconstrained),
        InfeasibleAction::Reject => Err(EngineError::FailedPrecondition {
            field: Some("fairness.constraint".to_owned()),
            reason: PreconditionReason::FairnessInfeasible,
            message: format!(
                "constraint `{constraint}` cannot be met on this pool: {}",
                describe(report)
            ),
        }),
        InfeasibleAction::BestEffort | InfeasibleAction::Unspecified => Ok(Decision::BestEffort),
    }
}

/// Why a constraint was not met, in English.
fn describe(report: &RerankReport) -> String {
    let mut parts: Vec<String> = report.notes.clone();
    if let Some(violation) = &report.violation {
        parts.push(violation_text(violation));
    }
    if parts.is_empty() {
        "the re-ranker relaxed the constraint".to_owned()
    } else {
        parts.join("; ")
    }
}

fn violation_text(violation: &fairness::Violation) -> String {
    match violation.measure {
        Measure::Count => format!(
            "the top {} hold {} items of group {}, at least {} are required",
            violation.prefix, violation.actual, violation.group, violation.required
        ),
        Measure::ExposureShare => format!(
            "group {} receives {:.4} of the exposure of the top {}, at least {:.4} is required",
            violation.group, violation.actual, violation.prefix, violation.required
        ),
    }
}

/// A fresh seed from this worker's ChaCha generator (seeded from the OS on first use).
fn worker_seed(seeds: &mut Option<ChaCha8Rng>) -> u64 {
    seeds
        .get_or_insert_with(|| {
            ChaCha8Rng::try_from_os_rng().unwrap_or_else(|_| {
                // No OS entropy: the process-random hasher keys are the next best source.
                ChaCha8Rng::seed_from_u64(RandomState::new().hash_one(std::thread::current().id()))
            })
        })
        .next_u64()
}

/// Re-ranks the pool to at most `k` items under the policy and reports on the answer.
pub(crate) fn rerank_and_report(input: &FairnessInput<'_>) -> Result<FairnessOutcome, EngineError> {
    WORKSPACE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut workspace) => run(&mut workspace, input),
        Err(_) => run(&mut Workspace::default(), input),
    })
}

fn run(
    workspace: &mut Workspace,
    input: &FairnessInput<'_>,
) -> Result<FairnessOutcome, EngineError> {
    let started = Instant::now();
    let policy = input.policy;
    let reranker = &*policy.built.reranker;
    let Workspace {
        candidates,
        shifted,
        output,
        answer_report: answer_summary,
        unconstrained_report: unconstrained_summary,
        prefix,
        pool_groups,
        sorted_labels,
        seeds,
    } = workspace;

    candidates.clear();
    match input.groups {
        Some((_, labels)) => candidates.extend(input.pool.iter().map(|item| {
            let group = labels.get(item.index as usize).copied().unwrap_or_default();
            Candidate::new(item.index, item.score, group)
        })),
        None => candidates.extend(
            input
                .pool
                .iter()
                .map(|item| Candidate::new(item.index, item.score, 0)),
        ),
    }

    let seed = reranker
        .is_stochastic()
        .then(|| policy.seed.unwrap_or_else(|| worker_seed(seeds)));
    let mut rng = ChaCha8Rng::seed_from_u64(seed.unwrap_or(0));
    let k = input.k;
    let constraint = reranker.name();
    let mut amortized = Vec::new();
    let mut disparity_after = None;
    let decision = match (&policy.scope_key, reranker.is_amortized()) {
        (Some(scope_key), true) => {
            let mut decision = Decision::Constrained;
            let candidates = &*candidates;
            policy
                .store
                .update(scope_key, &mut |state: &mut AmortizedState| {
                    reranker
                        .rerank(candidates, k, Some(state), &mut rng, output)
                        .map_err(rerank_error)?;
                    decision = decide(&output.report, policy.on_infeasible, constraint)?;
                    let changed = decision != Decision::Unconstrained;
                    if changed && let Some(next) = output.state.as_mut() {
                        // The old totals stay in the output buffer for reuse.
                        std::mem::swap(state, next);
                    }
                    amortized = amortized_shares(state);
                    disparity_after = fairness::amortized_disparity(state);
                    Ok(changed)
                })?;
            decision
        }
        _ => {
            reranker
                .rerank(candidates, k, None, &mut rng, output)
                .map_err(rerank_error)?;
            decide(&output.report, policy.on_infeasible, constraint)?
        }
    };
    let unconstrained_len = k.min(candidates.len());
    let answer: Vec<usize> = match decision {
        Decision::Unconstrained => (0..unconstrained_len).collect(),
        Decision::Constrained | Decision::BestEffort => output.order.clone(),
    };
    let report_started = Instant::now();
    let rerank_us = micros(report_started - started);

    // Gains: the pool's scores shifted so the lowest is 0 (the proto's NDCG definition);
    // only the prefix the answer and the unconstrained top-k reach is needed.
    let deepest = answer
        .iter()
        .map(|&position| position + 1)
        .max()
        .unwrap_or(0)
        .max(unconstrained_len)
        .min(candidates.len());
    let lowest = candidates.last().map_or(0.0, |candidate| candidate.score);
    shifted.clear();
    shifted.extend(candidates[..deepest].iter().map(|candidate| Candidate {
        score: (candidate.score - lowest).clamp(0.0, f32::MAX),
        ..*candidate
    }));
    let summary_error =
        |error: FairnessError| EngineError::internal(format!("fairness report failed: {error}"));
    answer_report(shifted, &answer, &output.report, answer_summary).map_err(summary_error)?;
    prefix.clear();
    prefix.extend(0..unconstrained_len);
    answer_report(shifted, prefix, &output.report, unconstrained_summary).map_err(summary_error)?;

    let groups = match input.groups {
        Some(_) => {
            count_groups(candidates, pool_groups, sorted_labels);
            pool_groups
                .iter()
                .map(|&(label, in_pool)| {
                    let answered = answer_summary
                        .groups
                        .binary_search_by_key(&label, |share| share.group)
                        .ok()
                        .map(|slot| answer_summary.groups[slot]);
                    let unconstrained = unconstrained_summary
                        .groups
                        .binary_search_by_key(&label, |share| share.group)
                        .ok()
                        .map(|slot| unconstrained_summary.groups[slot].share);
                    GroupExposure {
                        group: label,
                        items_returned: answered.map_or(0, |share| share.items as u32),
                        items_in_pool: in_pool,
                        exposure_share: answered.map_or(0.0, |share| share.share),
                        unconstrained_exposure_share: unconstrained.unwrap_or(0.0),
                        target_share: policy.built.target(label),
                    }
                })
                .collect()
        }
        None => Vec::new(),
    };

    let rerank_report = &output.report;
    let (satisfied, fallback, fallback_reason) = match decision {
        Decision::Constrained => match input.non_personalized {
            Some(reason) => (true, FairnessFallback::NonPersonalized, reason.to_owned()),
            None => (true, FairnessFallback::None, String::new()),
        },
        Decision::BestEffort => (
            false,
            FairnessFallback::BestEffort,
            format!(
                "constraint `{constraint}` cannot be fully met on this pool: {}",
                describe(rerank_report)
            ),
        ),
        Decision::Unconstrained => (
            false,
            FairnessFallback::Unconstrained,
            format!(
                "constraint `{constraint}` cannot be met on this pool ({}); the unconstrained top-k is returned",
                describe(rerank_report)
            ),
        ),
    };
    let violations = match (decision, &rerank_report.violation) {
        (Decision::BestEffort, Some(violation)) => vec![FairnessViolation {
            kind: match violation.measure {
                Measure::Count => ViolationKind::BelowMinCount,
                Measure::ExposureShare => ViolationKind::BelowMinExposure,
            },
            position: u32::try_from(violation.prefix).unwrap_or(u32::MAX),
            group: violation.group,
            required: violation.required,
            actual: violation.actual,
            description: violation_text(violation),
        }],
        _ => Vec::new(),
    };
    let is_amortized = reranker.is_amortized();
    let report = FairnessReport {
        constraint: constraint.to_owned(),
        group_attribute: input
            .groups
            .map(|(name, _)| name.to_owned())
            .unwrap_or_default(),
        satisfied,
        violations,
        fallback,
        fallback_reason,
        ndcg_vs_unconstrained: answer_summary.ndcg,
        groups,
        exposure_scope: if is_amortized {
            input.exposure_scope.to_owned()
        } else {
            String::new()
        },
        amortized,
        amortized_disparity: if is_amortized {
            disparity_after.or(rerank_report.amortized_disparity)
        } else {
            None
        },
        optimality: rerank_report
            .optimality
            .map(|optimality| FairnessOptimality {
                utility: optimality.utility,
                upper_bound: optimality.upper_bound,
                gap: optimality.gap,
                exact: optimality.exact,
            }),
        seed,
        notes: rerank_report.notes.clone(),
    };
    let report_us = micros(report_started.elapsed());
    Ok(FairnessOutcome {
        answer,
        report,
        rerank_us,
        report_us,
    })
}

/// Cumulative exposure and merit shares per group of an amortized state, ascending label.
fn amortized_shares(state: &AmortizedState) -> Vec<AmortizedGroupExposure> {
    let total_exposure: f64 = state.group_exposure.values().sum();
    let total_merit: f64 = state.group_relevance.values().sum();
    let share = |value: f64, total: f64| if total > 0.0 { value / total } else { 0.0 };
    let mut labels: Vec<u32> = state
        .group_exposure
        .keys()
        .chain(state.group_relevance.keys())
        .copied()
        .collect();
    labels.sort_unstable();
    labels.dedup();
    labels
        .into_iter()
        .map(|group| AmortizedGroupExposure {
            group,
            exposure_share: share(
                state.group_exposure.get(&group).copied().unwrap_or(0.0),
                total_exposure,
            ),
            merit_share: share(
                state.group_relevance.get(&group).copied().unwrap_or(0.0),
                total_merit,
            ),
        })
        .collect()
}

/// Items per group label in the pool, ascending label, into `out`.
fn count_groups(candidates: &[Candidate], out: &mut Vec<(u32, u32)>, labels: &mut Vec<u32>) {
    out.clear();
    let mut last: Option<usize> = None;
    for candidate in candidates {
        if let Some(slot) = last
            && out[slot].0 == candidate.group
        {
            out[slot].1 += 1;
            continue;
        }
        match out.binary_search_by_key(&candidate.group, |&(label, _)| label) {
            Ok(slot) => {
                out[slot].1 += 1;
                last = Some(slot);
            }
            Err(_) if out.len() >= FEW_GROUPS => {
                count_many_groups(candidates, out, labels);
                return;
            }
            Err(slot) => {
                out.insert(slot, (candidate.group, 1));
                last = Some(slot);
            }
        }
    }
}

/// [`count_groups`] for pools with many distinct labels: sort and count runs.
fn count_many_groups(candidates: &[Candidate], out: &mut Vec<(u32, u32)>, labels: &mut Vec<u32>) {
    labels.clear();
    labels.extend(candidates.iter().map(|candidate| candidate.group));
    labels.sort_unstable();
    out.clear();
    for &label in labels.iter() {
        match out.last_mut() {
            Some((last, count)) if *last == label => *count += 1,
            _ => out.push((label, 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> FairnessRuntime {
        let config = EngineConfig::default();
        FairnessRuntime::new(&config, FairnessSetup::in_memory(&config)).expect("default policy")
    }

    fn params(pairs: &[(&str, ParamValue)]) -> BTreeMap<String, ParamValue> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), value.clone()))
            .collect()
    }

    #[test]
    fn integral_numbers_become_json_integers() {
        assert_eq!(json_value(&ParamValue::Number(1.0)), Value::from(1u64));
        assert_eq!(json_value(&ParamValue::Number(-2.0)), Value::from(-2i64));
        assert_eq!(json_value(&ParamValue::Number(0.5)), serde_json::json!(0.5));
        assert_eq!(json_value(&ParamValue::Number(f64::NAN)), Value::Null);
    }

    #[test]
    fn policies_are_built_once_and_cached() {
        let runtime = runtime();
        let spec = params(&[
            ("p", ParamValue::Number(0.5)),
            ("protected", ParamValue::Number(1.0)),
        ]);
        let first = runtime.resolve("fa*ir", &spec).expect("valid");
        let second = runtime.resolve("FA*IR", &spec).expect("valid");
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(first.name(), "fa*ir");
        assert_eq!(first.targets, vec![(1, 0.5)]);
        let other = runtime
            .resolve(
                "fa*ir",
                &params(&[
                    ("p", ParamValue::Number(0.3)),
                    ("protected", ParamValue::Number(1.0)),
                ]),
            )
            .expect("valid");
        assert!(!Arc::ptr_eq(&first, &other));
        let default = runtime.resolve("", &BTreeMap::new()).expect("default");
        assert_eq!(default.name(), "none");
    }

    #[test]
    fn the_cache_is_bounded_and_evicts_the_least_recently_used() {
        let runtime = runtime();
        let capacity = EngineConfig::default().reranker_cache_capacity;
        let temperature = |t: f64| params(&[("temperature", ParamValue::Number(t + 0.5))]);
        let first = runtime
            .resolve("plackett-luce", &temperature(0.0))
            .expect("valid");
        for index in 1..=capacity {
            runtime
                .resolve("plackett-luce", &temperature(index as f64))
                .expect("valid");
        }
        assert_eq!(runtime.lock_cache().entries.len(), capacity);
        let again = runtime
            .resolve("plackett-luce", &temperature(0.0))
            .expect("valid");
        assert!(!Arc::ptr_eq(&first, &again), "the oldest entry was evicted");
    }

    #[test]
    fn registry_errors_name_the_field() {
        let runtime = runtime();
        let error = runtime.resolve("no-such", &BTreeMap::new()).unwrap_err();
        assert_eq!(error.field(), Some("fairness.constraint"));
        assert!(
            error.to_string().contains("fa*ir"),
            "lists the names: {error}"
        );
        let error = runtime
            .resolve(
                "fa*ir",
                &params(&[
                    ("p", ParamValue::Number(2.0)),
                    ("protected", ParamValue::Number(1.0)),
                ]),
            )
            .unwrap_err();
        assert_eq!(error.field(), Some("fairness.params.p"));
        let error = runtime
            .resolve("fa*ir", &params(&[("p", ParamValue::Number(0.5))]))
            .unwrap_err();
        assert_eq!(error.field(), Some("fairness.params.protected"));
        let error = runtime
            .resolve(
                "det-greedy",
                &params(&[("targetz", ParamValue::Number(0.5))]),
            )
            .unwrap_err();
        assert_eq!(error.field(), Some("fairness.params.targetz"));
        assert!(matches!(
            error,
            EngineError::InvalidArgument {
                reason: InvalidReason::InvalidConstraintParams,
                ..
            }
        ));
    }

    #[test]
    fn a_bad_default_policy_is_a_configuration_error() {
        let mut config = EngineConfig {
            default_fairness_constraint: "fa*ir".to_owned(),
            ..EngineConfig::default()
        };
        let error = FairnessRuntime::new(&config, FairnessSetup::in_memory(&config)).unwrap_err();
        assert_eq!(error.field(), Some("default_fairness_params"));
        config.default_fairness_constraint = "nope".to_owned();
        let error = FairnessRuntime::new(&config, FairnessSetup::in_memory(&config)).unwrap_err();
        assert_eq!(error.field(), Some("default_fairness_constraint"));
    }

    #[test]
    fn groups_are_counted_with_few_and_many_labels() {
        let pool: Vec<Candidate> = [3, 1, 1, 3, 2]
            .iter()
            .enumerate()
            .map(|(i, &g)| Candidate::new(i as u32, 1.0, g))
            .collect();
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        count_groups(&pool, &mut out, &mut scratch);
        assert_eq!(out, vec![(1, 2), (2, 1), (3, 2)]);
        let many: Vec<Candidate> = (0..300u32)
            .map(|i| Candidate::new(i, 1.0, (i * 7) % 150))
            .collect();
        count_groups(&many, &mut out, &mut scratch);
        assert_eq!(out.len(), 150);
        assert!(out.iter().all(|&(_, count)| count == 2));
        assert!(out.windows(2).all(|pair| pair[0].0 < pair[1].0));
    }
}
