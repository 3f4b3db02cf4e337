//! The single pass over the row block: squared norms, finiteness and zero padding.
//!
//! The scalar functions are the specification; [`scan_rows`] is the fast version used by the
//! writer and at open, property-tested against them. One pass does all checks: a row's sum of
//! squares is finite exactly when every value is finite and the sum does not overflow (NaN and
//! infinities propagate through `x * x` and `+`), so finiteness costs nothing beyond the norm.

use wide::f32x8;

use crate::error::RowProblem;

/// Values per unrolled step: four AVX2 registers of eight lanes, enough independent
/// accumulators to hide the add latency so the scan stays bound by memory bandwidth.
const LANES: usize = 32;

/// Scalar specification of a row check: the first non-finite value, else a norm overflow,
/// else the squared norm summed left to right. (Test-only: the fast path must agree with it.)
#[cfg(test)]
pub(crate) fn check_row_scalar(values: &[f32]) -> Result<f32, RowProblem> {
    if let Some(column) = values.iter().position(|value| !value.is_finite()) {
        return Err(RowProblem::NonFinite {
            column,
            value: values[column],
        });
    }
    let sum = values
        .iter()
        .fold(0.0f32, |sum, &value| sum + value * value);
    if sum.is_finite() {
        Ok(sum)
    } else {
        Err(RowProblem::NormOverflow)
    }
}

/// Sum of squares in four independent `f32x8` accumulators (explicit SIMD: the compiler's
/// auto-vectorizer does not reliably vectorize this reduction). With the workspace's
/// x86-64-v3 target these are AVX2 registers and `mul_add` is a fused multiply-add.
pub(crate) fn squared_norm(values: &[f32]) -> f32 {
    let (blocks, rest) = values.as_chunks::<LANES>();
    let mut sums = [f32x8::ZERO; LANES / 8];
    for block in blocks {
        let (eights, _) = block.as_chunks::<8>();
        for (sum, &eight) in sums.iter_mut().zip(eights) {
            let lanes = f32x8::new(eight);
            *sum = lanes.mul_add(lanes, *sum);
        }
    }
    let (eights, tail) = rest.as_chunks::<8>();
    for &eight in eights {
        let lanes = f32x8::new(eight);
        sums[0] = lanes.mul_add(lanes, sums[0]);
    }
    let total = ((sums[0] + sums[1]) + (sums[2] + sums[3])).reduce_add();
    tail.iter()
        .fold(total, |total, &value| total + value * value)
}

/// The squared norm of one row, or what is wrong with it.
fn check_row(values: &[f32]) -> Result<f32, RowProblem> {
    let sum = squared_norm(values);
    if sum.is_finite() {
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
/// whole number of rows) and returns the largest squared norm.
///
/// Refuses the first row (in row order) with a non-finite value, an overflowing norm or a
/// padding element whose bits are not zero.
pub(crate) fn scan_rows(
    block: &[f32],
    dim: usize,
    stride: usize,
) -> Result<f32, (usize, RowProblem)> {
    let mut max_squared = 0.0f32;
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

/// The norm tolerance between two writers: summing `dim` squares in any order in f32 has a
/// relative error of about `dim / 2` units in the last place; twice that bounds the gap
/// between two such computations.
pub(crate) fn norm_tolerance(dim: usize) -> f32 {
    (dim as f32 + 2.0) * f32::EPSILON
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
                    let tolerance = norm_tolerance(values.len()) * spec.max(f32::MIN_POSITIVE);
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
            let mut expected_max = 0.0f32;
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
                    let tolerance = norm_tolerance(dim) * expected_max.max(f32::MIN_POSITIVE);
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
