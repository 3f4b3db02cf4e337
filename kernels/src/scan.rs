//! Whole-table scans fused with top-k selection: single-threaded and rayon-parallel.
//!
//! Rows are scored eight at a time ([`score_rows8`]); the eight scores are compared with the
//! current k-th best score in one SIMD compare, and only survivors touch the heap. One query
//! over a large table is memory-bandwidth bound, so the parallel scan splits rows into
//! contiguous ranges (one heap per task, merged at the end) and does nothing else.

use std::cell::Cell;
use std::sync::{Mutex, PoisonError};

use rayon::prelude::*;
use wide::f32x8;

use crate::error::KernelError;
use crate::matrix::RowMatrix;
use crate::simd::{PreparedQuery, ROW_BLOCK, prefetch_l2, score_row, score_rows8};
use crate::topk::{ScoredItem, TopKHeap, TopKScratch, heap_offer, may_enter, sort_ranked};
use crate::validate::{check_k, check_query};

/// Fewest rows worth a separate rayon task in [`par_scan_topk`] (about 2 MB at dim 128).
const MIN_ROWS_PER_TASK: usize = 4096;

/// Tasks per pool thread in [`par_scan_topk`], for load balance on a busy machine.
const TASKS_PER_THREAD: usize = 4;

/// How far ahead of the rows being scored the scan requests rows into L2, in bytes.
///
/// The hardware prefetchers alone left a 1M x 128 scan at 0.72 to 0.81 of the measured read
/// bandwidth on an Intel Xeon (family 6 model 207); requesting every line of the block 8 to
/// 32 KiB ahead lifted it to 0.90 to 0.98 (BENCHMARKS.md, section `scanpf`). Requesting every
/// other line (leaving the rest to the adjacent-line prefetcher) was slower than none.
const SCAN_PREFETCH_BYTES: usize = 16 << 10;

thread_local! {
    /// Per-thread scratch of the parallel scan (heap and padded query), reused across calls.
    static SCAN_SCRATCH: Cell<TopKScratch> = Cell::new(TopKScratch::new());
}

/// Runs `f` with this thread's reusable scratch; a nested call (or one during thread
/// teardown) gets a fresh scratch instead.
pub(crate) fn with_thread_scratch<R>(f: impl FnOnce(&mut TopKScratch) -> R) -> R {
    let mut scratch = SCAN_SCRATCH.try_with(Cell::take).unwrap_or_default();
    let result = f(&mut scratch);
    // Ignoring the error is right: during thread teardown there is nothing left to reuse.
    let _ = SCAN_SCRATCH.try_with(|cell| cell.set(scratch));
    result
}

/// Offers every row of `m` to `heap`; `first_index` is the table index of `m`'s row 0.
/// `query` is prepared for the row kernels.
pub(crate) fn scan_rows_into(
    m: RowMatrix<'_>,
    first_index: usize,
    query: &PreparedQuery,
    heap: &mut TopKHeap,
) {
    let rows = m.rows();
    let blocks = rows / ROW_BLOCK;
    let mut threshold = f32x8::splat(heap.threshold());
    // Each chunk starts a row and runs to the next row (the last one is exactly `dim` long);
    // a stride of 0 only occurs with dim 0, where every row is empty.
    let data = m.data();
    let mut row_slices = data.chunks(m.stride().max(1));
    // A whole number of blocks ahead, so that successive prefetches tile the rows without
    // overlap; the range is clipped to this matrix (a task never touches past its rows).
    let block_floats = ROW_BLOCK * m.stride();
    let ahead_floats =
        (SCAN_PREFETCH_BYTES / std::mem::size_of::<f32>()).next_multiple_of(block_floats.max(1));
    for block in 0..blocks {
        let start = block * ROW_BLOCK;
        let ahead = (start * m.stride() + ahead_floats).min(data.len());
        prefetch_l2(&data[ahead..(ahead + block_floats).min(data.len())]);
        let rows8 = std::array::from_fn(|_| row_slices.next().unwrap_or_default());
        let scores = score_rows8(rows8, query);
        // Lanes that are NOT below the threshold may enter: a superset of the rows that
        // belong in the heap (NaN scores or thresholds pass, and the exact comparison in the
        // heap decides).
        let survivors = !scores.simd_lt(threshold).to_bitmask() & 0xFF;
        if survivors != 0 {
            offer_lanes(heap, scores, survivors, first_index + start);
            threshold = f32x8::splat(heap.threshold());
        }
    }
    for row in blocks * ROW_BLOCK..rows {
        let score = score_row(m.row_extended(row), query);
        if may_enter(score, heap.threshold()) {
            heap.offer(ScoredItem::new((first_index + row) as u32, score));
        }
    }
}

