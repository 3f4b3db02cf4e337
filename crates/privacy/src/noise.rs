//! Data-independent noise generated ahead of time: the standard Gumbel sampler and the
//! per-worker `NoiseBuffer` that keeps the request path down to adds and selects.
//!
//! Noise that does not depend on the data (Gumbel noise for selection, discrete Laplace or
//! Gaussian noise of a fixed scale) can be drawn before the request arrives. A worker owns
//! one buffer per noise kind, refills it between requests (or swaps in a buffer refilled by
//! a background thread: `NoiseBuffer` is `Send`), and the request only consumes samples.
//! Every sample is handed out exactly once; reusing noise would void the privacy guarantee.

use rand::CryptoRng;
use rand_distr::Distribution;

/// A source of data-independent noise samples that can be buffered.
pub trait NoiseSampler {
    /// One noise sample.
    type Sample: Copy;

    /// Draws one sample from `rng`.
    fn draw<R: CryptoRng + ?Sized>(&self, rng: &mut R) -> Self::Sample;
}

/// The standard Gumbel distribution, `P[G <= x] = exp(-exp(-x))`.
///
/// Sampled as `G = -ln E` with `E` a standard exponential variate (if `E ~ Exp(1)` then
/// `P[-ln E <= x] = P[E >= e^-x] = exp(-e^-x)`). `E` is drawn by the ziggurat method of
/// Marsaglia & Tsang (2000) with 256 layers (`rand_distr::Exp1`): one 64-bit draw, a table
/// look-up, a multiply and a compare for about 98.9 % of samples, an `exp` for most of the
/// rest and an `ln` only in the tail (layer 0, `R - ln U`). So a sample costs one `ln`
/// instead of the two of the inversion method `-ln(-ln U)` ([`StandardGumbel::from_bits`],
/// kept as the reference), with the same distribution: both are exact transformations of
/// uniform variates, up to the resolution of the doubles involved (the ziggurat's uniform
/// has 52 bits, the inversion's 53). The statistical tests below check the exact Gumbel CDF.
///
/// `E` is strictly positive (the ziggurat's uniform is at least `2^-53`) and a non-finite
/// `E` (the tail's uniform being exactly 0, probability below `2^-60`) is redrawn, so every
/// sample is finite (between about `-3.8` and `45`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StandardGumbel;

impl StandardGumbel {
    /// The Gumbel sample for 64 random bits by inversion, `-ln(-ln U)` with `U = j / 2^53`
    /// for the top 53 bits `j` (an exact double strictly inside `(0, 1)`), or `None` when
    /// they are all zero (the caller redraws). The reference method (two logarithms per
    /// sample); [`NoiseSampler::draw`] uses the faster ziggurat.
    pub fn from_bits(bits: u64) -> Option<f64> {
        const INVERSE_2_POW_53: f64 = 1.0 / 9_007_199_254_740_992.0;
        let numerator = bits >> 11;
        if numerator == 0 {
            return None;
        }
        // numerator < 2^53 is exact in f64, and so is the scaling by a power of two.
        let uniform = numerator as f64 * INVERSE_2_POW_53;
        Some(-(-uniform.ln()).ln())
    }

    /// The cumulative distribution function `exp(-exp(-x))`.
    pub fn cdf(x: f64) -> f64 {
        (-(-x).exp()).exp()
    }
}

impl NoiseSampler for StandardGumbel {
    type Sample = f64;

    fn draw<R: CryptoRng + ?Sized>(&self, rng: &mut R) -> f64 {
        loop {
            let exponential: f64 = rand_distr::Exp1.sample(rng);
            // Redraws the (practically impossible) non-finite or zero values, so the
            // logarithm is always finite.
            if exponential > 0.0 && exponential.is_finite() {
                return -exponential.ln();
            }
        }
    }
}

