//! Exact integer randomness: unbiased uniform integers, Bernoulli trials with rational
//! probabilities and `Bernoulli(exp(-gamma))` for rational `gamma` (Canonne, Kamath & Steinke
//! 2020, Algorithm 1), plus the 256-bit helpers the discrete Gaussian needs.
//!
//! Nothing here touches floating point: every probability is a ratio of integers and every
//! decision is an integer comparison against uniformly random integers, so the sampled
//! distributions are exactly the intended ones (given a uniform random bit source).

use rand::RngCore;

/// Uniform integer in `0..bound` (Lemire's multiply-shift with rejection: exactly unbiased).
///
/// `bound` must be positive; `0` is treated as `1` and returns `0`.
pub(crate) fn uniform_below_u64<R: RngCore + ?Sized>(rng: &mut R, bound: u64) -> u64 {
    if bound <= 1 {
        return 0;
    }
    let mut product = u128::from(rng.next_u64()) * u128::from(bound);
    let mut low = product as u64;
    if low < bound {
        // 2^64 mod bound: products whose low word falls below it are rejected.
        let threshold = bound.wrapping_neg() % bound;
        while low < threshold {
            product = u128::from(rng.next_u64()) * u128::from(bound);
            low = product as u64;
        }
    }
    (product >> 64) as u64
}

/// Uniform integer in `0..bound` for 128-bit bounds (masked rejection: exactly unbiased,
/// fewer than two draws on average).
pub(crate) fn uniform_below_u128<R: RngCore + ?Sized>(rng: &mut R, bound: u128) -> u128 {
    if bound <= 1 {
        return 0;
    }
    if let Ok(small) = u64::try_from(bound) {
        return u128::from(uniform_below_u64(rng, small));
    }
    let bits = 128 - (bound - 1).leading_zeros();
    loop {
        let word = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
        let candidate = word >> (128 - bits);
        if candidate < bound {
            return candidate;
        }
    }
}

/// `Bernoulli(numerator / denominator)`; requires `numerator <= denominator`, `denominator > 0`.
pub(crate) fn bernoulli_ratio<R: RngCore + ?Sized>(
    rng: &mut R,
    numerator: u128,
    denominator: u128,
) -> bool {
    uniform_below_u128(rng, denominator) < numerator
}

/// `Bernoulli(exp(-numerator/denominator))` for `0 <= numerator <= denominator`
/// (CKS20 Algorithm 1, case `gamma <= 1`): count how many `Bernoulli(gamma/K)` trials
/// succeed for `K = 1, 2, ...`; the first failure at an odd `K` happens with probability
/// `exp(-gamma)`.
pub(crate) fn bernoulli_exp_neg_at_most_one<R: RngCore + ?Sized>(
    rng: &mut R,
    numerator: u128,
    denominator: u128,
) -> bool {
    let mut k: u128 = 1;
    loop {
        // Bernoulli(gamma / k) = Bernoulli(numerator / (denominator k)); when the product
        // does not fit, use the equivalent independent pair Bernoulli(gamma) * Bernoulli(1/k).
        let success = match denominator.checked_mul(k) {
            Some(scaled) => bernoulli_ratio(rng, numerator, scaled),
            None => bernoulli_ratio(rng, numerator, denominator) && uniform_below_u128(rng, k) == 0,
        };
        if !success {
            return k % 2 == 1;
        }
        k += 1;
    }
}

/// `Bernoulli(exp(-(whole + numerator/denominator)))` with `numerator < denominator`
/// (CKS20 Algorithm 1, case `gamma > 1`: `floor(gamma)` independent `Bernoulli(exp(-1))`
/// trials, then one for the fractional part; all must succeed).
pub(crate) fn bernoulli_exp_neg_parts<R: RngCore + ?Sized>(
    rng: &mut R,
    whole: u128,
    numerator: u128,
    denominator: u128,
) -> bool {
    let mut remaining = whole;
    while remaining > 0 {
        if !bernoulli_exp_neg_at_most_one(rng, 1, 1) {
            return false;
        }
        remaining -= 1;
    }
    bernoulli_exp_neg_at_most_one(rng, numerator, denominator)
}

