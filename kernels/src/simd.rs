//! SIMD building blocks on `wide::f32x8`: the public [`dot`] and the private row-scoring kernels.
//!
//! Every SIMD score follows one arithmetic recipe, so a row's score is bit-for-bit the same
//! whichever path computes it (whole-table scan, parallel scan, candidate list, [`dot`]) and
//! wherever the row falls in a block:
//!
//! 1. the vectors are cut into 8-lane chunks, the last partial chunk zero-padded;
//! 2. chunk `c` is fused-multiply-added into accumulator `c % 4` (four independent chains, so
//!    FMA latency is hidden within one row);
//! 3. the accumulators are combined as `(a0 + a1) + (a2 + a3)`;
//! 4. the 8 lanes are summed as `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`.
//!
//! The 8-row kernel computes rows one after the other (the loads then walk memory
//! sequentially, which hardware prefetchers follow) and does step 4 for all eight rows at once
//! with a transpose. The specification of every kernel is in [`crate::scalar`]; results agree
//! with it up to rounding.

use wide::f32x8;

/// Number of `f32` lanes in a SIMD register.
pub(crate) const LANES: usize = 8;

/// Number of rows the blocked kernel scores at once.
pub(crate) const ROW_BLOCK: usize = 8;

/// A query split into 8-lane chunks for the row kernels (the last chunk zero-padded), plus
/// the lane mask of that last chunk.
#[derive(Debug, Clone, Default)]
pub(crate) struct PreparedQuery {
    lanes: Vec<f32x8>,
    tail_mask: f32x8,
    dim: usize,
}

