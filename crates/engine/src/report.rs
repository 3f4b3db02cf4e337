//! The per-answer fairness report: exposure share by group and utility kept by re-ranking.
//!
//! Exposure of rank r (1-based) is the DCG position discount `1 / log2(1 + r)` (Singh and
//! Joachims, KDD 2018); shares are relative to the total exposure of the ranking described.
//! Utility is DCG@k of the answer over DCG@k of the unconstrained top-k of the same pool,
//! with gains equal to the re-ranker's input scores shifted so the lowest pool score is 0.

use kernels::ScoredItem;

use crate::response::{FairnessFallback, FairnessReport, GroupExposure};

/// Exposure (position discount) of 1-based rank `rank`.
pub(crate) fn exposure(rank: usize) -> f64 {
    1.0 / ((1.0 + rank as f64).log2())
}

/// What the report is computed from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReportInput<'a> {
    /// Constraint applied.
    pub constraint: &'a str,
    /// The group attribute's name and its labels (one per item table row), if used.
    pub groups: Option<(&'a str, &'a [u32])>,
    /// The pool, best first (unconstrained order).
    pub pool: &'a [ScoredItem],
    /// The answer: positions into `pool`, best first.
    pub answer: &'a [usize],
    /// Number of items in the unconstrained answer (`min(k, pool.len())`): the pool prefix.
    pub unconstrained_len: usize,
    /// Fallback taken and its reason.
    pub fallback: (FairnessFallback, &'a str),
    /// Amortized scope (empty for per-ranking constraints).
    pub exposure_scope: &'a str,
}

/// Builds the fairness report of one answer.
pub(crate) fn fairness_report(input: &ReportInput<'_>) -> FairnessReport {
    let unconstrained: Vec<usize> = (0..input.unconstrained_len.min(input.pool.len())).collect();
    let groups = match input.groups {
        Some((_, labels)) => group_exposures(input.pool, input.answer, &unconstrained, labels),
        None => Vec::new(),
    };
    FairnessReport {
        constraint: input.constraint.to_owned(),
        group_attribute: input
            .groups
            .map(|(name, _)| name.to_owned())
            .unwrap_or_default(),
        satisfied: true,
        violations: Vec::new(),
        fallback: input.fallback.0,
        fallback_reason: input.fallback.1.to_owned(),
        ndcg_vs_unconstrained: ndcg_vs(input.pool, input.answer, &unconstrained),
        groups,
        exposure_scope: input.exposure_scope.to_owned(),
    }
}

/// DCG of `answer` over DCG of `reference` (both positions into `pool`), gains shifted so
/// the lowest pool score is 0; 1 when both DCGs are 0.
pub(crate) fn ndcg_vs(pool: &[ScoredItem], answer: &[usize], reference: &[usize]) -> f64 {
    let lowest = pool
        .iter()
        .map(|item| f64::from(item.score))
        .fold(f64::INFINITY, f64::min);
    let dcg = |order: &[usize]| -> f64 {
        order
            .iter()
            .enumerate()
            .filter_map(|(position, &index)| {
                pool.get(index)
                    .map(|item| (f64::from(item.score) - lowest) * exposure(position + 1))
            })
            .sum()
    };
    let (achieved, ideal) = (dcg(answer), dcg(reference));
    // The reference is the best order, so a zero ideal DCG means every gain is zero.
    if ideal <= 0.0 {
        1.0
    } else {
        (achieved / ideal).clamp(0.0, 1.0)
    }
}