/// `Bernoulli(exp(-numerator/denominator))` for any `numerator`, `denominator > 0`.
#[cfg(test)]
pub(crate) fn bernoulli_exp_neg<R: RngCore + ?Sized>(
    rng: &mut R,
    numerator: u128,
    denominator: u128,
) -> bool {
    bernoulli_exp_neg_parts(
        rng,
        numerator / denominator,
        numerator % denominator,
        denominator,
    )
}

/// Full 256-bit product `a * b` as `(high, low)` words.
pub(crate) fn widening_mul_u128(a: u128, b: u128) -> (u128, u128) {
    const MASK: u128 = u64::MAX as u128;
    let (a_hi, a_lo) = (a >> 64, a & MASK);
    let (b_hi, b_lo) = (b >> 64, b & MASK);
    let lo_lo = a_lo * b_lo;
    let hi_lo = a_hi * b_lo;
    let lo_hi = a_lo * b_hi;
    let hi_hi = a_hi * b_hi;
    // Middle column: at most 3 * (2^64 - 1), which fits in u128.
    let middle = (lo_lo >> 64) + (hi_lo & MASK) + (lo_hi & MASK);
    let low = (middle << 64) | (lo_lo & MASK);
    let high = hi_hi + (hi_lo >> 64) + (lo_hi >> 64) + (middle >> 64);
    (high, low)
}

