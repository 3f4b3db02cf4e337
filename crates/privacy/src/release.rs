//! Releasing a number: round it to the grid `2^-k Z`, add exact discrete Laplace or discrete
//! Gaussian noise in grid units, and return the noisy grid point.
//!
//! This is how every noisy number leaves the server. The noise is an exact integer sample
//! (`discrete.rs`) added to an exact integer (the rounded value), so the output cannot leak
//! the low-order bits of the input the way floating-point Laplace noise does (Mironov 2012).
//!
//! **Rounding and sensitivity.** The value is rounded half-up, `R(v) = floor(v 2^k + 1/2)`,
//! computed exactly. `R` is monotone and commutes with integer shifts, so if neighbouring
//! inputs satisfy `|v - v'| <= Delta`, then `|R(v) - R(v')| <= ceil(Delta 2^k)`: the grid
//! sensitivity is [`grid_sensitivity`], at most one grid step more than `Delta 2^k`. The
//! guarantees below use it. Converting the final integer to f64 (`(R(v) + Z) 2^-k`) is
//! post-processing: exact while `|R(v) + Z| <= 2^53`, and harmless to privacy beyond.

use rand::CryptoRng;

use crate::calibration::calibrate_laplace;
use crate::discrete::{
    DiscreteGaussian, DiscreteLaplace, MAX_GAUSSIAN_SIGMA, MAX_LAPLACE_SCALE, MIN_GAUSSIAN_SIGMA,
    MIN_LAPLACE_SCALE,
};
use crate::error::{PrivacyError, Result, require_non_negative, require_positive};
use crate::noise::{NoiseBuffer, NoiseSampler};

/// Smallest supported grid exponent (grid step `2^60`).
pub const MIN_GRID_K: i32 = -60;

/// Largest supported grid exponent (grid step `2^-60`).
pub const MAX_GRID_K: i32 = 60;

/// Largest `|value| * 2^k` that can be released (values on the grid stay exact in f64).
const MAX_GRID_VALUE: f64 = 4_503_599_627_370_496.0; // 2^52

/// Largest grid sensitivity (`Delta * 2^k`) supported.
const MAX_GRID_SENSITIVITY: f64 = 4_611_686_018_427_387_904.0; // 2^62

/// Rounds `value` to the grid `2^-k Z` (half-up) and returns it in grid units.
///
/// # Errors
/// [`PrivacyError::GridOutOfRange`], [`PrivacyError::InvalidParameter`] for a non-finite
/// value, [`PrivacyError::ValueOutOfGridRange`] if `|value| 2^k > 2^52`.
pub fn round_to_grid(value: f64, grid_k: i32) -> Result<i64> {
    check_grid(grid_k)?;
    if !value.is_finite() {
        return Err(PrivacyError::InvalidParameter {
            name: "value",
            value,
            requirement: "must be finite",
        });
    }
    // Exact: scaling by a power of two only rounds in the subnormal range, where the
    // result is below 1/2 in magnitude and rounds to 0 either way.
    let scaled = libm::scalbn(value, grid_k);
    if scaled.abs() > MAX_GRID_VALUE {
        return Err(PrivacyError::ValueOutOfGridRange { value, grid_k });
    }
    let floor = scaled.floor();
    // Exact for |scaled| <= 2^52: the fractional part is representable.
    let rounded = if scaled - floor >= 0.5 {
        floor + 1.0
    } else {
        floor
    };
    // |rounded| <= 2^52, exactly representable as i64.
    Ok(rounded as i64)
}