/// A buffer of pre-generated noise samples, each handed out exactly once.
///
/// Fill it off the request path with [`NoiseBuffer::refill`]; on the request path call
/// [`NoiseBuffer::take`], which only falls back to drawing fresh samples (slower, but still
/// correct) when the buffer runs short.
///
/// Deliberately not `Clone` (a copy would hand out the same noise twice), and its `Debug`
/// output shows counts only, never samples.
pub struct NoiseBuffer<S: NoiseSampler> {
    sampler: S,
    samples: Vec<S::Sample>,
    /// Index of the first unused sample; `samples[..next]` have been handed out.
    next: usize,
    capacity: usize,
}

impl<S: NoiseSampler + std::fmt::Debug> std::fmt::Debug for NoiseBuffer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseBuffer")
            .field("sampler", &self.sampler)
            .field("available", &self.available())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl<S: NoiseSampler> NoiseBuffer<S> {
    /// An empty buffer that holds up to `capacity` samples once refilled.
    pub fn new(sampler: S, capacity: usize) -> Self {
        Self {
            sampler,
            samples: Vec::with_capacity(capacity),
            next: 0,
            capacity,
        }
    }

    /// A buffer filled with `capacity` fresh samples.
    pub fn filled<R: CryptoRng + ?Sized>(sampler: S, capacity: usize, rng: &mut R) -> Self {
        let mut buffer = Self::new(sampler, capacity);
        buffer.refill(rng);
        buffer
    }

    /// The sampler the buffer draws from.
    pub fn sampler(&self) -> &S {
        &self.sampler
    }

    /// How many samples a full buffer holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many unused samples are ready.
    pub fn available(&self) -> usize {
        self.samples.len() - self.next
    }

    /// Replaces every used sample with a fresh one, so the buffer holds `capacity` unused
    /// samples. Call it off the request path.
    pub fn refill<R: CryptoRng + ?Sized>(&mut self, rng: &mut R) {
        self.top_up(self.capacity, rng);
    }

    /// Hands out `count` unused samples (they are consumed even if the caller fails later).
    ///
    /// If fewer than `count` are ready, the buffer first tops itself up with fresh samples
    /// (growing its capacity if `count` exceeds it).
    pub fn take<R: CryptoRng + ?Sized>(&mut self, count: usize, rng: &mut R) -> &[S::Sample] {
        if self.available() < count {
            self.capacity = self.capacity.max(count);
            self.top_up(self.capacity, rng);
        }
        let start = self.next;
        self.next += count;
        &self.samples[start..self.next]
    }

    /// Hands out one unused sample (refilling on demand, like [`NoiseBuffer::take`]).
    pub fn take_one<R: CryptoRng + ?Sized>(&mut self, rng: &mut R) -> S::Sample {
        if self.available() == 0 {
            self.capacity = self.capacity.max(1);
            self.top_up(self.capacity, rng);
        }
        let sample = self.samples[self.next];
        self.next += 1;
        sample
    }

    /// Overwrites the used samples with fresh ones in place and appends fresh ones until
    /// `target` unused samples are ready.
    ///
    /// The unused samples stay where they are (no copy of the buffer: with a buffer sized for
    /// the whole catalog, moving the unused rest to the front after every request was the
    /// largest single cost of a DP worker). Their order does not matter: every sample is an
    /// independent draw that does not depend on the data, so any arrangement of unused
    /// samples has the same joint distribution, and a used one is overwritten before it
    /// could be handed out again.
    fn top_up<R: CryptoRng + ?Sized>(&mut self, target: usize, rng: &mut R) {
        let sampler = &self.sampler;
        for slot in &mut self.samples[..self.next] {
            *slot = sampler.draw(rng);
        }
        self.next = 0;
        while self.samples.len() < target {
            self.samples.push(self.sampler.draw(rng));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SecureRng;
    use crate::test_stats::assert_kolmogorov_smirnov;
    use std::collections::HashSet;

    #[test]
    fn gumbel_is_finite_at_the_extremes() {
        assert_eq!(StandardGumbel::from_bits(0), None);
        assert_eq!(StandardGumbel::from_bits((1 << 11) - 1), None);
        let extremes = [1 << 11, u64::MAX - (1 << 11), u64::MAX].map(StandardGumbel::from_bits);
        for sample in extremes {
            assert!(sample.is_some_and(f64::is_finite));
        }
        assert!(extremes[0].is_some_and(|g| (-3.61..-3.59).contains(&g)));
        assert!(extremes[2].is_some_and(|g| (36.0..37.0).contains(&g)));
    }

    #[test]
    fn gumbel_samples_follow_the_exact_cdf() {
        let mut rng = SecureRng::from_seed(31);
        let mut samples: Vec<f64> = (0..400_000)
            .map(|_| StandardGumbel.draw(&mut rng))
            .collect();
        assert_kolmogorov_smirnov(&mut samples, StandardGumbel::cdf, 1e-6);
        // Mean of the standard Gumbel is the Euler–Mascheroni constant, variance pi^2/6.
        let variance = std::f64::consts::PI.powi(2) / 6.0;
        crate::test_stats::assert_mean_within(&samples, 0.577_215_664_901_532_9, variance, 5.3);
    }

    #[test]
    fn gumbel_tails_match_the_exact_probabilities() {
        // The KS test is weak in the tails, where the ziggurat's wedge and tail code run
        // (the exponential's tail beyond R = 7.697 is the Gumbel's lower tail below -2.04).
        // Chi-square over bins with exact probabilities, fine at both ends.
        let edges = [-2.5, -2.04, -1.5, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 9.0];
        let mut probabilities = Vec::new();
        let mut previous = 0.0;
        for &edge in &edges {
            let cdf = StandardGumbel::cdf(edge);
            probabilities.push(cdf - previous);
            previous = cdf;
        }
        probabilities.push(1.0 - previous);
        let mut rng = SecureRng::from_seed(34);
        let mut observed = vec![0_u64; probabilities.len()];
        for _ in 0..2_000_000 {
            let sample = StandardGumbel.draw(&mut rng);
            assert!(sample.is_finite());
            observed[edges.partition_point(|&edge| edge < sample)] += 1;
        }
        crate::test_stats::assert_chi_square(&observed, &probabilities, 1e-6);
    }

    #[test]
    fn buffer_hands_out_each_sample_once() {
        let mut rng = SecureRng::from_seed(32);
        let mut buffer = NoiseBuffer::filled(StandardGumbel, 100, &mut rng);
        assert_eq!(buffer.available(), 100);
        let mut seen = HashSet::new();
        for round in 0..50 {
            let count = 7 + round % 13;
            let taken = buffer.take(count, &mut rng).to_vec();
            assert_eq!(taken.len(), count);
            for value in taken {
                assert!(
                    seen.insert(value.to_bits()),
                    "a sample was handed out twice"
                );
            }
            if round % 5 == 0 {
                buffer.refill(&mut rng);
                assert_eq!(buffer.available(), 100);
            }
        }
        assert!(seen.insert(buffer.take_one(&mut rng).to_bits()));
    }

    #[test]
    fn refill_replaces_exactly_the_used_samples() {
        let mut rng = SecureRng::from_seed(35);
        let mut buffer = NoiseBuffer::filled(StandardGumbel, 64, &mut rng);
        let before: Vec<u64> = buffer.samples.iter().map(|value| value.to_bits()).collect();
        let taken: HashSet<u64> = buffer
            .take(20, &mut rng)
            .iter()
            .map(|value| value.to_bits())
            .collect();
        buffer.refill(&mut rng);
        assert_eq!(buffer.available(), 64);
        let after: Vec<u64> = buffer.samples.iter().map(|value| value.to_bits()).collect();
        // The 44 unused samples are kept; none of the 20 handed out is left.
        assert_eq!(after[20..], before[20..]);
        assert!(after.iter().all(|bits| !taken.contains(bits)));
    }

    #[test]
    fn buffer_grows_for_large_requests() {
        let mut rng = SecureRng::from_seed(33);
        let mut buffer = NoiseBuffer::new(StandardGumbel, 4);
        assert_eq!(buffer.available(), 0);
        assert_eq!(buffer.take(10, &mut rng).len(), 10);
        assert_eq!(buffer.capacity(), 10);
        assert_eq!(buffer.available(), 0);
        buffer.refill(&mut rng);
        assert_eq!(buffer.available(), 10);
    }
}
