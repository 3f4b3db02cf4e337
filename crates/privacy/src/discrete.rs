//! Exact samplers for the discrete Laplace and discrete Gaussian distributions on the
//! integers (Canonne, Kamath & Steinke 2020, "The Discrete Gaussian for Differential
//! Privacy", Algorithms 2 and 3), in integer arithmetic only.
//!
//! Floating-point noise is attackable (Mironov 2012: the set of doubles reachable from
//! `value + noise` depends on `value`). These samplers draw integers with exactly the stated
//! probabilities, using only uniform integers and integer comparisons (`exact.rs`); callers
//! add the integer noise to an integer (a value rounded to a grid, see `release.rs`).
//!
//! **Representation limits.** Parameters are rationals with 64-bit parts and intermediates
//! are 128/256-bit integers, chosen so that nothing overflows for any outcome that fits the
//! output type. The only deviation from the exact distributions: outcomes with `|z| > 2^62`
//! are rejected and redrawn (and for the discrete Gaussian, an acceptance exponent above
//! `2^128 - 1` is capped). Those events have probability below `exp(-2^30)` for every
//! supported parameter, astronomically below the security of the ChaCha20 generator itself.

use rand::CryptoRng;

use crate::error::{PrivacyError, Result};
use crate::exact::{
    bernoulli_exp_neg_at_most_one, bernoulli_exp_neg_parts, div_rem_wide, uniform_below_u64,
    widening_mul_u128,
};

/// Largest magnitude a sampler returns; larger draws (probability below `exp(-2^30)`) are redrawn.
pub const MAX_NOISE_MAGNITUDE: u64 = 1 << 62;

/// Largest numerator or denominator accepted for a rational scale or variance.
const MAX_RATIONAL_PART: u64 = 1 << 62;

/// Discrete Laplace distribution with rational scale `b = numerator / denominator`:
/// `P[Z = z] = (e^(1/b) - 1)/(e^(1/b) + 1) * e^(-|z|/b)` for every integer `z`.
///
/// # Privacy
/// Adding `Z` to an integer-valued query with L1 sensitivity `D` (an integer) is
/// `(D / b)`-DP: the probability ratio of any output under neighbouring inputs is at most
/// `e^(|shift| / b)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscreteLaplace {
    /// `t` in CKS20 Algorithm 2 (the scale is `t / s`).
    numerator: u64,
    /// `s` in CKS20 Algorithm 2.
    denominator: u64,
}

impl DiscreteLaplace {
    /// Discrete Laplace with scale `numerator / denominator`.
    ///
    /// # Errors
    /// [`PrivacyError::InvalidParameter`] unless both parts are in `1..=2^62`.
    pub fn new(numerator: u64, denominator: u64) -> Result<Self> {
        check_rational_part("scale numerator", numerator)?;
        check_rational_part("scale denominator", denominator)?;
        Ok(Self {
            numerator,
            denominator,
        })
    }

    /// Discrete Laplace whose scale is the f64 `scale`: exactly when `scale * 2^62` is an
    /// integer (every finite double is a dyadic rational, and all doubles `>= 2^-10`
    /// qualify), otherwise rounded **up** to the next multiple of `2^-62` (a larger scale only
    /// adds privacy).
    ///
    /// # Errors
    /// [`PrivacyError::InvalidParameter`] unless `2^-62 <= scale < 2^62` (finite).
    pub fn from_scale(scale: f64) -> Result<Self> {
        if !(scale.is_finite() && (MIN_DYADIC..MAX_DYADIC).contains(&scale)) {
            return Err(PrivacyError::InvalidParameter {
                name: "discrete Laplace scale",
                value: scale,
                requirement: "must be finite and in [2^-62, 2^62)",
            });
        }
        let (mantissa, exponent) = dyadic_parts(scale);
        let (numerator, denominator) = if exponent >= 0 {
            (mantissa << exponent, 1)
        } else if exponent >= -62 {
            (mantissa, 1_u64 << -exponent)
        } else {
            // ceil(m 2^(e + 62)) / 2^62; the shift is at most 53 + 62 bits deep.
            let right = (-62 - exponent) as u32;
            let numerator = if right >= 64 {
                1
            } else {
                (mantissa >> right) + u64::from(mantissa & ((1_u64 << right) - 1) != 0)
            };
            (numerator, 1_u64 << 62)
        };
        Self::new(numerator, denominator)
    }

