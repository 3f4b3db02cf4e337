//! Standard normal CDF and its logarithm, accurate in both tails, built on `erfc`.
//!
//! `erfc` comes from `libm` (a port of FreeBSD msun `s_erf.c`, error below 1 ulp over the
//! whole range). `ln Phi(x)` uses `ln_1p` for `x > 0` (where `Phi` is close to 1), `ln` of
//! `erfc` down to `x = -37` (where `erfc` is still a normal f64), and the asymptotic series
//! `Phi(x) = phi(x)/|x| * sum_k (-1)^k (2k-1)!! / x^(2k)` below, truncated after 8 terms
//! (the first omitted term is below `2e-19` relative for `x <= -37`).

use std::f64::consts::FRAC_1_SQRT_2;

/// `ln(sqrt(2 pi))`.
const LN_SQRT_2PI: f64 = 0.918_938_533_204_672_8;

/// Below this point `erfc(-x/sqrt 2)` would leave the normal f64 range.
const ASYMPTOTIC_BELOW: f64 = -37.0;

/// Standard normal cumulative distribution function `Phi(x)` (used by tests; the library
/// works with [`log_normal_cdf`]).
#[cfg(test)]
pub(crate) fn normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x * FRAC_1_SQRT_2)
}

/// `ln Phi(x)`, finite for every finite `x` (no underflow in the lower tail).
pub(crate) fn log_normal_cdf(x: f64) -> f64 {
    if x.is_nan() {
        f64::NAN
    } else if x > 0.0 {
        (-0.5 * libm::erfc(x * FRAC_1_SQRT_2)).ln_1p()
    } else if x >= ASYMPTOTIC_BELOW {
        (0.5 * libm::erfc(-x * FRAC_1_SQRT_2)).ln()
    } else if x == f64::NEG_INFINITY {
        f64::NEG_INFINITY
    } else {
        let inverse_square = 1.0 / (x * x);
        // sum_{k=0}^{7} (-1)^k (2k-1)!! x^(-2k), evaluated by Horner's rule.
        let mut series = 0.0;
        for k in (1..=7).rev() {
            series = 1.0 - f64::from(2 * k - 1) * inverse_square * series;
        }
        -0.5 * x * x - (-x).ln() - LN_SQRT_2PI + series.ln()
    }
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

    // Reference values: 150-digit evaluation of erfc (Python `decimal`, Maclaurin series and
    // Lentz continued fraction), independent of this implementation.
    #[test]
    fn normal_cdf_matches_high_precision_values() {
        assert_relative(normal_cdf(-1.0), 0.158_655_253_931_457_05, 1e-15);
        assert_relative(normal_cdf(-5.0), 2.866_515_718_791_939e-7, 1e-14);
        assert_relative(normal_cdf(-10.0), 7.619_853_024_160_525e-24, 1e-14);
        assert_relative(normal_cdf(3.0), 0.998_650_101_968_369_9, 1e-15);
    }

    #[test]
    fn log_normal_cdf_matches_high_precision_values_in_both_tails() {
        assert_relative(log_normal_cdf(-1.0), -1.841_021_645_009_263_6, 1e-15);
        assert_relative(log_normal_cdf(-20.0), -203.917_155_371_097_27, 1e-15);
        assert_relative(log_normal_cdf(-37.0), -689.030_585_576_890_6, 1e-15);
        assert_relative(log_normal_cdf(-40.0), -804.608_442_013_753_8, 1e-15);
        assert_relative(log_normal_cdf(-100.0), -5_005.524_208_694_205, 1e-15);
        assert_relative(log_normal_cdf(3.0), -0.001_350_809_964_748_193_8, 1e-13);
        assert_relative(log_normal_cdf(8.0), -6.220_960_574_271_786e-16, 1e-13);
    }

    #[test]
    fn log_normal_cdf_is_continuous_where_the_method_changes() {
        let below = log_normal_cdf(ASYMPTOTIC_BELOW.next_down());
        let above = log_normal_cdf(ASYMPTOTIC_BELOW);
        assert_relative(below, above, 1e-14);
        assert_relative(log_normal_cdf(1e-300), log_normal_cdf(-1e-300), 1e-15);
    }

    #[test]
    fn log_normal_cdf_is_monotone_on_a_grid() {
        let mut previous = f64::NEG_INFINITY;
        for step in 0..=2_000 {
            let x = -60.0 + 0.035 * f64::from(step);
            let value = log_normal_cdf(x);
            assert!(value.is_finite() && value <= 0.0);
            assert!(value > previous, "not increasing at {x}");
            previous = value;
        }
    }
}
