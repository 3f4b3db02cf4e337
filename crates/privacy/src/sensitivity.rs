//! Sensitivity of personalised scores: clipping the user embedding and bounding how much
//! any item's f32 score can move when the user's embedding changes.
//!
//! The server clips the user embedding `u` to L2 norm `C_u` and every stored item vector `v`
//! has norm at most `C_v` (from the table header). For two users `u, u'` the exact scores
//! differ by `|<u - u', v>| <= ||u - u'|| ||v|| <= 2 C_u C_v`. The kernel computes scores in
//! f32 with an unspecified summation order (SIMD lanes, FMA, pairwise trees), so each
//! computed score differs from the exact one by at most `gamma_n * sum_i |u_i v_i|
//! <= gamma_n C_u C_v`, where `gamma_n = n u / (1 - n u)`, `u = 2^-24` and `n` is the
//! dimension (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §3.1; the
//! bound holds for every summation order, with or without FMA).
//!
//! That relative bound assumes no underflow. A product (or fused multiply-add) whose result
//! is an f32 subnormal is rounded to a multiple of `2^-149`, an absolute error of up to
//! `2^-150` however small the exact value is (additions whose result is subnormal are exact;
//! Higham §2.1, the model with gradual underflow). Each of the `n` products can add that, and
//! the later additions can enlarge it by at most `1 + gamma_n`, so each computed score is
//! also off by up to `n 2^-150 (1 + gamma_n)`. For small norms (`C_u C_v` near `1e-38` and
//! below, for example `C_u = 1e-20` and items scaled by `1e-20`) this term dominates: two
//! users' computed scores can differ by more than `2 C_u C_v (1 + gamma_n)`. Hence the
//! utility sensitivity of the computed scores is
//!
//! ```text
//! Delta = (2 C_u C_v + n 2^-149) (1 + gamma_n)
//! ```
//!
//! which [`score_sensitivity`] returns, rounded up (for norms of ordinary size the added
//! `n 2^-149` is below the rounding of `2 C_u C_v` and changes nothing). Anything the engine
//! adds to a score (priors, boosts) must be data-independent or have its own sensitivity
//! added.

use crate::error::{PrivacyError, Result, require_positive};

/// Unit roundoff of f32 (`2^-24`).
const F32_UNIT_ROUNDOFF: f64 = 1.0 / 16_777_216.0;

/// Unit roundoff of f64 (`2^-53`).
const F64_UNIT_ROUNDOFF: f64 = f64::EPSILON / 2.0;

/// Spacing of the f32 subnormals, `2^-149` (the smallest positive f32): twice the largest
/// absolute error of an f32 product or fused multiply-add whose result underflows.
const F32_SUBNORMAL_SPACING: f64 = f32::from_bits(1) as f64;

/// Largest dimension for which `gamma_n` stays below 1 with a wide margin (`n u <= 1/16`).
pub const MAX_SCORE_DIMENSION: usize = 1 << 20;

/// Clips `embedding` in place to L2 norm at most `max_norm` and returns its norm before
/// clipping (so callers can count how often clipping happens).
///
/// Vectors already inside the ball are left bit-for-bit unchanged. Longer vectors are scaled
/// towards the origin, and the result is *certified*: its exact real-valued norm is at most
/// `max_norm` despite f32 rounding (the scale factor keeps a relative margin of `2^-22`, the
/// check uses an f64 sum of exactly computed squares with its error bound, and the scaling
/// repeats with a larger margin in the rare case the certificate fails). For a `max_norm`
/// deep in the f32 subnormal range, where rounding is absolute rather than relative, the
/// certificate can fail every time; the embedding is then set to zero, the one point
/// certainly inside the ball.
///
/// # Errors
/// [`PrivacyError::InvalidParameter`] if `max_norm` is not finite and positive;
/// [`PrivacyError::NonFiniteEmbedding`] if a component is NaN or infinite (the embedding
/// is left unchanged).
pub fn clip_to_norm(embedding: &mut [f32], max_norm: f32) -> Result<f64> {
    let limit = require_positive("max_norm", f64::from(max_norm))?;
    if let Some((index, &value)) = embedding.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(PrivacyError::NonFiniteEmbedding { index, value });
    }
    let original_norm = sum_of_squares(embedding).sqrt();
    if certified_within(embedding, limit) {
        return Ok(original_norm);
    }
    let mut margin = 1.0 - 4.0 * F32_UNIT_ROUNDOFF;
    for _ in 0..32 {
        let current_norm = sum_of_squares(embedding).sqrt();
        let factor = limit / current_norm * margin;
        for component in embedding.iter_mut() {
            *component = (f64::from(*component) * factor) as f32;
        }
        if certified_within(embedding, limit) {
            return Ok(original_norm);
        }
        margin *= 1.0 - 64.0 * F32_UNIT_ROUNDOFF;
    }
    // Only reachable for limits deep in the f32 subnormal range, where rounding is absolute
    // rather than relative: the zero vector is the one point certainly inside the ball.
    embedding.fill(0.0);
    Ok(original_norm)
}

