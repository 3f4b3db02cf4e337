//! Many queries at once: an exact bf16-pruned kernel on AVX-512 BF16 CPUs, else faer matrix
//! products over row blocks, top-k fused per score block.
//!
//! [`batch_topk`] picks the path ([`batch_path`]): on CPUs with AVX-512 BF16 the kernel of
//! [`crate::bf16`] (about twice the f32 multiply-add rate, exact results by rescoring),
//! otherwise the faer path below.
//!
//! Scoring B queries against a table is a matrix product, which is compute bound once B is a
//! few dozen. The table is cut into row blocks small enough that the block, the query block
//! and the score block stay in the per-core L2 cache; each rayon task walks a contiguous range
//! of row blocks, calls faer's GEMM sequentially (`Par::Seq`) per block, and immediately folds
//! the scores into per-query heaps with a SIMD threshold prefilter. Task heaps are merged into
//! `out` at the end.
//!
//! Layout: the product is `scores (queries x rows) = queries (queries x dim) * block^T`, with
//! the score block column-major, so the scores of one table row for all queries are
//! contiguous. The GEMM then packs only the small query block and streams the table block
//! in place (a row-major table block as the left operand would be re-packed, transposed, for
//! every block), and the top-k step compares 8 queries' scores with their 8 thresholds in
//! one SIMD compare.

use std::cell::Cell;
use std::sync::{Mutex, PoisonError};

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;
use wide::f32x8;

use crate::bf16::{self, Bf16Plan, Bf16Support};
use crate::error::KernelError;
use crate::matrix::RowMatrix;
use crate::simd::prefetch_l2;
use crate::topk::{ScoredItem, heap_offer, heap_threshold, may_enter, sort_ranked};
use crate::validate::{check_k, check_query};

/// Target size, in `f32`, of one row block and of one score block (256 KiB each), so that
/// both plus faer's packed copy fit a 1 MiB L2 cache.
const BLOCK_FLOATS: usize = 64 * 1024;

/// Queries scored together per GEMM call (caps the score block's width).
const MAX_QUERY_BLOCK: usize = 128;

/// Tasks per pool thread, for load balance on a busy machine.
const TASKS_PER_THREAD: usize = 2;

/// Block sizes of the batched kernel.
#[derive(Debug, Clone, Copy)]
struct BatchPlan {
    /// Table rows per GEMM call.
    row_block: usize,
    /// Queries per GEMM call.
    query_block: usize,
    /// Fewest rows worth a separate rayon task.
    min_rows_per_task: usize,
}

impl BatchPlan {
    /// Block sizes for `queries` queries of dimension `dim` (see [`BLOCK_FLOATS`]).
    fn for_shape(dim: usize, queries: usize) -> Self {
        let query_block = queries.clamp(1, MAX_QUERY_BLOCK);
        let row_block = (BLOCK_FLOATS / dim.max(query_block).max(1)).clamp(64, 4096) / 8 * 8;
        Self {
            row_block,
            query_block,
            min_rows_per_task: 4 * row_block,
        }
    }
}

/// Per-thread scratch of the batched kernel: one score block, one heap and one threshold per
/// query.
#[derive(Debug, Default)]
struct BatchScratch {
    scores: Vec<f32>,
    heaps: Vec<Vec<ScoredItem>>,
    thresholds: Vec<f32>,
}

thread_local! {
    static BATCH_SCRATCH: Cell<BatchScratch> = Cell::new(BatchScratch::default());
}

/// Runs `f` with this thread's reusable batch scratch (fresh if nested or during teardown).
fn with_batch_scratch<R>(f: impl FnOnce(&mut BatchScratch) -> R) -> R {
    let mut scratch = BATCH_SCRATCH.try_with(Cell::take).unwrap_or_default();
    let result = f(&mut scratch);
    // Ignoring the error is right: during thread teardown there is nothing left to reuse.
    let _ = BATCH_SCRATCH.try_with(|cell| cell.set(scratch));
    result
}

/// Which implementation a batched top-k runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BatchPath {
    /// A bf16 pass on AVX-512 BF16 whose proven error bound prunes rows, then exact f32
    /// rescoring of the rest: results identical to [`crate::scan_topk`]'s, bit for bit.
    Bf16Rescore,
    /// faer f32 matrix products over row blocks (GEMM summation order: scores can differ
    /// from [`crate::scan_topk`]'s in the last bits).
    Faer,
}

