//! zCDP accounting: per-mechanism costs `rho` (which add up under composition) and the
//! conversion of a total `rho` to `(epsilon, delta)`-DP.
//!
//! Costs (Bun & Steinke 2016; Cesar & Rogers 2021 for bounded-range mechanisms):
//!
//! | mechanism | `rho` |
//! | --- | --- |
//! | Gaussian noise, L2 sensitivity `D`, std `sigma` (continuous or discrete) | `D^2 / (2 sigma^2)` |
//! | any `epsilon`-DP mechanism (e.g. Laplace) | `epsilon^2 / 2` |
//! | one exponential-mechanism pick at `epsilon` (bounded range) | `epsilon^2 / 8` |
//! | Gumbel top-`m` at `epsilon` per pick | `m * epsilon^2 / 8` |
//!
//! Permute-and-flip is `epsilon`-DP but not `epsilon`-bounded-range: charge it
//! `epsilon^2 / 2`, never `epsilon^2 / 8`.
//!
//! **Conversion.** `rho`-zCDP implies `(epsilon, delta)`-DP for (Canonne, Kamath & Steinke
//! 2020, Proposition 12 with Renyi divergence `alpha * rho` of every order `alpha > 1`)
//!
//! ```text
//! delta = inf_{alpha > 1} exp((alpha - 1)(alpha rho - epsilon)) / (alpha - 1) * (1 - 1/alpha)^alpha
//! ```
//!
//! or equivalently
//!
//! ```text
//! epsilon = inf_{alpha > 1} alpha rho + (ln(1/delta) - ln alpha)/(alpha - 1) + ln(1 - 1/alpha)
//! ```
//!
//! Every single `alpha` gives a valid bound, so a numerically imperfect minimiser can only
//! make the answer conservative, never invalid. The older Bun–Steinke
//! bound `epsilon = rho + 2 sqrt(rho ln(1/delta))` is provided as a documented upper bound;
//! the CKS20 value is always below it.

use crate::error::{PrivacyError, Result, require_non_negative, require_open_unit};

/// zCDP cost of the Gaussian mechanism: `rho = sensitivity^2 / (2 sigma^2)`.
///
/// Holds for continuous Gaussian noise and for the discrete Gaussian on the integers with
/// integer sensitivity (Canonne, Kamath & Steinke 2020, Theorem 14).
///
/// # Errors
/// [`PrivacyError::InvalidParameter`] unless `sensitivity >= 0` and `sigma > 0` are finite.
pub fn rho_gaussian(sensitivity: f64, sigma: f64) -> Result<f64> {
    require_non_negative("sensitivity", sensitivity)?;
    crate::error::require_positive("sigma", sigma)?;
    let ratio = sensitivity / sigma;
    finite_cost(0.5 * ratio * ratio)
}

/// Gaussian `sigma` whose cost is exactly `rho`: `sigma = sensitivity / sqrt(2 rho)`.
///
/// # Errors
/// [`PrivacyError::InvalidParameter`] unless `sensitivity` and `rho` are finite and positive.
pub fn sigma_for_rho(sensitivity: f64, rho: f64) -> Result<f64> {
    crate::error::require_positive("sensitivity", sensitivity)?;
    crate::error::require_positive("rho", rho)?;
    let sigma = sensitivity / (2.0 * rho).sqrt();
    // Round up so that rho_gaussian(sensitivity, sigma) <= rho despite rounding.
    Ok(sigma * (1.0 + 4.0 * f64::EPSILON))
}

/// zCDP cost of any `epsilon`-DP (pure DP) mechanism: `rho = epsilon^2 / 2`
/// (Bun & Steinke 2016, Proposition 1.4).
///
/// # Errors
/// [`PrivacyError::InvalidParameter`] unless `epsilon` is finite and non-negative.
pub fn rho_pure_dp(epsilon: f64) -> Result<f64> {
    require_non_negative("epsilon", epsilon)?;
    finite_cost(0.5 * epsilon * epsilon)
}

