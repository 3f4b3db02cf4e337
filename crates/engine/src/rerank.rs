//! The fairness stage of the request path: re-rankers built from request policies through
//! the `fairness` registry (and cached), the re-ranking of the pool with a per-worker
//! seeded RNG and reused buffers, amortized state kept per exposure scope, and the
//! per-answer fairness report (the figures of `fairness::answer_report`, computed in one
//! pass). The pool is turned into candidates and counted per group (in the same pass when
//! every label is 0 or 1, else in a second one over 4 counter lanes; the counts reach the
//! re-ranker as a `fairness::PoolSummary`, so it need not count again), and
//! every buffer lives in a per-thread workspace, so the stage does not allocate per request
//! beyond the answer and the report it returns.

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use fairness::{
    AmortizedState, Candidate, ConstraintInfo, FairnessError, Measure, PoolSummary, Registry,
    RerankOutput, RerankReport, Reranker, dcg_weight,
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
        // Names are exact and case-sensitive (the registry's contract), so the key is too.
        let mut key = name.to_owned();
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
    /// The amortized scope's state (amortized constraints with a group attribute only;
    /// other requests hold no reference to the store).
    pub amortized_scope: Option<AmortizedScope>,
}

/// Where the amortized state of a request's exposure scope lives.
#[derive(Debug, Clone)]
pub(crate) struct AmortizedScope {
    /// Store key of the scope.
    pub key: String,
    /// The store.
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
    /// Whether the answer may still be discarded (a DP release not yet charged): an
    /// amortized constraint then ranks against a snapshot of its state and returns the
    /// update in [`FairnessOutcome::pending_state`] instead of storing it, so only a
    /// released answer ever counts.
    pub defer_state_update: bool,
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
    /// The amortized state update of a deferred run ([`FairnessInput::defer_state_update`]),
    /// to commit once the answer is released; `None` when there is nothing to commit.
    pub pending_state: Option<PendingStateUpdate>,
}

/// An amortized state update held back until its answer is released.
#[derive(Debug)]
#[must_use = "the amortized state only counts the answer once the update is committed"]
pub(crate) struct PendingStateUpdate {
    store: Arc<dyn ExposureStateStore>,
    scope_key: String,
    /// This answer's exposure and merit per group and one ranking (additive).
    delta: AmortizedState,
}

impl PendingStateUpdate {
    /// Adds this answer to its scope's amortized state (call only once it is released).
    pub fn commit(self) -> Result<(), EngineError> {
        let delta = &self.delta;
        self.store
            .update(&self.scope_key, &mut |state: &mut AmortizedState| {
                add_state_delta(state, delta);
                Ok(true)
            })
            .map(|_| ())
    }
}

/// Per-thread buffers of the fairness stage, reused across requests.
#[derive(Debug, Default)]
struct Workspace {
    candidates: Vec<Candidate>,
    output: RerankOutput,
    groups: GroupCounter,
    summary: PoolSummary,
    tallies: Vec<GroupTally>,
    seeds: Option<ChaCha8Rng>,
}

thread_local! {
    static WORKSPACE: RefCell<Workspace> = RefCell::new(Workspace::default());
}

/// Labels below this bound are counted in a fixed array; larger ones are sorted and counted.
const SMALL_LABELS: usize = 64;

/// Counts items per group label in one pass: labels below [`SMALL_LABELS`] (the common case)
/// by direct indexing, the others collected and counted by a sort at the end.
#[derive(Debug, Clone)]
struct GroupCounter {
    small: [u32; SMALL_LABELS],
    large: Vec<u32>,
}

impl Default for GroupCounter {
    fn default() -> Self {
        GroupCounter {
            small: [0; SMALL_LABELS],
            large: Vec::new(),
        }
    }
}

impl GroupCounter {
    fn reset(&mut self) {
        self.small = [0; SMALL_LABELS];
        self.large.clear();
    }

    #[cfg(test)]
    fn add(&mut self, label: u32) {
        match self.small.get_mut(label as usize) {
            Some(count) => *count += 1,
            None => self.large.push(label),
        }
    }

