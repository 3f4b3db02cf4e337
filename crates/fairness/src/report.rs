//! The per-answer fairness report attached to every Rank answer.

use serde::{Deserialize, Serialize};

use crate::candidate::{Candidate, dcg_weight};
use crate::error::FairnessError;
use crate::reranker::RerankReport;

/// Exposure of one group in an answer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GroupShare {
    /// Group label.
    pub group: u32,
    /// Items of the group in the answer.
    pub items: usize,
    /// Sum of DCG position weights `1 / log2(1 + r)` of the group's items.
    pub exposure: f64,
    /// `exposure` divided by the total exposure of the answer.
    pub share: f64,
}

/// What the server reports with each answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AnswerReport {
    /// Exposure share per group present in the answer, in label order.
    pub groups: Vec<GroupShare>,
    /// NDCG@k of the answer against the unconstrained order (the pool's top k), with the
    /// scores clamped at 0 as linear gains; 1 means no utility was lost.
    pub ndcg: f64,
    /// Whether the constraint held (from the re-ranker's report).
    pub satisfied: bool,
    /// Whether the re-ranker had to relax the constraint.
    pub fallback: bool,
}

/// Fills `out` for the answer `order` (pool positions) drawn from `pool`.
///
/// Runs in O(k * groups) without touching the rest of the pool, reusing `out`'s buffers.
pub fn answer_report(
    pool: &[Candidate],
    order: &[usize],
    rerank: &RerankReport,
    out: &mut AnswerReport,
) -> Result<(), FairnessError> {
    out.groups.clear();
    out.satisfied = rerank.satisfied;
    out.fallback = rerank.fallback;
    let mut total = 0.0;
    let mut dcg = 0.0;
    let mut ideal = 0.0;
    for (index, &position) in order.iter().enumerate() {
        let Some(candidate) = pool.get(position) else {
            return Err(FairnessError::input(
                "answer_report",
                format!(
                    "answer position {position} is outside the pool of {}",
                    pool.len()
                ),
            ));
        };
        let weight = dcg_weight(index + 1);
        total += weight;
        dcg += weight * f64::from(candidate.score).max(0.0);
        if let Some(reference) = pool.get(index) {
            ideal += weight * f64::from(reference.score).max(0.0);
        }
        match out
            .groups
            .binary_search_by_key(&candidate.group, |entry| entry.group)
        {
            Ok(slot) => {
                out.groups[slot].items += 1;
                out.groups[slot].exposure += weight;
            }
            Err(slot) => out.groups.insert(
                slot,
                GroupShare {
                    group: candidate.group,
                    items: 1,
                    exposure: weight,
                    share: 0.0,
                },
            ),
        }
    }
    for entry in &mut out.groups {
        entry.share = if total > 0.0 {
            entry.exposure / total
        } else {
            0.0
        };
    }
    out.ndcg = if ideal > 0.0 {
        (dcg / ideal).min(1.0)
    } else {
        1.0
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_gives_exposure_shares_and_ndcg_against_score_order() {
        let pool = vec![
            Candidate::new(0, 3.0, 0),
            Candidate::new(1, 2.0, 0),
            Candidate::new(2, 1.0, 1),
        ];
        let mut out = AnswerReport::default();
        let rerank = RerankReport {
            satisfied: true,
            ..RerankReport::default()
        };
        answer_report(&pool, &[2, 0], &rerank, &mut out).expect("valid");
        assert_eq!(out.groups.len(), 2);
        let total = 1.0 + 1.0 / 3f64.log2();
        assert!((out.groups[1].share - 1.0 / total).abs() < 1e-12);
        assert_eq!(out.groups[0].items, 1);
        let expected = (1.0 + 3.0 / 3f64.log2()) / (3.0 + 2.0 / 3f64.log2());
        assert!((out.ndcg - expected).abs() < 1e-12);
        assert!(out.satisfied);
        answer_report(&pool, &[0, 1], &rerank, &mut out).expect("valid");
        assert!((out.ndcg - 1.0).abs() < 1e-15);
        assert!(answer_report(&pool, &[7], &rerank, &mut out).is_err());
    }
}
