//! Exact batched top-k on AVX-512 BF16: a bf16 pass with a proven error bound prunes rows, and
//! exact f32 rescoring of every row the bound cannot rule out decides.
//!
//! # Algorithm
//!
//! Scoring B queries against the table is a matrix product, compute bound once B is a few
//! dozen. In f32 it tops out near the FMA peak (about 240 GFLOP/s on two Zen 4 cores);
//! `vdpbf16ps` does twice the multiply-adds per instruction. So each rayon task walks a range
//! of row blocks and, per block:
//!
//! 1. converts the block's f32 rows to bf16 (round to nearest even, `vcvtne2ps2bf16`) into a
//!    reused scratch block sized for L2, computing each row's norm on the way;
//! 2. runs a register-blocked microkernel: 16 queries per ZMM register (the queries were
//!    converted and packed once per batch), up to 4 such registers (64 queries) times 6 rows
//!    per step, each row's bf16 pair broadcast from memory: 24 accumulators (measured on an
//!    L2-resident block: 236 GFLOP/s per Zen 4 core, its `vdpbf16ps` peak; 2x12, 1x24 and
//!    2x14 tiles are no faster). Each step also prefetches its share of the NEXT block's
//!    source rows into L2, so the conversion finds them there (one burst of thousands of
//!    prefetches per block instead left the conversion stalled on DRAM: a third of the
//!    microkernel's time);
//! 3. for every (query, row) it forms an upper bound `approx + bound(q, x)` on the exact
//!    score and compares it (16 queries at once) with the query's current exact k-th best
//!    score; a row whose upper bound is below it cannot be in the query's top-k;
//! 4. rows that pass are rescored EXACTLY, with the scan kernel's f32 recipe
//!    ([`crate::simd::score_row`]); those not below the threshold are appended to the query's
//!    kept list, which is cut back to its best `k` in bulk (a linear-time selection) whenever
//!    it reaches `2 max(k, 32)` items, the threshold then rising to the k-th best score. (A
//!    heap insertion per survivor cost as much as all the rescoring.)
//!
//! The thresholds are exact k-th best scores (not approximate ones minus a bound), so they are
//! as tight as the data allows, and the candidate set is never stored: every surviving row is
//! rescored at once, while it is still in cache. There is no cap anywhere: on adversarial data
//! where the bound prunes nothing, every row is rescored and the answer is still exact (only
//! slower). Per-task kept lists are merged at the end, so the result equals, item for item and
//! bit for bit, what [`crate::scan_topk`] returns for each query.
//!
//! # Error bound
//!
//! Let `s` be the f32 score the scan recipe computes for query `q` and row `x` (dimension `d`,
//! `n` = `d` rounded up to a multiple of 32, plus 8), `a` the score of the bf16 pass,
//! `u = 2^-8` the unit roundoff of bf16 and `γ(m) = m 2^-24 / (1 - m 2^-24)`. Then
//!
//! ```text
//! |s - a| <= c * (||q|| + δ) * (||x|| + δ),   c = 2u + u² + γ(n) (2 + 2u + u²),   δ = 2^-41
//! ```
//!
//! for `d <= 2^20` and `||q||, ||x|| <= 2^50`. Proof sketch, with `ŝ` the exact dot product
//! of the bf16-rounded vectors and `S = Σ |q_i x_i| <= ||q|| ||x||` (Cauchy-Schwarz):
//!
//! - `|s - Σ q_i x_i| <= γ(n) S`: the scan recipe sums `d` products along a tree of depth at
//!   most `d / 32 + 6 <= n` (FMAs round once per step);
//! - `|Σ q_i x_i - ŝ| <= (2u + u²) S`: each operand is rounded to nearest with relative error
//!   at most `u`, so each product changes by at most `(2u + u²) |q_i x_i|`;
//! - `|ŝ - a| <= γ(n) (1 + u)² S`: bf16 products are exact in f32 (8 x 8 significant bits)
//!   and `vdpbf16ps` rounds at most twice per lane and instruction, `d` times in all;
//! - underflow: `vdpbf16ps` treats denormal inputs as zero and flushes denormal results;
//!   this costs at most `d 2^-126 (||q||_inf + ||x||_inf) + 3 d 2^-126`, which the `δ` terms
//!   `c δ (||q|| + ||x||) + c δ²` cover (`c >= 2^-7`, `d <= 2^20`);
//! - the norm limits rule out overflow.
//!
//! The kernel never evaluates the bound in inexact arithmetic that could shrink it: row norms
//! are computed in f32 (`sqrt(Σ x_i²) + 2^-40`, which is at least `(1 - γ(n + 2)) (||x|| + δ)`),
//! so the coefficient is raised to `c / (1 - γ(n + 2))`; the per-query factor `c ||q||` is
//! computed in f64 and rounded up; and the test `fma(c ||q||, ||x||, a) < threshold` rounds
//! once, monotonically, so it implies `s <= a + bound < threshold`. Rows or queries whose norm
//! exceeds `2^50` get an infinite bound (always rescored). [`tests`] checks the bound on
//! adversarial data where it is nearly tight.

use std::cell::Cell;
use std::sync::atomic::AtomicU32;
#[cfg(target_arch = "x86_64")]
use std::sync::atomic::Ordering;
#[cfg(target_arch = "x86_64")]
use std::sync::{Mutex, PoisonError};

#[cfg(target_arch = "x86_64")]
use rayon::prelude::*;

use crate::matrix::RowMatrix;
use crate::simd::PreparedQuery;
#[cfg(target_arch = "x86_64")]
use crate::simd::score_row;
use crate::topk::ScoredItem;
#[cfg(target_arch = "x86_64")]
use crate::topk::{keep_best, may_enter, sort_ranked};

/// Queries per SIMD register (16 f32 lanes of a ZMM register).
const QUERY_LANES: usize = 16;

/// Query registers per microkernel step: up to 64 queries are scored together.
const MAX_QUERY_VECTORS: usize = 4;

/// Queries scored together per pass over a converted row block.
const MAX_QUERY_BLOCK: usize = QUERY_LANES * MAX_QUERY_VECTORS;

/// Target size of one f32 source block (128 KiB): it, its prefetched successor, the bf16 copy
/// and the packed queries fit the per-core L2 cache together.
const BLOCK_SOURCE_BYTES: usize = 128 * 1024;

/// Row blocks are a multiple of this many rows (every microkernel step height divides it).
const ROW_STEP_LCM: usize = 24;

/// Largest dimension the error bound is proven for.
pub(crate) const MAX_DIM: usize = 1 << 20;

