//! Fairness and utility metrics of rankings, each with its formula and reference.
//!
//! Ranks are 1-based in the formulas. Functions take plain slices (group label per rank,
//! relevance per item) so they serve the server's per-answer report and offline evaluation
//! alike; they validate their input and never panic.

pub mod expected_exposure;
pub mod rank_fairness;

use serde::{Deserialize, Serialize};

use crate::candidate::dcg_weight;
use crate::error::FairnessError;

pub use expected_exposure::{ExpectedExposure, expected_exposure};
pub use rank_fairness::{
    RankFairnessMeasure, rank_fairness, rank_fairness_normalizer, rank_fairness_unnormalized,
};

/// A browsing model assigning exposure to ranks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionWeighting {
    /// `w_r = 1 / log2(1 + r)` (DCG discount; Singh & Joachims, KDD 2018).
    Dcg,
    /// `w_r = patience^(r - 1)` (rank-biased precision user model; Moffat & Zobel, TOIS 2008,
    /// without the constant `1 - patience`, as in Diaz et al. 2020).
    Rbp {
        /// Probability of continuing to the next rank, in (0, 1).
        patience: f64,
    },
}

impl PositionWeighting {
    /// Exposure of the 1-based `rank` (0 for rank 0).
    pub fn weight(&self, rank: usize) -> f64 {
        match *self {
            Self::Dcg => dcg_weight(rank),
            Self::Rbp { patience } => {
                if rank == 0 {
                    0.0
                } else {
                    patience.powi(i32::try_from(rank - 1).unwrap_or(i32::MAX))
                }
            }
        }
    }

    fn validate(&self, function: &'static str) -> Result<(), FairnessError> {
        match *self {
            Self::Dcg => Ok(()),
            Self::Rbp { patience } if patience > 0.0 && patience < 1.0 => Ok(()),
            Self::Rbp { patience } => Err(FairnessError::input(
                function,
                format!("RBP patience {patience} must lie in (0, 1)"),
            )),
        }
    }
}

/// A value attached to a group label.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GroupValue {
    /// Group label.
    pub group: u32,
    /// The value for that group.
    pub value: f64,
}

/// Adds `value` to `group` in a label-sorted list.
fn accumulate(out: &mut Vec<GroupValue>, group: u32, value: f64) {
    match out.binary_search_by_key(&group, |entry| entry.group) {
        Ok(index) => out[index].value += value,
        Err(index) => out.insert(index, GroupValue { group, value }),
    }
}

/// Exposure per group: `Exposure(G) = sum_{r : group(r) = G} w_r` for the chosen weighting
/// (Singh & Joachims, "Fairness of Exposure in Rankings", KDD 2018). `ranked_groups[r - 1]`
/// is the group of the item at rank `r`; `out` is cleared and filled in label order.
pub fn group_exposure(
    ranked_groups: &[u32],
    weighting: PositionWeighting,
    out: &mut Vec<GroupValue>,
) -> Result<(), FairnessError> {
    weighting.validate("group_exposure")?;
    out.clear();
    for (index, &group) in ranked_groups.iter().enumerate() {
        accumulate(out, group, weighting.weight(index + 1));
    }
    Ok(())
}

/// Ratio of the least to the most exposed group per unit of relevance:
/// `min_G (Exposure(G) / Merit(G)) / max_G (Exposure(G) / Merit(G))`, where `Exposure(G)`
/// sums the position weights of the group's ranked items and `Merit(G)` sums the relevance of
/// all the group's items in the pool (Singh & Joachims 2018, disparate treatment: exposure
/// proportional to merit gives 1; the mean-based form is identical since the group size
/// cancels). `ranked` holds pool indices; groups with zero merit are ignored. Returns `None`
/// when fewer than one group has merit or no group has exposure.
pub fn exposure_per_relevance_ratio(
    ranked: &[usize],
    pool_groups: &[u32],
    pool_relevance: &[f64],
    weighting: PositionWeighting,
) -> Result<Option<f64>, FairnessError> {
    const FUNCTION: &str = "exposure_per_relevance_ratio";
    weighting.validate(FUNCTION)?;
    if pool_groups.len() != pool_relevance.len() {
        return Err(FairnessError::input(
            FUNCTION,
            "pool_groups and pool_relevance differ in length",
        ));
    }
    let mut merit = Vec::new();
    for (&group, &relevance) in pool_groups.iter().zip(pool_relevance) {
        if !(relevance.is_finite() && relevance >= 0.0) {
            return Err(FairnessError::input(
                FUNCTION,
                format!("relevance {relevance} must be finite and non-negative"),
            ));
        }
        accumulate(&mut merit, group, relevance);
    }
    let mut exposure: Vec<GroupValue> = merit
        .iter()
        .map(|entry| GroupValue {
            group: entry.group,
            value: 0.0,
        })
        .collect();
    for (index, &item) in ranked.iter().enumerate() {
        let Some(&group) = pool_groups.get(item) else {
            return Err(FairnessError::input(
                FUNCTION,
                format!("ranked item {item} is outside the pool"),
            ));
        };
        accumulate(&mut exposure, group, weighting.weight(index + 1));
    }
    let ratios = merit
        .iter()
        .zip(&exposure)
        .filter(|(merit, _)| merit.value > 0.0)
        .map(|(merit, exposure)| exposure.value / merit.value);
    let (low, high) = ratios.fold((f64::INFINITY, 0.0f64), |(low, high), ratio| {
        (low.min(ratio), high.max(ratio))
    });
    Ok((high > 0.0 && low.is_finite()).then(|| low / high))
}