/// Grid sensitivity `ceil(sensitivity * 2^k)`: how far [`round_to_grid`] can move between
/// neighbouring inputs whose values differ by at most `sensitivity`.
///
/// # Errors
/// [`PrivacyError::GridOutOfRange`]; [`PrivacyError::InvalidParameter`] unless
/// `sensitivity` is finite, non-negative and `sensitivity * 2^k <= 2^62`.
pub fn grid_sensitivity(sensitivity: f64, grid_k: i32) -> Result<u64> {
    check_grid(grid_k)?;
    require_non_negative("sensitivity", sensitivity)?;
    let scaled = libm::scalbn(sensitivity, grid_k).ceil();
    if scaled > MAX_GRID_SENSITIVITY {
        return Err(PrivacyError::InvalidParameter {
            name: "sensitivity",
            value: sensitivity,
            requirement: "sensitivity * 2^k must be at most 2^62",
        });
    }
    // 0 <= scaled <= 2^62 is an exact integer.
    Ok(scaled as u64)
}

/// Noise in grid units that knows its grid, so a [`NoiseBuffer`] of it can release values.
pub trait GridNoise: NoiseSampler<Sample = i64> {
    /// The grid exponent `k` (grid step `2^-k`).
    fn grid_k(&self) -> i32;
}

/// The discrete Laplace release mechanism on the grid `2^-k Z`.
///
/// # Privacy
/// For a query whose values on neighbouring inputs differ by at most `sensitivity`,
/// [`LaplaceRelease::release`] is `epsilon`-DP with
/// `epsilon = ceil(sensitivity 2^k) / (scale 2^k)` ([`LaplaceRelease::epsilon`]), which
/// includes the rounding to the grid; in zCDP that is `epsilon^2 / 2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaplaceRelease {
    grid_k: i32,
    noise: DiscreteLaplace,
}

impl LaplaceRelease {
    /// Discrete Laplace noise of scale `scale` (in value units) on the grid `2^-k Z`.
    ///
    /// # Errors
    /// [`PrivacyError::GridOutOfRange`], [`PrivacyError::InvalidParameter`] for a
    /// non-positive scale, [`PrivacyError::NoiseOutOfGridRange`] unless
    /// `2^-62 <= scale 2^k < 2^62`.
    pub fn new(scale: f64, grid_k: i32) -> Result<Self> {
        check_grid(grid_k)?;
        require_positive("scale", scale)?;
        let grid_scale = libm::scalbn(scale, grid_k);
        if !(MIN_LAPLACE_SCALE..MAX_LAPLACE_SCALE).contains(&grid_scale) {
            return Err(PrivacyError::NoiseOutOfGridRange {
                name: "scale",
                value: grid_scale,
                min: MIN_LAPLACE_SCALE,
                max: MAX_LAPLACE_SCALE,
                hint: "choose k so that scale * 2^k is in range",
            });
        }
        Ok(Self {
            grid_k,
            noise: DiscreteLaplace::from_scale(grid_scale)?,
        })
    }

    /// The release with the smallest scale that is `epsilon`-DP for `sensitivity`,
    /// including the grid rounding: `scale = ceil(sensitivity 2^k) 2^-k / epsilon`.
    ///
    /// # Errors
    /// As [`LaplaceRelease::new`] and [`grid_sensitivity`]; `epsilon` must be finite and
    /// positive and the sensitivity positive on the grid.
    pub fn for_epsilon(epsilon: f64, sensitivity: f64, grid_k: i32) -> Result<Self> {
        let grid_sensitivity = grid_sensitivity(sensitivity, grid_k)?;
        let grid_scale = calibrate_laplace(epsilon, grid_sensitivity as f64)?;
        Self::new(libm::scalbn(grid_scale, -grid_k), grid_k)
    }

    /// The grid exponent `k`.
    pub fn grid_k(&self) -> i32 {
        self.grid_k
    }

    /// The noise distribution in grid units.
    pub fn noise(&self) -> &DiscreteLaplace {
        &self.noise
    }

    /// The noise scale in value units.
    pub fn scale(&self) -> f64 {
        libm::scalbn(self.noise.scale(), -self.grid_k)
    }

    /// The pure-DP `epsilon` for a query of the given sensitivity, rounding included
    /// (rounded up).
    ///
    /// # Errors
    /// As [`grid_sensitivity`].
    pub fn epsilon(&self, sensitivity: f64) -> Result<f64> {
        let grid_sensitivity = grid_sensitivity(sensitivity, self.grid_k)? as f64;
        Ok(round_up(grid_sensitivity / self.noise.scale()))
    }

