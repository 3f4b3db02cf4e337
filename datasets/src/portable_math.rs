//! `ln` and `exp` built from IEEE-754 basic operations only, so generated data is bit-identical on
//! every platform (the system `libm` behind `f64::ln`/`f64::exp` may differ in the last bit).
//!
//! Both functions use the classic range reductions (fdlibm's split of ln 2 into a high part with
//! trailing zero bits and a low correction) followed by a fixed-length series evaluated by Horner's
//! rule. Rust never contracts `a * b + c` into a fused multiply-add on its own, so every step is a
//! correctly rounded `+ - * /` and the result is reproducible. Accuracy is a few ulps, far below
//! what the generator needs; tests check it against the standard library.

/// High part of ln 2 (its last 21 mantissa bits are zero, so `k * LN2_HIGH` is exact for |k| < 2^21).
const LN2_HIGH: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
/// ln 2 minus [`LN2_HIGH`].
const LN2_LOW: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
/// 2^54, used to lift subnormal inputs into the normal range.
const TWO_POW_54: f64 = 18_014_398_509_481_984.0;

/// Coefficients of 2 atanh(f) / (2 f) = sum f^(2n) / (2n + 1); 12 terms reach 1e-18 for |f| <= 0.172.
const ATANH_SERIES: [f64; 12] = [
    1.0,
    1.0 / 3.0,
    1.0 / 5.0,
    1.0 / 7.0,
    1.0 / 9.0,
    1.0 / 11.0,
    1.0 / 13.0,
    1.0 / 15.0,
    1.0 / 17.0,
    1.0 / 19.0,
    1.0 / 21.0,
    1.0 / 23.0,
];

/// Coefficients 1 / n! of the exponential series; 17 terms reach 1e-20 for |r| <= 0.347.
const EXP_SERIES: [f64; 17] = [
    1.0,
    1.0,
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5_040.0,
    1.0 / 40_320.0,
    1.0 / 362_880.0,
    1.0 / 3_628_800.0,
    1.0 / 39_916_800.0,
    1.0 / 479_001_600.0,
    1.0 / 6_227_020_800.0,
    1.0 / 87_178_291_200.0,
    1.0 / 1_307_674_368_000.0,
    1.0 / 20_922_789_888_000.0,
];

/// Natural logarithm, bit-reproducible across platforms.
///
/// Returns `-inf` for 0, NaN for negative or NaN input and `+inf` for `+inf`.
pub(crate) fn ln(x: f64) -> f64 {
    if x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return f64::NEG_INFINITY;
    }
    if x.is_infinite() {
        return x;
    }
    let (normal, exponent_shift) = if x < f64::MIN_POSITIVE {
        (x * TWO_POW_54, -54)
    } else {
        (x, 0)
    };
    let bits = normal.to_bits();
    let biased_exponent = ((bits >> 52) & 0x7ff) as i64;
    let mut exponent = biased_exponent - 1023 + exponent_shift;
    // Mantissa in [1, 2), then moved to [sqrt(1/2), sqrt(2)] so the series argument stays small.
    let mut mantissa = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if mantissa > std::f64::consts::SQRT_2 {
        mantissa *= 0.5;
        exponent += 1;
    }
    let f = (mantissa - 1.0) / (mantissa + 1.0);
    let f_squared = f * f;
    let mut series = 0.0;
    for &coefficient in ATANH_SERIES.iter().rev() {
        series = series * f_squared + coefficient;
    }
    let ln_mantissa = 2.0 * f * series;
    let k = exponent as f64;
    k * LN2_HIGH + (k * LN2_LOW + ln_mantissa)
}

/// Exponential function, bit-reproducible across platforms.
///
/// Underflows to 0 below about -745 and overflows to `+inf` above about 709.8.
pub(crate) fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x > 709.8 {
        return f64::INFINITY;
    }
    if x < -745.2 {
        return 0.0;
    }
    let k = (x * std::f64::consts::LOG2_E).round();
    let r = (x - k * LN2_HIGH) - k * LN2_LOW;
    let mut series = 0.0;
    for &coefficient in EXP_SERIES.iter().rev() {
        series = series * r + coefficient;
    }
    scale_by_power_of_two(series, k as i32)
}