/// Divides the 256-bit number `(high, low)` by `divisor > 0`: returns the quotient,
/// saturated at `u128::MAX`, and the exact remainder.
pub(crate) fn div_rem_wide(high: u128, low: u128, divisor: u128) -> (u128, u128) {
    if high == 0 {
        return (low / divisor, low % divisor);
    }
    let quotient_overflows = high >= divisor;
    // Binary long division; the remainder always stays below the divisor.
    let mut remainder: u128 = 0;
    let mut quotient_low: u128 = 0;
    for bit in (0..256).rev() {
        let incoming = if bit >= 128 {
            (high >> (bit - 128)) & 1
        } else {
            (low >> bit) & 1
        };
        let carry = remainder >> 127;
        remainder = (remainder << 1) | incoming;
        if carry == 1 || remainder >= divisor {
            remainder = remainder.wrapping_sub(divisor);
            if bit < 128 {
                quotient_low |= 1 << bit;
            }
        }
    }
    let quotient = if quotient_overflows {
        u128::MAX
    } else {
        quotient_low
    };
    (quotient, remainder)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SecureRng;
    use crate::test_stats::{assert_chi_square, assert_z_within};
    use proptest::prelude::*;

    #[test]
    fn uniform_small_bounds_are_uniform() {
        let mut rng = SecureRng::from_seed(11);
        for bound in [2_u64, 3, 7, 10] {
            let mut counts = vec![0_u64; bound as usize];
            for _ in 0..60_000 {
                counts[uniform_below_u64(&mut rng, bound) as usize] += 1;
            }
            let probabilities = vec![1.0 / bound as f64; bound as usize];
            assert_chi_square(&counts, &probabilities, 1e-6);
        }
    }

    #[test]
    fn uniform_large_bounds_are_unbiased() {
        // Bounds whose naive `x % bound` reduction would be visibly biased: with bound
        // 3 * 2^62 the lowest third of the range would get half the mass instead of a third.
        let mut rng = SecureRng::from_seed(12);
        let bound = 3_u64 << 62;
        let draws = 60_000_u64;
        let low = (0..draws)
            .filter(|_| uniform_below_u64(&mut rng, bound) < (1_u64 << 62))
            .count();
        assert_z_within(low as f64, draws as f64, 1.0 / 3.0, 5.3);
        let wide_bound = 3_u128 << 100;
        let low = (0..draws)
            .filter(|_| uniform_below_u128(&mut rng, wide_bound) < (1_u128 << 100))
            .count();
        assert_z_within(low as f64, draws as f64, 1.0 / 3.0, 5.3);
    }

    #[test]
    fn bernoulli_exp_neg_has_probability_exp_minus_gamma() {
        let mut rng = SecureRng::from_seed(13);
        let draws = 80_000_u64;
        for (numerator, denominator) in [(0_u128, 1_u128), (1, 3), (1, 1), (7, 4), (5, 2), (9, 2)] {
            let hits = (0..draws)
                .filter(|_| bernoulli_exp_neg(&mut rng, numerator, denominator))
                .count();
            let probability = (-(numerator as f64) / denominator as f64).exp();
            if numerator == 0 {
                assert_eq!(hits as u64, draws);
            } else {
                assert_z_within(hits as f64, draws as f64, probability, 5.3);
            }
        }
    }

    #[test]
    fn bernoulli_exp_neg_handles_huge_denominators() {
        // gamma = 1/2 with a denominator near 2^127 exercises the split Bernoulli path.
        let mut rng = SecureRng::from_seed(14);
        let denominator = 1_u128 << 126;
        let draws = 40_000_u64;
        let hits = (0..draws)
            .filter(|_| bernoulli_exp_neg(&mut rng, denominator / 2, denominator))
            .count();
        assert_z_within(hits as f64, draws as f64, (-0.5_f64).exp(), 5.3);
    }

    #[test]
    fn wide_division_handles_edge_cases() {
        assert_eq!(div_rem_wide(0, 17, 5), (3, 2));
        assert_eq!(div_rem_wide(1, 0, 2), (1 << 127, 0));
        assert_eq!(div_rem_wide(1, 5, 1 << 127), (2, 5));
        assert_eq!(div_rem_wide(5, 0, 3).0, u128::MAX);
        let divisor = u128::MAX - 4;
        let (high, low) = widening_mul_u128(u128::MAX - 1, divisor);
        assert_eq!(div_rem_wide(high, low, divisor), (u128::MAX - 1, 0));
    }

    proptest! {
        #[test]
        fn widening_mul_matches_u128_when_it_fits(a in any::<u64>(), b in any::<u64>()) {
            let (high, low) = widening_mul_u128(u128::from(a), u128::from(b));
            prop_assert_eq!(high, 0);
            prop_assert_eq!(low, u128::from(a) * u128::from(b));
        }

        #[test]
        fn widening_mul_is_commutative_and_distributes(a in any::<u128>(), b in any::<u128>()) {
            prop_assert_eq!(widening_mul_u128(a, b), widening_mul_u128(b, a));
            // (a * b) mod 2^128 is the wrapping product.
            prop_assert_eq!(widening_mul_u128(a, b).1, a.wrapping_mul(b));
        }

        #[test]
        fn wide_division_reconstructs_the_dividend(a in any::<u128>(), b in any::<u128>(), divisor in 1_u128..) {
            let (high, low) = widening_mul_u128(a, b);
            let (quotient, remainder) = div_rem_wide(high, low, divisor);
            prop_assert!(remainder < divisor);
            if high < divisor {
                // quotient * divisor + remainder == dividend, checked in 256 bits.
                let (product_high, product_low) = widening_mul_u128(quotient, divisor);
                let (sum_low, carry) = product_low.overflowing_add(remainder);
                prop_assert_eq!((product_high + u128::from(carry), sum_low), (high, low));
            } else {
                prop_assert_eq!(quotient, u128::MAX);
            }
        }

        #[test]
        fn uniform_stays_below_its_bound(seed in any::<u64>(), bound in 1_u128..) {
            let mut rng = SecureRng::from_seed(seed);
            prop_assert!(uniform_below_u128(&mut rng, bound) < bound);
            let small = (bound % u128::from(u64::MAX)) as u64 + 1;
            prop_assert!(uniform_below_u64(&mut rng, small) < small);
        }
    }
}
