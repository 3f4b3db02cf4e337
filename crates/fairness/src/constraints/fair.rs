//! The `fa*ir` re-ranker (Zehlike et al., CIKM 2017, Algorithm 2 "FA*IR").
//!
//! Two queues, protected and non-protected candidates, each in score order. At position `i`
//! the algorithm takes the best protected candidate if the prefix so far holds fewer than
//! `m(i)` protected candidates; otherwise it takes the better of the two queue heads, the
//! protected one on ties. When the protected queue runs dry the remaining positions are filled
//! from the other queue and the report says which prefix first fell short: this is the best
//! feasible ranking, since every prefix keeps `min(m(i), P)` protected candidates where `P` is
//! the number of protected candidates in the pool.

use std::sync::Arc;

use super::mtable::{MAX_MTABLE_K, MTable, MTableCache};
use crate::candidate::{Candidate, validate_pool};
use crate::error::FairnessError;
use crate::reranker::{AmortizedState, Measure, RerankOutput, Reranker, Violation};

/// FA*IR top-k re-ranking with a minimum proportion `p` of the `protected` group at
/// significance `alpha` (adjusted for multiple tests unless `adjust_alpha` is false).
///
/// The ranking has length `min(k, pool.len())` and uses the mtable of that length (at most
/// [`MAX_MTABLE_K`]; longer requests fail with [`FairnessError::KTooLarge`]).
#[derive(Debug, Clone)]
pub struct FaStarIr {
    p: f64,
    alpha: f64,
    protected: u32,
    adjust_alpha: bool,
    cache: Arc<MTableCache>,
}

impl FaStarIr {
    /// Validates the parameters; mtables are computed on first use per output length and kept
    /// in `cache`.
    pub fn new(
        p: f64,
        alpha: f64,
        protected: u32,
        adjust_alpha: bool,
        cache: Arc<MTableCache>,
    ) -> Result<Self, FairnessError> {
        // Validates p and alpha with a trivial table.
        MTable::unadjusted(0, p, alpha)?;
        Ok(Self {
            p,
            alpha,
            protected,
            adjust_alpha,
            cache,
        })
    }

    /// The mtable used for rankings of length `k` (cached).
    pub fn mtable(&self, k: usize) -> Result<Arc<MTable>, FairnessError> {
        self.cache
            .get_or_compute(k, self.p, self.alpha, self.adjust_alpha)
    }

    /// The protected group label.
    pub fn protected(&self) -> u32 {
        self.protected
    }
}

/// The first prefix of `order` (pool positions) with fewer protected candidates than the
/// mtable requires, if any.
pub fn check_mtable(
    pool: &[Candidate],
    order: &[usize],
    protected: u32,
    table: &MTable,
) -> Option<Violation> {
    let mut count = 0usize;
    for (index, &position) in order.iter().enumerate() {
        if pool
            .get(position)
            .is_some_and(|candidate| candidate.group == protected)
        {
            count += 1;
        }
        let required = table.required(index + 1);
        if count < required {
            return Some(Violation {
                prefix: index + 1,
                group: protected,
                required: required as f64,
                actual: count as f64,
                measure: Measure::Count,
            });
        }
    }
    None
}

impl Reranker for FaStarIr {
    fn name(&self) -> &str {
        "fa*ir"
    }

    fn violation(
        &self,
        pool: &[Candidate],
        order: &[usize],
    ) -> Result<Option<Violation>, FairnessError> {
        if order.is_empty() {
            return Ok(None);
        }
        if order.len() > MAX_MTABLE_K {
            return Err(FairnessError::KTooLarge {
                constraint: self.name().to_string(),
                k: order.len(),
                max: MAX_MTABLE_K,
            });
        }
        let table = self.mtable(order.len())?;
        Ok(check_mtable(pool, order, self.protected, &table))
    }

