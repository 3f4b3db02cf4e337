//! rND, rKL and rRD (Yang & Stoyanovich, "Measuring Fairness in Ranked Outputs", SSDBM 2017)
//! with the normalizer computed exactly.
//!
//! For a ranking of `N` items of which `P` are protected, with `S+_{1..i}` the protected items
//! in the top `i`, and cut points `i = s, 2s, ...` (`s = 10` in the paper):
//!
//! - rND = `(1/Z) sum_i |S+_{1..i}/i - P/N| / log2(i)`
//! - rKL = `(1/Z) sum_i D_KL(P_i || Q) / log2(i)` with `P_i = (S+_{1..i}/i, S-_{1..i}/i)`,
//!   `Q = (P/N, (N-P)/N)`, in bits with `0 log 0 = 0` (the reference code replaces 0 and 1 by
//!   0.001 instead)
//! - rRD = `(1/Z) sum_i |S+_{1..i}/S-_{1..i} - P/(N-P)| / log2(i)`, where a prefix without
//!   non-protected items has ratio 0 (the reference code's convention)
//!
//! These are the paper's definitions, so values differ from the reference code's
//! (`DataResponsibly/FairRank`, `measures.py`) in two more ways: its rND divides by
//! `log2(i + 1)` instead of `log2(i)`, and its rRD is one-sided,
//! `|min(P/(N-P), S+/S-) - P/(N-P)|` (following the FATML poster: over-representing the
//! protected group costs nothing there), where the paper's and ours is two-sided. Example:
//! `N = 20, P = 10, s = 10`, 9 protected items in the top 10: the rRD term at `i = 10` is
//! `|9 - 1| = 8` here and 0 there.
//!
//! `Z` is the largest value of the sum over all rankings with the same `N` and `P`. The
//! reference code estimates it by simulating rankings; here it is exact. The sum depends on
//! a ranking only through the protected counts `x_j` at the cut points `c_j`, and a count
//! sequence is realizable iff `max(0, P - (N - c_j)) <= x_j <= min(c_j, P)` and
//! `0 <= x_{j+1} - x_j <= c_{j+1} - c_j`. A dynamic program over cut points and counts (with a
//! sliding-window maximum) therefore maximizes over all rankings in `O(N/s * P)` time.
//!
//! Why not just put all protected items first or last? For rND and rKL the per-prefix terms
//! are convex in the count, so each term is largest at an extreme count, and enumerating every
//! `N <= 60` with steps 2, 3, 5 and 10 finds the maximum always at one of the two extreme
//! rankings; but the two extremes are not the only vertices of the set of count sequences, so
//! that is an observation, not a proof. For rRD with the zero-denominator convention the terms
//! are not convex and the extremes are often not maximal (e.g. `N = 7, P = 2, s = 2`). The
//! program is exact for all three.

use std::collections::VecDeque;

use crate::error::FairnessError;

/// Which of the three measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankFairnessMeasure {
    /// Normalized discounted difference.
    Rnd,
    /// Normalized discounted KL-divergence.
    Rkl,
    /// Normalized discounted ratio difference.
    Rrd,
}

impl RankFairnessMeasure {
    /// The term for a prefix of length `prefix` holding `protected_in_prefix` protected items,
    /// in a ranking of `total` items with `protected_total` protected.
    fn term(
        self,
        protected_in_prefix: usize,
        prefix: usize,
        protected_total: usize,
        total: usize,
    ) -> f64 {
        let x = protected_in_prefix as f64;
        let i = prefix as f64;
        let p = protected_total as f64;
        let n = total as f64;
        match self {
            Self::Rnd => (x / i - p / n).abs(),
            Self::Rkl => {
                let share = x / i;
                let expected = p / n;
                let part = |a: f64, b: f64| if a > 0.0 { a * (a / b).log2() } else { 0.0 };
                part(share, expected) + part(1.0 - share, 1.0 - expected)
            }
            Self::Rrd => {
                let expected = p / (n - p);
                let unprotected = i - x;
                let ratio = if unprotected > 0.0 {
                    x / unprotected
                } else {
                    0.0
                };
                (ratio - expected).abs()
            }
        }
    }

    /// Whether the measure is defined for `protected_total` of `total` (both groups present).
    fn defined(protected_total: usize, total: usize) -> bool {
        protected_total > 0 && protected_total < total
    }
}

