//! Noise calibration: Laplace scale and the analytic Gaussian mechanism (Balle & Wang 2018).
//!
//! The analytic Gaussian mechanism finds the smallest `sigma` for which adding
//! `N(0, sigma^2)` noise to a query of L2 sensitivity `Delta` is `(epsilon, delta)`-DP, using
//! the exact privacy profile (Balle & Wang 2018, Theorem 8):
//!
//! ```text
//! delta(sigma) = Phi(Delta/(2 sigma) - epsilon sigma/Delta)
//!                - e^epsilon * Phi(-Delta/(2 sigma) - epsilon sigma/Delta)
//! ```
//!
//! instead of the classic `sqrt(2 ln(1.25/delta)) Delta/epsilon` (Dwork & Roth, Theorem A.1),
//! which is loose and only valid for `epsilon < 1`. Both normal CDFs are evaluated in log
//! space from `erfc` (see `special.rs`), so nothing underflows for tiny `delta` or overflows
//! for large `epsilon`.
//!
//! **Certified result.** [`calibrate_gaussian`] does not trust a point estimate of
//! `delta(sigma)`: it bisects on a rigorous upper bound that adds a bound on the
//! floating-point error of the evaluation (argument rounding amplified by the slope of
//! `ln Phi`, `erfc` error below 1 ulp, log/exp rounding, all with a factor 4 safety margin).
//! The returned `sigma` therefore satisfies `delta(sigma) <= delta` for the exact real-valued
//! profile, and exceeds the exact optimum only by a relative `1e-10` or so.

use crate::error::{PrivacyError, Result, require_open_unit, require_positive};
use crate::special::log_normal_cdf;

/// Unit roundoff of f64.
const UNIT_ROUNDOFF: f64 = f64::EPSILON / 2.0;

/// Laplace scale `b = sensitivity / epsilon` for an `epsilon`-DP Laplace mechanism.
///
/// The quotient is rounded up (never down), so `sensitivity / b <= epsilon` holds exactly.
///
/// # Privacy
/// Adding `Laplace(b)` noise to a query with L1 sensitivity `sensitivity` is `epsilon`-DP,
/// i.e. `epsilon^2 / 2`-zCDP. For values that leave the server use
/// [`crate::release_laplace`], which samples the discrete Laplace on a grid and accounts
/// for the rounding to that grid.
///
/// # Errors
/// [`PrivacyError::InvalidParameter`] unless both inputs are finite and positive.
pub fn calibrate_laplace(epsilon: f64, sensitivity: f64) -> Result<f64> {
    require_positive("epsilon", epsilon)?;
    require_positive("sensitivity", sensitivity)?;
    let mut scale = sensitivity / epsilon;
    // fma computes scale * epsilon - sensitivity with a single rounding, so its sign is exact.
    while scale.mul_add(epsilon, -sensitivity) < 0.0 {
        scale = scale.next_up();
    }
    require_positive("scale (sensitivity / epsilon)", scale)
}

