//! Differentially private selection of an ordered pool: the exponential mechanism via
//! one-shot Gumbel top-k (Durfee & Rogers 2019).
//!
//! Adding independent Gumbel noise of scale `2 Delta / epsilon` to every score and keeping
//! the `k` largest noisy scores, in order, has exactly the distribution of `k` sequential
//! rounds of the exponential mechanism at `epsilon` per round (each round picks item `i`
//! among the remaining ones with probability proportional to `exp(epsilon q_i / (2 Delta))`,
//! then removes it). Only the order of item indices is released, never a score.
//!
//! **Scale.** For utilities of sensitivity `Delta` (every score moves by at most `Delta`
//! between neighbours) the exponential mechanism needs `exp(epsilon q / (2 Delta))`, i.e.
//! Gumbel scale `2 Delta / epsilon`. The factor 2 may be dropped only for *monotone*
//! utilities, where all scores move in the same direction between neighbours. Personalised
//! scores `<u, v>` are not monotone in the user embedding `u` (a change can raise one item
//! and lower another), so the server uses [`Monotonicity::General`]; `Monotone` exists for
//! counting-style utilities.
//!
//! **Cost.** Each round is `epsilon`-DP and, more precisely, `epsilon`-bounded-range, so a
//! top-`k` selection is `k epsilon`-DP and `k epsilon^2 / 8`-zCDP (Cesar & Rogers 2021).
//!
//! **Floating point.** Scores, noise and comparisons are f64. The guarantee is the one of the
//! real-valued mechanism; the score sensitivity passed in should come from
//! [`crate::score_sensitivity`], which covers the f32 rounding of the scores themselves.
//! Two residual gaps are not covered by that guarantee. First, the Gumbel samples have a
//! bounded range (see [`StandardGumbel`]: the uniform behind them has at most 53 bits), so
//! the noise's upper tail is cut at a probability of about `1e-16` per sample; read strictly,
//! an `epsilon`-DP selection is `(epsilon, delta)`-DP with `delta` of that order per noisy
//! score. Second, floating-point implementations of the exponential mechanism can leak
//! through the rounding of the noisy values (Ilvento, "Implementing the Exponential Mechanism
//! with Base-2 Differential Privacy", CCS 2020); releasing only the order of ids, never a
//! noisy value, narrows but does not formally close that channel. Numbers that leave the
//! server use the exact integer samplers (discrete Laplace and Gaussian) instead.

use rand::CryptoRng;

use crate::accounting::rho_gumbel_top_k;
use crate::error::{PrivacyError, Result, require_positive};
use crate::noise::{NoiseBuffer, StandardGumbel};

/// Whether scores can move in opposite directions between neighbouring inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Monotonicity {
    /// Scores may move in different directions (personalised scores): Gumbel scale
    /// `2 Delta / epsilon`.
    #[default]
    General,
    /// All scores move in the same direction between any two neighbours (e.g. counts when
    /// adding a record): Gumbel scale `Delta / epsilon`.
    Monotone,
}

/// Parameters of the exponential mechanism used for each pick.
///
/// # Privacy
/// One pick selects item `i` with probability proportional to `exp(q_i / gumbel_scale)`,
/// which is `epsilon_per_pick`-DP and `epsilon_per_pick`-bounded-range (hence
/// `epsilon_per_pick^2 / 8`-zCDP) when every score moves by at most `sensitivity` between
/// neighbouring inputs (and, for [`Monotonicity::Monotone`], all in the same direction).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExponentialMechanism {
    epsilon_per_pick: f64,
    sensitivity: f64,
    monotonicity: Monotonicity,
}

impl ExponentialMechanism {
    /// Exponential mechanism at `epsilon_per_pick` for scores of the given sensitivity, for
    /// general (non-monotone) utilities.
    ///
    /// # Errors
    /// [`PrivacyError::InvalidParameter`] unless both are finite and positive and the
    /// resulting Gumbel scale is finite.
    pub fn new(epsilon_per_pick: f64, sensitivity: f64) -> Result<Self> {
        Self::with_monotonicity(epsilon_per_pick, sensitivity, Monotonicity::General)
    }

    /// Exponential mechanism with an explicit [`Monotonicity`].
    ///
    /// # Errors
    /// As [`ExponentialMechanism::new`].
    pub fn with_monotonicity(
        epsilon_per_pick: f64,
        sensitivity: f64,
        monotonicity: Monotonicity,
    ) -> Result<Self> {
        require_positive("epsilon_per_pick", epsilon_per_pick)?;
        require_positive("sensitivity", sensitivity)?;
        let mechanism = Self {
            epsilon_per_pick,
            sensitivity,
            monotonicity,
        };
        require_positive("Gumbel scale", mechanism.gumbel_scale())?;
        Ok(mechanism)
    }