    /// Adds every candidate's group: small labels over 4 counter lanes (consecutive items
    /// of one group do not wait on each other's increment), the others collected.
    fn count(&mut self, candidates: &[Candidate]) {
        let mut lanes = [[0u32; SMALL_LABELS]; 4];
        let mut any_large = false;
        let mut chunks = candidates.chunks_exact(4);
        for chunk in &mut chunks {
            for (lane, candidate) in lanes.iter_mut().zip(chunk) {
                match lane.get_mut(candidate.group as usize) {
                    Some(count) => *count += 1,
                    None => any_large = true,
                }
            }
        }
        for candidate in chunks.remainder() {
            match lanes[0].get_mut(candidate.group as usize) {
                Some(count) => *count += 1,
                None => any_large = true,
            }
        }
        for (label, count) in self.small.iter_mut().enumerate() {
            *count += lanes.iter().map(|lane| lane[label]).sum::<u32>();
        }
        if any_large {
            self.large.extend(
                candidates
                    .iter()
                    .map(|candidate| candidate.group)
                    .filter(|&group| group as usize >= SMALL_LABELS),
            );
        }
    }

    /// Calls `emit(label, count)` per label with items, ascending label (`large` is left
    /// sorted).
    fn finish(&mut self, mut emit: impl FnMut(u32, u32)) {
        for (label, &count) in self.small.iter().enumerate() {
            if count > 0 {
                emit(label as u32, count);
            }
        }
        self.large.sort_unstable();
        let mut runs = self.large.chunk_by(|a, b| a == b);
        for run in &mut runs {
            emit(run[0], u32::try_from(run.len()).unwrap_or(u32::MAX));
        }
    }
}

/// One pool group in the report: its label and pool count, and what the answer and the
/// unconstrained top-k give it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct GroupTally {
    label: u32,
    in_pool: u32,
    returned: u32,
    /// Sum of the DCG weights of its answer positions.
    exposure: f64,
    /// The same for the unconstrained top-k.
    unconstrained_exposure: f64,
}

/// Items per group label in the pool, ascending label, into `out` (`labels` is scratch).
#[cfg(test)]
fn count_groups(candidates: &[Candidate], out: &mut Vec<(u32, u32)>, labels: &mut Vec<u32>) {
    let mut counter = GroupCounter {
        large: std::mem::take(labels),
        ..GroupCounter::default()
    };
    counter.reset();
    for candidate in candidates {
        counter.add(candidate.group);
    }
    out.clear();
    counter.finish(|label, count| out.push((label, count)));
    *labels = counter.large;
}

/// The pool as re-ranker candidates, in one pass: with group labels (`labels` indexed by
/// item row; rows beyond it get label 0) also counting the pool per group into `counter`.
///
/// The pass itself only gathers labels and keeps their maximum and sum in registers: a
/// per-item counter increment in memory would chain consecutive items of one group through
/// store-to-load forwarding (about 5 cycles each, more than the rest of the pass). A pool
/// whose labels are all 0 or 1 (the common protected / unprotected attribute) is then
/// counted exactly from the sum; other pools are counted in a second pass over 4 counter
/// lanes ([`GroupCounter::count`]).
fn build_candidates(
    pool: &[ScoredItem],
    labels: Option<&[u32]>,
    candidates: &mut Vec<Candidate>,
    counter: &mut GroupCounter,
) {
    candidates.clear();
    counter.reset();
    match labels {
        Some(labels) => {
            let mut largest = 0u32;
            let mut sum = 0u64;
            candidates.extend(pool.iter().map(|item| {
                let group = labels.get(item.index as usize).copied().unwrap_or_default();
                largest = largest.max(group);
                sum += u64::from(group);
                Candidate::new(item.index, item.score, group)
            }));
            if largest <= 1 {
                // Every label is 0 or 1: the sum counts the ones. Both fit in u32 here
                // (`sum <= len`), since pools are far below 2^32 items.
                let ones = u32::try_from(sum).unwrap_or(u32::MAX);
                let len = u32::try_from(candidates.len()).unwrap_or(u32::MAX);
                counter.small[1] = ones;
                counter.small[0] = len.saturating_sub(ones);
            } else {
                counter.count(candidates);
            }
        }
        None => candidates.extend(
            pool.iter()
                .map(|item| Candidate::new(item.index, item.score, 0)),
        ),
    }
}

/// The pool summary handed to the re-ranker, from the counts of [`build_candidates`] (every
/// item is in group 0 when the request has no group labels).
fn summarize_pool(
    labelled: bool,
    items: usize,
    counter: &mut GroupCounter,
    summary: &mut PoolSummary,
) {
    summary.clear();
    if labelled {
        counter.finish(|label, count| summary.add(label, count as usize));
    } else {
        summary.add(0, items);
    }
}