    /// The scale `b` as f64 (exact for scales built by [`DiscreteLaplace::from_scale`]).
    pub fn scale(&self) -> f64 {
        self.numerator as f64 / self.denominator as f64
    }

    /// `P[Z = z]`, evaluated in f64 (for tests, reports and plots; never used for sampling).
    pub fn probability(&self, z: i64) -> f64 {
        let rate = 1.0 / self.scale();
        let normalizer = -(-rate).exp_m1() / (1.0 + (-rate).exp());
        normalizer * (-rate * z.unsigned_abs() as f64).exp()
    }

    /// `E|Z| = 2 e^(-1/b) / (1 - e^(-2/b))` (f64).
    pub fn mean_absolute(&self) -> f64 {
        let rate = 1.0 / self.scale();
        2.0 * (-rate).exp() / -(-2.0 * rate).exp_m1()
    }

    /// `Var Z = E[Z^2] = 2 e^(-1/b) / (1 - e^(-1/b))^2` (f64).
    pub fn variance(&self) -> f64 {
        let rate = 1.0 / self.scale();
        let q = (-rate).exp();
        2.0 * q / (-rate).exp_m1().powi(2)
    }

    /// Draws one sample (CKS20 Algorithm 2).
    ///
    /// # Privacy
    /// See the type documentation; the draw is exact (integer arithmetic only).
    pub fn sample<R: CryptoRng + ?Sized>(&self, rng: &mut R) -> i64 {
        let t = self.numerator;
        let s = u128::from(self.denominator);
        loop {
            // X = U + t V ~ Geometric(1 - e^(-1/t)) from U uniform on 0..t accepted with
            // probability e^(-U/t), and V ~ Geometric(1 - e^(-1)).
            let u = uniform_below_u64(rng, t);
            if !bernoulli_exp_neg_at_most_one(rng, u128::from(u), u128::from(t)) {
                continue;
            }
            let mut v: u64 = 0;
            while bernoulli_exp_neg_at_most_one(rng, 1, 1) {
                v = v.saturating_add(1);
            }
            // u < 2^62 and t * v < 2^126: no overflow.
            let x = u128::from(u) + u128::from(t) * u128::from(v);
            // Y = floor(X / s) ~ Geometric(1 - e^(-s/t)).
            let y = x / s;
            let negative = rng.next_u64() & 1 == 1;
            if negative && y == 0 {
                continue;
            }
            if y > u128::from(MAX_NOISE_MAGNITUDE) {
                continue;
            }
            // y <= 2^62 fits in i64.
            let magnitude = y as i64;
            return if negative { -magnitude } else { magnitude };
        }
    }
}

/// Discrete Gaussian distribution `N_Z(0, sigma^2)` with rational variance
/// `sigma^2 = numerator / denominator`: `P[Z = z] ∝ exp(-z^2 / (2 sigma^2))` on the integers.
///
/// # Privacy
/// Adding `Z` to an integer-valued query with L2 sensitivity `D` is `D^2/(2 sigma^2)`-zCDP
/// (Canonne, Kamath & Steinke 2020, Theorem 14), exactly like continuous Gaussian noise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscreteGaussian {
    /// `sigma^2` numerator `p`.
    numerator: u64,
    /// `sigma^2` denominator `q`.
    denominator: u64,
    /// Proposal scale `t = floor(sigma) + 1` (CKS20 Algorithm 3).
    proposal: DiscreteLaplace,
    /// `t * q`, so that `|y| - sigma^2/t = (|y| t q - p) / (t q)`.
    t_times_q: u128,
    /// `2 p q t^2`, the denominator of the acceptance exponent.
    exponent_denominator: u128,
}