    /// Privacy level of each pick.
    pub fn epsilon_per_pick(&self) -> f64 {
        self.epsilon_per_pick
    }

    /// Sensitivity of the scores.
    pub fn sensitivity(&self) -> f64 {
        self.sensitivity
    }

    /// Whether the utility is monotone.
    pub fn monotonicity(&self) -> Monotonicity {
        self.monotonicity
    }

    /// Gumbel noise scale: `2 Delta / epsilon` (general) or `Delta / epsilon` (monotone).
    pub fn gumbel_scale(&self) -> f64 {
        let factor = match self.monotonicity {
            Monotonicity::General => 2.0,
            Monotonicity::Monotone => 1.0,
        };
        factor * self.sensitivity / self.epsilon_per_pick
    }

    /// zCDP cost of selecting `picks` items: `picks * epsilon^2 / 8`.
    pub fn rho(&self, picks: usize) -> f64 {
        // Validated epsilon keeps this finite except for absurd pick counts; saturate then.
        rho_gumbel_top_k(self.epsilon_per_pick, picks).unwrap_or(f64::INFINITY)
    }

    /// The probabilities with which one pick selects each item:
    /// `softmax(q / gumbel_scale)` (computed stably). For reports and tests.
    ///
    /// # Privacy
    /// Not a private output: the probabilities are a deterministic function of the raw
    /// scores. Only show them for public or synthetic scores.
    ///
    /// # Errors
    /// [`PrivacyError::NonFiniteScore`] for a NaN or infinite score.
    pub fn selection_probabilities(&self, scores: &[f32], out: &mut Vec<f64>) -> Result<()> {
        check_scores(scores)?;
        out.clear();
        let scale = self.gumbel_scale();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        out.extend(
            scores
                .iter()
                .map(|&score| ((f64::from(score) - f64::from(max)) / scale).exp()),
        );
        let total: f64 = out.iter().sum();
        for probability in out.iter_mut() {
            *probability /= total;
        }
        Ok(())
    }
}

/// Picks up to this many items by insertion into a small sorted array; larger pools use a
/// full selection.
const INSERTION_LIMIT: usize = 48;

/// One candidate: noisy key and item index. Ordered by key descending, then index ascending.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    key: f64,
    index: usize,
}

impl Candidate {
    /// Whether `self` ranks before `other`.
    fn precedes(&self, other: &Candidate) -> bool {
        self.key > other.key || (self.key == other.key && self.index < other.index)
    }

    fn order(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
        b.key.total_cmp(&a.key).then(a.index.cmp(&b.index))
    }
}

/// Per-worker DP top-k selector: a buffer of pre-generated Gumbel noise plus scratch space,
/// so a request does one add and one compare per item and allocates nothing.
#[derive(Debug)]
pub struct GumbelTopK {
    noise: NoiseBuffer<StandardGumbel>,
    scratch: Vec<Candidate>,
}

impl GumbelTopK {
    /// A selector whose noise buffer holds `noise_capacity` samples once refilled (size it
    /// to a few requests' worth of candidates).
    pub fn new(noise_capacity: usize) -> Self {
        Self {
            noise: NoiseBuffer::new(StandardGumbel, noise_capacity),
            scratch: Vec::new(),
        }
    }

    /// A selector with a full noise buffer.
    pub fn with_noise<R: CryptoRng + ?Sized>(noise_capacity: usize, rng: &mut R) -> Self {
        Self {
            noise: NoiseBuffer::filled(StandardGumbel, noise_capacity, rng),
            scratch: Vec::new(),
        }
    }

    /// Refills the noise buffer (call between requests, off the request path).
    pub fn refill<R: CryptoRng + ?Sized>(&mut self, rng: &mut R) {
        self.noise.refill(rng);
    }

    /// Unused pre-generated noise samples.
    pub fn noise_available(&self) -> usize {
        self.noise.available()
    }