/// zCDP cost of one pick of the exponential mechanism at privacy level `epsilon`:
/// `rho = epsilon^2 / 8`.
///
/// The exponential mechanism is `epsilon`-bounded-range, and `epsilon`-bounded-range
/// mechanisms are `epsilon^2/8`-zCDP (Cesar & Rogers 2021, Lemma 3.2).
///
/// # Errors
/// [`PrivacyError::InvalidParameter`] unless `epsilon` is finite and non-negative.
pub fn rho_exponential_pick(epsilon: f64) -> Result<f64> {
    require_non_negative("epsilon", epsilon)?;
    finite_cost(0.125 * epsilon * epsilon)
}

/// zCDP cost of a Gumbel top-`picks` selection with `epsilon` per pick:
/// `rho = picks * epsilon^2 / 8` (`picks` exponential-mechanism rounds, composed).
///
/// # Errors
/// [`PrivacyError::InvalidParameter`] unless `epsilon` is finite and non-negative.
pub fn rho_gumbel_top_k(epsilon_per_pick: f64, picks: usize) -> Result<f64> {
    require_non_negative("epsilon", epsilon_per_pick)?;
    // usize -> f64 is exact up to 2^53 picks, far beyond any pool.
    finite_cost(0.125 * epsilon_per_pick * epsilon_per_pick * picks as f64)
}

/// Bun–Steinke conversion `epsilon = rho + 2 sqrt(rho ln(1/delta))`
/// (Bun & Steinke 2016, Proposition 1.3): valid, but looser than [`rho_to_epsilon`].
///
/// # Errors
/// [`PrivacyError::InvalidParameter`] unless `rho >= 0` is finite and `0 < delta < 1`.
pub fn rho_to_epsilon_bun_steinke(rho: f64, delta: f64) -> Result<f64> {
    require_non_negative("rho", rho)?;
    require_open_unit("delta", delta)?;
    Ok(rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt())
}

/// Tight conversion of `rho`-zCDP to `(epsilon, delta)`-DP (Canonne, Kamath & Steinke 2020,
/// Proposition 12): the smallest `epsilon` certified by some Renyi order `alpha > 1`.
///
/// The minimisation runs over `t = ln(alpha - 1)`: a coarse scan of `t` in `[-40, 60]` picks
/// the best region, then golden-section search refines it (the objective is quasi-convex in
/// `alpha` because its sublevel sets are the `alpha` where a convex function is below
/// `ln delta`). The returned value is the bound at the final `alpha`, so it is valid even if
/// the search were imperfect, and it never exceeds [`rho_to_epsilon_bun_steinke`].
///
/// # Errors
/// [`PrivacyError::InvalidParameter`] unless `rho >= 0` is finite and `0 < delta < 1`.
pub fn rho_to_epsilon(rho: f64, delta: f64) -> Result<f64> {
    require_non_negative("rho", rho)?;
    require_open_unit("delta", delta)?;
    if rho == 0.0 {
        return Ok(0.0);
    }
    let log_inverse_delta = -delta.ln();
    // Minimise the certified value (estimate plus its error bound).
    let objective = |t: f64| {
        let (value, error) = epsilon_at_order(rho, log_inverse_delta, t);
        value + error
    };

    const T_MIN: f64 = -40.0;
    const T_MAX: f64 = 60.0;
    const SCAN_STEPS: u32 = 200;
    let step = (T_MAX - T_MIN) / f64::from(SCAN_STEPS);
    let mut best_t = T_MIN;
    let mut best = objective(T_MIN);
    for index in 1..=SCAN_STEPS {
        let t = T_MIN + step * f64::from(index);
        let value = objective(t);
        if value < best {
            best = value;
            best_t = t;
        }
    }
    let (mut lo, mut hi) = (best_t - step, best_t + step);
    let golden = 0.5 * (5.0_f64.sqrt() - 1.0);
    let mut left = hi - golden * (hi - lo);
    let mut right = lo + golden * (hi - lo);
    let mut left_value = objective(left);
    let mut right_value = objective(right);
    for _ in 0..100 {
        if left_value < right_value {
            hi = right;
            right = left;
            right_value = left_value;
            left = hi - golden * (hi - lo);
            left_value = objective(left);
        } else {
            lo = left;
            left = right;
            left_value = right_value;
            right = lo + golden * (hi - lo);
            right_value = objective(right);
        }
    }
    let refined = left_value.min(right_value);
    let epsilon = best.min(refined);
    if !epsilon.is_finite() {
        return Err(PrivacyError::NoConvergence(
            "zCDP to (epsilon, delta) conversion produced a non-finite epsilon",
        ));
    }
    // A negative bound means (0, delta)-DP already holds.
    Ok(epsilon.max(0.0))
}