    /// Rounds `value` to the grid and adds fresh discrete Laplace noise.
    ///
    /// # Privacy
    /// See the type documentation.
    ///
    /// # Errors
    /// As [`round_to_grid`].
    pub fn release<R: CryptoRng + ?Sized>(&self, value: f64, rng: &mut R) -> Result<f64> {
        let rounded = round_to_grid(value, self.grid_k)?;
        Ok(from_grid(rounded + self.noise.sample(rng), self.grid_k))
    }
}

impl NoiseSampler for LaplaceRelease {
    type Sample = i64;

    fn draw<R: CryptoRng + ?Sized>(&self, rng: &mut R) -> i64 {
        self.noise.sample(rng)
    }
}

impl GridNoise for LaplaceRelease {
    fn grid_k(&self) -> i32 {
        self.grid_k
    }
}

/// The discrete Gaussian release mechanism on the grid `2^-k Z`.
///
/// # Privacy
/// For a query whose values on neighbouring inputs differ by at most `sensitivity`,
/// [`GaussianRelease::release`] is `rho`-zCDP with
/// `rho = ceil(sensitivity 2^k)^2 / (2 sigma_grid^2)` ([`GaussianRelease::rho`]), where
/// `sigma_grid^2 >= (sigma 2^k)^2` is the variance actually sampled (rounded up by less than
/// `2^-40` relative). Convert to `(epsilon, delta)` with [`crate::rho_to_epsilon`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GaussianRelease {
    grid_k: i32,
    noise: DiscreteGaussian,
}

impl GaussianRelease {
    /// Discrete Gaussian noise of standard deviation `sigma` (in value units) on the grid
    /// `2^-k Z`.
    ///
    /// # Errors
    /// [`PrivacyError::GridOutOfRange`], [`PrivacyError::InvalidParameter`] for a
    /// non-positive sigma, [`PrivacyError::NoiseOutOfGridRange`] unless
    /// `2^-10 <= sigma 2^k <= 2^31`.
    pub fn new(sigma: f64, grid_k: i32) -> Result<Self> {
        check_grid(grid_k)?;
        require_positive("sigma", sigma)?;
        let grid_sigma = libm::scalbn(sigma, grid_k);
        if !(MIN_GAUSSIAN_SIGMA..=MAX_GAUSSIAN_SIGMA).contains(&grid_sigma) {
            return Err(PrivacyError::NoiseOutOfGridRange {
                name: "sigma",
                value: grid_sigma,
                min: MIN_GAUSSIAN_SIGMA,
                max: MAX_GAUSSIAN_SIGMA,
                hint: "choose k so that sigma * 2^k is in range (a coarser grid for large sigma)",
            });
        }
        Ok(Self {
            grid_k,
            noise: DiscreteGaussian::from_sigma(grid_sigma)?,
        })
    }

    /// The release with the smallest sigma that is `rho`-zCDP for `sensitivity`, including
    /// the grid rounding: `sigma = ceil(sensitivity 2^k) 2^-k / sqrt(2 rho)`.
    ///
    /// # Errors
    /// As [`GaussianRelease::new`] and [`grid_sensitivity`]; `rho` must be finite and
    /// positive and the sensitivity positive on the grid.
    pub fn for_rho(rho: f64, sensitivity: f64, grid_k: i32) -> Result<Self> {
        let grid_sensitivity = grid_sensitivity(sensitivity, grid_k)?;
        let grid_sigma = crate::accounting::sigma_for_rho(grid_sensitivity as f64, rho)?;
        Self::new(libm::scalbn(grid_sigma, -grid_k), grid_k)
    }

    /// The grid exponent `k`.
    pub fn grid_k(&self) -> i32 {
        self.grid_k
    }

    /// The noise distribution in grid units.
    pub fn noise(&self) -> &DiscreteGaussian {
        &self.noise
    }