/// The answer's NDCG against the unconstrained order and, per pool group in `tallies`
/// (ascending label), its items and exposure in the answer and in the unconstrained top
/// `unconstrained_len`, in one pass over each.
///
/// Gains are the scores shifted so the pool's lowest is 0 (the proto's NDCG definition);
/// the sums run in rank order, so the figures equal `fairness::answer_report`'s on the
/// shifted pool bit for bit.
fn summarize(
    candidates: &[Candidate],
    answer: &[usize],
    unconstrained_len: usize,
    tallies: &mut [GroupTally],
) -> Result<f64, EngineError> {
    let lowest = candidates.last().map_or(0.0, |candidate| candidate.score);
    let gain =
        |candidate: &Candidate| f64::from((candidate.score - lowest).clamp(0.0, f32::MAX)).max(0.0);
    let slot = |tallies: &[GroupTally], label: u32| {
        tallies
            .binary_search_by_key(&label, |tally| tally.label)
            .ok()
    };
    let mut dcg = 0.0;
    let mut ideal = 0.0;
    for (index, &position) in answer.iter().enumerate() {
        let Some(candidate) = candidates.get(position) else {
            return Err(EngineError::internal(format!(
                "fairness report failed: answer position {position} is outside the pool of {}",
                candidates.len()
            )));
        };
        let weight = dcg_weight(index + 1);
        dcg += weight * gain(candidate);
        if let Some(reference) = candidates.get(index) {
            ideal += weight * gain(reference);
        }
        if let Some(slot) = slot(tallies, candidate.group) {
            tallies[slot].returned += 1;
            tallies[slot].exposure += weight;
        }
    }
    for (index, candidate) in candidates.iter().take(unconstrained_len).enumerate() {
        if let Some(slot) = slot(tallies, candidate.group) {
            tallies[slot].unconstrained_exposure += dcg_weight(index + 1);
        }
    }
    Ok(if ideal > 0.0 {
        (dcg / ideal).min(1.0)
    } else {
        1.0
    })
}