impl DiscreteGaussian {
    /// Discrete Gaussian with variance `numerator / denominator`.
    ///
    /// # Errors
    /// [`PrivacyError::InvalidParameter`] unless both parts are in `1..=2^62` and
    /// `sigma <= 2^31`.
    pub fn new(numerator: u64, denominator: u64) -> Result<Self> {
        check_rational_part("variance numerator", numerator)?;
        check_rational_part("variance denominator", denominator)?;
        // floor(sqrt(p/q)) = floor(sqrt(floor(p/q))) for real p/q >= 0.
        let t = (numerator / denominator).isqrt() + 1;
        if t > (1 << 31) + 1 {
            return Err(PrivacyError::InvalidParameter {
                name: "discrete Gaussian sigma",
                value: (numerator as f64 / denominator as f64).sqrt(),
                requirement: "must be at most 2^31",
            });
        }
        let (p, q, t_wide) = (
            u128::from(numerator),
            u128::from(denominator),
            u128::from(t),
        );
        // t q <= (sqrt(p/q) + 1) q <= sqrt(p q) + q < 2^63, and
        // 2 p q t^2 <= 2 p (sqrt(p) + sqrt(q))^2 < 2^127.
        let overflow = || PrivacyError::InvalidParameter {
            name: "discrete Gaussian variance",
            value: numerator as f64 / denominator as f64,
            requirement: "parts too large for exact 128-bit arithmetic",
        };
        let t_times_q = t_wide.checked_mul(q).ok_or_else(overflow)?;
        let exponent_denominator = (2 * p)
            .checked_mul(q)
            .and_then(|value| value.checked_mul(t_wide * t_wide))
            .ok_or_else(overflow)?;
        Ok(Self {
            numerator,
            denominator,
            proposal: DiscreteLaplace::new(t, 1)?,
            t_times_q,
            exponent_denominator,
        })
    }

    /// Discrete Gaussian whose variance is `sigma^2` rounded **up** to a rational with a
    /// power-of-two denominator and at least 40 significant bits (relative increase below
    /// `2^-40`; rounding up only adds privacy).
    ///
    /// # Errors
    /// [`PrivacyError::InvalidParameter`] unless `2^-10 <= sigma <= 2^31` (finite).
    pub fn from_sigma(sigma: f64) -> Result<Self> {
        if !(sigma.is_finite() && (MIN_GAUSSIAN_SIGMA..=MAX_GAUSSIAN_SIGMA).contains(&sigma)) {
            return Err(PrivacyError::InvalidParameter {
                name: "discrete Gaussian sigma",
                value: sigma,
                requirement: "must be finite and in [2^-10, 2^31]",
            });
        }
        let (mantissa, exponent) = dyadic_parts(sigma);
        // sigma^2 = m^2 2^(2e) exactly, m^2 < 2^106.
        let square = u128::from(mantissa) * u128::from(mantissa);
        let square_exponent = 2 * exponent;
        let log2_variance = (127 - square.leading_zeros() as i32) + square_exponent;
        // Choose q = 2^f with p = ceil(sigma^2 2^f) in [2^40, 2^41], or f = 0 for large sigma.
        let f = (40 - log2_variance).max(0);
        let shift = square_exponent + f;
        let numerator = if shift >= 0 {
            square << shift
        } else {
            let right = (-shift) as u32;
            if right >= 128 {
                1
            } else {
                (square >> right) + u128::from(square & ((1_u128 << right) - 1) != 0)
            }
        };
        let numerator = u64::try_from(numerator).map_err(|_| PrivacyError::InvalidParameter {
            name: "discrete Gaussian sigma",
            value: sigma,
            requirement: "variance does not fit exact 64-bit rationals",
        })?;
        Self::new(numerator, 1_u64 << f)
    }

    /// The variance `sigma^2` as f64.
    pub fn variance(&self) -> f64 {
        self.numerator as f64 / self.denominator as f64
    }