    /// Selects `min(k, scores.len())` item indices, best first, by one-shot Gumbel top-k.
    /// Consumes one noise sample per score (drawing fresh ones only if the buffer is short).
    ///
    /// # Privacy
    /// The output order is distributed exactly as `out.len()` sequential rounds of the
    /// exponential mechanism at `mechanism.epsilon_per_pick()` without replacement, so it is
    /// `out.len() * epsilon`-DP and `out.len() * epsilon^2 / 8`-zCDP
    /// ([`ExponentialMechanism::rho`]) when the scores have the mechanism's sensitivity.
    /// Only indices are released.
    ///
    /// # Errors
    /// [`PrivacyError::NonFiniteScore`] if any score is NaN or infinite (`out` is cleared).
    pub fn select<R: CryptoRng + ?Sized>(
        &mut self,
        scores: &[f32],
        mechanism: &ExponentialMechanism,
        k: usize,
        rng: &mut R,
        out: &mut Vec<usize>,
    ) -> Result<()> {
        out.clear();
        check_scores(scores)?;
        let noise = self.noise.take(scores.len(), rng);
        select_with_noise(
            scores,
            mechanism.gumbel_scale(),
            noise,
            k,
            &mut self.scratch,
            out,
        );
        Ok(())
    }
}

/// Selects `min(k, scores.len())` indices, best first, by one-shot Gumbel top-k with fresh
/// noise (allocates; workers should keep a [`GumbelTopK`] instead).
///
/// # Privacy
/// As [`GumbelTopK::select`]: `picks * epsilon_per_pick^2 / 8`-zCDP for scores of the given
/// sensitivity (general utilities, Gumbel scale `2 sensitivity / epsilon_per_pick`).
///
/// # Errors
/// As [`ExponentialMechanism::new`] and [`GumbelTopK::select`].
pub fn gumbel_top_k<R: CryptoRng + ?Sized>(
    scores: &[f32],
    epsilon_per_pick: f64,
    sensitivity: f64,
    k: usize,
    rng: &mut R,
    out: &mut Vec<usize>,
) -> Result<()> {
    let mechanism = ExponentialMechanism::new(epsilon_per_pick, sensitivity)?;
    GumbelTopK::new(scores.len()).select(scores, &mechanism, k, rng, out)
}

/// Runs [`gumbel_top_k`] `repeat` times and counts how often each index was released at
/// each position: `counts[position][index]` for `position < min(k, scores.len())`.
///
/// Every row sums to `repeat`. Intended for `fairrank privacy topk`, to show how much a
/// given epsilon scrambles a ranking.
///
/// # Privacy
/// A diagnostic, not a mechanism to run on real users' scores: it releases `repeat`
/// independent selections, costing `repeat * picks * epsilon_per_pick^2 / 8` in zCDP, and
/// the counts converge to the exact (non-private) selection probabilities.
///
/// # Errors
/// As [`gumbel_top_k`].
pub fn position_counts<R: CryptoRng + ?Sized>(
    scores: &[f32],
    epsilon_per_pick: f64,
    sensitivity: f64,
    k: usize,
    repeat: u64,
    rng: &mut R,
) -> Result<Vec<Vec<u64>>> {
    let mechanism = ExponentialMechanism::new(epsilon_per_pick, sensitivity)?;
    check_scores(scores)?;
    let picks = k.min(scores.len());
    let mut counts = vec![vec![0_u64; scores.len()]; picks];
    let batch = 64_usize;
    let mut selector = GumbelTopK::new(scores.len().saturating_mul(batch));
    let mut order = Vec::with_capacity(picks);
    for _ in 0..repeat {
        selector.select(scores, &mechanism, k, rng, &mut order)?;
        for (position, &index) in order.iter().enumerate() {
            counts[position][index] += 1;
        }
    }
    Ok(counts)
}

fn check_scores(scores: &[f32]) -> Result<()> {
    match scores.iter().position(|score| !score.is_finite()) {
        Some(index) => Err(PrivacyError::NonFiniteScore {
            index,
            value: scores[index],
        }),
        None => Ok(()),
    }
}