/// Added to every computed row norm (`2^-40`; the bound uses `δ = 2^-41`).
const NORM_OFFSET: f32 = 9.094_947e-13;

/// Norms above this (`2^50`) get an infinite bound.
const NORM_LIMIT: f32 = 1_125_899_906_842_624.0;

/// Length at which a query's kept list is cut back to its best `k` (raising the threshold to
/// the k-th best score). Appending and cutting back in bulk costs a few nanoseconds per row,
/// where a heap insertion costs tens (unpredictable branches); the threshold lags a little.
#[cfg(target_arch = "x86_64")]
fn kept_capacity(k: usize) -> usize {
    2 * k.max(32)
}

/// Tasks per pool thread, for load balance on a busy machine.
#[cfg(target_arch = "x86_64")]
const TASKS_PER_THREAD: usize = 8;

/// Proof that the CPU runs AVX-512F and AVX-512 BF16 instructions; only [`Bf16Support::detect`]
/// makes one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bf16Support(());

impl Bf16Support {
    /// `Some` when this CPU has AVX-512F and AVX-512 BF16.
    pub(crate) fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
            {
                return Some(Self(()));
            }
        }
        None
    }
}

/// The coefficient `c / (1 - γ(n + 2))` of the module docs for dimension `dim`, rounded up.
pub(crate) fn bound_coefficient(dim: usize) -> f64 {
    let n = dim.next_multiple_of(32) as f64 + 8.0;
    let u = 2f64.powi(-8);
    let unit_f32 = 2f64.powi(-24);
    let gamma = |m: f64| m * unit_f32 / (1.0 - m * unit_f32);
    let c = 2.0 * u + u * u + gamma(n) * (2.0 + 2.0 * u + u * u);
    // f64 evaluation errors are below 2^-50 relative: the last factor absorbs them.
    c / (1.0 - gamma(n + 2.0)) * (1.0 + 2f64.powi(-30))
}

/// The bound of the module docs for one pair of norms, as the kernel applies it (tests).
#[cfg(test)]
pub(crate) fn score_bound(dim: usize, query: &[f32], row: &[f32]) -> f64 {
    let norm = |v: &[f32]| {
        v.iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt()
    };
    let delta = 2f64.powi(-41);
    bound_coefficient(dim) * (norm(query) + delta) * (norm(row) + delta)
}

/// `x` as `f32`, rounded towards +infinity.
pub(crate) fn f32_rounded_up(x: f64) -> f32 {
    let y = x as f32;
    if f64::from(y) < x { y.next_up() } else { y }
}

/// `x` rounded to bf16 (nearest, ties to even) as raw bits; `x` is finite.
fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounding = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// Block sizes of the bf16 kernel.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bf16Plan {
    /// Table rows converted and scored per block.
    pub(crate) row_block: usize,
    /// Fewest rows worth a separate rayon task.
    pub(crate) min_rows_per_task: usize,
}

impl Bf16Plan {
    /// Block sizes for rows of dimension `dim` (see [`BLOCK_SOURCE_BYTES`]).
    pub(crate) fn for_dim(dim: usize) -> Self {
        let row_block = (BLOCK_SOURCE_BYTES / (4 * dim.max(1))).clamp(ROW_STEP_LCM, 8192)
            / ROW_STEP_LCM
            * ROW_STEP_LCM;
        Self {
            row_block,
            min_rows_per_task: 8 * row_block,
        }
    }
}

/// One block of at most [`MAX_QUERY_BLOCK`] queries, packed for the microkernel.
#[derive(Debug, Clone, Copy, Default)]
struct QueryBlock {
    /// Index of the block's first query in the batch.
    first_query: usize,
    /// Number of queries in the block.
    queries: usize,
    /// Query registers per step: `queries.div_ceil(16)`.
    vectors: usize,
    /// Start of the block in [`PackedQueries::pairs`].
    pair_offset: usize,
    /// Start of the block's lanes in [`PackedQueries::scales`] and the thresholds.
    lane_offset: usize,
}

/// The batch's queries, converted and packed once per call.
#[derive(Debug, Default)]
struct PackedQueries {
    /// bf16 pairs per vector (`dim.div_ceil(2)`).
    pair_count: usize,
    blocks: Vec<QueryBlock>,
    /// Per block, pair `p` of register `j`, lane `l` at `pair_offset + (p * vectors + j) * 16
    /// + l`: elements `2p` (low half) and `2p + 1` (high half) of query `16 j + l`, in bf16.
    pairs: Vec<u32>,
    /// Per lane: `c (||q|| + δ)` rounded up (infinite above the norm limit; 0 for padding).
    scales: Vec<f32>,
    /// Per lane: `+inf` for padding lanes (never a survivor), else `-inf`.
    initial_thresholds: Vec<f32>,
    /// Per query, for exact rescoring with the scan recipe.
    prepared: Vec<PreparedQuery>,
    /// Per lane: the highest threshold any task has published, as a [`threshold_key`]. Every
    /// task's threshold is the k-th best score among its own (disjoint) rows, so no row
    /// scoring below any of them can be in the final top k: tasks prune with the highest.
    shared_thresholds: Vec<AtomicU32>,
}

impl PackedQueries {
    /// Packs `queries` (validated: finite, dimension `dim`) into `self`, reusing allocations.
    fn pack(&mut self, queries: RowMatrix<'_>) {
        let dim = queries.dim();
        let pair_count = dim.div_ceil(2);
        let coefficient = bound_coefficient(dim);
        let delta = 2f64.powi(-41);
        self.pair_count = pair_count;
        self.blocks.clear();
        self.pairs.clear();
        self.scales.clear();
        self.initial_thresholds.clear();
        self.shared_thresholds.clear();
        let count = queries.rows();
        self.prepared.resize_with(count, PreparedQuery::default);
        for (q, prepared) in self.prepared.iter_mut().enumerate() {
            prepared.prepare(queries.row(q));
        }
        for first_query in (0..count).step_by(MAX_QUERY_BLOCK) {
            let block_queries = MAX_QUERY_BLOCK.min(count - first_query);
            let vectors = block_queries.div_ceil(QUERY_LANES);
            self.blocks.push(QueryBlock {
                first_query,
                queries: block_queries,
                vectors,
                pair_offset: self.pairs.len(),
                lane_offset: self.scales.len(),
            });
            let lanes = vectors * QUERY_LANES;
            let element = |lane: usize, e: usize| -> u32 {
                match lane < block_queries && e < dim {
                    true => u32::from(bf16_bits(queries.row(first_query + lane)[e])),
                    false => 0,
                }
            };
            for p in 0..pair_count {
                for lane in 0..lanes {
                    self.pairs
                        .push(element(lane, 2 * p) | (element(lane, 2 * p + 1) << 16));
                }
            }
            for lane in 0..lanes {
                if lane >= block_queries {
                    self.scales.push(0.0);
                    self.initial_thresholds.push(f32::INFINITY);
                    continue;
                }
                let row = queries.row(first_query + lane);
                // Squares of f32 values are exact in f64; the sum errs by under 2^-32.
                let norm = row
                    .iter()
                    .map(|&x| f64::from(x) * f64::from(x))
                    .sum::<f64>()
                    .sqrt()
                    * (1.0 + 2f64.powi(-31));
                let scale = match norm <= f64::from(NORM_LIMIT) {
                    true => f32_rounded_up(coefficient * (norm + delta)),
                    false => f32::INFINITY,
                };
                self.scales.push(scale);
                self.initial_thresholds.push(f32::NEG_INFINITY);
            }
        }
        self.shared_thresholds.extend(
            self.initial_thresholds
                .iter()
                .map(|&t| AtomicU32::new(threshold_key(t))),
        );
    }