/// NDCG of an answer against a reference ranking (normally the unconstrained score order):
/// `DCG(answer) / DCG(reference)` with `DCG(g) = sum_r g_r / log2(1 + r)` over the first `k`
/// ranks and linear gains (Järvelin & Kekäläinen, TOIS 2002). Gains must be finite and
/// non-negative; the result is 1 when the reference has no gain.
pub fn ndcg_at_k(
    answer_gains: &[f64],
    reference_gains: &[f64],
    k: usize,
) -> Result<f64, FairnessError> {
    const FUNCTION: &str = "ndcg_at_k";
    let dcg = |gains: &[f64]| -> Result<f64, FairnessError> {
        let mut total = 0.0;
        for (index, &gain) in gains.iter().take(k).enumerate() {
            if !(gain.is_finite() && gain >= 0.0) {
                return Err(FairnessError::input(
                    FUNCTION,
                    format!("gain {gain} must be finite and non-negative"),
                ));
            }
            total += gain * dcg_weight(index + 1);
        }
        Ok(total)
    };
    let ideal = dcg(reference_gains)?;
    let actual = dcg(answer_gains)?;
    Ok(if ideal > 0.0 { actual / ideal } else { 1.0 })
}

fn check_distribution(
    function: &'static str,
    desired: &[(u32, f64)],
    must_sum_to_one: bool,
) -> Result<(), FairnessError> {
    let mut labels: Vec<u32> = desired.iter().map(|&(group, _)| group).collect();
    labels.sort_unstable();
    if labels.windows(2).any(|window| window[0] == window[1]) {
        return Err(FairnessError::input(
            function,
            "a group is listed twice in the desired distribution",
        ));
    }
    let mut sum = 0.0;
    for &(group, share) in desired {
        if !(share.is_finite() && share > 0.0) {
            return Err(FairnessError::input(
                function,
                format!("desired share of group {group} is {share}; it must be positive"),
            ));
        }
        sum += share;
    }
    if must_sum_to_one && (sum - 1.0).abs() > 1e-6 {
        return Err(FairnessError::input(
            function,
            format!("desired shares sum to {sum}, not 1"),
        ));
    }
    Ok(())
}

/// Skew@k per desired group: `Skew_a@k = ln(p_{tau^k, a} / p_{q, a})`, the log ratio of the
/// group's proportion in the top `k` to its desired proportion (Geyik, Ambler, Kenthapadi,
/// KDD 2019, Eq. 1). A group absent from the top `k` has skew `-inf`; MinSkew@k and
/// MaxSkew@k are the minimum and maximum of the returned values.
pub fn skew_at_k(
    ranked_groups: &[u32],
    k: usize,
    desired: &[(u32, f64)],
) -> Result<Vec<GroupValue>, FairnessError> {
    const FUNCTION: &str = "skew_at_k";
    check_distribution(FUNCTION, desired, false)?;
    let prefix = &ranked_groups[..k.min(ranked_groups.len())];
    if prefix.is_empty() {
        return Err(FairnessError::input(FUNCTION, "the top k is empty"));
    }
    Ok(desired
        .iter()
        .map(|&(group, share)| {
            let proportion =
                prefix.iter().filter(|&&label| label == group).count() as f64 / prefix.len() as f64;
            GroupValue {
                group,
                value: (proportion / share).ln(),
            }
        })
        .collect())
}

