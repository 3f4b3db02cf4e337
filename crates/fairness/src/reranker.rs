//! The object-safe re-ranker plug-in trait and its output, report and amortized state.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::candidate::Candidate;
use crate::error::FairnessError;
use crate::summary::PoolSummary;

/// A fairness re-ranker: turns the pool (the unconstrained order) into the final top-k.
///
/// Implementations must be pure functions of their inputs (pool, k, state, RNG draws) so that
/// retries reproduce answers, must never panic, and must return the best feasible ranking
/// with [`RerankReport::satisfied`] `= false` when the pool cannot satisfy the constraint
/// (for example too few protected items). Build them through a [`crate::Registry`].
pub trait Reranker: Send + Sync + fmt::Debug {
    /// The registry name of the constraint (for example `"fa*ir"`).
    fn name(&self) -> &str;

    /// The canonical configuration: `{"name": ..., <every parameter with defaults filled>}`.
    /// Feeding it back to [`crate::Registry::build`] rebuilds an equivalent re-ranker.
    fn config(&self) -> serde_json::Value {
        serde_json::json!({ "name": self.name() })
    }

    /// Whether the re-ranker reads and returns an [`AmortizedState`] (the server must persist
    /// [`RerankOutput::state`] between requests).
    fn is_amortized(&self) -> bool {
        false
    }

    /// Whether the output depends on the injected RNG.
    fn is_stochastic(&self) -> bool {
        false
    }

    /// The first prefix at which `order` (pool positions, best first) breaks this
    /// constraint, as it would be checked for an answer of length `order.len()`, or `None`
    /// when the order meets it or the constraint sets no per-ranking requirement (amortized
    /// and stochastic constraints; the default). The server reports with it the violations
    /// of an answer it returns in place of the re-ranker's, such as the unconstrained order
    /// under `on_infeasible = unconstrained`.
    fn violation(
        &self,
        _pool: &[Candidate],
        _order: &[usize],
    ) -> Result<Option<Violation>, FairnessError> {
        Ok(None)
    }

    /// Re-ranks `pool` (non-increasing scores, see [`crate::validate_pool`]) into at most `k`
    /// pool positions written to `out.order`, fills `out.report`, and for amortized
    /// re-rankers the updated state in `out.state`. `out` is reset first; its buffers are
    /// reused across calls so the hot path does not allocate once warm.
    fn rerank(
        &self,
        pool: &[Candidate],
        k: usize,
        state: Option<&AmortizedState>,
        rng: &mut dyn rand::RngCore,
        out: &mut RerankOutput,
    ) -> Result<(), FairnessError>;

    /// [`Reranker::rerank`] for a caller that already knows the pool's items per group
    /// (`summary` must describe `pool`, for example [`PoolSummary::of`]`(pool)`). The output
    /// must equal `rerank`'s bit for bit; re-rankers that would otherwise scan the whole
    /// pool to count groups override it to skip that scan. The default ignores the summary.
    fn rerank_summarized(
        &self,
        pool: &[Candidate],
        summary: &PoolSummary,
        k: usize,
        state: Option<&AmortizedState>,
        rng: &mut dyn rand::RngCore,
        out: &mut RerankOutput,
    ) -> Result<(), FairnessError> {
        let _ = summary;
        self.rerank(pool, k, state, rng, out)
    }
}

/// What a [`Violation`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// Number of items of the group in the prefix.
    Count,
    /// The group's share of position-weighted exposure in the prefix (0..=1).
    ExposureShare,
}

/// The first place where the output breaks the constraint.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Violation {
    /// Length of the violating prefix (1-based: `prefix = 3` means the top 3).
    pub prefix: usize,
    /// Group label that is under-represented.
    pub group: u32,
    /// What the constraint requires for that group in that prefix.
    pub required: f64,
    /// What the output gives it.
    pub actual: f64,
    /// The unit of `required` and `actual`.
    pub measure: Measure,
}

/// How close an optimizing re-ranker's answer is to the best possible utility.
///
/// Utility is `sum_r w_r * score_r` with DCG weights `w_r = 1 / log2(1 + r)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Optimality {
    /// Utility of the returned ranking.
    pub utility: f64,
    /// A proven upper bound on the utility of any ranking that satisfies the constraint
    /// (the unconstrained utility or a Lagrangian dual bound, whichever is smaller).
    pub upper_bound: f64,
    /// `upper_bound - utility` (>= 0); 0 means the answer is proven optimal.
    pub gap: f64,
    /// Whether the answer was found by exhaustive search (then it is optimal).
    pub exact: bool,
}

/// Per-call account of what the re-ranker did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RerankReport {
    /// Whether the output satisfies the constraint at every prefix it promises.
    pub satisfied: bool,
    /// Whether the re-ranker had to relax the constraint (infeasible pool) or give up on
    /// part of it; the output is then the best feasible ranking it found.
    pub fallback: bool,
    /// The first violated prefix, when `satisfied` is false.
    pub violation: Option<Violation>,
    /// Utility versus upper bound, for optimizing re-rankers (`min-exposure`).
    pub optimality: Option<Optimality>,
    /// For amortized re-rankers: after this answer, the largest difference between two groups'
    /// cumulative exposure per unit of cumulative merit.
    pub amortized_disparity: Option<f64>,
    /// Human-readable remarks (infeasibility, adjusted parameters); empty on the fast path.
    pub notes: Vec<String>,
}