fn check(function: &'static str, total: usize, step: usize) -> Result<(), FairnessError> {
    if step < 2 {
        return Err(FairnessError::input(
            function,
            format!("cut step {step} must be at least 2 (the discount is 1/log2(i))"),
        ));
    }
    if total == 0 {
        return Err(FairnessError::input(function, "the ranking is empty"));
    }
    Ok(())
}

/// The unnormalized sum `sum_i term_i / log2(i)` over cut points `step, 2 step, ... <= N`.
pub fn rank_fairness_unnormalized(
    measure: RankFairnessMeasure,
    protected: &[bool],
    step: usize,
) -> Result<f64, FairnessError> {
    check("rank_fairness_unnormalized", protected.len(), step)?;
    let total = protected.len();
    let protected_total = protected.iter().filter(|&&flag| flag).count();
    if !RankFairnessMeasure::defined(protected_total, total) {
        return Ok(0.0);
    }
    let mut count = 0usize;
    let mut sum = 0.0;
    for (index, &flag) in protected.iter().enumerate() {
        count += usize::from(flag);
        let prefix = index + 1;
        if prefix % step == 0 {
            sum += measure.term(count, prefix, protected_total, total) / (prefix as f64).log2();
        }
    }
    Ok(sum)
}

/// The exact normalizer `Z`: the maximum of the unnormalized measure over all rankings of
/// `total` items with `protected_total` protected (0 when the measure is undefined).
pub fn rank_fairness_normalizer(
    measure: RankFairnessMeasure,
    total: usize,
    protected_total: usize,
    step: usize,
) -> Result<f64, FairnessError> {
    const FUNCTION: &str = "rank_fairness_normalizer";
    check(FUNCTION, total, step)?;
    if protected_total > total {
        return Err(FairnessError::input(
            FUNCTION,
            "more protected items than items",
        ));
    }
    if !RankFairnessMeasure::defined(protected_total, total) {
        return Ok(0.0);
    }
    // values[x - low] = best sum over cut points so far with x protected at the current cut.
    let mut values: Vec<f64> = vec![0.0];
    let mut low = 0usize;
    let mut previous_cut = 0usize;
    let mut next_values = Vec::new();
    let mut window: VecDeque<usize> = VecDeque::new();
    let mut cut = step;
    while cut <= total {
        let gap = cut - previous_cut;
        let new_low = protected_total.saturating_sub(total - cut);
        let new_high = cut.min(protected_total);
        let high = low + values.len() - 1;
        next_values.clear();
        window.clear();
        // Sliding maximum over previous counts x' in [x - gap, x].
        let mut pushed = low;
        for x in new_low..=new_high {
            while pushed <= high && pushed <= x {
                while window
                    .back()
                    .is_some_and(|&back| values[back - low] <= values[pushed - low])
                {
                    window.pop_back();
                }
                window.push_back(pushed);
                pushed += 1;
            }
            while window.front().is_some_and(|&front| front + gap < x) {
                window.pop_front();
            }
            let best = window
                .front()
                .map_or(f64::NEG_INFINITY, |&front| values[front - low]);
            let term = measure.term(x, cut, protected_total, total) / (cut as f64).log2();
            next_values.push(best + term);
        }
        std::mem::swap(&mut values, &mut next_values);
        low = new_low;
        previous_cut = cut;
        cut += step;
    }
    Ok(values.iter().copied().fold(0.0, f64::max))
}