impl BatchPath {
    /// Short name: `bf16-rescore` or `faer`.
    pub fn name(self) -> &'static str {
        match self {
            BatchPath::Bf16Rescore => "bf16-rescore",
            BatchPath::Faer => "faer",
        }
    }
}

impl std::fmt::Display for BatchPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The path [`batch_topk`] takes on this CPU for rows of dimension `dim`:
/// [`BatchPath::Bf16Rescore`] when the CPU has AVX-512F and AVX-512 BF16 (detected at run
/// time) and `dim <= 2^20` (the range of the proven error bound), else [`BatchPath::Faer`].
pub fn batch_path(dim: usize) -> BatchPath {
    match Bf16Support::detect() {
        Some(_) if dim <= bf16::MAX_DIM => BatchPath::Bf16Rescore,
        _ => BatchPath::Faer,
    }
}

/// The best `k` rows of `m` for every row of `queries`, computed together on the current
/// rayon pool by the path [`batch_path`] picks.
///
/// `out` is resized to `queries.rows()` vectors (their allocations are reused); `out[q]` holds
/// `min(k, m.rows())` items for query `q`, score descending, ties by row index ascending.
/// On the [`BatchPath::Bf16Rescore`] path the result is exactly [`crate::scan_topk`]'s for
/// each query; on the [`BatchPath::Faer`] path scores equal [`crate::scalar::batch_topk`]'s
/// up to rounding (GEMM summation order), so they can differ from [`crate::par_scan_topk`]'s
/// in the last bits. Fails on `k == 0`, a dimension mismatch, or a non-finite query (naming
/// it).
pub fn batch_topk(
    m: RowMatrix<'_>,
    queries: RowMatrix<'_>,
    k: usize,
    out: &mut Vec<Vec<ScoredItem>>,
) -> Result<(), KernelError> {
    batch_topk_using(batch_path(m.dim()), m, queries, k, out)
}

/// [`batch_topk`] on a chosen path (to compare paths). Fails as [`batch_topk`], and with
/// [`KernelError::PathUnavailable`] if `path` cannot run here (see [`batch_path`]).
pub fn batch_topk_using(
    path: BatchPath,
    m: RowMatrix<'_>,
    queries: RowMatrix<'_>,
    k: usize,
    out: &mut Vec<Vec<ScoredItem>>,
) -> Result<(), KernelError> {
    match path {
        BatchPath::Faer => batch_topk_with(
            m,
            queries,
            k,
            out,
            BatchPlan::for_shape(m.dim(), queries.rows()),
        ),
        BatchPath::Bf16Rescore => match Bf16Support::detect() {
            Some(support) if m.dim() <= bf16::MAX_DIM => {
                batch_topk_bf16_with(support, m, queries, k, out, Bf16Plan::for_dim(m.dim()))
            }
            _ => Err(KernelError::PathUnavailable { path: path.name() }),
        },
    }
}

/// Validates a batched request and resets `out` to one empty answer per query (capacity
/// `k`); returns the effective `k` (at most the row count).
fn prepare_batch(
    m: RowMatrix<'_>,
    queries: RowMatrix<'_>,
    k: usize,
    out: &mut Vec<Vec<ScoredItem>>,
) -> Result<usize, KernelError> {
    check_k(k)?;
    if queries.dim() != m.dim() {
        return Err(KernelError::DimMismatch {
            expected: m.dim(),
            got: queries.dim(),
        });
    }
    let query_count = queries.rows();
    for q in 0..query_count {
        check_query(m.dim(), queries.row(q), q)?;
    }
    let k = k.min(m.rows());
    out.truncate(query_count);
    out.resize_with(query_count, Vec::new);
    for answer in out.iter_mut() {
        answer.clear();
        answer.reserve(k);
    }
    Ok(k)
}

/// The bf16 path with explicit block sizes (tests use tiny ones).
fn batch_topk_bf16_with(
    support: Bf16Support,
    m: RowMatrix<'_>,
    queries: RowMatrix<'_>,
    k: usize,
    out: &mut Vec<Vec<ScoredItem>>,
    plan: Bf16Plan,
) -> Result<(), KernelError> {
    let k = prepare_batch(m, queries, k, out)?;
    if k == 0 || queries.rows() == 0 {
        return Ok(());
    }
    bf16::batch_topk_bf16(support, m, queries, k, out, plan);
    Ok(())
}