    /// The noise standard deviation in value units (of the variance actually sampled).
    pub fn sigma(&self) -> f64 {
        libm::scalbn(self.noise.variance().sqrt(), -self.grid_k)
    }

    /// The zCDP cost `rho` for a query of the given L2 sensitivity, rounding included
    /// (rounded up).
    ///
    /// # Errors
    /// As [`grid_sensitivity`].
    pub fn rho(&self, sensitivity: f64) -> Result<f64> {
        let grid_sensitivity = grid_sensitivity(sensitivity, self.grid_k)? as f64;
        Ok(round_up(
            grid_sensitivity * grid_sensitivity / (2.0 * self.noise.variance()),
        ))
    }

    /// Rounds `value` to the grid and adds fresh discrete Gaussian noise.
    ///
    /// # Privacy
    /// See the type documentation.
    ///
    /// # Errors
    /// As [`round_to_grid`].
    pub fn release<R: CryptoRng + ?Sized>(&self, value: f64, rng: &mut R) -> Result<f64> {
        let rounded = round_to_grid(value, self.grid_k)?;
        Ok(from_grid(rounded + self.noise.sample(rng), self.grid_k))
    }
}

impl NoiseSampler for GaussianRelease {
    type Sample = i64;

    fn draw<R: CryptoRng + ?Sized>(&self, rng: &mut R) -> i64 {
        self.noise.sample(rng)
    }
}

impl GridNoise for GaussianRelease {
    fn grid_k(&self) -> i32 {
        self.grid_k
    }
}

impl<S: GridNoise> NoiseBuffer<S> {
    /// Rounds `value` to the buffer's grid and adds one pre-generated noise sample (drawn
    /// fresh only if the buffer is empty).
    ///
    /// # Privacy
    /// The same guarantee as the sampler's own `release` ([`LaplaceRelease`] or
    /// [`GaussianRelease`]): each buffered sample is used exactly once.
    ///
    /// # Errors
    /// As [`round_to_grid`]; no noise is consumed when the value is rejected.
    pub fn release<R: CryptoRng + ?Sized>(&mut self, value: f64, rng: &mut R) -> Result<f64> {
        let grid_k = self.sampler().grid_k();
        let rounded = round_to_grid(value, grid_k)?;
        Ok(from_grid(rounded + self.take_one(rng), grid_k))
    }
}

/// Releases `value` with discrete Laplace noise of scale `scale` on the grid `2^-k Z`.
///
/// # Privacy
/// `epsilon`-DP with `epsilon = ceil(sensitivity 2^k) / (scale 2^k)` for a query of the given
/// sensitivity (see [`LaplaceRelease`]).
///
/// # Errors
/// As [`LaplaceRelease::new`] and [`round_to_grid`].
pub fn release_laplace<R: CryptoRng + ?Sized>(
    value: f64,
    scale: f64,
    grid_k: i32,
    rng: &mut R,
) -> Result<f64> {
    LaplaceRelease::new(scale, grid_k)?.release(value, rng)
}

/// Releases `value` with discrete Gaussian noise of standard deviation `sigma` on the grid
/// `2^-k Z`.
///
/// # Privacy
/// `rho`-zCDP with `rho = ceil(sensitivity 2^k)^2 / (2 (sigma 2^k)^2)` or slightly less
/// (see [`GaussianRelease`]).
///
/// # Errors
/// As [`GaussianRelease::new`] and [`round_to_grid`].
pub fn release_gaussian<R: CryptoRng + ?Sized>(
    value: f64,
    sigma: f64,
    grid_k: i32,
    rng: &mut R,
) -> Result<f64> {
    GaussianRelease::new(sigma, grid_k)?.release(value, rng)
}

fn check_grid(grid_k: i32) -> Result<()> {
    if (MIN_GRID_K..=MAX_GRID_K).contains(&grid_k) {
        Ok(())
    } else {
        Err(PrivacyError::GridOutOfRange {
            grid_k,
            min: MIN_GRID_K,
            max: MAX_GRID_K,
        })
    }
}