/// Sum of the DCG weights of ranks `1..=length` (in rank order).
fn total_weight(length: usize) -> f64 {
    (1..=length)
        .map(dcg_weight)
        .fold(0.0, |total, weight| total + weight)
}

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
        output,
        groups: counter,
        summary,
        tallies,
        seeds,
    } = workspace;

    // One pass over the pool: candidates with their group labels, and the pool's groups.
    build_candidates(
        input.pool,
        input.groups.map(|(_, labels)| labels),
        candidates,
        counter,
    );
    summarize_pool(input.groups.is_some(), candidates.len(), counter, summary);
    let summary = &*summary;

    let seed = reranker
        .is_stochastic()
        .then(|| policy.seed.unwrap_or_else(|| worker_seed(seeds)));
    let mut rng = ChaCha8Rng::seed_from_u64(seed.unwrap_or(0));
    let k = input.k;
    let constraint = reranker.name();
    let mut amortized = Vec::new();
    let mut disparity_after = None;
    let mut pending_state = None;
    let decision = match (&policy.amortized_scope, reranker.is_amortized()) {
        (Some(scope), true) if input.defer_state_update => {
            // Rank against a snapshot; the update waits for the release.
            let before = scope.store.load(&scope.key)?.unwrap_or_default();
            reranker
                .rerank_summarized(candidates, summary, k, Some(&before), &mut rng, output)
                .map_err(rerank_error)?;
            let decision = decide(&output.report, policy.on_infeasible, constraint)?;
            let after = match output.state.as_ref() {
                Some(next) if decision != Decision::Unconstrained => {
                    pending_state = Some(PendingStateUpdate {
                        store: Arc::clone(&scope.store),
                        scope_key: scope.key.clone(),
                        delta: state::delta_between(&before, next),
                    });
                    next
                }
                _ => &before,
            };
            amortized = amortized_shares(after);
            disparity_after = fairness::amortized_disparity(after);
            decision
        }
        (Some(scope), true) => {
            let mut decision = Decision::Constrained;
            let candidates = &*candidates;
            scope
                .store
                .update(&scope.key, &mut |state: &mut AmortizedState| {
                    reranker
                        .rerank_summarized(candidates, summary, k, Some(state), &mut rng, output)
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
                .rerank_summarized(candidates, summary, k, None, &mut rng, output)
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

    // The report: NDCG and per-group exposure of the answer and of the unconstrained top-k.
    tallies.clear();
    if input.groups.is_some() {
        counter.finish(|label, in_pool| {
            tallies.push(GroupTally {
                label,
                in_pool,
                ..GroupTally::default()
            });
        });
    }
    let ndcg = summarize(candidates, &answer, unconstrained_len, tallies)?;
    let groups = match input.groups {
        Some(_) => {
            let answer_total = total_weight(answer.len());
            let unconstrained_total = total_weight(unconstrained_len);
            let share = |exposure: f64, total: f64| {
                if total > 0.0 { exposure / total } else { 0.0 }
            };
            tallies
                .iter()
                .map(|tally| GroupExposure {
                    group: tally.label,
                    items_returned: tally.returned,
                    items_in_pool: tally.in_pool,
                    exposure_share: share(tally.exposure, answer_total),
                    unconstrained_exposure_share: share(
                        tally.unconstrained_exposure,
                        unconstrained_total,
                    ),
                    target_share: policy.built.target(tally.label),
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
    // The violations of the order actually returned: the re-ranker's own for its
    // best-effort answer, the constraint's check of the unconstrained top-k otherwise.
    let returned_violation = match decision {
        Decision::Constrained => None,
        Decision::BestEffort => rerank_report.violation,
        Decision::Unconstrained => reranker
            .violation(candidates, &answer)
            .map_err(|error| EngineError::internal(format!("fairness report failed: {error}")))?,
    };
    let violations = match &returned_violation {
        Some(violation) => vec![FairnessViolation {
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
        None => Vec::new(),
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
        ndcg_vs_unconstrained: ndcg,
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
        pending_state,
    })
}

/// Adds `delta` (one answer's exposure and merit per group, and its ranking) to `state`.
fn add_state_delta(state: &mut AmortizedState, delta: &AmortizedState) {
    for (&group, &value) in &delta.group_exposure {
        *state.group_exposure.entry(group).or_insert(0.0) += value;
    }
    for (&group, &value) in &delta.group_relevance {
        *state.group_relevance.entry(group).or_insert(0.0) += value;
    }
    state.rankings = state.rankings.saturating_add(delta.rankings);
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
        let second = runtime.resolve("fa*ir", &spec).expect("valid");
        assert!(Arc::ptr_eq(&first, &second));
        // Names are case-sensitive: another spelling is an unknown constraint, not a hit.
        let error = runtime.resolve("FA*IR", &spec).unwrap_err();
        assert_eq!(error.field(), Some("fairness.constraint"));
        assert!(
            error.to_string().contains("did you mean `fa*ir`"),
            "{error}"
        );
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

    /// A pool of `size` random candidates in score order (with ties), labels from `labels`.
    fn random_pool(seed: u64, size: usize, labels: &[u32]) -> Vec<Candidate> {
        use rand::Rng;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut pool: Vec<Candidate> = (0..size)
            .map(|index| {
                let score = f32::from(rng.random_range(-40i16..60)) * 0.25;
                let label = labels[rng.random_range(0..labels.len())];
                Candidate::new(index as u32, score, label)
            })
            .collect();
        pool.sort_by(|a, b| b.score.total_cmp(&a.score));
        pool
    }

    #[test]
    fn candidates_are_built_and_counted_in_one_pass() {
        let labels: Vec<u32> = (0..500u32)
            .map(|row| [0, 3, 70, 1000][row as usize % 4])
            .collect();
        let pool: Vec<ScoredItem> = (0..600u32)
            .map(|row| ScoredItem::new(row, 600.0 - row as f32))
            .collect();
        let (mut candidates, mut counter) = (Vec::new(), GroupCounter::default());
        build_candidates(&pool, Some(&labels), &mut candidates, &mut counter);
        assert_eq!(candidates.len(), 600);
        for (candidate, item) in candidates.iter().zip(&pool) {
            assert_eq!((candidate.id, candidate.score), (item.index, item.score));
            // Rows beyond the label column get label 0.
            let expected = labels.get(item.index as usize).copied().unwrap_or(0);
            assert_eq!(candidate.group, expected);
        }
        let mut counts = Vec::new();
        counter.finish(|label, count| counts.push((label, count)));
        assert_eq!(
            counts,
            vec![(0, 125 + 100), (3, 125), (70, 125), (1000, 125)]
        );
        // Reused buffers start from scratch; without labels every candidate is in group 0.
        build_candidates(&pool[..10], None, &mut candidates, &mut counter);
        assert_eq!(candidates.len(), 10);
        assert!(candidates.iter().all(|candidate| candidate.group == 0));
    }

    #[test]
    fn the_engine_pool_summary_equals_pool_summary_of() {
        use rand::Rng;
        let (mut candidates, mut counter) = (Vec::new(), GroupCounter::default());
        let mut summary = PoolSummary::new();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for case in 0..70u32 {
            let rows = rng.random_range(0..400u32);
            let palette: &[u32] = match case % 5 {
                0 => &[0],
                1 => &[0, 1],
                2 => &[2, 5, 63, 64],
                3 => &[1],
                _ => &[1, 70, 1000, u32::MAX],
            };
            let labels: Vec<u32> = (0..rng.random_range(0..rows + 1))
                .map(|_| palette[rng.random_range(0..palette.len())])
                .collect();
            let pool: Vec<ScoredItem> = (0..rows)
                .map(|row| ScoredItem::new(row, rows as f32 - row as f32))
                .collect();
            let labelled = case % 7 != 6;
            build_candidates(
                &pool,
                labelled.then_some(labels.as_slice()),
                &mut candidates,
                &mut counter,
            );
            summarize_pool(labelled, candidates.len(), &mut counter, &mut summary);
            assert_eq!(summary, PoolSummary::of(&candidates), "case {case}");
        }
    }

    #[test]
    fn the_one_pass_report_equals_answer_report_on_the_shifted_pool() {
        use fairness::{AnswerReport, RerankReport, answer_report};
        use rand::seq::SliceRandom;
        for seed in 0..40u64 {
            let pool = random_pool(seed, 30 + seed as usize, &[0, 1, 2, 90]);
            let k = 1 + (seed as usize * 7) % 40;
            let unconstrained_len = k.min(pool.len());
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut answer: Vec<usize> = (0..pool.len()).collect();
            answer.shuffle(&mut rng);
            answer.truncate(unconstrained_len - usize::from(seed % 3 == 0));
            let mut counter = GroupCounter::default();
            let mut tallies = Vec::new();
            for candidate in &pool {
                counter.add(candidate.group);
            }
            counter.finish(|label, in_pool| {
                tallies.push(GroupTally {
                    label,
                    in_pool,
                    ..GroupTally::default()
                })
            });
            let ndcg = summarize(&pool, &answer, unconstrained_len, &mut tallies).expect("valid");

            let lowest = pool.last().map_or(0.0, |candidate| candidate.score);
            let shifted: Vec<Candidate> = pool
                .iter()
                .map(|candidate| Candidate {
                    score: (candidate.score - lowest).clamp(0.0, f32::MAX),
                    ..*candidate
                })
                .collect();
            let (mut expected, mut unconstrained) =
                (AnswerReport::default(), AnswerReport::default());
            let rerank = RerankReport::default();
            answer_report(&shifted, &answer, &rerank, &mut expected).expect("valid");
            let prefix: Vec<usize> = (0..unconstrained_len).collect();
            answer_report(&shifted, &prefix, &rerank, &mut unconstrained).expect("valid");
            assert_eq!(ndcg.to_bits(), expected.ndcg.to_bits(), "seed {seed}");
            let answer_total = total_weight(answer.len());
            let unconstrained_total = total_weight(unconstrained_len);
            for tally in &tallies {
                let find = |report: &AnswerReport| {
                    report
                        .groups
                        .iter()
                        .find(|share| share.group == tally.label)
                        .copied()
                };
                let share =
                    |exposure: f64, total: f64| if total > 0.0 { exposure / total } else { 0.0 };
                match find(&expected) {
                    Some(group) => {
                        assert_eq!(tally.returned as usize, group.items);
                        assert_eq!(
                            share(tally.exposure, answer_total).to_bits(),
                            group.share.to_bits(),
                            "seed {seed}"
                        );
                    }
                    None => assert_eq!((tally.returned, tally.exposure), (0, 0.0)),
                }
                match find(&unconstrained) {
                    Some(group) => assert_eq!(
                        share(tally.unconstrained_exposure, unconstrained_total).to_bits(),
                        group.share.to_bits(),
                        "seed {seed}"
                    ),
                    None => assert_eq!(tally.unconstrained_exposure, 0.0),
                }
            }
            let in_pool: u32 = tallies.iter().map(|tally| tally.in_pool).sum();
            assert_eq!(in_pool as usize, pool.len());
        }
        let pool = random_pool(1, 5, &[0]);
        let mut tallies = Vec::new();
        assert!(summarize(&pool, &[9], 5, &mut tallies).is_err());
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