/// Utility sensitivity of f32 scores `<u, v>` for `||u|| <= user_norm_bound`,
/// `||v|| <= item_norm_bound` in dimension `dim`: `(2 C_u C_v + dim 2^-149) (1 + gamma_dim)`,
/// rounded up (the second term covers products that underflow to f32 subnormals; see the
/// module documentation).
///
/// Use it as the `sensitivity` of [`crate::ExponentialMechanism`] (general, not monotone:
/// changing the user can raise some scores and lower others).
///
/// # Errors
/// [`PrivacyError::InvalidParameter`] unless both bounds are finite and positive;
/// [`PrivacyError::DimensionOutOfRange`] unless `1 <= dim <= MAX_SCORE_DIMENSION`.
pub fn score_sensitivity(user_norm_bound: f64, item_norm_bound: f64, dim: usize) -> Result<f64> {
    require_positive("user_norm_bound", user_norm_bound)?;
    require_positive("item_norm_bound", item_norm_bound)?;
    if dim == 0 || dim > MAX_SCORE_DIMENSION {
        return Err(PrivacyError::DimensionOutOfRange {
            dim,
            max: MAX_SCORE_DIMENSION,
        });
    }
    let gamma = f32_dot_error_factor(dim);
    // dim <= 2^20, so dim * 2^-149 is exact.
    let underflow = dim as f64 * F32_SUBNORMAL_SPACING;
    let exact = (2.0 * user_norm_bound * item_norm_bound + underflow) * (1.0 + gamma);
    // Five f64 operations above, each off by at most one unit roundoff relative (were
    // `2 C_u C_v` to underflow in f64, its absolute error would be negligible beside the
    // underflow term): round up past them.
    let bound = exact * (1.0 + 8.0 * F64_UNIT_ROUNDOFF);
    require_positive("score sensitivity", bound)
}

/// `gamma_n = n u / (1 - n u)` for f32 (`u = 2^-24`), rounded up: the relative bound on the
/// rounding error of an n-term f32 dot product in any summation order.
pub fn f32_dot_error_factor(dim: usize) -> f64 {
    // dim <= 2^20 is exact in f64; n u <= 2^-4 keeps the denominator well away from 0.
    let nu = dim as f64 * F32_UNIT_ROUNDOFF;
    nu / (1.0 - nu) * (1.0 + 4.0 * F64_UNIT_ROUNDOFF)
}

/// Sum of squares in f64: each square of an f32 is exact in f64 (48 significant bits).
fn sum_of_squares(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|&x| {
            let x = f64::from(x);
            x * x
        })
        .sum()
}