    fn config(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name(),
            "p": self.p,
            "alpha": self.alpha,
            "protected": self.protected,
            "adjust_alpha": self.adjust_alpha,
        })
    }

    fn rerank(
        &self,
        pool: &[Candidate],
        k: usize,
        _state: Option<&AmortizedState>,
        _rng: &mut dyn rand::RngCore,
        out: &mut RerankOutput,
    ) -> Result<(), FairnessError> {
        out.reset();
        out.state = None;
        validate_pool(pool)?;
        let length = k.min(pool.len());
        if length == 0 {
            return Ok(());
        }
        if length > MAX_MTABLE_K {
            return Err(FairnessError::KTooLarge {
                constraint: self.name().to_string(),
                k: length,
                max: MAX_MTABLE_K,
            });
        }
        let table = self.mtable(length)?;
        let is_protected = |position: usize| pool[position].group == self.protected;
        let next_matching = |from: usize, protected: bool| {
            let mut position = from;
            while position < pool.len() && is_protected(position) != protected {
                position += 1;
            }
            position
        };
        let mut next_protected = next_matching(0, true);
        let mut next_other = next_matching(0, false);
        let mut protected_count = 0usize;
        let mut violation = None;
        for prefix in 1..=length {
            let required = table.required(prefix);
            let take_protected = if next_protected >= pool.len() {
                false
            } else if next_other >= pool.len() || protected_count < required {
                true
            } else {
                pool[next_protected].score >= pool[next_other].score
            };
            if take_protected {
                out.order.push(next_protected);
                protected_count += 1;
                next_protected = next_matching(next_protected + 1, true);
            } else {
                out.order.push(next_other);
                next_other = next_matching(next_other + 1, false);
            }
            if protected_count < required && violation.is_none() {
                violation = Some(Violation {
                    prefix,
                    group: self.protected,
                    required: required as f64,
                    actual: protected_count as f64,
                    measure: Measure::Count,
                });
            }
        }
        if let Some(violation) = violation {
            out.report.satisfied = false;
            out.report.fallback = true;
            out.report.violation = Some(violation);
            out.report.notes.push(format!(
                "the pool holds only {protected_count} candidates of protected group {} but the mtable requires {} in the top {length}; every prefix keeps min(m(i), {protected_count})",
                self.protected,
                table.required(length),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{pool_from, rng};

    fn fair(p: f64, alpha: f64) -> FaStarIr {
        FaStarIr::new(p, alpha, 1, true, Arc::new(MTableCache::default())).expect("valid")
    }

    #[test]
    fn reproduces_the_reference_re_ranking_example() {
        // fairsearch-fair-python test_re_rank: k = 20, p = 0.25, alpha = 0.1, scores 20..1 with
        // the five protected candidates at the bottom.
        let groups: Vec<u32> = (0..20).map(|i| u32::from(i >= 15)).collect();
        let pool = pool_from(&groups);
        let ranker = fair(0.25, 0.1);
        let mut out = RerankOutput::new();
        ranker
            .rerank(&pool, 20, None, &mut rng(0), &mut out)
            .expect("reranks");
        assert!(out.report.satisfied);
        let table = ranker.mtable(20).expect("table");
        assert!(check_mtable(&pool, &out.order, 1, &table).is_none());
        assert!(check_mtable(&pool, &(0..20).collect::<Vec<_>>(), 1, &table).is_some());
        let mut sorted = out.order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>());
        // Protected candidates are inserted exactly where the table forces them.
        let (mut count, mut others) = (0, 0);
        for (index, &position) in out.order.iter().enumerate() {
            if pool[position].group == 1 {
                count += 1;
                if others < 15 {
                    assert_eq!(
                        count,
                        table.required(index + 1),
                        "protected at prefix {} without need",
                        index + 1
                    );
                }
            } else {
                others += 1;
            }
        }
    }

    #[test]
    fn ties_go_to_the_protected_candidate() {
        let pool = vec![
            Candidate::new(0, 1.0, 0),
            Candidate::new(1, 1.0, 1),
            Candidate::new(2, 0.5, 0),
        ];
        let mut out = RerankOutput::new();
        fair(0.1, 0.1)
            .rerank(&pool, 3, None, &mut rng(0), &mut out)
            .expect("reranks");
        assert_eq!(out.order, vec![1, 0, 2]);
    }

    #[test]
    fn too_few_protected_candidates_give_the_best_feasible_ranking_and_say_so() {
        let mut groups = vec![0u32; 40];
        groups[39] = 1;
        let pool = pool_from(&groups);
        let mut out = RerankOutput::new();
        fair(0.5, 0.1)
            .rerank(&pool, 20, None, &mut rng(0), &mut out)
            .expect("reranks");
        assert!(!out.report.satisfied && out.report.fallback);
        let violation = out.report.violation.expect("violation reported");
        assert_eq!(violation.group, 1);
        assert!(violation.actual < violation.required);
        assert!(out.order.contains(&39));
        assert_eq!(out.order.len(), 20);
        assert!(!out.report.notes.is_empty());
    }

    #[test]
    fn short_pools_and_zero_k_are_handled() {
        let pool = pool_from(&[0, 1, 0]);
        let mut out = RerankOutput::new();
        let ranker = fair(0.5, 0.1);
        ranker
            .rerank(&pool, 10, None, &mut rng(0), &mut out)
            .expect("reranks");
        assert_eq!(out.order.len(), 3);
        ranker
            .rerank(&pool, 0, None, &mut rng(0), &mut out)
            .expect("reranks");
        assert!(out.order.is_empty() && out.report.satisfied);
        ranker
            .rerank(&[], 5, None, &mut rng(0), &mut out)
            .expect("reranks");
        assert!(out.order.is_empty());
    }
}
