//! The single pass over the row block: squared norms, finiteness and zero padding.
//!
//! The scalar functions are the specification; [`scan_rows`] is the fast version used by the
//! writer and at open, property-tested against them. One pass does all checks: a row's sum of
//! squares is finite exactly when every value is finite (NaN and infinities propagate through
//! `x * x` and `+`), so finiteness costs nothing beyond the norm.
//!
//! Squares are summed in f64. The square of an f32 is exact in f64 (48 significant bits, and
//! even the square of the smallest subnormal, `2^-298`, is a normal f64), so the only rounding
//! is the summation's, a relative error below `dim * 2^-53`. In f32 the squares of components
//! below about `1e-19` are subnormal or zero: a table scaled by `1e-24` would have a computed
//! norm of 0, and the differential-privacy sensitivity built on it would be void.
//! [`certified_norm`] turns the largest sum into an f32 that is never below the exact norm.

use wide::f64x4;

use crate::error::RowProblem;

/// Values per unrolled step: eight AVX2 registers of four f64 lanes, enough independent
/// accumulators to hide the fused multiply-add latency so the scan stays bound by memory
/// bandwidth.
const LANES: usize = 32;

/// Largest squared norm a row may have: `f32::MAX` (the format's rule, from when squares
/// were summed in f32: the squared norm of every row is a finite f32).
const MAX_SQUARED_NORM: f64 = f32::MAX as f64;

/// Scalar specification of a row check: the first non-finite value, else a squared norm
/// above `f32::MAX`, else the squared norm summed left to right in f64. (Test-only: the fast
/// path must agree with it.)
#[cfg(test)]
pub(crate) fn check_row_scalar(values: &[f32]) -> Result<f64, RowProblem> {
    if let Some(column) = values.iter().position(|value| !value.is_finite()) {
        return Err(RowProblem::NonFinite {
            column,
            value: values[column],
        });
    }
    let sum = values.iter().fold(0.0f64, |sum, &value| {
        let value = f64::from(value);
        sum + value * value
    });
    if sum <= MAX_SQUARED_NORM {
        Ok(sum)
    } else {
        Err(RowProblem::NormOverflow)
    }
}

/// Four f32 values widened to f64 lanes (exactly).
fn widen(four: &[f32; 4]) -> f64x4 {
    f64x4::new(four.map(f64::from))
}

/// Sum of squares in f64, in eight independent `f64x4` accumulators (explicit SIMD: the
/// compiler's auto-vectorizer does not reliably vectorize this reduction). With the
/// workspace's x86-64-v3 target these are AVX2 registers, the widening is `vcvtps2pd` and
/// `mul_add` is a fused multiply-add. Every term is non-negative, so any summation order has
/// a relative error of at most `gamma_dim` (f64) against the exact sum.
pub(crate) fn squared_norm(values: &[f32]) -> f64 {
    let (blocks, rest) = values.as_chunks::<LANES>();
    let mut sums = [f64x4::ZERO; LANES / 4];
    for block in blocks {
        let (fours, _) = block.as_chunks::<4>();
        for (sum, four) in sums.iter_mut().zip(fours) {
            let lanes = widen(four);
            *sum = lanes.mul_add(lanes, *sum);
        }
    }
    let (fours, tail) = rest.as_chunks::<4>();
    for (sum, four) in sums.iter_mut().zip(fours) {
        let lanes = widen(four);
        *sum = lanes.mul_add(lanes, *sum);
    }
    let [a, b, c, d, e, f, g, h] = sums;
    let total = (((a + b) + (c + d)) + ((e + f) + (g + h))).reduce_add();
    tail.iter().fold(total, |total, &value| {
        let value = f64::from(value);
        total + value * value
    })
}

/// The squared norm of one row, or what is wrong with it.
fn check_row(values: &[f32]) -> Result<f64, RowProblem> {
    let sum = squared_norm(values);
    // NaN fails this comparison, as does +inf.
    if sum <= MAX_SQUARED_NORM {
        return Ok(sum);
    }
    // Rare path: say precisely why.
    match values.iter().position(|value| !value.is_finite()) {
        Some(column) => Err(RowProblem::NonFinite {
            column,
            value: values[column],
        }),
        None => Err(RowProblem::NormOverflow),
    }
}

/// Checks every row of a padded row block (`stride >= dim` elements per row, the block a
/// whole number of rows) and returns the largest squared norm, summed in f64.
///
/// Refuses the first row (in row order) with a non-finite value, a squared norm above
/// `f32::MAX` or a padding element whose bits are not zero.
pub(crate) fn scan_rows(
    block: &[f32],
    dim: usize,
    stride: usize,
) -> Result<f64, (usize, RowProblem)> {
    let mut max_squared = 0.0f64;
    if stride == 0 {
        return Ok(max_squared);
    }
    for (row, padded) in block.chunks_exact(stride).enumerate() {
        let (values, padding) = padded.split_at(dim.min(stride));
        let squared = check_row(values).map_err(|problem| (row, problem))?;
        max_squared = max_squared.max(squared);
        let padding_bits = padding
            .iter()
            .fold(0u32, |bits, value| bits | value.to_bits());
        if padding_bits != 0
            && let Some(offset) = padding.iter().position(|value| value.to_bits() != 0)
        {
            return Err((
                row,
                RowProblem::NonZeroPadding {
                    column: dim + offset,
                    bits: padding[offset].to_bits(),
                },
            ));
        }
    }
    Ok(max_squared)
}