/// Normalized discounted cumulative KL-divergence (Geyik et al., KDD 2019, Eq. 3):
/// `NDKL = (1 / Z) sum_{i=1}^{|tau|} d_KL(D_{tau^i} || D) / log2(i + 1)` with
/// `Z = sum_i 1 / log2(i + 1)`, `D_{tau^i}` the group distribution of the top `i` and `D` the
/// desired distribution (natural log, `0 ln 0 = 0`). 0 is ideal. Every ranked label must be in
/// `desired`, whose shares must sum to 1.
pub fn ndkl(ranked_groups: &[u32], desired: &[(u32, f64)]) -> Result<f64, FairnessError> {
    const FUNCTION: &str = "ndkl";
    check_distribution(FUNCTION, desired, true)?;
    if ranked_groups.is_empty() {
        return Err(FairnessError::input(FUNCTION, "the ranking is empty"));
    }
    let mut counts = vec![0usize; desired.len()];
    let (mut total, mut normalizer) = (0.0, 0.0);
    for (index, &group) in ranked_groups.iter().enumerate() {
        let Some(slot) = desired.iter().position(|&(label, _)| label == group) else {
            return Err(FairnessError::input(
                FUNCTION,
                format!("group {group} is not in the desired distribution"),
            ));
        };
        counts[slot] += 1;
        let prefix = (index + 1) as f64;
        let divergence: f64 = counts
            .iter()
            .zip(desired)
            .filter(|(count, _)| **count > 0)
            .map(|(&count, &(_, share))| {
                let proportion = count as f64 / prefix;
                proportion * (proportion / share).ln()
            })
            .sum();
        let weight = dcg_weight(index + 1);
        total += weight * divergence;
        normalizer += weight;
    }
    Ok(total / normalizer)
}