/// The faer path with explicit block sizes (tests use tiny ones).
fn batch_topk_with(
    m: RowMatrix<'_>,
    queries: RowMatrix<'_>,
    k: usize,
    out: &mut Vec<Vec<ScoredItem>>,
    plan: BatchPlan,
) -> Result<(), KernelError> {
    let k = prepare_batch(m, queries, k, out)?;
    let rows = m.rows();
    let query_count = queries.rows();
    if rows == 0 || query_count == 0 {
        return Ok(());
    }

    let blocks = rows.div_ceil(plan.row_block);
    let tasks = (rows / plan.min_rows_per_task.max(1))
        .clamp(1, rayon::current_num_threads() * TASKS_PER_THREAD)
        .min(blocks);
    let blocks_per_task = blocks.div_ceil(tasks);
    let merged = Mutex::new(out.as_mut_slice());
    let run_task = |task: usize| {
        let first_block = task * blocks_per_task;
        let end_block = blocks.min(first_block + blocks_per_task);
        if first_block >= end_block {
            return;
        }
        with_batch_scratch(|scratch| {
            scratch.heaps.resize_with(query_count, Vec::new);
            for heap in &mut scratch.heaps[..query_count] {
                heap.clear();
                heap.reserve(k);
            }
            scratch.thresholds.clear();
            scratch.thresholds.resize(query_count, f32::NEG_INFINITY);
            scratch
                .scores
                .resize(plan.row_block * plan.query_block, 0.0);
            for block in first_block..end_block {
                score_row_block(m, queries, block * plan.row_block, k, plan, scratch);
            }
            let mut merged = merged.lock().unwrap_or_else(PoisonError::into_inner);
            for (answer, heap) in merged.iter_mut().zip(&scratch.heaps) {
                for &item in heap {
                    heap_offer(answer, k, item);
                }
            }
        });
    };
    if tasks == 1 {
        run_task(0);
    } else {
        (0..tasks).into_par_iter().for_each(run_task);
    }
    for answer in merged.into_inner().unwrap_or_else(PoisonError::into_inner) {
        sort_ranked(answer);
    }
    Ok(())
}

/// Scores rows `start .. start + plan.row_block` (clipped) against all queries, block of
/// queries by block of queries, and folds the scores into the per-query heaps.
fn score_row_block(
    m: RowMatrix<'_>,
    queries: RowMatrix<'_>,
    start: usize,
    k: usize,
    plan: BatchPlan,
    scratch: &mut BatchScratch,
) {
    let len = plan.row_block.min(m.rows() - start);
    let (dim, stride) = (m.dim(), m.stride());
    // The GEMM reads the block in place, four rows at a time, a pattern the hardware
    // prefetcher follows poorly: request the next block into L2 now (measured: a few percent).
    let next = start + len;
    if next < m.rows() {
        let next_end = (next + plan.row_block).min(m.rows());
        prefetch_l2(&m.data()[next * stride..(next_end - 1) * stride + dim]);
    }
    // The row block transposed: dim x len, column-major with the table's stride as column
    // stride. The slice holds at least (len - 1) * stride + dim floats (validated matrix).
    let block =
        MatRef::from_column_major_slice_with_stride(&m.data()[start * stride..], dim, len, stride);
    let query_count = queries.rows();
    for first_query in (0..query_count).step_by(plan.query_block) {
        let width = plan.query_block.min(query_count - first_query);
        // Query block: width x dim, row-major with the query stride.
        let lhs = MatRef::from_row_major_slice_with_stride(
            &queries.data()[first_query * queries.stride()..],
            width,
            dim,
            queries.stride(),
        );
        // Scores: width x len, column-major: row r's scores for the block's queries are
        // scores[r * width .. (r + 1) * width].
        let scores = &mut scratch.scores[..len * width];
        matmul(
            MatMut::from_column_major_slice_mut(scores, width, len),
            Accum::Replace,
            lhs,
            block,
            1.0f32,
            Par::Seq,
        );
        let queries_range = first_query..first_query + width;
        select_into(
            scores,
            width,
            start,
            &mut scratch.heaps[queries_range.clone()],
            &mut scratch.thresholds[queries_range],
            k,
        );
    }
}