/// Smallest Gaussian `sigma` such that `N(0, sigma^2)` noise is `(epsilon, delta)`-DP for a
/// query of L2 sensitivity `sensitivity` (analytic Gaussian mechanism, Balle & Wang 2018).
///
/// The search keeps the invariant that the certified upper bound on `delta(sigma)` is at
/// most `delta` (see the module documentation), so the result is never below the exact
/// answer; it is above it by about one part in `1e10`.
///
/// # Privacy
/// Releasing `f(x) + N(0, sigma^2)` with `||f(x) - f(x')||_2 <= sensitivity` for neighbours
/// is `(epsilon, delta)`-DP. In this crate's zCDP accounting, the same mechanism costs
/// `rho = sensitivity^2 / (2 sigma^2)` ([`crate::rho_gaussian`]).
///
/// # Errors
/// [`PrivacyError::InvalidParameter`] for non-positive or non-finite `epsilon` or
/// `sensitivity`, or `delta` outside `(0, 1)`; [`PrivacyError::NoConvergence`] if no finite
/// `sigma` can be bracketed (only for absurd inputs such as `epsilon < 1e-300`).
pub fn calibrate_gaussian(epsilon: f64, delta: f64, sensitivity: f64) -> Result<f64> {
    require_positive("epsilon", epsilon)?;
    require_open_unit("delta", delta)?;
    require_positive("sensitivity", sensitivity)?;
    let satisfied = |sigma: f64| gaussian_delta_upper_bound(sigma, epsilon, sensitivity) <= delta;

    // Start from the classic calibration (valid for epsilon < 1), then bracket the answer.
    let mut hi = (2.0 * (1.25 / delta).ln()).sqrt() * sensitivity / epsilon;
    let mut steps = 0;
    while !satisfied(hi) {
        hi *= 2.0;
        steps += 1;
        if steps > 2_100 || !hi.is_finite() {
            return Err(PrivacyError::NoConvergence(
                "no finite Gaussian sigma reaches the requested delta",
            ));
        }
    }
    let mut lo = hi;
    steps = 0;
    while satisfied(lo) {
        hi = lo;
        lo *= 0.5;
        steps += 1;
        if steps > 2_100 || lo == 0.0 {
            return Err(PrivacyError::NoConvergence(
                "Gaussian sigma could not be bracketed from below",
            ));
        }
    }
    // Invariant: satisfied(hi) && !satisfied(lo).
    for _ in 0..200 {
        let mid = lo + 0.5 * (hi - lo);
        if mid <= lo || mid >= hi {
            break;
        }
        if satisfied(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

/// The exact `delta` of the Gaussian mechanism with noise `sigma` at privacy level `epsilon`
/// (Balle & Wang 2018, Theorem 8), as a best floating-point estimate.
///
/// # Errors
/// [`PrivacyError::InvalidParameter`] unless `sigma` and `sensitivity` are finite and
/// positive and `epsilon` is finite and non-negative.
pub fn gaussian_delta(sigma: f64, epsilon: f64, sensitivity: f64) -> Result<f64> {
    validate_profile_inputs(sigma, epsilon, sensitivity)?;
    let terms = ProfileTerms::new(sigma, epsilon, sensitivity);
    if terms.log_subtracted >= terms.log_leading {
        return Ok(0.0);
    }
    Ok(terms.log_leading.exp() * -(terms.log_subtracted - terms.log_leading).exp_m1())
}

/// Smallest `epsilon >= 0` for which the Gaussian mechanism with noise `sigma` is
/// `(epsilon, delta)`-DP (inverse of [`gaussian_delta`] in `epsilon`).
///
/// Bisects on the certified upper bound of `delta`, so the answer is never too small.
///
/// # Errors
/// [`PrivacyError::InvalidParameter`] for invalid inputs; [`PrivacyError::NoConvergence`]
/// if no finite `epsilon` reaches `delta`.
pub fn gaussian_epsilon(sigma: f64, delta: f64, sensitivity: f64) -> Result<f64> {
    validate_profile_inputs(sigma, 0.0, sensitivity)?;
    require_open_unit("delta", delta)?;
    let satisfied = |epsilon: f64| gaussian_delta_upper_bound(sigma, epsilon, sensitivity) <= delta;
    if satisfied(0.0) {
        return Ok(0.0);
    }
    let mut lo = 0.0;
    let mut hi = 1.0;
    let mut steps = 0;
    while !satisfied(hi) {
        lo = hi;
        hi *= 2.0;
        steps += 1;
        if steps > 1_100 || !hi.is_finite() {
            return Err(PrivacyError::NoConvergence(
                "no finite epsilon reaches the requested delta",
            ));
        }
    }
    for _ in 0..200 {
        let mid = lo + 0.5 * (hi - lo);
        if mid <= lo || mid >= hi {
            break;
        }
        if satisfied(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

/// The classic Gaussian calibration `sigma = sqrt(2 ln(1.25/delta)) * sensitivity / epsilon`
/// (Dwork & Roth 2014, Theorem A.1), for comparison only.
///
/// # Privacy
/// `(epsilon, delta)`-DP only for `epsilon < 1`; always larger than [`calibrate_gaussian`].
///
/// # Errors
/// [`PrivacyError::InvalidParameter`] unless `0 < epsilon < 1`, `0 < delta < 1` and the
/// sensitivity is finite and positive.
pub fn classic_gaussian_sigma(epsilon: f64, delta: f64, sensitivity: f64) -> Result<f64> {
    require_open_unit("epsilon (the classic bound needs epsilon < 1)", epsilon)?;
    require_open_unit("delta", delta)?;
    require_positive("sensitivity", sensitivity)?;
    Ok((2.0 * (1.25 / delta).ln()).sqrt() * sensitivity / epsilon)
}

fn validate_profile_inputs(sigma: f64, epsilon: f64, sensitivity: f64) -> Result<()> {
    require_positive("sigma", sigma)?;
    require_positive("sensitivity", sensitivity)?;
    if !(epsilon.is_finite() && epsilon >= 0.0) {
        return Err(PrivacyError::InvalidParameter {
            name: "epsilon",
            value: epsilon,
            requirement: "must be finite and at least 0",
        });
    }
    Ok(())
}

/// The two terms of Theorem 8 in log space, with a bound on their absolute error.
struct ProfileTerms {
    /// `ln Phi(a)`, `a = r/2 - epsilon/r`, `r = sensitivity/sigma`.
    log_leading: f64,
    /// `epsilon + ln Phi(b)`, `b = -r/2 - epsilon/r`.
    log_subtracted: f64,
    /// Bound on the absolute floating-point error of either log term.
    log_error: f64,
}

impl ProfileTerms {
    fn new(sigma: f64, epsilon: f64, sensitivity: f64) -> Self {
        let ratio = sensitivity / sigma;
        let half_ratio = 0.5 * ratio;
        let shift = epsilon / ratio;
        let a = half_ratio - shift;
        let b = -half_ratio - shift;
        let log_leading = log_normal_cdf(a);
        let log_subtracted = epsilon + log_normal_cdf(b);
        // Error budget (absolute, in log space):
        // - the arguments a, b carry at most 3 roundings of |r/2| + |epsilon/r|, amplified by
        //   the slope of ln Phi, which is at most |x| + 1;
        // - erfc is accurate to 1 ulp, and ln / ln_1p / the asymptotic series add a few ulps
        //   of the magnitude of the log term;
        // - the sum with epsilon adds one rounding of |log_subtracted|.
        // Everything is multiplied by 4 as a safety margin.
        let argument_error = 3.0 * UNIT_ROUNDOFF * (half_ratio.abs() + shift.abs());
        let slope = a.abs().max(b.abs()) + 1.0;
        let evaluation_error =
            UNIT_ROUNDOFF * (8.0 + 4.0 * log_leading.abs() + 5.0 * log_subtracted.abs());
        let log_error = 4.0 * (argument_error * slope + evaluation_error);
        Self {
            log_leading,
            log_subtracted,
            log_error,
        }
    }
}

/// Rigorous upper bound on the exact Theorem 8 `delta`: `e^(lA + err) - e^(lB - err)`,
/// computed stably and rounded up.
pub(crate) fn gaussian_delta_upper_bound(sigma: f64, epsilon: f64, sensitivity: f64) -> f64 {
    let terms = ProfileTerms::new(sigma, epsilon, sensitivity);
    let upper_leading = terms.log_leading + terms.log_error;
    let lower_subtracted = terms.log_subtracted - terms.log_error;
    if !upper_leading.is_finite() {
        return 1.0;
    }
    let gap = lower_subtracted - upper_leading;
    if gap >= 0.0 {
        return 0.0;
    }
    let bound = upper_leading.exp() * -gap.exp_m1();
    // exp, exp_m1 and the product: a few ulps, covered generously.
    (bound * (1.0 + 16.0 * UNIT_ROUNDOFF)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_relative(actual: f64, expected: f64, tolerance: f64) {
        let error = ((actual - expected) / expected).abs();
        assert!(
            error <= tolerance,
            "actual {actual:e}, expected {expected:e}, relative error {error:e}"
        );
    }

    const GRID: [(f64, f64); 12] = [
        (0.01, 1e-5),
        (0.1, 1e-10),
        (0.3, 1e-6),
        (0.5, 1e-6),
        (0.9, 1e-3),
        (1.0, 1e-5),
        (2.0, 1e-3),
        (5.0, 1e-8),
        (10.0, 1e-12),
        (30.0, 1e-5),
        (100.0, 1e-20),
        (0.05, 0.4),
    ];

    #[test]
    fn laplace_scale_is_sensitivity_over_epsilon_rounded_up() -> Result<()> {
        for (epsilon, sensitivity) in [(0.1, 1.0), (0.3, 0.7), (1.0 / 3.0, 2.0), (7.0, 1e-3)] {
            let scale = calibrate_laplace(epsilon, sensitivity)?;
            assert_relative(scale, sensitivity / epsilon, 4.0 * UNIT_ROUNDOFF);
            assert!(scale.mul_add(epsilon, -sensitivity) >= 0.0);
        }
        Ok(())
    }

    #[test]
    fn calibration_rejects_invalid_parameters() {
        assert!(calibrate_laplace(0.0, 1.0).is_err());
        assert!(calibrate_laplace(1.0, f64::NAN).is_err());
        assert!(calibrate_gaussian(1.0, 0.0, 1.0).is_err());
        assert!(calibrate_gaussian(1.0, 1.0, 1.0).is_err());
        assert!(calibrate_gaussian(-1.0, 1e-5, 1.0).is_err());
        assert!(calibrate_gaussian(1.0, 1e-5, f64::INFINITY).is_err());
        assert!(gaussian_delta(0.0, 1.0, 1.0).is_err());
        assert!(classic_gaussian_sigma(1.5, 1e-5, 1.0).is_err());
    }

    // Reference values: 150-digit bisection on Theorem 8 with an independent erfc
    // implementation (Python `decimal`), sensitivity 1.
    #[test]
    fn analytic_sigma_matches_high_precision_values() -> Result<()> {
        let known = [
            (1.0, 1e-5, 3.730_631_634_815_942),
            (0.5, 1e-6, 8.057_618_480_725_043),
            (2.0, 1e-3, 1.445_239_160_929_783_4),
            (0.1, 1e-10, 54.206_295_836_901_27),
            (5.0, 1e-8, 1.139_012_781_604_440_6),
        ];
        for (epsilon, delta, expected) in known {
            let sigma = calibrate_gaussian(epsilon, delta, 1.0)?;
            assert_relative(sigma, expected, 1e-9);
            assert!(
                sigma >= expected * (1.0 - 1e-13),
                "sigma below the exact optimum"
            );
            // Sensitivity scales sigma linearly.
            assert_relative(calibrate_gaussian(epsilon, delta, 3.5)?, 3.5 * sigma, 1e-9);
        }
        Ok(())
    }

    #[test]
    fn gaussian_delta_matches_high_precision_values() -> Result<()> {
        let known = [
            (2.0, 1.0, 0.006_829_594_983_114_575_5),
            (0.5, 3.0, 0.183_813_076_544_472_15),
            (10.0, 0.1, 0.008_751_768_145_809_594),
        ];
        for (sigma, epsilon, expected) in known {
            assert_relative(gaussian_delta(sigma, epsilon, 1.0)?, expected, 1e-12);
            let bound = gaussian_delta_upper_bound(sigma, epsilon, 1.0);
            assert!(bound >= expected && bound <= expected * (1.0 + 1e-9));
        }
        Ok(())
    }

    #[test]
    fn calibrated_sigma_meets_delta_and_is_tight() -> Result<()> {
        for (epsilon, delta) in GRID {
            let sigma = calibrate_gaussian(epsilon, delta, 1.0)?;
            let achieved = gaussian_delta(sigma, epsilon, 1.0)?;
            assert!(
                achieved <= delta,
                "eps {epsilon} delta {delta}: {achieved:e}"
            );
            assert!(gaussian_delta_upper_bound(sigma, epsilon, 1.0) <= delta);
            // A slightly smaller sigma must violate the requested delta.
            let smaller = gaussian_delta(sigma * (1.0 - 1e-7), epsilon, 1.0)?;
            assert!(smaller > delta, "eps {epsilon} delta {delta}: not tight");
        }
        Ok(())
    }

    #[test]
    fn analytic_sigma_beats_classic_for_epsilon_below_one() -> Result<()> {
        for (epsilon, delta) in GRID.iter().copied().filter(|(eps, _)| *eps < 1.0) {
            let analytic = calibrate_gaussian(epsilon, delta, 1.0)?;
            let classic = classic_gaussian_sigma(epsilon, delta, 1.0)?;
            assert!(analytic < classic, "eps {epsilon} delta {delta}");
            // The classic sigma is itself valid, so its delta is within budget too.
            assert!(gaussian_delta(classic, epsilon, 1.0)? <= delta);
        }
        Ok(())
    }

    #[test]
    fn gaussian_epsilon_inverts_calibration() -> Result<()> {
        for (epsilon, delta) in GRID {
            let sigma = calibrate_gaussian(epsilon, delta, 1.0)?;
            let recovered = gaussian_epsilon(sigma, delta, 1.0)?;
            assert!(
                recovered <= epsilon * (1.0 + 1e-9),
                "eps {epsilon}: {recovered}"
            );
            assert_relative(recovered, epsilon, 1e-6);
        }
        // Enormous noise: already (0, delta)-DP.
        assert_eq!(gaussian_epsilon(1e9, 1e-3, 1.0)?, 0.0);
        Ok(())
    }

    #[test]
    fn delta_decreases_with_sigma_and_epsilon() -> Result<()> {
        let mut previous = 1.0;
        for step in 1..=60 {
            let sigma = 0.1 * f64::from(step);
            let delta = gaussian_delta(sigma, 0.5, 1.0)?;
            assert!(delta < previous);
            previous = delta;
        }
        previous = 1.0;
        for step in 0..=60 {
            let delta = gaussian_delta(2.0, 0.1 * f64::from(step), 1.0)?;
            assert!(delta < previous);
            previous = delta;
        }
        Ok(())
    }
}