/// Whether the exact norm of `values` is provably at most `limit`.
fn certified_within(values: &[f32], limit: f64) -> bool {
    let computed = sum_of_squares(values);
    // Recursive f64 summation of n exact terms: relative error at most gamma_n(f64).
    let n = values.len() as f64;
    let nu = n * F64_UNIT_ROUNDOFF;
    if nu >= 0.5 {
        return false;
    }
    let upper = computed * (1.0 + 2.0 * nu / (1.0 - nu)) * (1.0 + 2.0 * F64_UNIT_ROUNDOFF);
    let limit_squared_lower = limit * limit * (1.0 - 2.0 * F64_UNIT_ROUNDOFF);
    upper <= limit_squared_lower
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn norm(values: &[f32]) -> f64 {
        sum_of_squares(values).sqrt()
    }

    #[test]
    fn short_vectors_are_untouched() -> Result<()> {
        let mut embedding = [0.3_f32, -0.4, 0.0];
        let before = embedding;
        let original = clip_to_norm(&mut embedding, 1.0)?;
        assert_eq!(embedding, before);
        assert!((original - 0.5).abs() < 1e-7);
        let mut zero = [0.0_f32; 4];
        assert_eq!(clip_to_norm(&mut zero, 1.0)?, 0.0);
        assert_eq!(zero, [0.0; 4]);
        Ok(())
    }

    #[test]
    fn long_vectors_land_just_inside_the_ball() -> Result<()> {
        let mut embedding = [3.0_f32, 4.0];
        let original = clip_to_norm(&mut embedding, 1.0)?;
        assert_eq!(original, 5.0);
        let clipped = norm(&embedding);
        assert!(clipped <= 1.0 && clipped > 1.0 - 1e-6, "{clipped}");
        assert!((f64::from(embedding[0]) / f64::from(embedding[1]) - 0.75).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn clipping_rejects_bad_input() {
        let mut embedding = [10.0_f32, f32::NAN];
        assert!(matches!(
            clip_to_norm(&mut embedding, 1.0),
            Err(PrivacyError::NonFiniteEmbedding { index: 1, .. })
        ));
        assert_eq!(embedding[0], 10.0, "rejected embeddings are left unchanged");
        assert!(matches!(
            clip_to_norm(&mut [1.0_f32, f32::INFINITY], 1.0),
            Err(PrivacyError::NonFiniteEmbedding { index: 1, .. })
        ));
        assert!(clip_to_norm(&mut [1.0_f32], 0.0).is_err());
        assert!(clip_to_norm(&mut [1.0_f32], f32::NAN).is_err());
    }

    #[test]
    fn sensitivity_includes_the_rounding_slack() -> Result<()> {
        let sensitivity = score_sensitivity(1.0, 2.0, 128)?;
        let gamma = 128.0 * F32_UNIT_ROUNDOFF / (1.0 - 128.0 * F32_UNIT_ROUNDOFF);
        assert!(sensitivity >= 4.0 * (1.0 + gamma));
        assert!(sensitivity <= 4.0 * (1.0 + gamma) * (1.0 + 1e-14));
        assert!(score_sensitivity(1.0, 1.0, 0).is_err());
        assert!(score_sensitivity(1.0, 1.0, MAX_SCORE_DIMENSION + 1).is_err());
        assert!(score_sensitivity(0.0, 1.0, 8).is_err());
        Ok(())
    }

    /// Two users whose f32 scores against a small item land on neighbouring multiples of
    /// the subnormal spacing: the computed scores differ by `2^-148`, more than
    /// `2 C_u C_v (1 + gamma)` (which is `1.5 * 2^-149` here), but within the sensitivity.
    #[test]
    fn sensitivity_covers_scores_that_underflow() -> Result<()> {
        assert_eq!(F32_SUBNORMAL_SPACING, 2f64.powi(-149));
        let item = [2f32.powi(-75), 0.0];
        let user = [3.0 * 2f32.powi(-76), 0.0];
        let other = [-3.0 * 2f32.powi(-76), 0.0];
        let (user_norm, item_norm) = (3.0 * 2f64.powi(-76), 2f64.powi(-75));
        let sensitivity = score_sensitivity(user_norm, item_norm, 2)?;
        for first in dot_variants(&user, &item) {
            assert_eq!(f64::from(first), 2f64.powi(-149), "0.75 * 2^-149 rounds up");
            for second in dot_variants(&other, &item) {
                let gap = f64::from(first) - f64::from(second);
                assert_eq!(gap, 2f64.powi(-148));
                assert!(gap > 2.0 * user_norm * item_norm * (1.0 + f32_dot_error_factor(2)));
                assert!(gap <= sensitivity, "{gap:e} > {sensitivity:e}");
            }
        }
        // For norms of ordinary size the underflow term is lost in the rounding.
        let ordinary = 2.0 * 1.0 * 2.0 * (1.0 + f32_dot_error_factor(128));
        assert!(score_sensitivity(1.0, 2.0, 128)? <= ordinary * (1.0 + 1e-14));
        Ok(())
    }

    /// f32 dot products in the summation orders a SIMD kernel may use.
    fn dot_variants(u: &[f32], v: &[f32]) -> [f32; 4] {
        let sequential = u.iter().zip(v).fold(0.0_f32, |acc, (a, b)| acc + a * b);
        let fused = u
            .iter()
            .zip(v)
            .fold(0.0_f32, |acc, (a, b)| a.mul_add(*b, acc));
        let reversed = u
            .iter()
            .zip(v)
            .rev()
            .fold(0.0_f32, |acc, (a, b)| acc + a * b);
        let mut lanes = [0.0_f32; 8];
        for (index, (a, b)) in u.iter().zip(v).enumerate() {
            lanes[index % 8] = a.mul_add(*b, lanes[index % 8]);
        }
        let laned = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
            + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
        [sequential, fused, reversed, laned]
    }

    fn vector(dim: usize) -> impl Strategy<Value = Vec<f32>> {
        proptest::collection::vec(-100.0_f32..100.0, dim)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn clipped_norm_is_certified(
            values in proptest::collection::vec(-1e6_f32..1e6, 1..200),
            limit in 1e-6_f32..1e6,
        ) {
            let mut embedding = values.clone();
            let original = clip_to_norm(&mut embedding, limit).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!((original - norm(&values)).abs() <= 1e-12 * original.max(1.0));
            prop_assert!(norm(&embedding) <= f64::from(limit));
            if norm(&values) > f64::from(limit) * 1.000_001 {
                prop_assert!(norm(&embedding) >= f64::from(limit) * (1.0 - 1e-5));
            }
        }

        #[test]
        fn vectors_scaled_onto_the_sphere_stay_inside(
            values in proptest::collection::vec(-1.0_f32..1.0, 1..64),
            limit in 0.01_f32..100.0,
        ) {
            let current = norm(&values);
            prop_assume!(current > 1e-3);
            // Land exactly on (or a rounding away from) the boundary.
            let mut embedding: Vec<f32> =
                values.iter().map(|&x| (f64::from(x) * f64::from(limit) / current) as f32).collect();
            clip_to_norm(&mut embedding, limit).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(norm(&embedding) <= f64::from(limit));
        }

        #[test]
        fn computed_scores_move_at_most_the_sensitivity(
            (u, u2, v) in (1_usize..300).prop_flat_map(|dim| (vector(dim), vector(dim), vector(dim))),
            user_norm in 0.1_f32..10.0,
            item_norm in 0.1_f32..10.0,
        ) {
            let (mut u, mut u2, mut v) = (u, u2, v);
            let fail = |e: PrivacyError| TestCaseError::fail(e.to_string());
            clip_to_norm(&mut u, user_norm).map_err(fail)?;
            clip_to_norm(&mut u2, user_norm).map_err(fail)?;
            clip_to_norm(&mut v, item_norm).map_err(fail)?;
            let sensitivity = score_sensitivity(f64::from(user_norm), f64::from(item_norm), u.len()).map_err(fail)?;
            let gamma = f32_dot_error_factor(u.len());
            let exact: f64 = u.iter().zip(&v).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
            let absolute: f64 = u.iter().zip(&v).map(|(a, b)| (f64::from(*a) * f64::from(*b)).abs()).sum();
            for first in dot_variants(&u, &v) {
                // The per-score rounding bound behind the slack (tiny f64 tolerance for the reference).
                prop_assert!((f64::from(first) - exact).abs() <= gamma * absolute + 1e-12 * absolute);
                for second in dot_variants(&u2, &v) {
                    prop_assert!((f64::from(first) - f64::from(second)).abs() <= sensitivity);
                }
            }
        }

        /// Norms so small that products underflow to f32 subnormals (`C_u C_v` from 1e-47
        /// to 1e-41, around the subnormal spacing 1.4e-45), with the second user often the
        /// first one negated (the largest change of score): the relative bound alone does not
        /// cover the computed scores.
        #[test]
        fn computed_scores_move_at_most_the_sensitivity_when_they_underflow(
            (u, u2, v) in (1_usize..64).prop_flat_map(|dim| (vector(dim), vector(dim), vector(dim))),
            negated in any::<bool>(),
            user_exponent in -23_i32..-20,
            item_exponent in -24_i32..-20,
        ) {
            let u2 = if negated { u.iter().map(|x| -x).collect() } else { u2 };
            let (mut u, mut u2, mut v) = (u, u2, v);
            let user_norm = 10f32.powi(user_exponent);
            let item_norm = 10f32.powi(item_exponent);
            let fail = |e: PrivacyError| TestCaseError::fail(e.to_string());
            clip_to_norm(&mut u, user_norm).map_err(fail)?;
            clip_to_norm(&mut u2, user_norm).map_err(fail)?;
            clip_to_norm(&mut v, item_norm).map_err(fail)?;
            let sensitivity = score_sensitivity(f64::from(user_norm), f64::from(item_norm), u.len()).map_err(fail)?;
            for first in dot_variants(&u, &v) {
                for second in dot_variants(&u2, &v) {
                    let gap = (f64::from(first) - f64::from(second)).abs();
                    prop_assert!(gap <= sensitivity, "{gap:e} > {sensitivity:e}");
                }
            }
        }
    }
}