impl RerankReport {
    /// Clears the report to "satisfied, no remarks", keeping allocations.
    pub fn reset(&mut self) {
        self.satisfied = true;
        self.fallback = false;
        self.violation = None;
        self.optimality = None;
        self.amortized_disparity = None;
        self.notes.clear();
    }
}

/// Cumulative exposure and merit per group for amortized fairness (FairCo).
///
/// The server persists it between requests (serde); the re-ranker returns the updated copy
/// in [`RerankOutput::state`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AmortizedState {
    /// Sum over past rankings of each group's mean position-weighted exposure.
    pub group_exposure: BTreeMap<u32, f64>,
    /// Sum over past rankings of each group's mean estimated relevance (merit).
    pub group_relevance: BTreeMap<u32, f64>,
    /// Number of rankings accumulated (`tau - 1` in Morik et al. 2020).
    #[serde(default)]
    pub rankings: u64,
}

impl AmortizedState {
    /// Checks that every total is finite and non-negative.
    pub fn validate(&self) -> Result<(), FairnessError> {
        for (name, map) in [
            ("group_exposure", &self.group_exposure),
            ("group_relevance", &self.group_relevance),
        ] {
            for (group, value) in map {
                if !value.is_finite() || *value < 0.0 {
                    return Err(FairnessError::InvalidState {
                        reason: format!(
                            "{name}[{group}] = {value} must be finite and non-negative"
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Reusable buffers owned by a [`RerankOutput`]; opaque to callers.
#[derive(Debug, Clone, Default)]
pub struct Scratch {
    pub(crate) lists: Vec<Vec<usize>>,
    pub(crate) counts: Vec<usize>,
    pub(crate) counts2: Vec<usize>,
    pub(crate) pairs: Vec<(usize, usize)>,
    pub(crate) values: Vec<f64>,
    pub(crate) values2: Vec<f64>,
    pub(crate) values3: Vec<f64>,
    pub(crate) held: Vec<f64>,
    pub(crate) zero_labels: Vec<usize>,
    pub(crate) zero_counts: Vec<usize>,
    pub(crate) zero_exposure: Vec<f64>,
    pub(crate) positions: Vec<usize>,
    pub(crate) positions2: Vec<usize>,
    pub(crate) labels: Vec<u32>,
    pub(crate) heap: Vec<(f64, usize)>,
    pub(crate) tiers: Vec<u32>,
    pub(crate) tiered: Vec<(u32, f64, usize)>,
    pub(crate) label_index: std::collections::HashMap<u32, usize>,
    pub(crate) deadlines: Vec<usize>,
    pub(crate) weights: Vec<f64>,
    pub(crate) required: Vec<f64>,
    pub(crate) group_items: Vec<Vec<(f64, usize)>>,
    pub(crate) consumed: Vec<usize>,
    pub(crate) totals: Vec<usize>,
}

/// The output buffer of [`Reranker::rerank`]: keep one per worker and reuse it.
#[derive(Debug, Clone, Default)]
pub struct RerankOutput {
    /// Pool positions (indices into the pool slice) of the final ranking, best first.
    pub order: Vec<usize>,
    /// What happened.
    pub report: RerankReport,
    /// The updated amortized state (only for amortized re-rankers).
    pub state: Option<AmortizedState>,
    pub(crate) scratch: Scratch,
}

impl RerankOutput {
    /// An empty output buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Clears order and report (keeping capacity); `state` is left for the re-ranker to set.
    pub fn reset(&mut self) {
        self.order.clear();
        self.report.reset();
    }

    /// The candidates of the final ranking, best first.
    pub fn ranked<'a>(&'a self, pool: &'a [Candidate]) -> impl Iterator<Item = &'a Candidate> + 'a {
        self.order
            .iter()
            .filter_map(move |&position| pool.get(position))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amortized_state_round_trips_through_json_and_defaults_rankings() {
        let mut state = AmortizedState::default();
        state.group_exposure.insert(1, 2.5);
        state.group_relevance.insert(1, 0.75);
        state.rankings = 3;
        let text = serde_json::to_string(&state).expect("serializable");
        let back: AmortizedState = serde_json::from_str(&text).expect("deserializable");
        assert_eq!(back, state);
        let legacy: AmortizedState =
            serde_json::from_str(r#"{"group_exposure":{"1":1.0},"group_relevance":{"1":2.0}}"#)
                .expect("state without a ranking count");
        assert_eq!(legacy.rankings, 0);
        assert_eq!(legacy.group_exposure.get(&1), Some(&1.0));
    }

    #[test]
    fn amortized_state_rejects_negative_or_non_finite_totals() {
        let mut state = AmortizedState::default();
        assert!(state.validate().is_ok());
        state.group_exposure.insert(0, -1.0);
        assert!(matches!(
            state.validate(),
            Err(FairnessError::InvalidState { .. })
        ));
        state.group_exposure.insert(0, f64::NAN);
        assert!(state.validate().is_err());
    }

    #[test]
    fn report_reset_clears_everything_but_keeps_it_satisfied() {
        let mut report = RerankReport {
            satisfied: false,
            fallback: true,
            violation: Some(Violation {
                prefix: 1,
                group: 2,
                required: 1.0,
                actual: 0.0,
                measure: Measure::Count,
            }),
            optimality: None,
            amortized_disparity: Some(0.5),
            notes: vec!["x".into()],
        };
        report.reset();
        assert!(report.satisfied && !report.fallback && report.violation.is_none());
        assert!(report.notes.is_empty() && report.amortized_disparity.is_none());
    }
}