/// Offers the lanes of `scores` selected by the bit mask `lanes`; lane `j` is row
/// `first_index + j`.
#[inline]
fn offer_lanes(heap: &mut TopKHeap, scores: f32x8, mut lanes: u32, first_index: usize) {
    let scores = scores.to_array();
    while lanes != 0 {
        let lane = lanes.trailing_zeros() as usize;
        heap.offer(ScoredItem::new((first_index + lane) as u32, scores[lane]));
        lanes &= lanes - 1;
    }
}

/// The best `k` rows of `m` for `query` on the calling thread, best first, into `out`.
///
/// `out` is cleared and receives `min(k, m.rows())` items ordered by score descending, ties
/// by row index ascending. With a warmed-up `scratch` (and `out` capacity) this allocates
/// nothing. Fails on `k == 0`, a query of the wrong length, or a non-finite query.
pub fn scan_topk(
    m: RowMatrix<'_>,
    query: &[f32],
    k: usize,
    scratch: &mut TopKScratch,
    out: &mut Vec<ScoredItem>,
) -> Result<(), KernelError> {
    check_k(k)?;
    check_query(m.dim(), query, 0)?;
    scratch.query.prepare(query);
    scratch.heap.reset(k.min(m.rows()));
    scan_rows_into(m, 0, &scratch.query, &mut scratch.heap);
    scratch.heap.write_sorted(out);
    Ok(())
}

/// [`scan_topk`] split over the current rayon pool: contiguous row ranges, a heap per task
/// (per-thread scratch, reused across calls), merged into `out` at the end.
///
/// Returns exactly what [`scan_topk`] returns (same scores bit for bit, same order). Call it
/// inside [`crate::ScoringPool::install`] to choose the threads.
pub fn par_scan_topk(
    m: RowMatrix<'_>,
    query: &[f32],
    k: usize,
    out: &mut Vec<ScoredItem>,
) -> Result<(), KernelError> {
    par_scan_topk_with(m, query, k, out, MIN_ROWS_PER_TASK)
}