/// The normalized measure in [0, 1]: unnormalized value divided by the exact normalizer
/// (`protected[r - 1]` tells whether the item at rank `r` is protected; the ranking covers
/// all `N` items). 0 when the normalizer is 0.
pub fn rank_fairness(
    measure: RankFairnessMeasure,
    protected: &[bool],
    step: usize,
) -> Result<f64, FairnessError> {
    let value = rank_fairness_unnormalized(measure, protected, step)?;
    let protected_total = protected.iter().filter(|&&flag| flag).count();
    let normalizer = rank_fairness_normalizer(measure, protected.len(), protected_total, step)?;
    Ok(if normalizer > 0.0 {
        (value / normalizer).min(1.0)
    } else {
        0.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Maximum over all placements of `protected_total` protected items among `total`.
    fn brute_force_normalizer(
        measure: RankFairnessMeasure,
        total: usize,
        protected_total: usize,
        step: usize,
    ) -> f64 {
        let mut best = 0.0f64;
        for mask in 0u32..(1u32 << total) {
            if mask.count_ones() as usize != protected_total {
                continue;
            }
            let ranking: Vec<bool> = (0..total).map(|bit| (mask >> bit) & 1 == 1).collect();
            best = best.max(rank_fairness_unnormalized(measure, &ranking, step).expect("valid"));
        }
        best
    }

    #[test]
    fn exact_normalizer_matches_brute_force() {
        for measure in [
            RankFairnessMeasure::Rnd,
            RankFairnessMeasure::Rkl,
            RankFairnessMeasure::Rrd,
        ] {
            for &(total, step) in &[(12usize, 2usize), (13, 3), (10, 2), (14, 4)] {
                for protected_total in 1..total {
                    let exact = rank_fairness_normalizer(measure, total, protected_total, step)
                        .expect("valid");
                    let brute = brute_force_normalizer(measure, total, protected_total, step);
                    assert!(
                        (exact - brute).abs() < 1e-12,
                        "{measure:?} N={total} P={protected_total} s={step}: {exact} vs {brute}"
                    );
                }
            }
        }
    }

    /// The larger of the two extreme rankings (all protected first, all protected last).
    fn extreme(
        measure: RankFairnessMeasure,
        total: usize,
        protected_total: usize,
        step: usize,
    ) -> f64 {
        let first: Vec<bool> = (0..total).map(|i| i < protected_total).collect();
        let last: Vec<bool> = (0..total).map(|i| i >= total - protected_total).collect();
        rank_fairness_unnormalized(measure, &first, step)
            .expect("valid")
            .max(rank_fairness_unnormalized(measure, &last, step).expect("valid"))
    }

    #[test]
    fn extremes_attain_the_maximum_of_rnd_and_rkl_on_small_cases() {
        for measure in [RankFairnessMeasure::Rnd, RankFairnessMeasure::Rkl] {
            for total in 4..=24usize {
                for protected_total in 1..total {
                    for step in [2usize, 3, 5] {
                        let exact = rank_fairness_normalizer(measure, total, protected_total, step)
                            .expect("valid");
                        let best_extreme = extreme(measure, total, protected_total, step);
                        assert!(
                            (exact - best_extreme).abs() <= 1e-9 * exact.max(1.0),
                            "{measure:?} N={total} P={protected_total}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn extremes_are_not_always_the_maximum_of_rrd() {
        // Document the justification: compare the exact maximum with the two extremes.
        let mut strictly_better = false;
        for total in 6..=14usize {
            for protected_total in 1..total {
                for step in 2..=3usize {
                    let exact = rank_fairness_normalizer(
                        RankFairnessMeasure::Rrd,
                        total,
                        protected_total,
                        step,
                    )
                    .expect("valid");
                    let best_extreme =
                        extreme(RankFairnessMeasure::Rrd, total, protected_total, step);
                    assert!(exact >= best_extreme - 1e-12);
                    if exact > best_extreme + 1e-9 {
                        strictly_better = true;
                    }
                }
            }
        }
        assert!(
            strictly_better,
            "expected an instance where neither extreme attains the maximum"
        );
    }

    #[test]
    fn measures_are_zero_for_proportional_and_one_for_the_worst_ranking() {
        // Alternating protected items: every even prefix matches P/N = 1/2.
        let alternating: Vec<bool> = (0..20).map(|i| i % 2 == 0).collect();
        assert!(rank_fairness(RankFairnessMeasure::Rnd, &alternating, 2).expect("valid") < 1e-12);
        assert!(rank_fairness(RankFairnessMeasure::Rkl, &alternating, 2).expect("valid") < 1e-12);
        let first: Vec<bool> = (0..20).map(|i| i < 4).collect();
        let value = rank_fairness(RankFairnessMeasure::Rnd, &first, 10).expect("valid");
        assert!(value > 0.0 && value <= 1.0);
        assert_eq!(
            rank_fairness(RankFairnessMeasure::Rnd, &[true, true], 2).expect("valid"),
            0.0
        );
        assert!(rank_fairness(RankFairnessMeasure::Rnd, &first, 1).is_err());
    }
}