/// The selection kernel: keys `score + scale * gumbel`, top `k` by key descending, ties by
/// index ascending. `noise.len() == scores.len()`.
fn select_with_noise(
    scores: &[f32],
    scale: f64,
    noise: &[f64],
    k: usize,
    scratch: &mut Vec<Candidate>,
    out: &mut Vec<usize>,
) {
    out.clear();
    scratch.clear();
    let picks = k.min(scores.len());
    if picks == 0 {
        return;
    }
    let keys = scores
        .iter()
        .zip(noise)
        .enumerate()
        .map(|(index, (&score, &gumbel))| Candidate {
            key: gumbel.mul_add(scale, f64::from(score)),
            index,
        });
    if picks <= INSERTION_LIMIT {
        // Sorted best-first array of at most `picks` candidates; most items fail the
        // threshold test against the current worst.
        for candidate in keys {
            if scratch.len() == picks {
                let worst = scratch[picks - 1];
                if !candidate.precedes(&worst) {
                    continue;
                }
                scratch.pop();
            }
            let position = scratch.partition_point(|held| held.precedes(&candidate));
            scratch.insert(position, candidate);
        }
    } else {
        scratch.extend(keys);
        if picks < scratch.len() {
            scratch.select_nth_unstable_by(picks - 1, Candidate::order);
            scratch.truncate(picks);
        }
        scratch.sort_unstable_by(Candidate::order);
    }
    out.extend(scratch.iter().map(|candidate| candidate.index));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SecureRng;
    use crate::test_stats::assert_chi_square;
    use proptest::prelude::*;

    const SCORES: [f32; 5] = [0.0, 0.5, 1.0, 2.0, -1.0];

    /// Exact probability of an ordered selection under sequential exponential-mechanism
    /// rounds without replacement.
    fn sequential_probability(weights: &[f64], order: &[usize]) -> f64 {
        let mut remaining: f64 = weights.iter().sum();
        let mut probability = 1.0;
        for &index in order {
            probability *= weights[index] / remaining;
            remaining -= weights[index];
        }
        probability
    }

    fn weights(mechanism: &ExponentialMechanism, scores: &[f32]) -> Vec<f64> {
        let scale = mechanism.gumbel_scale();
        scores
            .iter()
            .map(|&score| (f64::from(score) / scale).exp())
            .collect()
    }

    #[test]
    fn scale_and_cost_follow_the_documented_formulas() -> Result<()> {
        let general = ExponentialMechanism::new(0.5, 2.0)?;
        assert_eq!(general.gumbel_scale(), 8.0);
        let rho = general.rho(10);
        assert!((10.0 * 0.25 / 8.0..=10.0 * 0.25 / 8.0 * (1.0 + 1e-14)).contains(&rho));
        let monotone = ExponentialMechanism::with_monotonicity(0.5, 2.0, Monotonicity::Monotone)?;
        assert_eq!(monotone.gumbel_scale(), 4.0);
        assert!(ExponentialMechanism::new(0.0, 1.0).is_err());
        assert!(ExponentialMechanism::new(1.0, f64::NAN).is_err());
        assert!(ExponentialMechanism::new(1e-310, 1e300).is_err());
        Ok(())
    }

    #[test]
    fn selection_returns_distinct_indices_and_handles_edges() -> Result<()> {
        let mut rng = SecureRng::from_seed(51);
        let mut out = Vec::new();
        gumbel_top_k(&SCORES, 1.0, 1.0, 3, &mut rng, &mut out)?;
        assert_eq!(out.len(), 3);
        let mut sorted = out.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 3);
        gumbel_top_k(&SCORES, 1.0, 1.0, 99, &mut rng, &mut out)?;
        assert_eq!(out.len(), SCORES.len());
        gumbel_top_k(&SCORES, 1.0, 1.0, 0, &mut rng, &mut out)?;
        assert!(out.is_empty());
        gumbel_top_k(&[], 1.0, 1.0, 4, &mut rng, &mut out)?;
        assert!(out.is_empty());
        let error = gumbel_top_k(&[1.0, f32::NAN], 1.0, 1.0, 1, &mut rng, &mut out);
        assert!(matches!(
            error,
            Err(PrivacyError::NonFiniteScore { index: 1, .. })
        ));
        assert!(out.is_empty());
        Ok(())
    }

    #[test]
    fn first_position_follows_the_exponential_mechanism() -> Result<()> {
        let mut rng = SecureRng::from_seed(52);
        let mechanism = ExponentialMechanism::new(1.0, 1.0)?;
        let counts = position_counts(&SCORES, 1.0, 1.0, 1, 60_000, &mut rng)?;
        let mut softmax = Vec::new();
        mechanism.selection_probabilities(&SCORES, &mut softmax)?;
        assert_chi_square(&counts[0], &softmax, 1e-6);
        Ok(())
    }

    #[test]
    fn ordered_top_three_matches_sequential_exponential_mechanism_rounds() -> Result<()> {
        let mut rng = SecureRng::from_seed(53);
        let mechanism = ExponentialMechanism::new(2.0, 1.0)?;
        let mut selector = GumbelTopK::with_noise(5 * 1024, &mut rng);
        let n = SCORES.len();
        let mut counts = vec![0_u64; n * n * n];
        let mut out = Vec::new();
        for draw in 0..80_000 {
            if draw % 1024 == 0 {
                selector.refill(&mut rng);
            }
            selector.select(&SCORES, &mechanism, 3, &mut rng, &mut out)?;
            counts[(out[0] * n + out[1]) * n + out[2]] += 1;
        }
        let weights = weights(&mechanism, &SCORES);
        let mut probabilities = vec![0.0; n * n * n];
        for (cell, probability) in probabilities.iter_mut().enumerate() {
            let order = [cell / (n * n), (cell / n) % n, cell % n];
            if order[0] != order[1] && order[1] != order[2] && order[0] != order[2] {
                *probability = sequential_probability(&weights, &order);
            }
        }
        assert_chi_square(&counts, &probabilities, 1e-6);
        Ok(())
    }

    #[test]
    fn large_pools_follow_the_exponential_mechanism() -> Result<()> {
        // k above the insertion limit exercises the full-selection path.
        let mut rng = SecureRng::from_seed(54);
        let scores: Vec<f32> = (0..80).map(|i| (i % 7) as f32 * 0.3).collect();
        let mechanism = ExponentialMechanism::new(1.0, 0.5)?;
        let counts = position_counts(&scores, 1.0, 0.5, 70, 20_000, &mut rng)?;
        assert_eq!(counts.len(), 70);
        let weights = weights(&mechanism, &scores);
        let total: f64 = weights.iter().sum();
        let probabilities: Vec<f64> = weights.iter().map(|w| w / total).collect();
        assert_chi_square(&counts[0], &probabilities, 1e-6);
        // Second position: sum over first picks j of p(j) * w_i / (W - w_j).
        let second: Vec<f64> = (0..scores.len())
            .map(|i| {
                (0..scores.len())
                    .filter(|&j| j != i)
                    .map(|j| probabilities[j] * weights[i] / (total - weights[j]))
                    .sum()
            })
            .collect();
        assert_chi_square(&counts[1], &second, 1e-6);
        Ok(())
    }

    #[test]
    fn position_counts_rows_sum_to_repeat() -> Result<()> {
        let mut rng = SecureRng::from_seed(55);
        let counts = position_counts(&SCORES, 0.5, 1.0, 4, 500, &mut rng)?;
        assert_eq!(counts.len(), 4);
        for row in &counts {
            assert_eq!(row.len(), SCORES.len());
            assert_eq!(row.iter().sum::<u64>(), 500);
        }
        for index in 0..SCORES.len() {
            assert!(counts.iter().map(|row| row[index]).sum::<u64>() <= 500);
        }
        Ok(())
    }

    #[test]
    fn large_epsilon_recovers_the_exact_ranking() -> Result<()> {
        let mut rng = SecureRng::from_seed(56);
        let mut out = Vec::new();
        gumbel_top_k(&SCORES, 1e6, 1.0, 5, &mut rng, &mut out)?;
        assert_eq!(out, vec![3, 2, 1, 0, 4]);
        Ok(())
    }

    proptest! {
        #[test]
        fn both_selection_paths_agree(
            (scores, noise) in (1_usize..200).prop_flat_map(|n| (
                proptest::collection::vec(-3.0_f32..3.0, n),
                proptest::collection::vec(-3.0_f64..10.0, n),
            )),
            k in 0_usize..200,
            scale in 0.01_f64..10.0,
        ) {
            let (mut fast, mut reference) = (Vec::new(), Vec::new());
            select_with_noise(&scores, scale, &noise, k, &mut Vec::new(), &mut fast);
            // Reference: sort every candidate.
            let mut all: Vec<Candidate> = scores.iter().zip(&noise).enumerate()
                .map(|(index, (&s, &g))| Candidate { key: g.mul_add(scale, f64::from(s)), index })
                .collect();
            all.sort_by(Candidate::order);
            reference.extend(all.iter().take(k).map(|c| c.index));
            prop_assert_eq!(fast, reference);
        }

        #[test]
        fn ties_break_by_index(n in 1_usize..100, k in 1_usize..100) {
            let scores = vec![1.0_f32; n];
            let noise = vec![0.0_f64; n];
            let mut out = Vec::new();
            select_with_noise(&scores, 1.0, &noise, k, &mut Vec::new(), &mut out);
            prop_assert_eq!(out, (0..k.min(n)).collect::<Vec<_>>());
        }
    }
}