    /// Publishes a task's threshold for lane `lane` and returns the highest published so far
    /// (`threshold` itself if it is NaN, which is never published).
    #[cfg(target_arch = "x86_64")]
    fn publish_threshold(&self, lane: usize, threshold: f32) -> f32 {
        match (threshold.is_nan(), self.shared_thresholds.get(lane)) {
            (false, Some(shared)) => {
                let key = threshold_key(threshold);
                let previous = shared.fetch_max(key, Ordering::Relaxed);
                threshold_from_key(previous.max(key))
            }
            _ => threshold,
        }
    }

    /// Raises each of `thresholds` (one per lane) to the highest published threshold.
    #[cfg(target_arch = "x86_64")]
    fn raise_to_shared(&self, thresholds: &mut [f32]) {
        for (threshold, shared) in thresholds.iter_mut().zip(&self.shared_thresholds) {
            let best = threshold_from_key(shared.load(Ordering::Relaxed));
            // Also replaces a NaN threshold (published ones are never NaN).
            if threshold.is_nan() || *threshold < best {
                *threshold = best;
            }
        }
    }
}

/// A key whose unsigned order is the IEEE total order of `x` (for atomic maxima).
fn threshold_key(x: f32) -> u32 {
    let bits = x.to_bits();
    match bits >> 31 {
        0 => bits | 0x8000_0000,
        _ => !bits,
    }
}

/// The inverse of [`threshold_key`].
#[cfg(target_arch = "x86_64")]
fn threshold_from_key(key: u32) -> f32 {
    match key >> 31 {
        1 => f32::from_bits(key & 0x7FFF_FFFF),
        _ => f32::from_bits(!key),
    }
}

/// Per-thread scratch of the bf16 kernel.
#[derive(Debug, Default)]
struct Bf16Scratch {
    /// The converted row block: row `r`, pair `p` at `r * pair_stride + p`.
    block: Vec<u32>,
    /// Per block row: `sqrt(Σ x²) + 2^-40` in f32, or `+inf` above the norm limit.
    row_norms: Vec<f32>,
    /// Per query of the batch: this task's rows that may be among its best `k` (fewer than
    /// [`kept_capacity`]`(k)`). A row is left out only if it scores below the threshold or
    /// ranks below `k` other rows of the list.
    kept: Vec<Vec<ScoredItem>>,
    /// Per lane: a score no final top-k row is below: the highest k-th best score known (this
    /// task's or another's, see [`PackedQueries::shared_thresholds`]; `-inf` until known).
    thresholds: Vec<f32>,
}

thread_local! {
    static BF16_SCRATCH: Cell<Bf16Scratch> = Cell::new(Bf16Scratch::default());
    static PACKED_QUERIES: Cell<PackedQueries> = Cell::new(PackedQueries::default());
}

/// Runs `f` with this thread's value of `key` (a fresh one if nested or during teardown).
fn with_reused<T: Default, R>(
    key: &'static std::thread::LocalKey<Cell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    let mut value = key.try_with(Cell::take).unwrap_or_default();
    let result = f(&mut value);
    // Ignoring the error is right: during thread teardown there is nothing left to reuse.
    let _ = key.try_with(|cell| cell.set(value));
    result
}

/// The best `k` rows of `m` for every query, exactly, on the current rayon pool (see the module
/// docs). Arguments are validated by the caller: `k >= 1` (and `k <= m.rows()`), equal
/// dimensions of at most [`MAX_DIM`], finite queries; `out` holds one empty vector per query.
pub(crate) fn batch_topk_bf16(
    support: Bf16Support,
    m: RowMatrix<'_>,
    queries: RowMatrix<'_>,
    k: usize,
    out: &mut [Vec<ScoredItem>],
    plan: Bf16Plan,
) {
    #[cfg(target_arch = "x86_64")]
    with_reused(&PACKED_QUERIES, |packed| {
        packed.pack(queries);
        run_tasks(support, m, packed, k, out, plan);
    });
    #[cfg(not(target_arch = "x86_64"))]
    {
        // No value of `Bf16Support` exists off x86-64.
        let _ = (support, m, queries, k, out, plan);
    }
}