/// [`par_scan_topk`] with a configurable task granularity (tests use tiny tasks).
pub(crate) fn par_scan_topk_with(
    m: RowMatrix<'_>,
    query: &[f32],
    k: usize,
    out: &mut Vec<ScoredItem>,
    min_rows_per_task: usize,
) -> Result<(), KernelError> {
    check_k(k)?;
    check_query(m.dim(), query, 0)?;
    let rows = m.rows();
    let tasks =
        (rows / min_rows_per_task.max(1)).clamp(1, rayon::current_num_threads() * TASKS_PER_THREAD);
    if tasks == 1 {
        return with_thread_scratch(|scratch| scan_topk(m, query, k, scratch, out));
    }
    let k = k.min(rows);
    let rows_per_task = rows.div_ceil(tasks).next_multiple_of(ROW_BLOCK);
    out.clear();
    out.reserve(k);
    let merged = Mutex::new(out);
    (0..tasks).into_par_iter().for_each(|task| {
        let start = task * rows_per_task;
        if start >= rows {
            return;
        }
        let len = rows_per_task.min(rows - start);
        with_thread_scratch(|scratch| {
            scratch.query.prepare(query);
            scratch.heap.reset(k.min(len));
            scan_rows_into(
                m.slice_rows(start, len),
                start,
                &scratch.query,
                &mut scratch.heap,
            );
            let mut merged = merged.lock().unwrap_or_else(PoisonError::into_inner);
            for &item in scratch.heap.items() {
                heap_offer(&mut merged, k, item);
            }
        });
    });
    sort_ranked(merged.into_inner().unwrap_or_else(PoisonError::into_inner));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scalar;
    use crate::testutil::{check_topk, integer_rows, random_rows, random_vec, spec_scores};
    use proptest::prelude::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn scan_matches_scalar(
            rows in 0usize..300,
            dim in 1usize..40,
            pad in 0usize..9,
            k in 1usize..320,
            seed in any::<u64>(),
        ) {
            let stride = dim + pad;
            let data = random_rows(seed, rows, dim, stride);
            let m = RowMatrix::new(&data, rows, dim, stride).unwrap();
            let query = random_vec(!seed, dim);
            let mut scratch = TopKScratch::new();
            let mut fast = Vec::new();
            scan_topk(m, &query, k, &mut scratch, &mut fast).unwrap();
            let spec = spec_scores(m, &query, 0..rows as u32);
            check_topk(&spec, &fast, k).map_err(TestCaseError::fail)?;

            // The parallel scan with tiny tasks agrees bit for bit.
            let mut par = Vec::new();
            pool(3).install(|| par_scan_topk_with(m, &query, k, &mut par, 8)).unwrap();
            prop_assert_eq!(&par, &fast);
        }

        #[test]
        fn integer_data_matches_scalar_exactly(
            rows in 0usize..200,
            dim in 1usize..24,
            pad in 0usize..5,
            k in 1usize..220,
            seed in any::<u64>(),
        ) {
            let stride = dim + pad;
            let data = integer_rows(seed, rows, dim, stride);
            let m = RowMatrix::new(&data, rows, dim, stride).unwrap();
            let query: Vec<f32> = integer_rows(!seed, 1, dim, dim);
            let spec = scalar::scan_topk(m, &query, k).unwrap();
            let mut fast = Vec::new();
            scan_topk(m, &query, k, &mut TopKScratch::new(), &mut fast).unwrap();
            prop_assert_eq!(&fast, &spec);
            pool(2).install(|| par_scan_topk_with(m, &query, k, &mut fast, 8)).unwrap();
            prop_assert_eq!(&fast, &spec);
        }
    }

    #[test]
    fn duplicate_rows_tie_by_index() {
        // 50 copies of the same 3 distinct rows: scores tie exactly in groups.
        let dim = 13;
        let base = random_rows(7, 3, dim, dim);
        let data: Vec<f32> = (0..50).flat_map(|_| base.iter().copied()).collect();
        let m = RowMatrix::dense(&data, dim).unwrap();
        let query = random_vec(8, dim);
        let mut fast = Vec::new();
        scan_topk(m, &query, 20, &mut TopKScratch::new(), &mut fast).unwrap();
        let best = fast[0].score;
        assert!(fast.iter().all(|item| item.score == best));
        let expected_first = fast[0].index;
        assert!(expected_first < 3);
        let indices: Vec<u32> = fast.iter().map(|item| item.index).collect();
        let expected: Vec<u32> = (0..20).map(|i| expected_first + 3 * i).collect();
        assert_eq!(indices, expected);

        let mut par = Vec::new();
        pool(4)
            .install(|| par_scan_topk_with(m, &query, 20, &mut par, 8))
            .unwrap();
        assert_eq!(par, fast);
    }

    #[test]
    fn all_equal_rows_return_lowest_indices() {
        let data = vec![0.5f32; 100 * 16];
        let m = RowMatrix::new(&data, 100, 9, 16).unwrap();
        let mut out = Vec::new();
        pool(2)
            .install(|| par_scan_topk_with(m, &[1.0; 9], 10, &mut out, 8))
            .unwrap();
        let indices: Vec<u32> = out.iter().map(|item| item.index).collect();
        assert_eq!(indices, (0..10).collect::<Vec<u32>>());
    }

    #[test]
    fn rejects_bad_arguments() {
        let data = random_rows(1, 10, 4, 4);
        let m = RowMatrix::dense(&data, 4).unwrap();
        let mut out = vec![ScoredItem::new(0, 0.0)];
        let mut scratch = TopKScratch::new();
        assert_eq!(
            scan_topk(m, &[0.0; 4], 0, &mut scratch, &mut out),
            Err(KernelError::ZeroK)
        );
        assert_eq!(
            par_scan_topk(m, &[0.0; 4], 0, &mut out),
            Err(KernelError::ZeroK)
        );
        assert_eq!(
            par_scan_topk(m, &[0.0; 5], 1, &mut out),
            Err(KernelError::DimMismatch {
                expected: 4,
                got: 5
            })
        );
        assert_eq!(
            scan_topk(m, &[0.0, f32::NAN, 0.0, 0.0], 1, &mut scratch, &mut out),
            Err(KernelError::NonFiniteQuery {
                query: 0,
                component: 1
            })
        );
    }

    #[test]
    fn empty_matrix_gives_empty_output() {
        let m = RowMatrix::new(&[], 0, 4, 4).unwrap();
        let mut out = vec![ScoredItem::new(1, 1.0)];
        par_scan_topk(m, &[0.0; 4], 5, &mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn scratch_is_reusable_across_shapes() {
        let mut scratch = TopKScratch::new();
        let mut out = Vec::new();
        for (rows, dim, k) in [(50, 20, 5), (10, 3, 40), (200, 64, 100)] {
            let data = random_rows(rows as u64, rows, dim, dim);
            let m = RowMatrix::dense(&data, dim).unwrap();
            let query = random_vec(dim as u64, dim);
            scan_topk(m, &query, k, &mut scratch, &mut out).unwrap();
            let spec = spec_scores(m, &query, 0..rows as u32);
            check_topk(&spec, &out, k).unwrap();
        }
    }
}