/// Grid units back to a value: `units * 2^-k` (exact while `|units| <= 2^53`).
fn from_grid(units: i64, grid_k: i32) -> f64 {
    libm::scalbn(units as f64, -grid_k)
}

/// Rounds a computed privacy cost up past the few roundings that produced it.
fn round_up(cost: f64) -> f64 {
    cost * (1.0 + 4.0 * f64::EPSILON)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SecureRng;
    use crate::test_stats::{assert_chi_square, assert_mean_within};
    use proptest::prelude::*;

    #[test]
    fn rounding_is_half_up_and_exact() -> Result<()> {
        assert_eq!(round_to_grid(0.5, 0)?, 1);
        assert_eq!(round_to_grid(-0.5, 0)?, 0);
        assert_eq!(round_to_grid(-1.5, 0)?, -1);
        assert_eq!(round_to_grid(2.5, 0)?, 3);
        assert_eq!(round_to_grid(0.499_999_999_999_999_94, 0)?, 0);
        assert_eq!(round_to_grid(0.3, 3)?, 2); // 2.4 grid units
        assert_eq!(round_to_grid(13.0, -2)?, 3); // 3.25 units of 4
        assert_eq!(round_to_grid(1e-310, 10)?, 0);
        assert_eq!(
            round_to_grid(4_503_599_627_370_495.5, 0)?,
            4_503_599_627_370_496
        );
        assert!(matches!(
            round_to_grid(1e16, 0),
            Err(PrivacyError::ValueOutOfGridRange { .. })
        ));
        assert!(round_to_grid(f64::NAN, 0).is_err());
        assert!(round_to_grid(1.0, 61).is_err());
        Ok(())
    }

    #[test]
    fn releases_are_exact_grid_points() -> Result<()> {
        let mut rng = SecureRng::from_seed(41);
        for grid_k in [-2, 0, 3, 10, 30] {
            for value in [0.0, 1.234_567, -987.654, 1e6 + 0.1] {
                for released in [
                    release_laplace(value, 2.0, grid_k, &mut rng)?,
                    release_gaussian(value, 2.0, grid_k, &mut rng)?,
                ] {
                    let units = libm::scalbn(released, grid_k);
                    assert_eq!(
                        units,
                        units.trunc(),
                        "{released} is off the 2^-{grid_k} grid"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn laplace_release_noise_is_discrete_laplace_in_grid_units() -> Result<()> {
        let mut rng = SecureRng::from_seed(42);
        let release = LaplaceRelease::new(0.75, 2)?; // 3 grid units
        let value = 10.3;
        let center = round_to_grid(value, 2)?;
        let reach = 30;
        let mut counts = vec![0_u64; 2 * reach + 1];
        let mut absolute = Vec::new();
        for _ in 0..60_000 {
            let noise = round_to_grid(release.release(value, &mut rng)?, 2)? - center;
            counts[(noise.clamp(-(reach as i64), reach as i64) + reach as i64) as usize] += 1;
            absolute.push(noise.unsigned_abs() as f64);
        }
        let laplace = release.noise();
        let mut probabilities: Vec<f64> = (-(reach as i64)..=reach as i64)
            .map(|z| laplace.probability(z))
            .collect();
        let tail = 0.5 * (1.0 - probabilities.iter().sum::<f64>());
        probabilities[0] += tail;
        probabilities[2 * reach] += tail;
        assert_chi_square(&counts, &probabilities, 1e-6);
        // E|X| against the exact discrete-Laplace mean (close to the scale, 3 units).
        let mean = laplace.mean_absolute();
        assert_mean_within(&absolute, mean, laplace.variance() - mean * mean, 5.3);
        Ok(())
    }

    #[test]
    fn buffered_release_uses_the_buffer_grid() -> Result<()> {
        let mut rng = SecureRng::from_seed(43);
        let mut buffer = NoiseBuffer::filled(GaussianRelease::new(1.0, 4)?, 16, &mut rng);
        for _ in 0..40 {
            let released = buffer.release(5.0, &mut rng)?;
            assert_eq!(libm::scalbn(released, 4).fract(), 0.0);
        }
        assert!(buffer.release(f64::INFINITY, &mut rng).is_err());
        let mut laplace = NoiseBuffer::filled(LaplaceRelease::new(1.0, 0)?, 4, &mut rng);
        let before = laplace.available();
        assert!(laplace.release(1e300, &mut rng).is_err());
        assert_eq!(
            laplace.available(),
            before,
            "rejected values consume no noise"
        );
        Ok(())
    }

    #[test]
    fn privacy_parameters_include_the_rounding() -> Result<()> {
        // Sensitivity 1.1 on a grid of step 1/2 moves by at most ceil(2.2) = 3 steps.
        assert_eq!(grid_sensitivity(1.1, 1)?, 3);
        assert_eq!(grid_sensitivity(1.0, 1)?, 2);
        let laplace = LaplaceRelease::new(2.0, 1)?;
        let epsilon = laplace.epsilon(1.1)?;
        assert!((3.0 / 4.0..=0.75 * (1.0 + 1e-15)).contains(&epsilon));
        let calibrated = LaplaceRelease::for_epsilon(0.3, 1.1, 1)?;
        assert!(calibrated.epsilon(1.1)? <= 0.3 * (1.0 + 1e-15));
        assert!(calibrated.epsilon(1.1)? >= 0.3 * (1.0 - 1e-12));

        let gaussian = GaussianRelease::new(2.0, 1)?;
        let rho = gaussian.rho(1.1)?;
        assert!(rho <= 9.0 / (2.0 * 16.0) * (1.0 + 1e-15));
        assert!(rho >= 9.0 / (2.0 * 16.0) * (1.0 - 1e-11));
        let calibrated = GaussianRelease::for_rho(0.05, 1.1, 1)?;
        assert!(calibrated.rho(1.1)? <= 0.05 * (1.0 + 1e-15));
        assert!(calibrated.rho(1.1)? >= 0.05 * (1.0 - 1e-9));
        Ok(())
    }

    #[test]
    fn out_of_range_noise_is_rejected_with_a_hint() {
        assert!(matches!(
            GaussianRelease::new(1e6, 30),
            Err(PrivacyError::NoiseOutOfGridRange { name: "sigma", .. })
        ));
        assert!(matches!(
            LaplaceRelease::new(1e-30, -20),
            Err(PrivacyError::NoiseOutOfGridRange { name: "scale", .. })
        ));
        assert!(LaplaceRelease::new(0.0, 0).is_err());
        assert!(GaussianRelease::new(1.0, 100).is_err());
    }

    proptest! {
        #[test]
        fn rounding_commutes_with_integer_shifts(value in -1e9_f64..1e9, shift in -1_000_000_i64..1_000_000, grid_k in -4_i32..20) {
            let fail = |e: PrivacyError| TestCaseError::fail(e.to_string());
            let shifted = value + libm::scalbn(shift as f64, -grid_k);
            // Only meaningful when the shifted value is computed exactly.
            prop_assume!(shifted - value == libm::scalbn(shift as f64, -grid_k));
            prop_assert_eq!(
                round_to_grid(shifted, grid_k).map_err(fail)?,
                round_to_grid(value, grid_k).map_err(fail)? + shift
            );
        }

        #[test]
        fn rounded_neighbours_stay_within_the_grid_sensitivity(value in -1e6_f64..1e6, offset in 0.0_f64..1.0, sensitivity in 1e-3_f64..100.0, grid_k in -3_i32..12) {
            let fail = |e: PrivacyError| TestCaseError::fail(e.to_string());
            let neighbour = value + offset * sensitivity;
            prop_assume!((neighbour - value).abs() <= sensitivity);
            let moved = round_to_grid(neighbour, grid_k).map_err(fail)? - round_to_grid(value, grid_k).map_err(fail)?;
            prop_assert!(moved.unsigned_abs() <= grid_sensitivity(sensitivity, grid_k).map_err(fail)?);
            prop_assert!(moved >= 0, "rounding is monotone");
        }
    }
}