/// Tight `delta` for which `rho`-zCDP implies `(epsilon, delta)`-DP (Canonne, Kamath &
/// Steinke 2020, Proposition 12), minimising over the Renyi order exactly.
///
/// The log of the bound, `(alpha-1)(alpha rho - epsilon) + (alpha-1) ln(alpha-1) - alpha ln alpha`,
/// is convex in `alpha`, so its minimiser is the root of the increasing derivative
/// `(2 alpha - 1) rho - epsilon + ln(1 - 1/alpha)`, found by bisection. Any `alpha` gives a
/// valid bound, so the result is never below the exact infimum.
///
/// # Errors
/// [`PrivacyError::InvalidParameter`] unless `rho` and `epsilon` are finite and non-negative.
pub fn zcdp_delta(rho: f64, epsilon: f64) -> Result<f64> {
    require_non_negative("rho", rho)?;
    require_non_negative("epsilon", epsilon)?;
    if rho == 0.0 {
        return Ok(0.0);
    }
    // Work with s = alpha - 1 > 0 to keep precision near alpha = 1.
    let derivative = |s: f64| {
        let alpha = 1.0 + s;
        (2.0 * alpha - 1.0) * rho - epsilon + (s / alpha).ln()
    };
    let mut lo = 1e-300_f64;
    let mut hi = 1.0_f64;
    let mut steps = 0;
    while derivative(hi) < 0.0 {
        lo = hi;
        hi *= 2.0;
        steps += 1;
        if steps > 1_100 || !hi.is_finite() {
            return Err(PrivacyError::NoConvergence(
                "no Renyi order minimises the zCDP delta bound",
            ));
        }
    }
    for _ in 0..2_000 {
        let mid = if hi / lo > 4.0 {
            (lo * hi).sqrt()
        } else {
            lo + 0.5 * (hi - lo)
        };
        if mid <= lo || mid >= hi {
            break;
        }
        if derivative(mid) < 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let s = lo + 0.5 * (hi - lo);
    let alpha = 1.0 + s;
    let (first, second, third) = (s * (alpha * rho - epsilon), s * s.ln(), alpha * s.ln_1p());
    let log_delta = first + second - third;
    // Round the log up past the evaluation error of its few operations.
    let error = 16.0 * f64::EPSILON * (s * (alpha * rho + epsilon) + second.abs() + third.abs());
    Ok((log_delta + error).exp().min(1.0))
}

/// Largest `rho` whose tight conversion ([`rho_to_epsilon`]) stays within `epsilon` at
/// `delta`: the zCDP budget to give a ledger for an `(epsilon, delta)` target.
///
/// # Errors
/// [`PrivacyError::InvalidParameter`] unless `epsilon > 0` is finite and `0 < delta < 1`.
pub fn rho_for_epsilon(epsilon: f64, delta: f64) -> Result<f64> {
    crate::error::require_positive("epsilon", epsilon)?;
    require_open_unit("delta", delta)?;
    let within = |rho: f64| rho_to_epsilon(rho, delta).map(|value| value <= epsilon);
    let mut lo = 0.0;
    let mut hi = epsilon;
    let mut steps = 0;
    while within(hi)? {
        lo = hi;
        hi *= 2.0;
        steps += 1;
        if steps > 1_100 {
            return Err(PrivacyError::NoConvergence(
                "no zCDP budget exceeds the requested epsilon",
            ));
        }
    }
    for _ in 0..200 {
        let mid = lo + 0.5 * (hi - lo);
        if mid <= lo || mid >= hi {
            break;
        }
        if within(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// The CKS20 epsilon bound at Renyi order `alpha = 1 + e^t`, plus a bound on the
/// floating-point error of its evaluation (each of the ~10 operations is off by at most one
/// unit roundoff of the magnitudes involved; a factor 4 covers the propagation).
fn epsilon_at_order(rho: f64, log_inverse_delta: f64, t: f64) -> (f64, f64) {
    let alpha_minus_one = t.exp();
    let alpha = 1.0 + alpha_minus_one;
    let log_alpha = alpha_minus_one.ln_1p();
    let first = alpha * rho;
    let second = (log_inverse_delta - log_alpha) / alpha_minus_one;
    // ln(1 - 1/alpha) = ln(alpha - 1) - ln(alpha) = t - ln(alpha).
    let third = t - log_alpha;
    let value = first + second + third;
    let magnitude = first.abs()
        + (log_inverse_delta.abs() + log_alpha.abs()) / alpha_minus_one
        + t.abs()
        + log_alpha.abs();
    (value, 16.0 * f64::EPSILON * magnitude)
}

/// Rounds a cost computed with a few f64 operations up past their rounding errors (so a
/// ledger never under-charges) and rejects non-finite costs.
fn finite_cost(rho: f64) -> Result<f64> {
    let rounded = rho * (1.0 + 4.0 * f64::EPSILON);
    if rounded.is_finite() {
        Ok(rounded)
    } else {
        Err(PrivacyError::InvalidParameter {
            name: "rho",
            value: rho,
            requirement: "the resulting zCDP cost must be finite",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibration::gaussian_epsilon;

    fn assert_relative(actual: f64, expected: f64, tolerance: f64) {
        let error = ((actual - expected) / expected).abs();
        assert!(
            error <= tolerance,
            "actual {actual:e}, expected {expected:e}, relative error {error:e}"
        );
    }

    const RHOS: [f64; 9] = [1e-6, 1e-3, 0.01, 0.1, 0.5, 1.0, 5.0, 50.0, 1e3];
    const DELTAS: [f64; 5] = [1e-12, 1e-9, 1e-6, 1e-3, 0.1];

    #[test]
    fn mechanism_costs_follow_the_formulas() -> Result<()> {
        // Costs are rounded up by a few ulps, never down.
        let close_above =
            |actual: f64, exact: f64| actual >= exact && actual <= exact * (1.0 + 1e-14);
        assert!(close_above(rho_gaussian(2.0, 4.0)?, 0.125));
        assert!(close_above(rho_gaussian(1.0, 3.0)?, 1.0 / 18.0));
        assert!(close_above(rho_pure_dp(0.5)?, 0.125));
        assert!(close_above(rho_pure_dp(0.1)?, 0.005));
        assert!(close_above(rho_exponential_pick(1.0)?, 0.125));
        assert!(close_above(rho_exponential_pick(0.3)?, 0.01125));
        assert!(close_above(rho_gumbel_top_k(0.2, 50)?, 0.25));
        assert_eq!(rho_gumbel_top_k(0.2, 0)?, 0.0);
        let sigma = sigma_for_rho(3.0, 0.7)?;
        assert!(3.0 * 3.0 / (2.0 * sigma * sigma) <= 0.7);
        assert_relative(rho_gaussian(3.0, sigma)?, 0.7, 1e-14);
        assert!(rho_gaussian(1.0, 0.0).is_err());
        assert!(rho_pure_dp(f64::NAN).is_err());
        assert!(rho_gaussian(1e300, 1e-300).is_err());
        Ok(())
    }

    // Reference values: 150-digit golden-section minimisation of the CKS20 bound over
    // alpha (Python `decimal`), independent of this implementation.
    #[test]
    fn tight_conversion_matches_high_precision_values() -> Result<()> {
        let known = [
            (0.5, 1e-5, 4.728_386_984_943_314),
            (0.1, 1e-6, 2.141_938_928_385_473_5),
            (1.0, 1e-9, 9.521_463_671_792_231),
            (0.01, 1e-5, 0.545_725_548_274_002_4),
            (5.0, 1e-6, 20.551_948_814_041_253),
        ];
        for (rho, delta, expected) in known {
            let epsilon = rho_to_epsilon(rho, delta)?;
            assert_relative(epsilon, expected, 1e-10);
        }
        Ok(())
    }

    #[test]
    fn tight_conversion_is_below_bun_steinke() -> Result<()> {
        for rho in RHOS {
            for delta in DELTAS {
                let tight = rho_to_epsilon(rho, delta)?;
                let loose = rho_to_epsilon_bun_steinke(rho, delta)?;
                assert!(tight <= loose, "rho {rho} delta {delta}: {tight} > {loose}");
                assert!(tight >= 0.0);
            }
        }
        Ok(())
    }

    #[test]
    fn tight_conversion_is_not_below_the_exact_gaussian_profile() -> Result<()> {
        // A Gaussian mechanism with sigma (sensitivity 1) is 1/(2 sigma^2)-zCDP; any zCDP
        // conversion must be at least its exact (Balle & Wang) epsilon.
        for sigma in [0.5, 1.0, 2.0, 5.0, 20.0] {
            for delta in DELTAS {
                let rho = rho_gaussian(1.0, sigma)?;
                let via_zcdp = rho_to_epsilon(rho, delta)?;
                let exact = gaussian_epsilon(sigma, delta, 1.0)?;
                assert!(
                    via_zcdp >= exact * (1.0 - 1e-9),
                    "sigma {sigma} delta {delta}: zcdp {via_zcdp} < exact {exact}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn epsilon_and_delta_conversions_agree() -> Result<()> {
        for rho in RHOS {
            for delta in DELTAS {
                let epsilon = rho_to_epsilon(rho, delta)?;
                if epsilon == 0.0 {
                    assert!(zcdp_delta(rho, 0.0)? <= delta);
                    continue;
                }
                let back = zcdp_delta(rho, epsilon)?;
                assert_relative(back, delta, 1e-6);
            }
        }
        Ok(())
    }

    #[test]
    fn conversions_are_monotone() -> Result<()> {
        let mut previous = 0.0;
        for step in 1..=50 {
            let rho = 0.02 * f64::from(step);
            let epsilon = rho_to_epsilon(rho, 1e-6)?;
            assert!(epsilon > previous);
            previous = epsilon;
        }
        let mut previous_delta = 1.0;
        for step in 0..=40 {
            let delta = zcdp_delta(0.3, 0.1 * f64::from(step))?;
            assert!(delta <= previous_delta);
            previous_delta = delta;
        }
        Ok(())
    }

    #[test]
    fn rho_budget_inverts_the_conversion() -> Result<()> {
        for (epsilon, delta) in [(0.5, 1e-6), (1.0, 1e-9), (4.0, 1e-5), (10.0, 1e-3)] {
            let rho = rho_for_epsilon(epsilon, delta)?;
            assert!(rho_to_epsilon(rho, delta)? <= epsilon);
            assert!(rho_to_epsilon(rho * (1.0 + 1e-9), delta)? > epsilon * (1.0 - 1e-9));
        }
        Ok(())
    }

    #[test]
    fn conversion_rejects_invalid_inputs() {
        assert!(rho_to_epsilon(-1.0, 1e-5).is_err());
        assert!(rho_to_epsilon(1.0, 0.0).is_err());
        assert!(rho_to_epsilon(1.0, 1.0).is_err());
        assert!(zcdp_delta(f64::INFINITY, 1.0).is_err());
        assert!(rho_for_epsilon(0.0, 1e-5).is_err());
    }
}