/// Splits the row blocks over rayon tasks and merges their kept lists into `out`.
#[cfg(target_arch = "x86_64")]
fn run_tasks(
    support: Bf16Support,
    m: RowMatrix<'_>,
    packed: &PackedQueries,
    k: usize,
    out: &mut [Vec<ScoredItem>],
    plan: Bf16Plan,
) {
    let rows = m.rows();
    if rows == 0 || packed.prepared.is_empty() {
        return;
    }
    let blocks = rows.div_ceil(plan.row_block);
    let tasks = (rows / plan.min_rows_per_task.max(1))
        .clamp(1, rayon::current_num_threads() * TASKS_PER_THREAD)
        .min(blocks);
    let blocks_per_task = blocks.div_ceil(tasks);
    let merged = Mutex::new(out);
    let run_task = |task: usize| {
        let first_block = task * blocks_per_task;
        let end_block = blocks.min(first_block + blocks_per_task);
        if first_block >= end_block {
            return;
        }
        with_reused(&BF16_SCRATCH, |scratch| {
            scratch.kept.resize_with(packed.prepared.len(), Vec::new);
            for kept in &mut scratch.kept[..packed.prepared.len()] {
                kept.clear();
                // Grows on demand beyond this (an absurd k must not allocate up front).
                kept.reserve(kept_capacity(k).min(1 << 12));
            }
            scratch.thresholds.clear();
            scratch
                .thresholds
                .extend_from_slice(&packed.initial_thresholds);
            packed.raise_to_shared(&mut scratch.thresholds);
            let pair_stride = m.dim().div_ceil(32) * 16;
            scratch.block.resize(plan.row_block * pair_stride, 0);
            scratch.row_norms.resize(plan.row_block, 0.0);
            for block in first_block..end_block {
                let start = block * plan.row_block;
                let len = plan.row_block.min(rows - start);
                let next = start + len;
                // The next block's source rows, prefetched into L2 a few lines per microkernel
                // step (a burst of thousands of prefetches at once stalls the core).
                let next_rows: &[f32] = match next < rows {
                    true => {
                        let next_end = (next + plan.row_block).min(rows);
                        let (dim, stride) = (m.dim(), m.stride());
                        &m.data()[next * stride..(next_end - 1) * stride + dim]
                    }
                    false => &[],
                };
                if block > first_block {
                    packed.raise_to_shared(&mut scratch.thresholds);
                }
                score_block(
                    support,
                    m,
                    start,
                    len,
                    pair_stride,
                    packed,
                    k,
                    scratch,
                    next_rows,
                );
            }
            let mut merged = merged.lock().unwrap_or_else(PoisonError::into_inner);
            for (answer, kept) in merged.iter_mut().zip(&mut scratch.kept) {
                keep_best(kept, k);
                answer.extend_from_slice(kept);
            }
        });
    };
    if tasks == 1 {
        run_task(0);
    } else {
        (0..tasks).into_par_iter().for_each(run_task);
    }
    for answer in merged
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .iter_mut()
    {
        keep_best(answer, k);
        sort_ranked(answer);
    }
}

/// Converts rows `start .. start + len` and scores them against every query block.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn score_block(
    support: Bf16Support,
    m: RowMatrix<'_>,
    start: usize,
    len: usize,
    pair_stride: usize,
    packed: &PackedQueries,
    k: usize,
    scratch: &mut Bf16Scratch,
    next_rows: &[f32],
) {
    let Bf16Scratch {
        block,
        row_norms,
        kept,
        thresholds,
    } = scratch;
    let block = &mut block[..len * pair_stride];
    let row_norms = &mut row_norms[..len];
    // SAFETY: `support` proves the CPU has AVX-512F and AVX-512 BF16; the slices hold exactly
    // `len` rows of `pair_stride` pairs and `len` norms, as `convert_rows` requires.
    unsafe { x86::convert_rows(m, start, pair_stride, block, row_norms) };
    let Bf16Support(()) = support;
    let mut selection = Selection {
        m,
        first_row: start,
        packed,
        kept,
        thresholds,
        k,
    };
    for (b, query_block) in packed.blocks.iter().enumerate() {
        let pass = BlockPass {
            block,
            row_norms,
            pair_stride,
            pair_count: packed.pair_count,
            queries: query_block,
            packed,
            // Spread over the first pass only: later passes find the lines in flight already.
            prefetch: if b == 0 { next_rows } else { &[] },
        };
        // SAFETY: `support` proves the CPU features; `pass` describes in-bounds slices (the
        // block holds `row_norms.len()` rows, the packed queries `pair_count * vectors * 16`
        // pairs from `pair_offset`).
        unsafe {
            match query_block.vectors {
                1 => x86::score_rows::<1, 24>(&pass, &mut selection),
                2 => x86::score_rows::<2, 12>(&pass, &mut selection),
                3 => x86::score_rows::<3, 8>(&pass, &mut selection),
                _ => x86::score_rows::<4, 6>(&pass, &mut selection),
            }
        }
    }
}

/// One pass of one query block over a converted row block (read-only inputs).
#[cfg(target_arch = "x86_64")]
struct BlockPass<'a> {
    block: &'a [u32],
    row_norms: &'a [f32],
    pair_stride: usize,
    pair_count: usize,
    queries: &'a QueryBlock,
    packed: &'a PackedQueries,
    /// Source rows of the next block, to prefetch into L2 during this pass (may be empty).
    prefetch: &'a [f32],
}

/// Where survivors go: exact rescoring into the per-query kept lists.
#[cfg(target_arch = "x86_64")]
struct Selection<'a, 'm> {
    m: RowMatrix<'m>,
    /// Table index of the block's row 0.
    first_row: usize,
    packed: &'a PackedQueries,
    /// Per query: the rows that may still be among its best `k` (see [`kept_capacity`]).
    kept: &'a mut [Vec<ScoredItem>],
    thresholds: &'a mut [f32],
    k: usize,
}

#[cfg(target_arch = "x86_64")]
impl Selection<'_, '_> {
    /// Rescores block row `row` exactly for the queries of `block` register `vector` whose
    /// lanes are set in `lanes`, and updates their kept lists and thresholds. Kept out of line: it
    /// is the rare path, and it must compute exactly what the scan computes.
    #[inline(never)]
    fn rescore(&mut self, block: &QueryBlock, vector: usize, row: usize, mut lanes: u32) {
        let index = self.first_row + row;
        let row_data = self.m.row_extended(index);
        while lanes != 0 {
            let lane = vector * QUERY_LANES + lanes.trailing_zeros() as usize;
            lanes &= lanes - 1;
            // Padding lanes (past the block's queries) are skipped.
            let Some(prepared) = self.packed.prepared.get(block.first_query + lane) else {
                continue;
            };
            if lane >= block.queries {
                continue;
            }
            let score = score_row(row_data, prepared);
            let threshold = &mut self.thresholds[block.lane_offset + lane];
            if !may_enter(score, *threshold) {
                continue;
            }
            let kept = &mut self.kept[block.first_query + lane];
            kept.push(ScoredItem::new(index as u32, score));
            if kept.len() >= kept_capacity(self.k) {
                keep_best(kept, self.k);
                // The k-th best score so far (`keep_best` leaves it last): no row scoring
                // below it can enter the final top k. (A NaN threshold prunes nothing.)
                let own = kept.last().map_or(f32::NEG_INFINITY, |worst| worst.score);
                *threshold = self.packed.publish_threshold(block.lane_offset + lane, own);
            }
        }
    }
}