/// Exposure shares per group present in the pool, ascending label.
fn group_exposures(
    pool: &[ScoredItem],
    answer: &[usize],
    unconstrained: &[usize],
    labels: &[u32],
) -> Vec<GroupExposure> {
    let label_of = |position: usize| {
        pool.get(position)
            .and_then(|item| labels.get(item.index as usize))
            .copied()
    };
    let mut present: Vec<u32> = (0..pool.len()).filter_map(label_of).collect();
    present.sort_unstable();
    present.dedup();
    let slot = |label: u32| present.binary_search(&label).ok();

    let mut in_pool = vec![0u32; present.len()];
    for position in 0..pool.len() {
        if let Some(group) = label_of(position).and_then(slot) {
            in_pool[group] += 1;
        }
    }
    let shares = |order: &[usize]| -> (Vec<f64>, Vec<u32>) {
        let mut exposure_by_group = vec![0.0f64; present.len()];
        let mut counts = vec![0u32; present.len()];
        for (position, &index) in order.iter().enumerate() {
            if let Some(group) = label_of(index).and_then(slot) {
                exposure_by_group[group] += exposure(position + 1);
                counts[group] += 1;
            }
        }
        let total: f64 = exposure_by_group.iter().sum();
        if total > 0.0 {
            exposure_by_group
                .iter_mut()
                .for_each(|share| *share /= total);
        }
        (exposure_by_group, counts)
    };
    let (answer_shares, answer_counts) = shares(answer);
    let (unconstrained_shares, _) = shares(unconstrained);
    present
        .iter()
        .enumerate()
        .map(|(group, &label)| GroupExposure {
            group: label,
            items_returned: answer_counts[group],
            items_in_pool: in_pool[group],
            exposure_share: answer_shares[group],
            unconstrained_exposure_share: unconstrained_shares[group],
            target_share: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(scores: &[f32]) -> Vec<ScoredItem> {
        scores
            .iter()
            .enumerate()
            .map(|(i, &s)| ScoredItem::new(i as u32, s))
            .collect()
    }

    #[test]
    fn exposure_is_the_dcg_discount() {
        assert_eq!(exposure(1), 1.0);
        assert!((exposure(3) - 0.5).abs() < 1e-15);
        assert!((exposure(2) - 1.0 / 3f64.log2()).abs() < 1e-15);
    }

    #[test]
    fn shares_follow_the_discount_and_sum_to_one() {
        // Rows 0..5 with labels; answer = top 3 of the pool.
        let labels = [0, 1, 0, 1, 2];
        let pool = pool(&[5.0, 4.0, 3.0, 2.0, 1.0]);
        let report = fairness_report(&ReportInput {
            constraint: "none",
            groups: Some(("provider_group", &labels)),
            pool: &pool,
            answer: &[0, 1, 2],
            unconstrained_len: 3,
            fallback: (FairnessFallback::None, ""),
            exposure_scope: "",
        });
        let total = exposure(1) + exposure(2) + exposure(3);
        assert_eq!(report.groups.len(), 3);
        let group0 = &report.groups[0];
        assert_eq!(
            (group0.group, group0.items_returned, group0.items_in_pool),
            (0, 2, 2)
        );
        assert!((group0.exposure_share - (exposure(1) + exposure(3)) / total).abs() < 1e-12);
        let group2 = &report.groups[2];
        assert_eq!((group2.items_returned, group2.items_in_pool), (0, 1));
        assert_eq!(group2.exposure_share, 0.0);
        let sum: f64 = report.groups.iter().map(|g| g.exposure_share).sum();
        assert!((sum - 1.0).abs() < 1e-12);
        for group in &report.groups {
            assert_eq!(group.exposure_share, group.unconstrained_exposure_share);
        }
        assert_eq!(report.ndcg_vs_unconstrained, 1.0);
        assert!(report.satisfied);
    }

    #[test]
    fn ndcg_drops_when_the_answer_swaps_items() {
        let pool = pool(&[3.0, 2.0, 1.0, 0.0]);
        // Gains after the shift: 3, 2, 1, 0.
        let ideal = 3.0 * exposure(1) + 2.0 * exposure(2);
        let swapped = 2.0 * exposure(1) + 3.0 * exposure(2);
        assert!((ndcg_vs(&pool, &[1, 0], &[0, 1]) - swapped / ideal).abs() < 1e-12);
        assert_eq!(ndcg_vs(&pool, &[0, 1], &[0, 1]), 1.0);
        // All gains zero (equal scores): 1.
        let flat = super::tests::pool(&[1.0, 1.0]);
        assert_eq!(ndcg_vs(&flat, &[1, 0], &[0, 1]), 1.0);
    }
}