/// An f32 that is never below `sqrt(exact)`, where `exact` is the exact sum of the squares
/// whose f64 sum over `dim` terms (in any order) is `max_squared`; at most a few f64
/// rounding errors plus one f32 unit in the last place above it.
///
/// The f64 sum of `dim` non-negative exact terms is at least `exact * (1 - gamma)` with
/// `gamma = (dim - 1) 2^-53 / (1 - (dim - 1) 2^-53)`; widening by `(dim + 2) 2^-52` (and the
/// square root's result by `2^-50`) covers that and the roundings of the widening itself, for
/// every `dim` a table can have (`dim <= 2^32`). The result is then rounded up, not to
/// nearest, to f32. The maximum row norm in a header and the bound [`crate::Table`] serves
/// are this value, so the differential-privacy sensitivity built on them is never too small.
pub(crate) fn certified_norm(max_squared: f64, dim: usize) -> f32 {
    let widened = max_squared * (1.0 + (dim as f64 + 2.0) * f64::EPSILON);
    let norm = widened.sqrt() * (1.0 + 4.0 * f64::EPSILON);
    round_up_to_f32(norm)
}

/// The smallest f32 not below `value` (for finite `value` up to `f32::MAX`; NaN stays NaN).
fn round_up_to_f32(value: f64) -> f32 {
    let nearest = value as f32;
    if f64::from(nearest) < value {
        nearest.next_up()
    } else {
        nearest
    }
}