/// The AVX-512 code: row conversion and the microkernel.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m512, __m512bh, __m512i, _CMP_NLT_UQ, _mm512_cmp_ps_mask, _mm512_cvtne2ps_pbh,
        _mm512_dpbf16_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_loadu_si512,
        _mm512_maskz_loadu_ps, _mm512_reduce_add_ps, _mm512_set1_epi32, _mm512_set1_ps,
        _mm512_setzero_ps, _mm512_storeu_si512,
    };

    use super::{BlockPass, NORM_LIMIT, NORM_OFFSET, QUERY_LANES, Selection};
    use crate::matrix::RowMatrix;
    use crate::simd::prefetch_l2;

    /// Converts rows `start .. start + norms.len()` of `m` to bf16 pairs (`block`, row `r` at
    /// `r * pair_stride`, zero-padded to `pair_stride`) and stores each row's norm plus
    /// `2^-40` in `norms` (`+inf` above the norm limit).
    ///
    /// # Safety
    ///
    /// The CPU must support AVX-512F and AVX-512 BF16; `pair_stride` must be
    /// `m.dim().div_ceil(32) * 16`, `block.len() == norms.len() * pair_stride`, and the rows
    /// must exist in `m`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn convert_rows(
        m: RowMatrix<'_>,
        start: usize,
        pair_stride: usize,
        block: &mut [u32],
        norms: &mut [f32],
    ) {
        for (r, (norm, out)) in norms
            .iter_mut()
            .zip(block.chunks_exact_mut(pair_stride.max(1)))
            .enumerate()
        {
            let row = m.row(start + r);
            let mut squares = _mm512_setzero_ps();
            let (chunks, tail) = row.as_chunks::<32>();
            let (out_chunks, _) = out.as_chunks_mut::<16>();
            for (chunk, out) in chunks.iter().zip(out_chunks.iter_mut()) {
                // SAFETY: `chunk` holds 32 floats: two unaligned loads of 16 read inside it.
                let (low, high) = unsafe {
                    (
                        _mm512_loadu_ps(chunk.as_ptr()),
                        _mm512_loadu_ps(chunk.as_ptr().add(16)),
                    )
                };
                squares = _mm512_fmadd_ps(low, low, squares);
                squares = _mm512_fmadd_ps(high, high, squares);
                // SAFETY: `out` holds 16 u32 (64 bytes), the size of the store.
                unsafe {
                    _mm512_storeu_si512(out.as_mut_ptr().cast(), cvt(high, low));
                }
            }
            if !tail.is_empty() {
                let low_count = tail.len().min(16);
                let high_count = tail.len() - low_count;
                let low_mask = ((1u32 << low_count) - 1) as u16;
                let high_mask = ((1u32 << high_count) - 1) as u16;
                // SAFETY: masked loads touch only the enabled lanes (faults on the others are
                // suppressed), which lie inside `tail`: lanes below `low_count` of the first
                // 16 floats and below `high_count` of the next 16.
                let (low, high) = unsafe {
                    (
                        _mm512_maskz_loadu_ps(low_mask, tail.as_ptr()),
                        _mm512_maskz_loadu_ps(high_mask, tail.as_ptr().add(low_count)),
                    )
                };
                squares = _mm512_fmadd_ps(low, low, squares);
                squares = _mm512_fmadd_ps(high, high, squares);
                if let Some(last) = out_chunks.get_mut(chunks.len()) {
                    // SAFETY: `last` holds 16 u32 (64 bytes), the size of the store.
                    unsafe { _mm512_storeu_si512(last.as_mut_ptr().cast(), cvt(high, low)) };
                }
            }
            let computed = _mm512_reduce_add_ps(squares).sqrt() + NORM_OFFSET;
            // Not `<=` fails for NaN too (impossible for finite rows, but keeps the bound safe).
            *norm = match computed <= NORM_LIMIT {
                true => computed,
                false => f32::INFINITY,
            };
        }
    }

    /// `[low, high]` rounded to 32 bf16 values (element `i` of `low` in bf16 lane `i`), as
    /// integer lanes for storing.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn cvt(high: __m512, low: __m512) -> __m512i {
        // SAFETY: same-size reinterpretation of 32 x bf16 as 16 x i32 (any bits are valid).
        unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(high, low)) }
    }

    /// Scores every row of `pass.block` against the query block and hands the survivors to
    /// `selection`: steps of `RB` rows times `QV` query registers, then single rows.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX-512F and AVX-512 BF16; `QV == pass.queries.vectors`; the
    /// block holds `pass.row_norms.len()` rows of `pass.pair_stride >= pass.pair_count` pairs;
    /// the packed queries hold `pair_count * QV * 16` pairs from `pass.queries.pair_offset`
    /// and `QV * 16` scales from `lane_offset`, and `selection.thresholds` as many lanes.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn score_rows<const QV: usize, const RB: usize>(
        pass: &BlockPass<'_>,
        selection: &mut Selection<'_, '_>,
    ) {
        let rows = pass.row_norms.len();
        let full = rows / RB * RB;
        // The next block's source rows, an equal share per step (in whole 64-byte lines).
        let prefetch = pass.prefetch;
        let share = prefetch
            .len()
            .div_ceil(16)
            .div_ceil(rows.div_ceil(RB).max(1))
            * 16;
        let mut prefetched = 0;
        let mut row = 0;
        while row < full {
            let end = prefetch.len().min(prefetched + share);
            prefetch_l2(&prefetch[prefetched..end]);
            prefetched = end;
            // SAFETY: rows `row .. row + RB` exist (`row + RB <= full <= rows`); the rest is
            // this function's contract.
            unsafe { step::<QV, RB>(pass, selection, row) };
            row += RB;
        }
        prefetch_l2(&prefetch[prefetched..]);
        while row < rows {
            // SAFETY: row `row` exists; the rest is this function's contract.
            unsafe { step::<QV, 1>(pass, selection, row) };
            row += 1;
        }
    }

    /// One microkernel step: rows `row .. row + RB`, all `QV` query registers.
    ///
    /// # Safety
    ///
    /// As [`score_rows`], and rows `row .. row + RB` exist in the block.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn step<const QV: usize, const RB: usize>(
        pass: &BlockPass<'_>,
        selection: &mut Selection<'_, '_>,
        row: usize,
    ) {
        let query = pass.queries;
        let query_pairs = pass.packed.pairs[query.pair_offset..].as_ptr();
        let rows_ptr = pass.block[row * pass.pair_stride..].as_ptr();
        let mut acc = [[_mm512_setzero_ps(); QV]; RB];
        for p in 0..pass.pair_count {
            // SAFETY: pair `p < pair_count` of register `j < QV` lies inside the packed block
            // (contract), and is 16 u32 = 64 bytes long.
            let q: [__m512bh; QV] = std::array::from_fn(|j| unsafe {
                std::mem::transmute::<_, __m512bh>(_mm512_loadu_si512(
                    query_pairs.add((p * QV + j) * QUERY_LANES).cast(),
                ))
            });
            for (r, acc_row) in acc.iter_mut().enumerate() {
                // SAFETY: row `row + r` exists and `p < pair_count <= pair_stride`.
                let pair = unsafe { *rows_ptr.add(r * pass.pair_stride + p) };
                // SAFETY: same-size reinterpretation of 16 x i32 as 32 x bf16.
                let broadcast: __m512bh =
                    unsafe { std::mem::transmute(_mm512_set1_epi32(pair as i32)) };
                for (a, &q) in acc_row.iter_mut().zip(&q) {
                    *a = _mm512_dpbf16_ps(*a, q, broadcast);
                }
            }
        }
        let lanes = query.lane_offset..query.lane_offset + QV * QUERY_LANES;
        let scales = &pass.packed.scales[lanes.clone()];
        // SAFETY: `scales` holds QV * 16 floats, so each register's 16 lie inside.
        let scales: [__m512; QV] =
            std::array::from_fn(|j| unsafe { _mm512_loadu_ps(scales.as_ptr().add(j * 16)) });
        let thresholds = &selection.thresholds[lanes];
        // SAFETY: as for `scales`.
        let thresholds: [__m512; QV] =
            std::array::from_fn(|j| unsafe { _mm512_loadu_ps(thresholds.as_ptr().add(j * 16)) });
        let mut masks = [[0u16; QV]; RB];
        let mut any = 0u16;
        for (r, (acc_row, mask_row)) in acc.iter().zip(masks.iter_mut()).enumerate() {
            let norm = _mm512_set1_ps(pass.row_norms[row + r]);
            for j in 0..QV {
                // Upper bound on the exact score, rounded once (monotone): below the
                // threshold means the exact score is too. NaN counts as "not below".
                let upper = _mm512_fmadd_ps(scales[j], norm, acc_row[j]);
                mask_row[j] = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(upper, thresholds[j]);
                any |= mask_row[j];
            }
        }
        if any != 0 {
            for (r, mask_row) in masks.iter().enumerate() {
                for (j, &mask) in mask_row.iter().enumerate() {
                    if mask != 0 {
                        selection.rescore(query, j, row + r, u32::from(mask));
                    }
                }
            }
        }
    }

    /// The raw approximate scores of the block's rows for one query block (tests): row `r`,
    /// lane `l` at `r * QV * 16 + l`.
    ///
    /// # Safety
    ///
    /// As [`score_rows`] with `RB == 1`.
    #[cfg(test)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn approximate_scores<const QV: usize>(
        pass: &BlockPass<'_>,
        out: &mut Vec<f32>,
    ) {
        let query_pairs = pass.packed.pairs[pass.queries.pair_offset..].as_ptr();
        for row in 0..pass.row_norms.len() {
            let mut acc = [_mm512_setzero_ps(); QV];
            for p in 0..pass.pair_count {
                let pair = pass.block[row * pass.pair_stride + p];
                // SAFETY: same-size reinterpretation of 16 x i32 as 32 x bf16.
                let broadcast: __m512bh =
                    unsafe { std::mem::transmute(_mm512_set1_epi32(pair as i32)) };
                for (j, a) in acc.iter_mut().enumerate() {
                    // SAFETY: inside the packed block (contract); 64 bytes; same-size cast.
                    let q: __m512bh = unsafe {
                        std::mem::transmute(_mm512_loadu_si512(
                            query_pairs.add((p * QV + j) * QUERY_LANES).cast(),
                        ))
                    };
                    *a = _mm512_dpbf16_ps(*a, q, broadcast);
                }
            }
            for a in acc {
                let mut lanes = [0.0f32; 16];
                // SAFETY: `lanes` holds 16 floats.
                unsafe { std::arch::x86_64::_mm512_storeu_ps(lanes.as_mut_ptr(), a) };
                out.extend_from_slice(&lanes);
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::scalar;
    use crate::scan::scan_topk;
    use crate::testutil::{check_topk, integer_rows, random_rows, random_vec, spec_scores};
    use crate::topk::TopKScratch;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The CPU features, or `None` (then the bf16 tests have nothing to run: they say so).
    fn support() -> Option<Bf16Support> {
        let support = Bf16Support::detect();
        if support.is_none() {
            eprintln!("this CPU lacks AVX-512 BF16: bf16 kernel not exercised");
        }
        support
    }

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// Approximate (bf16 pass) scores: `result[q][r]` for query `q` and row `r`.
    fn approximate(
        support: Bf16Support,
        m: RowMatrix<'_>,
        queries: RowMatrix<'_>,
    ) -> Vec<Vec<f32>> {
        let Bf16Support(()) = support;
        let mut packed = PackedQueries::default();
        packed.pack(queries);
        let pair_stride = m.dim().div_ceil(32) * 16;
        let mut block = vec![0u32; m.rows() * pair_stride];
        let mut norms = vec![0.0f32; m.rows()];
        // SAFETY: the CPU features were detected; the slices are sized as required.
        unsafe { x86::convert_rows(m, 0, pair_stride, &mut block, &mut norms) };
        let mut result = vec![Vec::new(); queries.rows()];
        for query_block in &packed.blocks {
            let pass = BlockPass {
                block: &block,
                row_norms: &norms,
                pair_stride,
                pair_count: packed.pair_count,
                queries: query_block,
                packed: &packed,
                prefetch: &[],
            };
            let mut raw = Vec::new();
            // SAFETY: the CPU features were detected; `pass` is built as `score_block` does.
            unsafe {
                match query_block.vectors {
                    1 => x86::approximate_scores::<1>(&pass, &mut raw),
                    2 => x86::approximate_scores::<2>(&pass, &mut raw),
                    3 => x86::approximate_scores::<3>(&pass, &mut raw),
                    _ => x86::approximate_scores::<4>(&pass, &mut raw),
                }
            }
            let lanes = query_block.vectors * QUERY_LANES;
            for lane in 0..query_block.queries {
                result[query_block.first_query + lane] =
                    (0..m.rows()).map(|r| raw[r * lanes + lane]).collect();
            }
        }
        result
    }

    /// Largest `|exact - approx| / bound` over all pairs; fails if any pair breaks the bound.
    fn worst_bound_ratio(
        support: Bf16Support,
        m: RowMatrix<'_>,
        queries: RowMatrix<'_>,
    ) -> Result<f64, String> {
        let approx = approximate(support, m, queries);
        let mut worst = 0.0f64;
        for (q, scores) in approx.iter().enumerate() {
            for (r, &a) in scores.iter().enumerate() {
                // `dot` computes exactly the scan's score (same recipe, see `simd`).
                let exact = crate::simd::dot(m.row(r), queries.row(q));
                let bound = score_bound(m.dim(), queries.row(q), m.row(r));
                let error = (f64::from(exact) - f64::from(a)).abs();
                if error > bound {
                    return Err(format!(
                        "query {q} row {r}: exact {exact}, approx {a}, error {error} > bound {bound}"
                    ));
                }
                worst = worst.max(error / bound);
            }
        }
        Ok(worst)
    }

    #[test]
    fn bound_holds_and_is_nearly_tight_on_adversarial_data() {
        let Some(support) = support() else { return };
        // 1 + 2^-8 - 2^-23 lies just below the midpoint between the bf16 values 1 and
        // 1 + 2^-7: it rounds down by almost u = 2^-8 relative. With every product of such
        // values positive, every rounding error has the same sign and they add up: the error
        // is close to 2u ||q|| ||x||, the bound's leading term.
        let worst_case = 1.0 + 2f32.powi(-8) - 2f32.powi(-23);
        for dim in [1, 2, 31, 128, 257] {
            // Norms far above the absolute slack 2^-41 and below the limit 2^50.
            for scale in [2f32.powi(-20), 1.0, 2f32.powi(20)] {
                let rows: Vec<f32> = (0..3 * dim)
                    .map(|i| {
                        if (i / dim) % 2 == 0 {
                            worst_case * scale
                        } else {
                            -worst_case * scale
                        }
                    })
                    .collect();
                let m = RowMatrix::dense(&rows, dim).unwrap();
                let queries: Vec<f32> = (0..2 * dim)
                    .map(|i| if i < dim { worst_case } else { -worst_case })
                    .collect();
                let q = RowMatrix::dense(&queries, dim).unwrap();
                let ratio = worst_bound_ratio(support, m, q).unwrap();
                assert!(
                    ratio > 0.97,
                    "dim {dim} scale {scale}: the bound is loose here ({ratio})"
                );
            }
        }
    }

    #[test]
    fn bound_holds_across_exponents_and_denormals() {
        let Some(support) = support() else { return };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for round in 0..20 {
            let dim = rng.random_range(1..100);
            // Magnitudes from f32 denormals (2^-149) to 2^20; mixed signs; some exact zeros.
            let value = |rng: &mut ChaCha8Rng| -> f32 {
                match rng.random_range(0..10) {
                    0 => 0.0,
                    1 => {
                        f32::from_bits(rng.random_range(1..0x0080_0000))
                            * if rng.random() { 1.0 } else { -1.0 }
                    }
                    _ => rng.random_range(-1.0f32..1.0) * 2f32.powi(rng.random_range(-130..20)),
                }
            };
            let rows: Vec<f32> = (0..40 * dim).map(|_| value(&mut rng)).collect();
            let queries: Vec<f32> = (0..20 * dim).map(|_| value(&mut rng)).collect();
            let m = RowMatrix::dense(&rows, dim).unwrap();
            let q = RowMatrix::dense(&queries, dim).unwrap();
            worst_bound_ratio(support, m, q)
                .map_err(|e| format!("round {round}: {e}"))
                .unwrap();
        }
    }

    /// Runs the bf16 path with a tiny plan on `threads` threads.
    fn run_bf16(
        support: Bf16Support,
        m: RowMatrix<'_>,
        queries: RowMatrix<'_>,
        k: usize,
        row_block: usize,
        threads: usize,
    ) -> Vec<Vec<ScoredItem>> {
        let plan = Bf16Plan {
            row_block,
            min_rows_per_task: row_block,
        };
        let k = k.min(m.rows());
        let mut out = vec![Vec::new(); queries.rows()];
        pool(threads).install(|| batch_topk_bf16(support, m, queries, k, &mut out, plan));
        out
    }

    /// Checks `out` against `scan_topk` bit for bit, and against the scalar specification.
    fn check_against_scan(
        m: RowMatrix<'_>,
        queries: RowMatrix<'_>,
        k: usize,
        out: &[Vec<ScoredItem>],
    ) -> Result<(), TestCaseError> {
        let mut scratch = TopKScratch::new();
        let mut expected = Vec::new();
        for (q, answer) in out.iter().enumerate() {
            scan_topk(m, queries.row(q), k, &mut scratch, &mut expected).unwrap();
            let bits = |items: &[ScoredItem]| {
                items
                    .iter()
                    .map(|i| (i.index, i.score.to_bits()))
                    .collect::<Vec<_>>()
            };
            prop_assert_eq!(bits(answer), bits(&expected), "query {}", q);
            check_topk(
                &spec_scores(m, queries.row(q), 0..m.rows() as u32),
                answer,
                k,
            )
            .map_err(TestCaseError::fail)?;
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn equals_the_scan_on_random_shapes(
            rows in 0usize..400,
            dim in 1usize..70,
            pad in 0usize..9,
            batch in 1usize..70,
            k in 1usize..120,
            block_steps in 1usize..4,
            threads in 1usize..4,
            seed in any::<u64>(),
        ) {
            let Some(support) = support() else { return Ok(()) };
            let stride = dim + pad;
            let data = random_rows(seed, rows, dim, stride);
            let m = RowMatrix::new(&data, rows, dim, stride).unwrap();
            let qdata = random_rows(!seed, batch, dim, dim);
            let queries = RowMatrix::dense(&qdata, dim).unwrap();
            let out = run_bf16(support, m, queries, k, block_steps * ROW_STEP_LCM, threads);
            check_against_scan(m, queries, k, &out)?;
        }

        #[test]
        fn equals_the_scan_on_integer_ties(
            rows in 1usize..300,
            dim in 1usize..40,
            batch in 1usize..20,
            k in 1usize..80,
            seed in any::<u64>(),
        ) {
            let Some(support) = support() else { return Ok(()) };
            // Small integers: bf16-exact, scores exact, many exact ties broken by index.
            let data = integer_rows(seed, rows, dim, dim);
            let m = RowMatrix::dense(&data, dim).unwrap();
            let qdata = integer_rows(!seed, batch, dim, dim);
            let queries = RowMatrix::dense(&qdata, dim).unwrap();
            let out = run_bf16(support, m, queries, k, ROW_STEP_LCM, 2);
            check_against_scan(m, queries, k, &out)?;
            prop_assert_eq!(out, scalar::batch_topk(m, queries, k).unwrap());
        }

        #[test]
        fn equals_the_scan_on_near_ties_below_bf16_resolution(
            copies in 20usize..200,
            dim in 1usize..50,
            k in 1usize..60,
            seed in any::<u64>(),
        ) {
            let Some(support) = support() else { return Ok(()) };
            // Every row is the same base row scaled by 1 + j 2^-20: identical in bf16, so the
            // approximate scores tie while the exact ones differ in the last bits, both ways.
            let base = random_vec(seed, dim);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let data: Vec<f32> = (0..copies)
                .flat_map(|_| {
                    let factor = 1.0 + rng.random_range(-8i32..8) as f32 * 2f32.powi(-20);
                    base.iter().map(move |x| x * factor).collect::<Vec<_>>()
                })
                .collect();
            let m = RowMatrix::dense(&data, dim).unwrap();
            let mut qdata = random_vec(!seed, dim);
            qdata.extend(base.iter().map(|x| -x));
            let queries = RowMatrix::dense(&qdata, dim).unwrap();
            let out = run_bf16(support, m, queries, k, ROW_STEP_LCM, 2);
            check_against_scan(m, queries, k, &out)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn equals_the_scan_where_the_bound_is_tight(
            rows in 1usize..300,
            dim in 1usize..64,
            batch in 1usize..20,
            k in 1usize..50,
            seed in any::<u64>(),
        ) {
            let Some(support) = support() else { return Ok(()) };
            // Entries of magnitude 1 + 2^-8 - 2^-23 or twice that (bf16 rounds each down by
            // almost u) with random signs: rounding errors are maximal, products take few
            // distinct values, so approximate scores tie in bulk and sit near the bound.
            let worst_case = 1.0 + 2f32.powi(-8) - 2f32.powi(-23);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut entry = move || -> f32 {
                let sign = if rng.random() { 1.0 } else { -1.0 };
                let scale = if rng.random_range(0..4) == 0 { 2.0 } else { 1.0 };
                sign * scale * worst_case
            };
            let data: Vec<f32> = (0..rows * dim).map(|_| entry()).collect();
            let qdata: Vec<f32> = (0..batch * dim).map(|_| entry()).collect();
            let m = RowMatrix::dense(&data, dim).unwrap();
            let queries = RowMatrix::dense(&qdata, dim).unwrap();
            let out = run_bf16(support, m, queries, k, ROW_STEP_LCM, 2);
            check_against_scan(m, queries, k, &out)?;
        }
    }

    #[test]
    fn huge_norms_are_always_rescored() {
        let Some(support) = support() else { return };
        let dim = 20;
        let mut data = random_rows(8, 300, dim, dim);
        // Rows beyond the norm limit (2^50): their bound is infinite.
        for row in [3, 150, 299] {
            for x in &mut data[row * dim..(row + 1) * dim] {
                *x *= 1e16;
            }
        }
        let m = RowMatrix::dense(&data, dim).unwrap();
        let mut qdata = random_rows(9, 3, dim, dim);
        // One query beyond the norm limit too.
        for x in &mut qdata[dim..2 * dim] {
            *x *= 1e16;
        }
        let queries = RowMatrix::dense(&qdata, dim).unwrap();
        let out = run_bf16(support, m, queries, 7, ROW_STEP_LCM, 2);
        check_against_scan(m, queries, 7, &out).unwrap();
    }

    #[test]
    fn several_query_blocks_and_the_default_plan() {
        let Some(support) = support() else { return };
        let (rows, dim) = (5000, 48);
        let data = random_rows(31, rows, dim, dim);
        let m = RowMatrix::dense(&data, dim).unwrap();
        let qdata = random_rows(32, 150, dim, dim);
        let queries = RowMatrix::dense(&qdata, dim).unwrap();
        let plan = Bf16Plan::for_dim(dim);
        let mut out = vec![Vec::new(); queries.rows()];
        pool(2).install(|| batch_topk_bf16(support, m, queries, 30, &mut out, plan));
        check_against_scan(m, queries, 30, &out).unwrap();
    }

    #[test]
    fn threshold_keys_follow_the_total_order_and_round_trip() {
        let values = [
            f32::NEG_INFINITY,
            -f32::MAX,
            -1.5,
            -f32::MIN_POSITIVE,
            -1e-45,
            -0.0,
            0.0,
            1e-45,
            1.0,
            f32::MAX,
            f32::INFINITY,
        ];
        for pair in values.windows(2) {
            assert!(threshold_key(pair[0]) < threshold_key(pair[1]), "{pair:?}");
        }
        for x in values {
            assert_eq!(threshold_from_key(threshold_key(x)).to_bits(), x.to_bits());
        }
        let mut packed = PackedQueries::default();
        let data = [1.0f32, 2.0, 3.0, 4.0];
        packed.pack(RowMatrix::dense(&data, 2).unwrap());
        // Two queries, 16 lanes: publishing keeps the maximum; NaN is never published.
        assert_eq!(packed.publish_threshold(1, 3.0), 3.0);
        assert_eq!(packed.publish_threshold(1, 2.0), 3.0);
        assert!(packed.publish_threshold(1, f32::NAN).is_nan());
        let mut local = vec![f32::NEG_INFINITY; 16];
        local[0] = f32::NAN;
        packed.raise_to_shared(&mut local);
        assert_eq!(local[0], f32::NEG_INFINITY);
        assert_eq!(local[1], 3.0);
        assert_eq!(
            local[2],
            f32::INFINITY,
            "padding lanes never take survivors"
        );
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3F80);
        // Halfway between 1 and 1 + 2^-7: ties to even (1).
        assert_eq!(bf16_bits(1.0 + 2f32.powi(-8)), 0x3F80);
        // Halfway between 1 + 2^-7 and 1 + 2^-6: ties to even (1 + 2^-6).
        assert_eq!(bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3F82);
        assert_eq!(bf16_bits(1.0 + 2f32.powi(-8) + 2f32.powi(-23)), 0x3F81);
        assert_eq!(bf16_bits(-2.0), 0xC000);
        assert_eq!(
            f32_rounded_up(0.1),
            0.1f32.max(f32::from_bits(0.1f32.to_bits()))
        );
        assert!(f64::from(f32_rounded_up(0.1)) >= 0.1);
        assert!(bound_coefficient(128) > 2.0 * 2f64.powi(-8));
        assert!(bound_coefficient(128) < 2.1 * 2f64.powi(-8));
    }
}