/// Offers each score to its query's heap. `scores` holds `width` scores per table row (row
/// `first_index + r` at `scores[r * width ..]`); `heaps` and `thresholds` (each heap's current
/// [`heap_threshold`]) have one entry per query. Eight queries' scores are compared with
/// their eight thresholds in one SIMD compare, and a row is skipped after one branch when no
/// query's score reaches its threshold (the common case once the heaps are full).
#[inline]
fn select_into(
    scores: &[f32],
    width: usize,
    first_index: usize,
    heaps: &mut [Vec<ScoredItem>],
    thresholds: &mut [f32],
    k: usize,
) {
    let all_lanes = f32x8::splat(f32::from_bits(u32::MAX));
    for (r, row_scores) in scores.chunks_exact(width).enumerate() {
        let index = (first_index + r) as u32;
        let (score_groups, score_rest) = row_scores.as_chunks::<8>();
        let all_below = {
            let (threshold_groups, _) = thresholds.as_chunks::<8>();
            score_groups
                .iter()
                .zip(threshold_groups)
                .fold(all_lanes, |acc, (s, t)| {
                    acc & f32x8::new(*s).simd_lt(f32x8::new(*t))
                })
        };
        if !all_below.all() {
            for (g, group) in score_groups.iter().enumerate() {
                let (threshold_groups, _) = thresholds.as_chunks::<8>();
                let Some(t) = threshold_groups.get(g) else {
                    break;
                };
                let mut survivors = !f32x8::new(*group).simd_lt(f32x8::new(*t)).to_bitmask() & 0xFF;
                while survivors != 0 {
                    let lane = survivors.trailing_zeros() as usize;
                    let q = g * 8 + lane;
                    heap_offer(&mut heaps[q], k, ScoredItem::new(index, group[lane]));
                    thresholds[q] = heap_threshold(&heaps[q], k);
                    survivors &= survivors - 1;
                }
            }
        }
        let first_rest = score_groups.len() * 8;
        for (i, &score) in score_rest.iter().enumerate() {
            let q = first_rest + i;
            if may_enter(score, thresholds[q]) {
                heap_offer(&mut heaps[q], k, ScoredItem::new(index, score));
                thresholds[q] = heap_threshold(&heaps[q], k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scalar;
    use crate::testutil::{check_topk, integer_rows, random_rows, spec_scores};
    use proptest::prelude::*;

    fn tiny_plan(row_block: usize, query_block: usize) -> BatchPlan {
        BatchPlan {
            row_block,
            query_block,
            min_rows_per_task: row_block,
        }
    }

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(192))]

        #[test]
        fn batch_matches_scalar(
            rows in 0usize..260,
            dim in 1usize..40,
            pad in 0usize..9,
            query_count in 0usize..7,
            k in 1usize..280,
            row_block in 1usize..70,
            query_block in 1usize..5,
            seed in any::<u64>(),
        ) {
            let stride = dim + pad;
            let data = random_rows(seed, rows, dim, stride);
            let m = RowMatrix::new(&data, rows, dim, stride).unwrap();
            let qstride = dim + pad / 2;
            let qdata = random_rows(!seed, query_count, dim, qstride);
            let queries = RowMatrix::new(&qdata, query_count, dim, qstride).unwrap();
            let mut out = vec![vec![ScoredItem::new(9, 9.0)]; 9];
            pool(3)
                .install(|| batch_topk_with(m, queries, k, &mut out, tiny_plan(row_block, query_block)))
                .unwrap();
            prop_assert_eq!(out.len(), query_count);
            for (q, answer) in out.iter().enumerate() {
                let spec = spec_scores(m, queries.row(q), 0..rows as u32);
                check_topk(&spec, answer, k).map_err(|e| TestCaseError::fail(format!("query {q}: {e}")))?;
            }
        }

        #[test]
        fn integer_batch_matches_scalar_exactly(
            rows in 1usize..200,
            dim in 1usize..24,
            query_count in 1usize..6,
            k in 1usize..60,
            row_block in 1usize..50,
            seed in any::<u64>(),
        ) {
            let data = integer_rows(seed, rows, dim, dim + 3);
            let m = RowMatrix::new(&data, rows, dim, dim + 3).unwrap();
            let qdata = integer_rows(!seed, query_count, dim, dim);
            let queries = RowMatrix::dense(&qdata, dim).unwrap();
            let mut out = Vec::new();
            pool(2)
                .install(|| batch_topk_with(m, queries, k, &mut out, tiny_plan(row_block, 2)))
                .unwrap();
            prop_assert_eq!(out, scalar::batch_topk(m, queries, k).unwrap());
        }
    }

    #[test]
    fn duplicate_rows_tie_by_index_in_batches() {
        // Integer data: exact scores, so the 30 copies of each row tie exactly.
        let dim = 10;
        let base = integer_rows(11, 4, dim, dim);
        let data: Vec<f32> = (0..30).flat_map(|_| base.iter().copied()).collect();
        let m = RowMatrix::dense(&data, dim).unwrap();
        let qdata = integer_rows(12, 3, dim, dim);
        let queries = RowMatrix::dense(&qdata, dim).unwrap();
        let mut out = Vec::new();
        pool(2)
            .install(|| batch_topk_with(m, queries, 25, &mut out, tiny_plan(16, 2)))
            .unwrap();
        assert_eq!(out, scalar::batch_topk(m, queries, 25).unwrap());
        for answer in &out {
            // Within each run of equal scores, row indices ascend, and every run is made of
            // copies of one base row (index mod 4) unless two base rows tie.
            for pair in answer.windows(2) {
                if pair[0].score == pair[1].score {
                    assert!(pair[0].index < pair[1].index);
                }
            }
            assert_eq!(
                answer[0].index,
                answer[0].index % 4,
                "the best copy is the first one"
            );
        }
    }

    #[test]
    fn default_plan_matches_scalar() {
        let (rows, dim) = (3000, 32);
        let data = random_rows(21, rows, dim, dim);
        let m = RowMatrix::dense(&data, dim).unwrap();
        let qdata = random_rows(22, 5, dim, dim);
        let queries = RowMatrix::dense(&qdata, dim).unwrap();
        let mut out = Vec::new();
        batch_topk(m, queries, 17, &mut out).unwrap();
        for (q, answer) in out.iter().enumerate() {
            check_topk(&spec_scores(m, queries.row(q), 0..rows as u32), answer, 17).unwrap();
        }
    }

    #[test]
    fn both_paths_match_the_specification() {
        let (rows, dim) = (2000, 40);
        let data = random_rows(41, rows, dim, dim);
        let m = RowMatrix::dense(&data, dim).unwrap();
        let qdata = random_rows(42, 9, dim, dim);
        let queries = RowMatrix::dense(&qdata, dim).unwrap();
        let mut paths = vec![BatchPath::Faer];
        if batch_path(dim) == BatchPath::Bf16Rescore {
            paths.push(BatchPath::Bf16Rescore);
        }
        for path in paths {
            let mut out = Vec::new();
            pool(2)
                .install(|| batch_topk_using(path, m, queries, 33, &mut out))
                .unwrap();
            assert_eq!(out.len(), 9);
            let mut scan = Vec::new();
            for (q, answer) in out.iter().enumerate() {
                check_topk(&spec_scores(m, queries.row(q), 0..rows as u32), answer, 33).unwrap();
                if path == BatchPath::Bf16Rescore {
                    crate::scan::scan_topk(
                        m,
                        queries.row(q),
                        33,
                        &mut Default::default(),
                        &mut scan,
                    )
                    .unwrap();
                    assert_eq!(answer, &scan, "{path}: query {q} differs from the scan");
                }
            }
        }
        assert_eq!(BatchPath::Bf16Rescore.to_string(), "bf16-rescore");
        assert_eq!(BatchPath::Faer.name(), "faer");
    }

    #[test]
    fn bf16_path_refuses_dimensions_beyond_its_proof() {
        let dim = crate::bf16::MAX_DIM + 1;
        assert_eq!(batch_path(dim), BatchPath::Faer);
        let data = vec![0.5f32; dim];
        let m = RowMatrix::dense(&data, dim).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            batch_topk_using(BatchPath::Bf16Rescore, m, m, 1, &mut out),
            Err(KernelError::PathUnavailable {
                path: "bf16-rescore"
            })
        );
    }

    #[test]
    fn rejects_bad_arguments() {
        let data = random_rows(1, 10, 4, 4);
        let m = RowMatrix::dense(&data, 4).unwrap();
        let mut qdata = vec![0.0f32; 8];
        let mut out = Vec::new();
        let queries = RowMatrix::dense(&qdata, 4).unwrap();
        assert_eq!(batch_topk(m, queries, 0, &mut out), Err(KernelError::ZeroK));
        let wrong = RowMatrix::dense(&qdata, 8).unwrap();
        assert_eq!(
            batch_topk(m, wrong, 1, &mut out),
            Err(KernelError::DimMismatch {
                expected: 4,
                got: 8
            })
        );
        qdata[6] = f32::NAN;
        let queries = RowMatrix::dense(&qdata, 4).unwrap();
        assert_eq!(
            batch_topk(m, queries, 1, &mut out),
            Err(KernelError::NonFiniteQuery {
                query: 1,
                component: 2
            })
        );
    }
}