/// Attention-weighted rank fairness as scored in the TREC 2022 Fair Ranking Track (Task 1;
/// Sapiezynski et al. 2019): group exposure with weights `1 / log2(max(r, 2))`, normalized to
/// a distribution, compared with the target distribution by the Jensen-Shannon divergence in
/// nats: `AWRF = 1 - JSD(exposure || target)` (the track computes `1 - d^2` with `d` the SciPy
/// Jensen-Shannon distance). 1 is perfect; labels missing from either side count as 0.
pub fn awrf(ranked_groups: &[u32], target: &[(u32, f64)]) -> Result<f64, FairnessError> {
    const FUNCTION: &str = "awrf";
    check_distribution(FUNCTION, target, false)?;
    if ranked_groups.is_empty() {
        return Err(FairnessError::input(FUNCTION, "the ranking is empty"));
    }
    let mut exposure = Vec::new();
    for (index, &group) in ranked_groups.iter().enumerate() {
        accumulate(
            &mut exposure,
            group,
            1.0 / ((index + 1).max(2) as f64).log2(),
        );
    }
    let exposure_total: f64 = exposure.iter().map(|entry| entry.value).sum();
    let target_total: f64 = target.iter().map(|&(_, share)| share).sum();
    let mut labels: Vec<u32> = exposure
        .iter()
        .map(|entry| entry.group)
        .chain(target.iter().map(|&(group, _)| group))
        .collect();
    labels.sort_unstable();
    labels.dedup();
    let mut divergence = 0.0;
    for label in labels {
        let p = exposure
            .iter()
            .find(|entry| entry.group == label)
            .map_or(0.0, |entry| entry.value / exposure_total);
        let q = target
            .iter()
            .find(|&&(group, _)| group == label)
            .map_or(0.0, |&(_, share)| share / target_total);
        let m = 0.5 * (p + q);
        if p > 0.0 {
            divergence += 0.5 * p * (p / m).ln();
        }
        if q > 0.0 {
            divergence += 0.5 * q * (q / m).ln();
        }
    }
    Ok(1.0 - divergence)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_exposure_sums_position_weights() {
        let mut out = Vec::new();
        group_exposure(&[1, 0, 1], PositionWeighting::Dcg, &mut out).expect("valid");
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].group, 0);
        assert!((out[0].value - 1.0 / 3f64.log2()).abs() < 1e-12);
        assert!((out[1].value - (1.0 + 0.5)).abs() < 1e-12);
        group_exposure(
            &[1, 0, 1],
            PositionWeighting::Rbp { patience: 0.5 },
            &mut out,
        )
        .expect("valid");
        assert!((out[0].value - 0.5).abs() < 1e-12 && (out[1].value - 1.25).abs() < 1e-12);
        assert!(group_exposure(&[1], PositionWeighting::Rbp { patience: 1.0 }, &mut out).is_err());
    }

    #[test]
    fn exposure_ratio_is_one_when_exposure_is_proportional_to_merit() {
        let groups = [0, 1, 0];
        let relevance = [1.0, 1.0, 1.0];
        // Exposure with weights 1, .5, .25: group 0 gets 1.25 for merit 2, group 1 gets .5 for merit 1.
        let ratio = exposure_per_relevance_ratio(
            &[0, 1, 2],
            &groups,
            &relevance,
            PositionWeighting::Rbp { patience: 0.5 },
        )
        .expect("valid")
        .expect("defined");
        assert!((ratio - 0.5 / 0.625).abs() < 1e-12);
        let unshown =
            exposure_per_relevance_ratio(&[0], &groups, &relevance, PositionWeighting::Dcg)
                .expect("valid");
        assert_eq!(unshown, Some(0.0));
        assert!(
            exposure_per_relevance_ratio(&[5], &groups, &relevance, PositionWeighting::Dcg)
                .is_err()
        );
    }

    #[test]
    fn ndcg_is_one_for_the_reference_and_below_for_worse_orders() {
        let reference = [3.0, 2.0, 1.0];
        assert!((ndcg_at_k(&reference, &reference, 3).expect("valid") - 1.0).abs() < 1e-15);
        let swapped = ndcg_at_k(&[2.0, 3.0, 1.0], &reference, 3).expect("valid");
        let expected = (2.0 + 3.0 / 3f64.log2() + 0.5) / (3.0 + 2.0 / 3f64.log2() + 0.5);
        assert!((swapped - expected).abs() < 1e-12);
        assert_eq!(ndcg_at_k(&[0.0], &[0.0], 1).expect("valid"), 1.0);
        assert!(ndcg_at_k(&[-1.0], &[1.0], 1).is_err());
    }

    #[test]
    fn skew_and_ndkl_follow_geyik_definitions() {
        let ranking = [0, 0, 1, 0];
        let skew = skew_at_k(&ranking, 4, &[(0, 0.5), (1, 0.5)]).expect("valid");
        assert!((skew[0].value - (0.75f64 / 0.5).ln()).abs() < 1e-12);
        assert!((skew[1].value - (0.25f64 / 0.5).ln()).abs() < 1e-12);
        let absent = skew_at_k(&ranking, 2, &[(1, 0.5)]).expect("valid");
        assert_eq!(absent[0].value, f64::NEG_INFINITY);
        // NDKL of a ranking that matches the distribution at every even prefix.
        let value = ndkl(&[0, 1], &[(0, 0.5), (1, 0.5)]).expect("valid");
        let kl1 = (1.0f64 / 0.5).ln();
        let expected = kl1 / (1.0 + 1.0 / 3f64.log2());
        assert!((value - expected).abs() < 1e-12);
        assert!(ndkl(&[2], &[(0, 1.0)]).is_err());
        assert!(ndkl(&[0], &[(0, 0.5)]).is_err());
    }

    #[test]
    fn awrf_is_one_at_the_target_and_uses_the_trec_discount() {
        // Ranks 1 and 2 both weigh 1 under 1/log2(max(r, 2)): two groups get equal exposure.
        assert!((awrf(&[0, 1], &[(0, 0.5), (1, 0.5)]).expect("valid") - 1.0).abs() < 1e-12);
        // All exposure on one group against a 50/50 target: JSD = ln 2 - 0.75 ln 1.5 ... computed directly.
        let value = awrf(&[0], &[(0, 0.5), (1, 0.5)]).expect("valid");
        let (p, q0, q1): (f64, f64, f64) = (1.0, 0.5, 0.5);
        let m0 = 0.5 * (p + q0);
        let m1 = 0.5 * q1;
        let jsd = 0.5 * p * (p / m0).ln() + 0.5 * (q0 * (q0 / m0).ln() + q1 * (q1 / m1).ln());
        assert!((value - (1.0 - jsd)).abs() < 1e-12);
        assert!(awrf(&[], &[(0, 1.0)]).is_err());
    }
}