impl PreparedQuery {
    /// Loads `query` (reusing the allocation).
    pub(crate) fn prepare(&mut self, query: &[f32]) {
        self.lanes.clear();
        let (full, tail) = query.as_chunks::<LANES>();
        self.lanes
            .extend(full.iter().map(|chunk| f32x8::new(*chunk)));
        if !tail.is_empty() {
            self.lanes.push(f32x8::from(tail));
        }
        let lane_index = f32x8::new([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        self.tail_mask = lane_index.simd_lt(f32x8::splat(tail.len() as f32));
        self.dim = query.len();
    }

    /// Reserves room for a query of dimension `dim`.
    pub(crate) fn reserve(&mut self, dim: usize) {
        self.lanes.reserve(dim.div_ceil(LANES));
    }

    /// Number of components of the query.
    #[cfg(test)]
    pub(crate) fn dim(&self) -> usize {
        self.dim
    }
}

/// The last, partial 8-lane chunk of a row, zero beyond `dim`.
///
/// `row` starts at the row and may extend past `dim` (padding or the next row): when 8 floats
/// are available they are loaded at once and the extra lanes cleared with a bit mask (so NaN
/// padding cannot leak in); otherwise the tail is copied into a zeroed vector.
#[inline(always)]
fn load_tail(row: &[f32], full: usize, dim: usize, mask: f32x8) -> f32x8 {
    let start = full * LANES;
    match row.get(start..start + LANES) {
        Some(chunk) => {
            let (chunk, _) = chunk.as_chunks::<LANES>();
            f32x8::new(chunk[0]) & mask
        }
        None => f32x8::from(&row[start..dim]),
    }
}

/// Asks the CPU to start loading the cache lines covering `data` into L2 (a hint: no effect on
/// results, never faults; a no-op on other architectures).
///
/// L2 tracks more outstanding misses than L1, so prefetching random rows (candidate lists) or a
/// whole next block (batched scoring) this way gets more memory requests in flight without
/// stalling on L1 miss buffers (measured: T1 hints beat T0 hints for both uses).
#[inline(always)]
pub fn prefetch_l2<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        let start = data.as_ptr().cast::<i8>();
        let bytes = std::mem::size_of_val(data);
        let mut offset = 0;
        while offset < bytes {
            // SAFETY: `_mm_prefetch` only hints the cache; it never faults and has no
            // observable effect whatever the address (which is inside `data` here anyway).
            // SSE, which it requires, is part of the x86-64 baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(start.wrapping_add(offset)) };
            offset += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Sums the lanes of `v` in the fixed tree order of step 4 (see the module docs).
#[inline(always)]
fn sum_lanes(v: f32x8) -> f32 {
    let a = v.to_array();
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// Lane `r` of the result is [`sum_lanes`]`(acc[r])`, bit for bit.
#[inline(always)]
fn sum_lanes_x8(acc: [f32x8; ROW_BLOCK]) -> f32x8 {
    let t = f32x8::transpose(acc);
    ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]))
}

/// Steps 2 and 3 of the recipe over whole chunks of a row and a query, plus an optional
/// zero-padded last chunk pair. (Accumulators are separate variables indexed statically, so
/// that they stay in registers.)
#[inline(always)]
fn accumulate<L: Copy + Into<f32x8>>(
    chunks: &[[f32; LANES]],
    lanes: &[L],
    tail: Option<(f32x8, f32x8)>,
) -> f32x8 {
    let fma = |chunk: &[f32; LANES], lane: &L, acc: f32x8| {
        f32x8::new(*chunk).mul_add((*lane).into(), acc)
    };
    let (mut a0, mut a1, mut a2, mut a3) = (f32x8::ZERO, f32x8::ZERO, f32x8::ZERO, f32x8::ZERO);
    let (quads, rest) = chunks.as_chunks::<4>();
    let (lane_quads, lane_rest) = lanes.as_chunks::<4>();
    for (c, l) in quads.iter().zip(lane_quads) {
        a0 = fma(&c[0], &l[0], a0);
        a1 = fma(&c[1], &l[1], a1);
        a2 = fma(&c[2], &l[2], a2);
        a3 = fma(&c[3], &l[3], a3);
    }
    if let (Some(c), Some(l)) = (rest.first(), lane_rest.first()) {
        a0 = fma(c, l, a0);
    }
    if let (Some(c), Some(l)) = (rest.get(1), lane_rest.get(1)) {
        a1 = fma(c, l, a1);
    }
    if let (Some(c), Some(l)) = (rest.get(2), lane_rest.get(2)) {
        a2 = fma(c, l, a2);
    }
    if let Some((row_tail, query_tail)) = tail {
        match chunks.len() % 4 {
            0 => a0 = row_tail.mul_add(query_tail, a0),
            1 => a1 = row_tail.mul_add(query_tail, a1),
            2 => a2 = row_tail.mul_add(query_tail, a2),
            _ => a3 = row_tail.mul_add(query_tail, a3),
        }
    }
    (a0 + a1) + (a2 + a3)
}

/// The combined accumulator of one row (steps 1 to 3); `row` is as in [`score_rows8`].
#[inline(always)]
fn row_accumulator(row: &[f32], query: &PreparedQuery) -> f32x8 {
    let dim = query.dim;
    let full = dim / LANES;
    let (chunks, _) = row[..full * LANES].as_chunks::<LANES>();
    let lanes = &query.lanes[..full];
    let tail = match dim.is_multiple_of(LANES) {
        true => None,
        false => Some((
            load_tail(row, full, dim, query.tail_mask),
            query.lanes[full],
        )),
    };
    accumulate(chunks, lanes, tail)
}

/// Scores of eight rows against `query`.
///
/// Each slice starts at its row and holds at least `query`'s dimension floats; it may extend
/// further (see [`crate::RowMatrix::row_extended`]), which makes the partial last chunk cheap.
#[inline(always)]
pub(crate) fn score_rows8(rows: [&[f32]; ROW_BLOCK], query: &PreparedQuery) -> f32x8 {
    // Row after row: the loads walk memory sequentially, the pattern hardware prefetchers
    // follow best (measured: DRAM scans 1.3x to 2.5x faster than interleaving the rows).
    // Written out (not `rows.map`) so that the compiler inlines all eight rows and keeps the
    // accumulators in registers.
    let [r0, r1, r2, r3, r4, r5, r6, r7] = rows;
    sum_lanes_x8([
        row_accumulator(r0, query),
        row_accumulator(r1, query),
        row_accumulator(r2, query),
        row_accumulator(r3, query),
        row_accumulator(r4, query),
        row_accumulator(r5, query),
        row_accumulator(r6, query),
        row_accumulator(r7, query),
    ])
}

/// Score of one row against `query`; identical to the lane of [`score_rows8`] that would hold
/// this row. `row` is as in [`score_rows8`].
#[inline(always)]
pub(crate) fn score_row(row: &[f32], query: &PreparedQuery) -> f32 {
    sum_lanes(row_accumulator(row, query))
}

/// Dot product of `a` and `b` with AVX2/FMA (`wide::f32x8`, four independent accumulators).
///
/// Only the common prefix `min(a.len(), b.len())` is used. The result equals
/// [`crate::scalar::dot`] up to rounding (fused multiply-adds, different summation order),
/// and equals bit for bit the score the scan and candidate kernels give a row `a` for a
/// query `b` (same recipe, see the module docs).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let len = a.len().min(b.len());
    let (a_chunks, a_tail) = a[..len].as_chunks::<LANES>();
    let (b_chunks, b_tail) = b[..len].as_chunks::<LANES>();
    let tail = match a_tail.is_empty() {
        true => None,
        false => Some((f32x8::from(a_tail), f32x8::from(b_tail))),
    };
    sum_lanes(accumulate(a_chunks, b_chunks, tail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scalar;
    use crate::testutil::{dot_tolerance, random_vec};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn dot_matches_scalar(len in 0usize..300, extra in 0usize..5, seed in any::<u64>()) {
            let a = random_vec(seed, len + extra);
            let b = random_vec(seed ^ 0x9e37, len);
            let fast = dot(&a, &b);
            let spec = scalar::dot(&a, &b);
            prop_assert!((fast - spec).abs() <= dot_tolerance(&a, &b), "{fast} vs {spec}");
        }

        #[test]
        fn row_kernels_agree_bit_for_bit(dim in 0usize..70, seed in any::<u64>()) {
            let rows: Vec<Vec<f32>> = (0..ROW_BLOCK as u64).map(|r| random_vec(seed + r, dim)).collect();
            let query = random_vec(seed ^ 0x51, dim);
            let mut prepared = PreparedQuery::default();
            prepared.prepare(&query);
            let block = score_rows8(std::array::from_fn(|r| rows[r].as_slice()), &prepared).to_array();
            for (r, row) in rows.iter().enumerate() {
                let single = score_row(row, &prepared);
                prop_assert_eq!(single.to_bits(), block[r].to_bits());
                let spec = scalar::dot(row, &query);
                prop_assert!((single - spec).abs() <= dot_tolerance(row, &query));
                prop_assert_eq!(dot(row, &query).to_bits(), single.to_bits());
            }
        }
    }

    #[test]
    fn dot_ignores_the_longer_tail() {
        assert_eq!(dot(&[1.0, 2.0, 3.0], &[4.0, 5.0]), 14.0);
        assert_eq!(dot(&[], &[1.0]), 0.0);
    }

    #[test]
    fn prepared_query_zero_fills() {
        let mut prepared = PreparedQuery::default();
        prepared.prepare(&[1.0; 10]);
        assert_eq!(prepared.dim(), 10);
        assert_eq!(prepared.lanes.len(), 2);
        assert_eq!(
            prepared.lanes[1].to_array(),
            [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    fn extended_rows_mask_nan_padding() {
        // Row of dim 10 followed by NaN padding: the masked full load must ignore the NaNs,
        // and give exactly the copy-path result.
        let mut row = vec![0.5f32; 10];
        let copy_path = {
            let mut prepared = PreparedQuery::default();
            prepared.prepare(&[2.0; 10]);
            score_row(&row, &prepared)
        };
        row.extend([f32::NAN; 6]);
        let mut prepared = PreparedQuery::default();
        prepared.prepare(&[2.0; 10]);
        let masked_path = score_row(&row, &prepared);
        assert_eq!(masked_path, 10.0);
        assert_eq!(masked_path.to_bits(), copy_path.to_bits());
    }
}