    /// `P[Z = z]`, evaluated in f64 (for tests and reports only; never used for sampling).
    ///
    /// The normalizer `sum_z exp(-z^2/(2 sigma^2))` is summed directly for `sigma^2 < 1`
    /// and otherwise taken from the Poisson summation formula
    /// `sqrt(2 pi) sigma (1 + 2 sum_k exp(-2 pi^2 sigma^2 k^2))`, whose terms beyond `k = 2`
    /// are below `1e-34`.
    pub fn probability(&self, z: i64) -> f64 {
        let variance = self.variance();
        let weight = |x: f64| (-x * x / (2.0 * variance)).exp();
        let normalizer = if variance < 1.0 {
            1.0 + (1..=64).map(|x| 2.0 * weight(f64::from(x))).sum::<f64>()
        } else {
            let two_pi_squared = 2.0 * std::f64::consts::PI * std::f64::consts::PI;
            let correction: f64 = (1..=3)
                .map(|k| 2.0 * (-two_pi_squared * variance * f64::from(k * k)).exp())
                .sum();
            (std::f64::consts::TAU * variance).sqrt() * (1.0 + correction)
        };
        weight(z as f64) / normalizer
    }

    /// Draws one sample (CKS20 Algorithm 3: discrete Laplace proposal with scale
    /// `t = floor(sigma) + 1`, accepted with probability
    /// `exp(-(|y| - sigma^2/t)^2 / (2 sigma^2))`).
    ///
    /// # Privacy
    /// See the type documentation; the draw is exact (integer arithmetic only).
    pub fn sample<R: CryptoRng + ?Sized>(&self, rng: &mut R) -> i64 {
        loop {
            let y = self.proposal.sample(rng);
            let (whole, fraction) = self.acceptance_exponent(y.unsigned_abs());
            if bernoulli_exp_neg_parts(rng, whole, fraction, self.exponent_denominator) {
                return y;
            }
        }
    }

    /// The acceptance exponent `(|y| t q - p)^2 / (2 p q t^2)` as an integer part (capped at
    /// `u128::MAX`) and a numerator over `exponent_denominator`.
    fn acceptance_exponent(&self, magnitude: u64) -> (u128, u128) {
        // magnitude <= 2^62 and t q < 2^63, so the product fits in u128.
        let scaled = u128::from(magnitude).saturating_mul(self.t_times_q);
        let p = u128::from(self.numerator);
        let difference = scaled.abs_diff(p);
        match difference.checked_mul(difference) {
            Some(square) => (
                square / self.exponent_denominator,
                square % self.exponent_denominator,
            ),
            None => {
                let (high, low) = widening_mul_u128(difference, difference);
                div_rem_wide(high, low, self.exponent_denominator)
            }
        }
    }
}

/// Smallest supported sigma of [`DiscreteGaussian::from_sigma`] (`2^-10`).
pub const MIN_GAUSSIAN_SIGMA: f64 = 1.0 / 1024.0;

/// Largest supported sigma of [`DiscreteGaussian::from_sigma`] (`2^31`).
pub const MAX_GAUSSIAN_SIGMA: f64 = 2_147_483_648.0;

/// Smallest supported scale of [`DiscreteLaplace::from_scale`] (`2^-62`).
pub const MIN_LAPLACE_SCALE: f64 = MIN_DYADIC;

/// Supremum of supported scales of [`DiscreteLaplace::from_scale`] (`2^62`, exclusive).
pub const MAX_LAPLACE_SCALE: f64 = MAX_DYADIC;

const MIN_DYADIC: f64 = 1.0 / 4_611_686_018_427_387_904.0;
const MAX_DYADIC: f64 = 4_611_686_018_427_387_904.0;

/// Splits a positive normal f64 into an odd mantissa and a power of two: `x = m * 2^e`.
fn dyadic_parts(x: f64) -> (u64, i32) {
    let bits = x.to_bits();
    let biased_exponent = ((bits >> 52) & 0x7ff) as i32;
    let fraction = bits & ((1 << 52) - 1);
    let (mut mantissa, mut exponent) = if biased_exponent == 0 {
        (fraction, -1074)
    } else {
        (fraction | (1 << 52), biased_exponent - 1075)
    };
    if mantissa == 0 {
        return (0, 0);
    }
    let zeros = mantissa.trailing_zeros();
    mantissa >>= zeros;
    exponent += zeros as i32;
    (mantissa, exponent)
}