/// The norm tolerance between two writers: summing `dim` squares in any order in f32 (as
/// writers before the f64 scan did) has a relative error of about `dim / 2` units in the
/// last place, and taking the root halves it; `dim + 2` units bounds the gap between such a
/// norm and [`certified_norm`], for rows whose squares are normal f32 values (components
/// above about `1e-19`). Below that, f32 squares lose their precision or vanish and an old
/// writer's norm is too small by more than this: such files are refused.
pub(crate) fn norm_tolerance(dim: usize) -> f32 {
    (dim as f32 + 2.0) * f32::EPSILON
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Relative gap between two f64 sums of `len` non-negative terms in different orders.
    fn sum_tolerance(len: usize) -> f64 {
        (len as f64 + 2.0) * f64::EPSILON
    }

    /// The sum of the squares of `values` to within about one f64 ulp: the squares are exact
    /// in f64 and each addition's rounding error is carried (Neumaier's compensated
    /// summation), so it is far closer to the exact sum than [`certified_norm`]'s margin.
    fn reference_squared(values: &[f32]) -> f64 {
        let (mut sum, mut carry) = (0.0f64, 0.0f64);
        for &value in values {
            let term = f64::from(value) * f64::from(value);
            let next = sum + term;
            carry += if sum >= term {
                (sum - next) + term
            } else {
                (term - next) + sum
            };
            sum = next;
        }
        sum + carry
    }

    fn value() -> impl Strategy<Value = f32> {
        prop_oneof![
            8 => -100.0f32..100.0,
            1 => Just(f32::NAN),
            1 => Just(f32::INFINITY),
            1 => Just(f32::NEG_INFINITY),
            1 => Just(3.0e19f32),
            1 => Just(f32::MIN_POSITIVE / 4.0),
        ]
    }

    proptest! {
        #[test]
        fn row_check_agrees_with_scalar_spec(values in prop::collection::vec(value(), 0..200)) {
            let fast = check_row(&values);
            let spec = check_row_scalar(&values);
            match (fast, spec) {
                (Ok(fast), Ok(spec)) => {
                    let tolerance = sum_tolerance(values.len()) * spec;
                    prop_assert!((fast - spec).abs() <= tolerance, "{fast} vs {spec}");
                }
                // NaN never equals itself: compare the debug forms.
                (fast, spec) => prop_assert_eq!(format!("{:?}", fast.map(|_| ())), format!("{:?}", spec.map(|_| ()))),
            }
        }

        #[test]
        fn block_scan_finds_first_bad_row(
            dim in 1usize..40,
            rows in 0usize..12,
            seed in any::<u64>(),
            poison in prop::option::of((any::<prop::sample::Index>(), any::<prop::sample::Index>(), value())),
        ) {
            let stride = dim.div_ceil(16) * 16;
            let mut block = vec![0.0f32; rows * stride];
            let mut state = seed;
            for row in 0..rows {
                for column in 0..dim {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    block[row * stride + column] = ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                }
            }
            if let (Some((row, column, value)), true) = (poison, rows > 0) {
                let row = row.index(rows);
                let column = column.index(stride);
                block[row * stride + column] = value;
            }
            let mut expected_max = 0.0f64;
            let mut expected = Ok(());
            for (row, padded) in block.chunks_exact(stride).enumerate() {
                match check_row_scalar(&padded[..dim]) {
                    Ok(squared) => expected_max = expected_max.max(squared),
                    Err(problem) => { expected = Err((row, problem)); break; }
                }
                if let Some(offset) = padded[dim..].iter().position(|v| v.to_bits() != 0) {
                    expected = Err((row, RowProblem::NonZeroPadding {
                        column: dim + offset, bits: padded[dim + offset].to_bits() }));
                    break;
                }
            }
            match (scan_rows(&block, dim, stride), expected) {
                (Ok(found), Ok(())) => {
                    let tolerance = sum_tolerance(dim) * expected_max;
                    prop_assert!((found - expected_max).abs() <= tolerance);
                }
                (Err((row, problem)), Err((expected_row, expected_problem))) => {
                    prop_assert_eq!(row, expected_row);
                    // NaN never equals itself: compare the kind and column.
                    prop_assert_eq!(format!("{problem:?}"), format!("{expected_problem:?}"));
                }
                (found, expected) => prop_assert!(false, "{found:?} vs {expected:?}"),
            }
        }
    }

    /// Rows of one magnitude each, from the f32 subnormal range up to the overflow limit.
    fn scaled_row() -> impl Strategy<Value = Vec<f32>> {
        (-45i32..18, prop::collection::vec(-1.0f32..1.0, 1..100)).prop_map(|(exponent, row)| {
            let scale = 10f64.powi(exponent);
            row.iter()
                .map(|&value| (f64::from(value) * scale) as f32)
                .collect()
        })
    }

    proptest! {
        #[test]
        fn certified_norm_is_never_below_the_exact_norm(row in scaled_row()) {
            let squared = check_row(&row).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            let certified = f64::from(certified_norm(squared, row.len()));
            let exact = reference_squared(&row).sqrt();
            prop_assert!(certified >= exact, "{certified:e} < {exact:e}");
            // Tight: one f32 rounding (absolute below the normal range) and a few f64 ones.
            let slack = f64::from(f32::EPSILON) + (row.len() as f64 + 16.0) * f64::EPSILON;
            let smallest = f64::from(f32::from_bits(1));
            prop_assert!(certified <= exact * (1.0 + slack) + smallest, "{certified:e} vs {exact:e}");
        }
    }

    /// Rows scaled far below 1: in f32 their squares are subnormal or zero (the norm was
    /// computed as 0 at 1e-24 and about 4 % low at 1e-22); in f64 they are exact.
    #[test]
    fn tiny_rows_get_a_norm_at_least_their_exact_norm() {
        for scale in [1.0f64, 1e-18, 1e-20, 1e-22, 1e-24, 1e-30, 1e-38, 1e-40] {
            let row: Vec<f32> = [1.0f64, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
                .iter()
                .map(|&value| (value * scale) as f32)
                .collect();
            let squared = scan_rows(&row, row.len(), row.len()).expect("a valid row");
            let certified = f64::from(certified_norm(squared, row.len()));
            let exact = reference_squared(&row).sqrt();
            assert!(exact > 0.0, "scale {scale:e}");
            assert!(
                certified >= exact,
                "scale {scale:e}: {certified:e} < {exact:e}"
            );
            let close =
                exact * (1.0 + 2.0 * f64::from(f32::EPSILON)) + f64::from(f32::from_bits(1));
            assert!(
                certified <= close,
                "scale {scale:e}: {certified:e} vs {exact:e}"
            );
        }
    }

    #[test]
    fn certified_norm_rounds_up_to_f32() {
        // Exact squares of f32 norms still land above them: the bound covers the f64 sum's
        // possible rounding, so it cannot be the exact value's f32 neighbour below.
        assert_eq!(certified_norm(1.0, 1), 1.0f32.next_up());
        assert_eq!(certified_norm(4.0, 3), 2.0f32.next_up());
        assert_eq!(certified_norm(0.0, 8), 0.0);
        // Halfway cases and values just above an f32 round up, never to nearest.
        let above_one = 1.0 + f64::from(f32::EPSILON) / 4.0;
        assert_eq!(round_up_to_f32(above_one), 1.0f32.next_up());
        assert_eq!(round_up_to_f32(1.0), 1.0);
        let subnormal = f64::from(f32::from_bits(3)) * 1.000_001;
        assert_eq!(round_up_to_f32(subnormal), f32::from_bits(4));
    }

    #[test]
    fn overflowing_norm_is_not_reported_as_non_finite() {
        let values = [3.0e19f32, 1.0];
        assert_eq!(check_row(&values), Err(RowProblem::NormOverflow));
    }

    #[test]
    fn negative_zero_padding_is_refused() {
        let block = [1.0f32, -0.0];
        assert_eq!(
            scan_rows(&block, 1, 2),
            Err((
                0,
                RowProblem::NonZeroPadding {
                    column: 1,
                    bits: 0x8000_0000
                }
            ))
        );
    }
}