/// `x^y` for `x > 0` as `exp(y ln x)`, bit-reproducible across platforms.
pub(crate) fn pow(x: f64, y: f64) -> f64 {
    exp(y * ln(x))
}

/// `value * 2^k`, exact unless the result is subnormal or overflows.
fn scale_by_power_of_two(value: f64, k: i32) -> f64 {
    let power = |exponent: i32| f64::from_bits(((exponent + 1023) as u64) << 52);
    if k > 1023 {
        value * power(1023) * power(k - 1023)
    } else if k < -1022 {
        value * power(k + 1000) * power(-1000)
    } else {
        value * power(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relative_error(actual: f64, expected: f64) -> f64 {
        ((actual - expected) / expected).abs()
    }

    #[test]
    fn ln_matches_std_within_a_few_ulps() {
        let mut x = 1e-300_f64;
        while x < 1e300 {
            for factor in [1.0, 1.1, 1.41, 1.42, 1.999, 3.7] {
                let value = x * factor;
                let expected = value.ln();
                let actual = ln(value);
                if expected.abs() > 1e-3 {
                    assert!(
                        relative_error(actual, expected) < 4e-16,
                        "ln({value}) = {actual}"
                    );
                } else {
                    assert!((actual - expected).abs() < 1e-18, "ln({value}) = {actual}");
                }
            }
            x *= 7.3;
        }
        for value in [
            1.0_f64,
            0.999_999_999,
            1.000_000_001,
            2.0,
            0.5,
            5e-324,
            1e-310,
        ] {
            let expected = value.ln();
            assert!((ln(value) - expected).abs() <= 4e-16 * expected.abs().max(1e-2));
        }
    }

    #[test]
    fn ln2_split_is_exact_enough() {
        assert_eq!(LN2_HIGH.to_bits() & 0x1f_ffff, 0, "21 trailing zero bits");
        assert_eq!(LN2_HIGH + LN2_LOW, std::f64::consts::LN_2);
        assert!((LN2_HIGH - 0.693_147_180_369_123_8).abs() < 1e-16);
    }

    #[test]
    fn ln_edge_cases() {
        assert_eq!(ln(0.0), f64::NEG_INFINITY);
        assert!(ln(-1.0).is_nan());
        assert!(ln(f64::NAN).is_nan());
        assert_eq!(ln(f64::INFINITY), f64::INFINITY);
        assert_eq!(ln(1.0), 0.0);
    }

    #[test]
    fn exp_matches_std_within_a_few_ulps() {
        let mut x = -708.0_f64;
        while x < 709.0 {
            let expected = x.exp();
            assert!(
                relative_error(exp(x), expected) < 4e-16,
                "exp({x}) = {}",
                exp(x)
            );
            x += 0.737;
        }
        for value in [0.0, 1e-10, -1e-10, 0.5, -0.5, 1.0, -1.0] {
            assert!(relative_error(exp(value), value.exp()) < 4e-16);
        }
    }

    #[test]
    fn exp_edge_cases() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(800.0), f64::INFINITY);
        assert_eq!(exp(-800.0), 0.0);
        assert!(exp(f64::NAN).is_nan());
        // Subnormal results stay close to the standard library's.
        let expected = (-740.0_f64).exp();
        assert!(relative_error(exp(-740.0), expected) < 1e-6);
    }

    #[test]
    fn pow_matches_std() {
        for base in [1.0, 2.0, 10.0, 1234.0, 99_999.0] {
            for exponent in [-3.0, -1.5, -1.0, -0.5, 0.0, 0.8, 2.0] {
                let expected = f64::powf(base, exponent);
                assert!(relative_error(pow(base, exponent), expected) < 1e-14);
            }
        }
    }
}