fn check_rational_part(name: &'static str, value: u64) -> Result<()> {
    if (1..=MAX_RATIONAL_PART).contains(&value) {
        Ok(())
    } else {
        Err(PrivacyError::InvalidParameter {
            name,
            value: value as f64,
            requirement: "must be between 1 and 2^62",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SecureRng;
    use crate::test_stats::{assert_chi_square, assert_mean_within};
    use proptest::prelude::*;

    /// Histogram of samples over `-reach..=reach`, with both tails folded into the end cells.
    fn histogram(samples: &[i64], reach: i64) -> Vec<u64> {
        let mut counts = vec![0_u64; (2 * reach + 1) as usize];
        for &z in samples {
            counts[(z.clamp(-reach, reach) + reach) as usize] += 1;
        }
        counts
    }

    /// Cell probabilities matching [`histogram`].
    fn cell_probabilities(probability: impl Fn(i64) -> f64, reach: i64) -> Vec<f64> {
        let mut cells: Vec<f64> = (-reach..=reach).map(&probability).collect();
        let inner: f64 = cells.iter().sum();
        let tail = 0.5 * (1.0 - inner);
        let last = cells.len() - 1;
        cells[0] += tail;
        cells[last] += tail;
        cells
    }

    #[test]
    fn dyadic_parts_are_exact() {
        assert_eq!(dyadic_parts(1.0), (1, 0));
        assert_eq!(dyadic_parts(0.75), (3, -2));
        assert_eq!(dyadic_parts(1024.0), (1, 10));
        let (m, e) = dyadic_parts(0.1);
        assert_eq!(m as f64 * 2.0_f64.powi(e), 0.1);
    }

    #[test]
    fn laplace_scale_is_represented_exactly() -> Result<()> {
        for scale in [0.1, 0.7, 1.0, 2.5, 37.5, 1e6, 1.0 / 1024.0] {
            assert_eq!(DiscreteLaplace::from_scale(scale)?.scale(), scale);
        }
        // Tiny scales are rounded up to a multiple of 2^-62, never down.
        let tiny = DiscreteLaplace::from_scale(3.0e-12)?.scale();
        assert!((3.0e-12..=3.0e-12 * (1.0 + 1e-6)).contains(&tiny));
        assert!(DiscreteLaplace::from_scale(0.0).is_err());
        assert!(DiscreteLaplace::from_scale(f64::NAN).is_err());
        assert!(DiscreteLaplace::from_scale(1e30).is_err());
        assert!(DiscreteLaplace::new(0, 1).is_err());
        Ok(())
    }

    #[test]
    fn laplace_pmf_is_normalised() -> Result<()> {
        let laplace = DiscreteLaplace::from_scale(2.5)?;
        let total: f64 = (-400..=400).map(|z| laplace.probability(z)).sum();
        assert!((total - 1.0).abs() < 1e-12);
        let mean_absolute: f64 = (-400..=400_i64)
            .map(|z| z.unsigned_abs() as f64 * laplace.probability(z))
            .sum();
        assert!((mean_absolute - laplace.mean_absolute()).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn laplace_samples_follow_the_exact_pmf() -> Result<()> {
        let mut rng = SecureRng::from_seed(21);
        for scale in [0.3, 1.0, 3.0, 37.5] {
            let laplace = DiscreteLaplace::from_scale(scale)?;
            let samples: Vec<i64> = (0..60_000).map(|_| laplace.sample(&mut rng)).collect();
            let reach = (8.0 * scale).ceil() as i64 + 2;
            assert_chi_square(
                &histogram(&samples, reach),
                &cell_probabilities(|z| laplace.probability(z), reach),
                1e-6,
            );
            let absolute: Vec<f64> = samples.iter().map(|z| z.unsigned_abs() as f64).collect();
            let mean = laplace.mean_absolute();
            assert_mean_within(&absolute, mean, laplace.variance() - mean * mean, 5.3);
        }
        Ok(())
    }

    #[test]
    fn laplace_with_rational_scale_follows_the_exact_pmf() -> Result<()> {
        // Scale 7/3: a non-dyadic rational exercises t and s both above 1.
        let mut rng = SecureRng::from_seed(22);
        let laplace = DiscreteLaplace::new(7, 3)?;
        let samples: Vec<i64> = (0..60_000).map(|_| laplace.sample(&mut rng)).collect();
        assert_chi_square(
            &histogram(&samples, 25),
            &cell_probabilities(|z| laplace.probability(z), 25),
            1e-6,
        );
        Ok(())
    }

    #[test]
    fn gaussian_pmf_is_normalised_on_both_branches() -> Result<()> {
        for sigma in [0.4, 0.999, 1.0, 3.0] {
            let gaussian = DiscreteGaussian::from_sigma(sigma)?;
            let total: f64 = (-200..=200).map(|z| gaussian.probability(z)).sum();
            assert!((total - 1.0).abs() < 1e-12, "sigma {sigma}: {total}");
        }
        Ok(())
    }

    #[test]
    fn gaussian_variance_is_rounded_up_by_a_tiny_amount() -> Result<()> {
        for sigma in [0.001, 0.3, 1.0, 1.7, 10.0, 123.456, 2.0e6, 2.0e9] {
            let gaussian = DiscreteGaussian::from_sigma(sigma)?;
            let exact = sigma * sigma;
            assert!(gaussian.variance() >= exact * (1.0 - 1e-15));
            assert!(
                gaussian.variance() <= exact * (1.0 + 1e-11),
                "sigma {sigma}"
            );
        }
        assert!(DiscreteGaussian::from_sigma(0.0).is_err());
        assert!(DiscreteGaussian::from_sigma(1e10).is_err());
        assert!(DiscreteGaussian::from_sigma(f64::INFINITY).is_err());
        Ok(())
    }

    #[test]
    fn gaussian_samples_follow_the_exact_pmf() -> Result<()> {
        let mut rng = SecureRng::from_seed(23);
        for sigma in [0.5, 2.0, 10.0] {
            let gaussian = DiscreteGaussian::from_sigma(sigma)?;
            let samples: Vec<i64> = (0..60_000).map(|_| gaussian.sample(&mut rng)).collect();
            let reach = (6.0 * sigma).ceil() as i64 + 1;
            assert_chi_square(
                &histogram(&samples, reach),
                &cell_probabilities(|z| gaussian.probability(z), reach),
                1e-6,
            );
            let squares: Vec<f64> = samples.iter().map(|&z| (z * z) as f64).collect();
            // Discrete Gaussian variance is below sigma^2 but within 1e-6 for sigma >= 2.
            if sigma >= 2.0 {
                let variance = gaussian.variance();
                assert_mean_within(&squares, variance, 2.0 * variance * variance, 5.3);
            }
        }
        Ok(())
    }

    #[test]
    fn acceptance_exponent_is_exact_for_large_magnitudes() -> Result<()> {
        let gaussian = DiscreteGaussian::from_sigma(1.3)?;
        let variance = gaussian.variance();
        let t = (variance.sqrt().floor() + 1.0) as u64;
        for magnitude in [0_u64, 1, 5, 1 << 20, 1 << 40, MAX_NOISE_MAGNITUDE] {
            let (whole, fraction) = gaussian.acceptance_exponent(magnitude);
            let approximate = whole as f64 + fraction as f64 / gaussian.exponent_denominator as f64;
            let y = magnitude as f64;
            let expected = (y - variance / t as f64).powi(2) / (2.0 * variance);
            assert!(
                (approximate - expected).abs() <= 1e-9 * expected.max(1.0),
                "magnitude {magnitude}: {approximate} vs {expected}"
            );
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn samplers_return_values_in_range(seed in any::<u64>(), scale in 1e-3_f64..1e6, sigma in 1e-3_f64..1e6) {
            let mut rng = SecureRng::from_seed(seed);
            let fail = |e: PrivacyError| TestCaseError::fail(e.to_string());
            let laplace = DiscreteLaplace::from_scale(scale).map_err(fail)?;
            let gaussian = DiscreteGaussian::from_sigma(sigma).map_err(fail)?;
            prop_assert!(laplace.sample(&mut rng).unsigned_abs() <= MAX_NOISE_MAGNITUDE);
            prop_assert!(gaussian.sample(&mut rng).unsigned_abs() <= MAX_NOISE_MAGNITUDE);
        }
    }
}
