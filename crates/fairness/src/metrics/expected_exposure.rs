//! Expected exposure metrics EE-L, EE-D and EE-R (Diaz, Mitra, Ekstrand, Biega, Carterette,
//! "Evaluating Stochastic Rankings with Expected Exposure", CIKM 2020; reference code
//! `diazf/expeval`).
//!
//! Under the RBP browsing model with patience `gamma`, the item at 0-based rank `i` receives
//! exposure `gamma^i`. A stochastic policy is summarized by sampled rankings; the expected
//! exposure `eps_d` of item `d` is its mean exposure over the samples (0 when not ranked). The
//! target exposure `eps*` treats equally relevant items equally: items are grouped by
//! relevance grade in decreasing order, and a grade whose `m` items follow `b` items of higher
//! grades gets `eps*_d = (gamma^b - gamma^(b + m)) / (m (1 - gamma))`, the mean exposure of the
//! ranks it would occupy in an ideal ranking. Then
//!
//! - EE-L = `||eps - eps*||^2` (loss, lower is better)
//! - EE-D = `||eps||^2` (disparity, lower is more equal)
//! - EE-R = `eps . eps*` (relevance, higher is better)
//!
//! so that EE-L = EE-D - 2 EE-R + `||eps*||^2`.

use serde::{Deserialize, Serialize};

use crate::error::FairnessError;

/// The three expected exposure metrics (unnormalized, as defined by Diaz et al. 2020).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ExpectedExposure {
    /// Squared distance between expected and target exposure.
    pub ee_l: f64,
    /// Squared norm of the expected exposure.
    pub ee_d: f64,
    /// Inner product of expected and target exposure.
    pub ee_r: f64,
}

/// Computes EE-L, EE-D and EE-R of sampled `rankings` (item indices into `relevance`, best
/// first; unranked items get no exposure) with RBP patience `patience` in (0, 1).
pub fn expected_exposure<R: AsRef<[usize]>>(
    rankings: &[R],
    relevance: &[f64],
    patience: f64,
) -> Result<ExpectedExposure, FairnessError> {
    const FUNCTION: &str = "expected_exposure";
    if !(patience > 0.0 && patience < 1.0) {
        return Err(FairnessError::input(
            FUNCTION,
            format!("patience {patience} must lie in (0, 1)"),
        ));
    }
    if rankings.is_empty() {
        return Err(FairnessError::input(
            FUNCTION,
            "at least one sampled ranking is required",
        ));
    }
    if let Some(bad) = relevance.iter().find(|value| !value.is_finite()) {
        return Err(FairnessError::input(
            FUNCTION,
            format!("relevance {bad} is not finite"),
        ));
    }
    let items = relevance.len();
    let mut expected = vec![0.0; items];
    let share = 1.0 / rankings.len() as f64;
    let mut seen = vec![usize::MAX; items];
    for (sample, ranking) in rankings.iter().enumerate() {
        let mut exposure = 1.0;
        for &item in ranking.as_ref() {
            let Some(slot) = expected.get_mut(item) else {
                return Err(FairnessError::input(
                    FUNCTION,
                    format!("ranked item {item} is outside the {items} judged items"),
                ));
            };
            if seen[item] == sample {
                return Err(FairnessError::input(
                    FUNCTION,
                    format!("item {item} appears twice in ranking {sample}"),
                ));
            }
            seen[item] = sample;
            *slot += exposure * share;
            exposure *= patience;
        }
    }
    // Target exposure by relevance grade, highest grade first.
    let mut order: Vec<usize> = (0..items).collect();
    order.sort_by(|&a, &b| relevance[b].total_cmp(&relevance[a]));
    let mut target = vec![0.0; items];
    let mut start = 0usize;
    while start < items {
        let grade = relevance[order[start]];
        let mut end = start;
        while end < items && relevance[order[end]] == grade {
            end += 1;
        }
        let count = (end - start) as f64;
        let value =
            (patience.powi(start as i32) - patience.powi(end as i32)) / (count * (1.0 - patience));
        for &item in &order[start..end] {
            target[item] = value;
        }
        start = end;
    }
    let ee_d = expected.iter().map(|e| e * e).sum();
    let ee_r = expected.iter().zip(&target).map(|(e, t)| e * t).sum();
    let ee_l = expected
        .iter()
        .zip(&target)
        .map(|(e, t)| (e - t) * (e - t))
        .sum();
    Ok(ExpectedExposure { ee_l, ee_d, ee_r })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_policy_over_equally_relevant_items_meets_the_target() {
        // Two equally relevant items, both orders once: each gets (1 + g) / 2 = target.
        let gamma = 0.5;
        let metrics =
            expected_exposure(&[vec![0, 1], vec![1, 0]], &[1.0, 1.0], gamma).expect("valid");
        assert!(metrics.ee_l < 1e-15);
        assert!((metrics.ee_d - 2.0 * 0.75f64.powi(2)).abs() < 1e-12);
        assert!((metrics.ee_r - metrics.ee_d).abs() < 1e-12);
    }

    #[test]
    fn deterministic_ranking_of_ties_has_positive_loss_and_the_identity_holds() {
        let gamma = 0.8;
        let relevance = [1.0, 1.0, 0.0];
        let metrics = expected_exposure(&[vec![0, 1, 2]], &relevance, gamma).expect("valid");
        let target = [(1.0 + gamma) / 2.0, (1.0 + gamma) / 2.0, gamma * gamma];
        let exposure = [1.0, gamma, gamma * gamma];
        let loss: f64 = exposure
            .iter()
            .zip(&target)
            .map(|(e, t)| (e - t) * (e - t))
            .sum();
        assert!((metrics.ee_l - loss).abs() < 1e-12);
        let target_norm: f64 = target.iter().map(|t| t * t).sum();
        assert!((metrics.ee_l - (metrics.ee_d - 2.0 * metrics.ee_r + target_norm)).abs() < 1e-12);
    }

    #[test]
    fn invalid_inputs_are_rejected() {
        assert!(expected_exposure(&[vec![0]], &[1.0], 1.0).is_err());
        assert!(expected_exposure(&[vec![3]], &[1.0], 0.5).is_err());
        assert!(expected_exposure(&[vec![0, 0]], &[1.0], 0.5).is_err());
        assert!(expected_exposure::<Vec<usize>>(&[], &[1.0], 0.5).is_err());
    }
}
