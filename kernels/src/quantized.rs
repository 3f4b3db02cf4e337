//! An int8 copy of a row matrix and the candidate top-k that prunes with it: a proven error
//! bound decides which candidates the exact f32 kernel must rescore, so the answer is exact.
//!
//! # Why
//!
//! Candidate lists are scored at random rows, so the f32 kernel ([`crate::candidates_topk`])
//! is bound by the cache lines it fetches: a row of dimension 64 is 256 bytes, four lines. The
//! quantized copy ([`QuantizedRows`]) stores each element as an `i8` with one `f32` scale per
//! row (in a separate array, 4 bytes per row): a row of dimension 64 is one 64-byte line.
//! [`quantized_candidates_topk`] reads that line per candidate, and the four f32 lines only
//! for the few candidates whose approximate score does not rule them out.
//!
//! # Algorithm
//!
//! 1. The query is quantized too, to `i16` codes `q̃_i = round(q_i / t)` with a step `t` (up
//!    to 32767 levels, fewer for very long rows so that no `i32` sum can overflow). The dot
//!    product of the codes `P = Σ c_i q̃_i` is then EXACT in `i32` (`vpmaddwd`, no rounding
//!    at all), and cheaper than converting the codes to floats.
//! 2. For every candidate, with row scale `s`: `a = s t P` approximates the exact score `E`
//!    (what the f32 kernel computes), and `|E - a| <= s W + η` (below), so
//!    `lower = s (t P - W) - η <= E <= upper = s (t P + W) + η`, with the roundings of that
//!    very computation included in `W` and `η`.
//! 3. `L` is the k-th largest `lower`. At least `k` candidates have `E >= lower >= L`, so the
//!    k-th best exact score is `>= L`; a candidate with `upper < L` has `E < L` and cannot be
//!    in the top k (not even by a tie, since its score is strictly lower). The scan writes
//!    every candidate's bounds without a branch; then a threshold `T` is read off a sample of
//!    the lower bounds and proven `<= L` by counting at least `k` lower bounds that reach it,
//!    the candidates whose `upper` reaches `T` (about twice `k`) are collected, and `L` is
//!    selected among their lower bounds alone ([`split_at_kth_lower`]).
//! 4. Candidates are rescored with the f32 kernel's own recipe ([`score_rows8`] /
//!    [`score_row`]), so each score is bit for bit the score [`crate::candidates_topk`] gives
//!    it. First the sure ones, whose `lower >= L` (at least `k` of them). The smallest of
//!    their exact scores, `F >= L`, is reached by at least `k` candidates, so the k-th best
//!    exact score is `>= F`: of the others, only those with `upper >= F` (a subset of those
//!    with `upper >= L`) can be in the top k, and only they are rescored. With 1000
//!    candidates of dimension 64 and k = 100 that is about 108 rows where `upper >= L` gave
//!    117. The best `k` rescored candidates under the same ranking order (score descending,
//!    ties by row index) are returned, sorted as integer keys
//!    ([`crate::topk::rank_key`]): the same list, item for item.
//!
//! The dot products `P` are exact integers, so how they are computed does not change any
//! bound: on CPUs with AVX-512BW, strides of 64 and 128 codes (dimensions 33 to 128) use a
//! path that widens 32 codes per instruction and sums eight rows' lanes with one shuffle
//! tree (`x86`, detected at run time); every other case uses the portable `wide` path. The
//! tests check every path this CPU runs against each other and against a plain integer sum.
//!
//! There is no cap: on data where the bound prunes nothing every candidate is rescored (only
//! slower). When an input lies outside the proven range (a non-finite value in the table, a
//! zero or tiny query, sums that could approach overflow, `k` covering every candidate) the
//! exact kernel runs alone.
//!
//! # Error bound
//!
//! `d` is the dimension, `u = 2^-24`, `γ = m u / (1 - m u)` with `m = d + 38` (every
//! rounding the f32 recipe can apply to one product: at most `d / 32 + 5` along its path, and
//! `d + 38` operations in all for the underflow term), `Q1 = Σ |q_i|`, `r = Σ |q_i - t q̃_i|`
//! (computed per query), `M = max |x_i|` of the row.
//!
//! - Row quantization: `s = fl(M / 127)` and `c_i = round(fl(x_i fl(1 / s)))`, so
//!   `|x_i / s - c_i| <= 1/2 + 256 u` and `|c_i| <= 127`; `M <= 127 s (1 + 2u)`. Rows whose
//!   `M / 127` would be subnormal use a power-of-two scale instead, where `x_i / s` is exact
//!   (error `1/2`). So `|Σ q_i x_i - s Σ q_i c_i| <= s Q1 (1 + 2^-14) / 2`.
//! - Query quantization: `|s Σ c_i q_i - s t P| <= 127 s r`.
//! - The f32 kernel: `|E - Σ q_i x_i| <= γ Σ |q_i x_i| + (d + 38) 2^-150 (1 + γ)
//!   <= 127 (1 + 2u) γ Q1 s + (d + 38) 2^-149` (standard FMA error analysis, with the
//!   absolute underflow term).
//! - So `|E - s t P| <= s W0 + η0` with `W0 = Q1 (1 + 2^-14) / 2 + 127 r + 127 (1 + 2u) γ Q1`
//!   and `η0 = (d + 38) 2^-149`.
//! - Computing `lower` and `upper` in f32 (`P` to f32, times `t`, `± W`, times `s`, `∓ η`)
//!   adds at most `s (7 u G + 4 u W) + 2^-149 + u η` with `G = 127 (Q1 + r) >= |t P|`
//!   (no intermediate underflows but the last two operations: `t >= 2^-115` and a
//!   subnormal difference is exact). The kernel uses
//!   `W = (W0 + 7 u G) / (1 - 4 u) (1 + 2^-30)` rounded up to f32 (the last factor absorbs
//!   the f64 evaluation) and `η = (d + 48) 2^-148`, which cover all of it.
//!
//! Overflow is ruled out up front (`Q1 · max |x| · (d + 1) <= 2^100`), so every score is
//! finite. The tests check `lower <= E <= upper` on random and adversarial data (rows at
//! half-steps, one huge element, tiny and subnormal rows) and that halving `W` breaks an
//! answer.

use rayon::prelude::*;
use wide::{f32x8, i8x16, i16x16, i32x8};

use crate::bf16::f32_rounded_up;
use crate::candidates::{candidates_topk, prefetch_group};
use crate::error::KernelError;
use crate::matrix::RowMatrix;
use crate::simd::{PreparedQuery, ROW_BLOCK, prefetch_l2, score_row, score_rows8};
use crate::topk::{
    ScoredItem, TopKScratch, descending_key, may_enter, score_of_descending_key, write_best_sorted,
};
use crate::validate::{check_candidates, check_k, check_query};

/// Bytes of a cache line: quantized rows of up to 64 elements never straddle one.
const LINE_BYTES: usize = 64;

/// Codes per SIMD step (an `i8x16` widened to an `i16x16`).
const CHUNK: usize = 16;

/// Largest code magnitude of a row element.
const ROW_CODE_LIMIT: f32 = 127.0;

/// Largest code magnitude of a query element (`i16`, and `vpmaddwd` cannot overflow on it).
const QUERY_CODE_LIMIT: usize = i16::MAX as usize;

/// Fewest query code levels worth the int8 pass (only rows longer than about 66 000 elements
/// get fewer; the exact kernel then runs alone).
const MIN_QUERY_CODE_LIMIT: usize = 255;

/// Largest dimension the error bound is proven for.
const MAX_DIM: usize = 1 << 20;

/// Rows whose largest magnitude is below `2^-118` get a power-of-two scale (their `M / 127`
/// would be near the subnormal range, where a division loses relative precision).
const POWER_OF_TWO_SCALE_BELOW: f32 = f32::from_bits(9 << 23);

/// Queries whose largest magnitude is below `2^-100` are scored by the exact kernel alone.
const MIN_QUERY_MAGNITUDE: f32 = f32::from_bits(27 << 23);

/// `Q1 · max |x| · (d + 1)` above this (`2^100`) sends a query to the exact kernel alone.
const MAGNITUDE_LIMIT: f64 = 1.267_650_600_228_229_4e30;

/// How many 8-candidate groups ahead the quantized rows are prefetched.
const PREFETCH_BLOCKS: usize = 4;

/// Rows quantized per rayon task when building a large copy.
const ROWS_PER_TASK: usize = 4096;

/// Copies with fewer elements are built on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 20;

/// Bytes per quantized row: `dim` rounded up to 16, then to a power of two up to 64 bytes
/// (so that a row never straddles a cache line) or to a multiple of 64 beyond.
fn quantized_stride(dim: usize) -> usize {
    let padded = dim.max(1).next_multiple_of(CHUNK);
    if padded <= LINE_BYTES {
        padded.next_power_of_two()
    } else {
        padded.next_multiple_of(LINE_BYTES)
    }
}

/// An int8 copy of a [`RowMatrix`]: per row, `i8` codes `c_i` (zero-padded to a cache-line
/// friendly stride, 64-byte aligned) and one `f32` scale `s` (a separate array), with
/// `x_i ≈ s c_i`. Memory: `stride + 4` bytes per row, where the stride is the dimension
/// rounded up to 16, 32, 64 or a multiple of 64 (dimension 64: 68 bytes per row instead of
/// 256). Built once per table by [`QuantizedRows::build`]; read by
/// [`quantized_candidates_topk`].
#[derive(Debug, Clone)]
pub struct QuantizedRows {
    storage: Vec<i8>,
    start: usize,
    rows: usize,
    dim: usize,
    stride: usize,
    scales: Vec<f32>,
    max_abs: f32,
    finite: bool,
    source: usize,
}

/// What quantizing some rows found.
#[derive(Debug, Clone, Copy)]
struct RowsSummary {
    max_abs: f32,
    finite: bool,
}

impl RowsSummary {
    const EMPTY: RowsSummary = RowsSummary {
        max_abs: 0.0,
        finite: true,
    };

    fn merge(self, other: RowsSummary) -> RowsSummary {
        RowsSummary {
            max_abs: self.max_abs.max(other.max_abs),
            finite: self.finite && other.finite,
        }
    }
}

/// Quantizes one row into `codes` (zeroed beyond the row, which the caller provides zeroed)
/// and returns its scale and summary. A row with a non-finite value gets zero codes and is
/// reported non-finite (the kernel then never uses the copy).
fn quantize_row(row: &[f32], codes: &mut [i8]) -> (f32, RowsSummary) {
    if !row.iter().all(|x| x.is_finite()) {
        return (
            0.0,
            RowsSummary {
                max_abs: 0.0,
                finite: false,
            },
        );
    }
    let max_abs = row.iter().fold(0.0f32, |max, x| max.max(x.abs()));
    let summary = RowsSummary {
        max_abs,
        finite: true,
    };
    if max_abs == 0.0 {
        return (0.0, summary);
    }
    if max_abs >= POWER_OF_TWO_SCALE_BELOW {
        let scale = max_abs / ROW_CODE_LIMIT;
        let inverse = 1.0 / scale;
        for (code, &x) in codes.iter_mut().zip(row) {
            *code = (x * inverse).round().clamp(-ROW_CODE_LIMIT, ROW_CODE_LIMIT) as i8;
        }
        return (scale, summary);
    }
    // Tiny rows: the smallest power of two `s >= M / 127` (at least 2^-149, the smallest
    // f32). Dividing by it is exact in f64, so each code is off by at most 1/2.
    let wanted = f64::from(max_abs) / f64::from(ROW_CODE_LIMIT);
    let mut exponent = (wanted.log2().ceil() as i32).max(-149);
    while f64::from(ROW_CODE_LIMIT) * 2f64.powi(exponent) < f64::from(max_abs) {
        exponent += 1;
    }
    let scale = 2f64.powi(exponent) as f32;
    for (code, &x) in codes.iter_mut().zip(row) {
        *code = (f64::from(x) / f64::from(scale))
            .round()
            .clamp(-f64::from(ROW_CODE_LIMIT), f64::from(ROW_CODE_LIMIT)) as i8;
    }
    (scale, summary)
}

impl QuantizedRows {
    /// Quantizes every row of `m` (on the current rayon pool for a million elements or
    /// more). The copy remembers which matrix it was built from: the kernel refuses any
    /// other.
    pub fn build(m: RowMatrix<'_>) -> QuantizedRows {
        let (rows, dim) = (m.rows(), m.dim());
        let stride = quantized_stride(dim);
        let mut storage = vec![0i8; rows * stride + LINE_BYTES - 1];
        // Where the first 64-byte aligned row starts (always below 64 for bytes).
        let start = storage
            .as_ptr()
            .align_offset(LINE_BYTES)
            .min(LINE_BYTES - 1);
        let mut scales = vec![0.0f32; rows];
        let body = &mut storage[start..start + rows * stride];
        let quantize_range = |first_row: usize, codes: &mut [i8], scales: &mut [f32]| {
            let mut summary = RowsSummary::EMPTY;
            for (offset, (codes, scale)) in codes
                .chunks_exact_mut(stride)
                .zip(scales.iter_mut())
                .enumerate()
            {
                let (row_scale, row_summary) = quantize_row(m.row(first_row + offset), codes);
                *scale = row_scale;
                summary = summary.merge(row_summary);
            }
            summary
        };
        let summary = if rows * dim >= PARALLEL_MIN_ELEMENTS {
            body.par_chunks_mut(stride * ROWS_PER_TASK)
                .zip(scales.par_chunks_mut(ROWS_PER_TASK))
                .enumerate()
                .map(|(task, (codes, scales))| quantize_range(task * ROWS_PER_TASK, codes, scales))
                .reduce(|| RowsSummary::EMPTY, RowsSummary::merge)
        } else {
            quantize_range(0, body, &mut scales)
        };
        QuantizedRows {
            storage,
            start,
            rows,
            dim,
            stride,
            scales,
            max_abs: summary.max_abs,
            finite: summary.finite,
            source: m.data().as_ptr().addr(),
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of components per row.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Bytes per row: the code stride plus the 4-byte scale.
    pub fn bytes_per_row(&self) -> usize {
        self.stride + std::mem::size_of::<f32>()
    }

    /// Heap bytes held (codes, alignment slack and scales).
    pub fn heap_bytes(&self) -> usize {
        self.storage.len() + std::mem::size_of_val(self.scales.as_slice())
    }

    /// Whether every value of the source matrix was finite (otherwise the kernel always runs
    /// the exact path).
    pub fn is_usable(&self) -> bool {
        self.finite
    }

    /// Asks the CPU to start loading row `row`'s codes and scale into L2 (a hint for a
    /// caller about to score it; nothing for an index out of range).
    #[inline]
    pub fn prefetch_row(&self, row: usize) {
        if row < self.rows {
            prefetch_l2(self.codes(row));
            prefetch_l2(&self.scales[row..=row]);
        }
    }

    /// The row hints of this copy, for a caller about to score a batch of rows: what
    /// [`QuantizedRowHints::codes`] needs, taken once for the whole batch.
    #[inline]
    pub fn row_hints(&self) -> QuantizedRowHints<'_> {
        // A stride of 4 GiB or more (never built in practice) gets no hints at all.
        let (codes, stride) = match u32::try_from(self.stride) {
            Ok(stride) => (
                self.storage
                    .get(self.start..self.start + self.rows * self.stride)
                    .unwrap_or_default(),
                stride,
            ),
            Err(_) => (&[][..], 0),
        };
        QuantizedRowHints {
            codes,
            stride,
            scales: &self.scales,
        }
    }

    /// The codes of row `row` (`stride` bytes, zero beyond `dim`).
    #[inline(always)]
    fn codes(&self, row: usize) -> &[i8] {
        let first = self.start + row * self.stride;
        &self.storage[first..first + self.stride]
    }

    /// Checks that this copy was built from `m`.
    fn check_source(&self, m: RowMatrix<'_>) -> Result<(), KernelError> {
        if self.rows == m.rows() && self.dim == m.dim() && self.source == m.data().as_ptr().addr() {
            return Ok(());
        }
        Err(KernelError::QuantizedMismatch {
            quantized_rows: self.rows,
            quantized_dim: self.dim,
            rows: m.rows(),
            dim: m.dim(),
        })
    }
}

/// Cheap L2 hints for rows of one [`QuantizedRows`] (from [`QuantizedRows::row_hints`]):
/// the codes' slice and stride are read once per batch, so hinting a row is one multiply,
/// one bounds check and one prefetch instruction per cache line of codes (one line at
/// dimensions up to 64), and one check and prefetch for the scale. Hints only: no result
/// depends on them, and a row out of range gets none.
#[derive(Debug, Clone, Copy)]
pub struct QuantizedRowHints<'q> {
    /// Every row's codes, `stride` bytes each, the first row 64-byte aligned.
    codes: &'q [i8],
    /// Below 2^32, so that a `u32` row times the stride never overflows a `u64`.
    stride: u32,
    scales: &'q [f32],
}

impl QuantizedRowHints<'_> {
    /// Asks the CPU to start loading row `row`'s codes into L2, not its scale. Nothing for a
    /// row out of range. Before the int8 pass, prefer [`QuantizedRowHints::codes_and_scale`]:
    /// without the scale's line the pass was slower than with no hint at all
    /// (BENCHMARKS.md, section `dedup`).
    #[inline(always)]
    pub fn codes(&self, row: u32) {
        let Ok(first) = usize::try_from(u64::from(row) * u64::from(self.stride)) else {
            return;
        };
        if let Some(code) = self.codes.get(first) {
            // Rows are 64-byte aligned and a stride is a power of two below 64 or a multiple
            // of 64, so the row's first line holds its first code and the row never
            // straddles a line it does not start.
            prefetch_l2(std::slice::from_ref(code));
            let mut offset = LINE_BYTES;
            while offset < self.stride as usize {
                if let Some(code) = self.codes.get(first + offset) {
                    prefetch_l2(std::slice::from_ref(code));
                }
                offset += LINE_BYTES;
            }
        }
    }

    /// [`QuantizedRowHints::codes`], and the line of the row's scale too: the hint before
    /// [`quantized_candidates_topk`] (whose own look-ahead prefetches codes only).
    #[inline(always)]
    pub fn codes_and_scale(&self, row: u32) {
        self.codes(row);
        if let Some(scale) = self.scales.get(row as usize) {
            prefetch_l2(std::slice::from_ref(scale));
        }
    }
}

/// A query quantized for [`QuantizedRows`], with the error bound's constants.
#[derive(Debug, Clone, Default)]
pub(crate) struct QuantizedQuery {
    /// The `i16` codes in 16-lane chunks, zero-padded to the row stride.
    lanes: Vec<i16x16>,
    /// The step `t`: `q_i ≈ t q̃_i`.
    step: f32,
    /// `W`: the bound is `s W + η`.
    width: f32,
    /// `η`, the absolute (underflow) part of the bound.
    floor: f32,
}

impl QuantizedQuery {
    /// Quantizes `query` (finite, checked by the caller) for a table whose largest magnitude
    /// is `table_max_abs` and whose rows are `stride` codes apart (the lanes are zero-padded
    /// to cover a whole stride). False when the inputs fall outside the proven range: then
    /// the exact kernel must run alone.
    fn prepare(&mut self, query: &[f32], table_max_abs: f32, stride: usize) -> bool {
        let dim = query.len();
        if dim == 0 || dim > MAX_DIM {
            return false;
        }
        let query_max = query.iter().fold(0.0f32, |max, x| max.max(x.abs()));
        if query_max < MIN_QUERY_MAGNITUDE {
            return false;
        }
        let sum_abs: f64 = query.iter().map(|&x| f64::from(x.abs())).sum();
        if sum_abs * f64::from(table_max_abs) * (dim as f64 + 1.0) > MAGNITUDE_LIMIT {
            return false;
        }
        let padded = dim.next_multiple_of(CHUNK);
        // |Σ c_i q̃_i| <= 127 padded limit <= i32::MAX: the exact integer sum never overflows.
        let limit = (i32::MAX as usize / (ROW_CODE_LIMIT as usize * padded)).min(QUERY_CODE_LIMIT);
        if limit < MIN_QUERY_CODE_LIMIT {
            return false;
        }
        let limit = limit as f64;
        // Rounded up, so that |q_i / t| <= limit and no code is clamped.
        let step = f32_rounded_up(f64::from(query_max) / limit * (1.0 + 2f64.powi(-50)));
        let step64 = f64::from(step);
        let mut residual = 0.0f64;
        let mut codes = [0i16; CHUNK];
        self.lanes.clear();
        for chunk in query.chunks(CHUNK) {
            codes.fill(0);
            for (code, &x) in codes.iter_mut().zip(chunk) {
                let level = (f64::from(x) / step64).round().clamp(-limit, limit);
                residual += (f64::from(x) - level * step64).abs();
                *code = level as i16;
            }
            self.lanes.push(i16x16::new(codes));
        }
        // Zero codes times zero padding: the dot products do not change.
        self.lanes
            .resize(stride.div_ceil(CHUNK).max(self.lanes.len()), i16x16::ZERO);
        let unit = 2f64.powi(-24);
        let operations = dim as f64 + 38.0;
        let gamma = operations * unit / (1.0 - operations * unit);
        let row_code_limit = f64::from(ROW_CODE_LIMIT);
        let approx_magnitude = row_code_limit * (sum_abs + residual);
        let error = sum_abs * (1.0 + 2f64.powi(-14)) / 2.0
            + row_code_limit * residual
            + row_code_limit * (1.0 + 2.0 * unit) * gamma * sum_abs;
        let width =
            (error + 7.0 * unit * approx_magnitude) / (1.0 - 4.0 * unit) * (1.0 + 2f64.powi(-30));
        self.step = step;
        self.width = f32_rounded_up(width);
        self.floor = f32_rounded_up((dim as f64 + 48.0) * 2f64.powi(-148));
        true
    }
}

/// One candidate that the sampled threshold has not ruled out: its row and bounds.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct OpenCandidate {
    row: u32,
    lower: f32,
    upper: f32,
}

/// Scratch of [`quantized_candidates_topk`] (inside [`TopKScratch`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct QuantizedScratch {
    query: QuantizedQuery,
    /// Every candidate's lower and upper bound, in list order (written by the scan; the
    /// arrays only grow, so only the first `candidates.len()` entries are this list's).
    bounds: CandidateBounds,
    /// Where the candidates whose upper bound reaches the sampled threshold sit in the list
    /// (a prefix; the array only grows, so that the branch-free writes need no check of
    /// capacity).
    positions: Vec<u32>,
    /// Lower bounds as [`descending_key`]s (which select as plain integers): first a sample,
    /// then those of the candidates at `positions`.
    lowers: Vec<u32>,
    /// The sure candidates: their lower bound reaches `L`, the k-th largest lower bound.
    open: Vec<OpenCandidate>,
    /// The candidates whose lower bound is below `L` but whose upper bound reaches it.
    doubtful: Vec<OpenCandidate>,
    /// The rank keys of the rescored candidates (see [`write_best_sorted`]).
    keys: Vec<u64>,
}

/// The bounds of every candidate of a list, `lower[i]` and `upper[i]` for candidate `i`.
#[derive(Debug, Clone, Default)]
pub(crate) struct CandidateBounds {
    lower: Vec<f32>,
    upper: Vec<f32>,
}

/// What [`quantized_candidates_topk`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizedPass {
    /// Candidates scored by the exact f32 kernel (all of them when it ran alone).
    pub rescored: usize,
    /// Whether the int8 pass ran (false: `k` covered every candidate or an input was outside
    /// its proven range, and the exact kernel ran alone).
    pub pruned: bool,
}

/// The exact `i32` dot product lanes of one row's codes with the query codes.
#[inline(always)]
fn code_dot(codes: &[i8], lanes: &[i16x16]) -> i32x8 {
    let (chunks, _) = codes.as_chunks::<CHUNK>();
    let mut sum = i32x8::ZERO;
    for (chunk, lane) in chunks.iter().zip(lanes) {
        sum += i16x16::from_i8x16(i8x16::new(*chunk)).dot(*lane);
    }
    sum
}

/// Lane `r`: the sum of the eight lanes of `sums[r]` (exact integer sums, any order).
#[inline(always)]
fn sum_lanes_x8(sums: [i32x8; ROW_BLOCK]) -> i32x8 {
    // The transpose only moves bits, so it is done on the bits as f32 lanes.
    let t = f32x8::transpose(sums.map(bytemuck::cast::<i32x8, f32x8>))
        .map(bytemuck::cast::<f32x8, i32x8>);
    ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]))
}

/// `[lane(0), lane(1), …, lane(7)]` for a closure `lane`, spelled out: `array::map` (or
/// `from_fn`) over a block is not always inlined here, and a call spills every vector.
macro_rules! eight_lanes {
    ($lane:expr) => {
        [
            $lane(0),
            $lane(1),
            $lane(2),
            $lane(3),
            $lane(4),
            $lane(5),
            $lane(6),
            $lane(7),
        ]
    };
}

/// The exact code dot products `P` of eight rows with the query (the portable path: any
/// stride, `wide` vectors).
#[inline(always)]
fn portable_dots8(rows: &QuantizedRows, query: &QuantizedQuery, block: &[u32; ROW_BLOCK]) -> i32x8 {
    let lanes = query.lanes.as_slice();
    let dot = |lane: usize| code_dot(rows.codes(block[lane] as usize), lanes);
    sum_lanes_x8(eight_lanes!(dot))
}

/// Lower and upper bounds on the exact scores of eight rows whose code dot products with
/// the query are `dots` (the same operations as [`bounds1`], lane by lane).
#[inline(always)]
fn bounds8(
    rows: &QuantizedRows,
    query: &QuantizedQuery,
    block: &[u32; ROW_BLOCK],
    dots: i32x8,
) -> (f32x8, f32x8) {
    let scale = |lane: usize| rows.scales[block[lane] as usize];
    let scales = f32x8::new(eight_lanes!(scale));
    let approx = f32x8::from_i32x8(dots) * f32x8::splat(query.step);
    let width = f32x8::splat(query.width);
    let floor = f32x8::splat(query.floor);
    let lower = scales * (approx - width) - floor;
    let upper = scales * (approx + width) + floor;
    (lower, upper)
}

/// Lower and upper bounds on the exact score of one row (the same operations as one lane
/// of [`bounds8`]).
#[inline(always)]
fn bounds1(rows: &QuantizedRows, query: &QuantizedQuery, row: u32) -> (f32, f32) {
    let dot: i32 = code_dot(rows.codes(row as usize), &query.lanes)
        .to_array()
        .iter()
        .sum();
    let scale = rows.scales[row as usize];
    let approx = dot as f32 * query.step;
    let lower = scale * (approx - query.width) - query.floor;
    let upper = scale * (approx + query.width) + query.floor;
    (lower, upper)
}

/// Bounds every candidate (eight at a time, the code dot products from `dots8`) into
/// `bounds`, in list order, without a branch on the values; `codes(row)` is row `row`'s
/// codes (what is prefetched).
#[inline(always)]
fn scan<'q, T: 'q>(
    quantized: &QuantizedRows,
    query: &QuantizedQuery,
    candidates: &[u32],
    bounds: &mut CandidateBounds,
    codes: impl Fn(usize) -> &'q [T] + Copy,
    dots8: impl Fn(&[u32; ROW_BLOCK]) -> i32x8,
) {
    let CandidateBounds { lower, upper } = bounds;
    let count = candidates.len();
    // Grown, never shrunk: only the first `count` bounds are written and read.
    if lower.len() < count {
        lower.resize(count, 0.0);
        upper.resize(count, 0.0);
    }
    let (lower_blocks, lower_rest) = lower[..count].as_chunks_mut::<ROW_BLOCK>();
    let (upper_blocks, upper_rest) = upper[..count].as_chunks_mut::<ROW_BLOCK>();
    let (blocks, rest) = candidates.as_chunks::<ROW_BLOCK>();
    for group in 0..PREFETCH_BLOCKS {
        prefetch_group(blocks, rest, group, codes);
    }
    for (b, ((block, lower), upper)) in blocks
        .iter()
        .zip(lower_blocks.iter_mut())
        .zip(upper_blocks.iter_mut())
        .enumerate()
    {
        prefetch_group(blocks, rest, b + PREFETCH_BLOCKS, codes);
        let (block_lower, block_upper) = bounds8(quantized, query, block, dots8(block));
        *lower = block_lower.to_array();
        *upper = block_upper.to_array();
    }
    for ((&row, lower), upper) in rest.iter().zip(lower_rest).zip(upper_rest) {
        (*lower, *upper) = bounds1(quantized, query, row);
    }
}

/// How the int8 pass computes code dot products (all paths give the same exact integers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DotsPath {
    /// `wide` vectors, any stride.
    Portable,
    /// AVX-512BW (`vpmaddwd` then `vpaddd`), for strides of 64 and 128 codes (dimensions 33
    /// to 128).
    #[cfg(target_arch = "x86_64")]
    Avx512(x86::Avx512Support),
}

impl DotsPath {
    /// The fastest path this CPU runs.
    fn detect() -> DotsPath {
        #[cfg(target_arch = "x86_64")]
        if let Some(support) = x86::Avx512Support::detect() {
            return DotsPath::Avx512(support);
        }
        DotsPath::Portable
    }

    /// Every path this CPU runs, the portable one first (the tests compare them).
    #[cfg(test)]
    fn all_supported() -> Vec<DotsPath> {
        #[allow(unused_mut)]
        let mut paths = vec![DotsPath::Portable];
        #[cfg(target_arch = "x86_64")]
        paths.extend(x86::Avx512Support::detect().map(DotsPath::Avx512));
        paths
    }
}

/// [`scan`] with the dot products of `path` (the portable one for strides AVX-512 does not
/// cover).
fn bound_candidates(
    quantized: &QuantizedRows,
    query: &QuantizedQuery,
    candidates: &[u32],
    bounds: &mut CandidateBounds,
    path: DotsPath,
) {
    #[cfg(target_arch = "x86_64")]
    match (path, quantized.stride) {
        (DotsPath::Avx512(support), 64) => {
            return x86::scan::<2>(support, quantized, query, candidates, bounds);
        }
        (DotsPath::Avx512(support), 128) => {
            return x86::scan::<4>(support, quantized, query, candidates, bounds);
        }
        _ => {}
    }
    let _ = path;
    scan(
        quantized,
        query,
        candidates,
        bounds,
        |row| quantized.codes(row),
        |block| portable_dots8(quantized, query, block),
    );
}

/// The AVX-512 code dot products: per row, 32 codes at a time sign-extended to `i16`
/// (`vpmovsxbw`) and multiplied into `i32` pairs and summed (`vpmaddwd` + `vpaddd`), exact
/// like the portable path.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m256i, __m512i, _MM_PERM_BADC, _mm256_loadu_si256, _mm512_add_epi32,
        _mm512_castsi512_si256, _mm512_cvtepi8_epi16, _mm512_loadu_si512, _mm512_madd_epi16,
        _mm512_permutexvar_epi32, _mm512_setr_epi32, _mm512_setzero_si512, _mm512_shuffle_epi32,
        _mm512_shuffle_i64x2, _mm512_unpackhi_epi32, _mm512_unpacklo_epi32,
    };

    use wide::i32x8;

    use super::{CandidateBounds, QuantizedQuery, QuantizedRows, ROW_BLOCK};

    /// Codes per `vpmovsxbw` (a 256-bit load widened to 512 bits).
    const CODES_PER_STEP: usize = 32;

    /// Proof that the CPU runs AVX-512F and AVX-512BW; only [`Avx512Support::detect`] makes
    /// one.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) struct Avx512Support(());

    impl Avx512Support {
        /// `Some` when this CPU has AVX-512F and AVX-512BW.
        pub(super) fn detect() -> Option<Self> {
            (std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw"))
            .then_some(Self(()))
        }
    }

    /// A row's codes as `STEPS` runs of 32.
    type CodeSteps<const STEPS: usize> = [[i8; CODES_PER_STEP]; STEPS];

    impl QuantizedRows {
        /// Every row's codes, row `r` at index `r` (the stride must be `32 STEPS`): indexing
        /// it checks one bound per row.
        fn code_steps<const STEPS: usize>(&self) -> &[CodeSteps<STEPS>] {
            assert_eq!(self.stride, CODES_PER_STEP * STEPS);
            let body = &self.storage[self.start..self.start + self.rows * self.stride];
            let (steps, _) = body.as_chunks::<CODES_PER_STEP>();
            let (rows, _) = steps.as_chunks::<STEPS>();
            rows
        }
    }

    /// [`super::scan`] for rows of `32 STEPS` codes (the stride), with AVX-512BW dot
    /// products.
    pub(super) fn scan<const STEPS: usize>(
        _support: Avx512Support,
        quantized: &QuantizedRows,
        query: &QuantizedQuery,
        candidates: &[u32],
        bounds: &mut CandidateBounds,
    ) {
        assert_eq!(quantized.stride, CODES_PER_STEP * STEPS);
        // SAFETY: `_support` proves that the CPU runs AVX-512F and AVX-512BW.
        unsafe { scan_avx512::<STEPS>(quantized, query, candidates, bounds) }
    }

    /// See [`scan`].
    ///
    /// # Safety
    ///
    /// The CPU must support AVX-512F and AVX-512BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn scan_avx512<const STEPS: usize>(
        quantized: &QuantizedRows,
        query: &QuantizedQuery,
        candidates: &[u32],
        bounds: &mut CandidateBounds,
    ) {
        let query_steps = query_steps::<STEPS>(query);
        let rows = quantized.code_steps::<STEPS>();
        super::scan(
            quantized,
            query,
            candidates,
            bounds,
            |row| rows[row].as_slice(),
            |block| dots8(rows, &query_steps, block),
        );
    }

    /// The query codes as `STEPS` vectors of 32 `i16`.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn query_steps<const STEPS: usize>(query: &QuantizedQuery) -> [__m512i; STEPS] {
        let (pairs, _) = query.lanes.as_chunks::<2>();
        let Some(pairs) = pairs.first_chunk::<STEPS>() else {
            panic!("the query lanes do not cover the stride");
        };
        // SAFETY: each pair is two `i16x16`, 64 contiguous bytes: the size of the unaligned
        // load.
        pairs.map(|pair| unsafe { _mm512_loadu_si512(pair.as_ptr().cast()) })
    }

    /// One step of a row's codes (32 bytes) sign-extended to 32 `i16`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn widen(step: &[i8; CODES_PER_STEP]) -> __m512i {
        // SAFETY: `step` is 32 bytes: the size of the unaligned load.
        _mm512_cvtepi8_epi16(unsafe { _mm256_loadu_si256(step.as_ptr().cast()) })
    }

    /// Sixteen `i32` lanes whose sum is the exact dot product of one row's codes with the
    /// query's.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn row_dot<const STEPS: usize>(codes: &CodeSteps<STEPS>, query: &[__m512i; STEPS]) -> __m512i {
        let mut sum = _mm512_setzero_si512();
        for (step, query) in codes.iter().zip(query) {
            // |c q| <= 127 * 32767: each pair sum is exact in i32, and so is the total (the
            // query step is chosen so that no sum of a row can overflow).
            sum = _mm512_add_epi32(sum, _mm512_madd_epi16(widen(step), *query));
        }
        sum
    }

    /// The exact code dot products of the eight rows of `block`, lane `r` for row `block[r]`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn dots8<const STEPS: usize>(
        rows: &[CodeSteps<STEPS>],
        query: &[__m512i; STEPS],
        block: &[u32; ROW_BLOCK],
    ) -> i32x8 {
        let dot = |r: usize| row_dot(&rows[block[r] as usize], query);
        let sums = eight_lanes!(dot);
        bytemuck::cast::<__m256i, i32x8>(sum_lanes_x8(sums))
    }

    /// The dot products of `block` on the AVX-512 path `path`, or `None` for the portable
    /// path or a stride the AVX-512 paths do not cover.
    #[cfg(test)]
    pub(super) fn block_dots(
        path: super::DotsPath,
        quantized: &QuantizedRows,
        query: &QuantizedQuery,
        block: &[u32; ROW_BLOCK],
    ) -> Option<i32x8> {
        use super::DotsPath;
        // SAFETY: the `Avx512` path's token proves that the CPU runs AVX-512F and AVX-512BW.
        unsafe {
            match (path, quantized.stride) {
                (DotsPath::Avx512(_), 64) => Some(dots8(
                    quantized.code_steps(),
                    &query_steps::<2>(query),
                    block,
                )),
                (DotsPath::Avx512(_), 128) => Some(dots8(
                    quantized.code_steps(),
                    &query_steps::<4>(query),
                    block,
                )),
                _ => None,
            }
        }
    }

    /// Lane `r` (of eight): the sum of the sixteen lanes of `sums[r]` (integer additions,
    /// exact in any order).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn sum_lanes_x8(sums: [__m512i; ROW_BLOCK]) -> __m256i {
        // Two rows per vector, eight partial sums each: a's in the low half, b's in the high.
        let halves = |a, b| {
            _mm512_add_epi32(
                _mm512_shuffle_i64x2::<0x44>(a, b),
                _mm512_shuffle_i64x2::<0xEE>(a, b),
            )
        };
        // Four rows per vector (two pairs), four partial sums each, one row per 128 bits.
        let quarters = |ab, cd| {
            _mm512_add_epi32(
                _mm512_shuffle_i64x2::<0x88>(ab, cd),
                _mm512_shuffle_i64x2::<0xDD>(ab, cd),
            )
        };
        let [s0, s1, s2, s3, s4, s5, s6, s7] = sums;
        let low = quarters(halves(s0, s1), halves(s2, s3)); // rows 0..4, one per 128 bits
        let high = quarters(halves(s4, s5), halves(s6, s7)); // rows 4..8
        // In 128-bit block j: [j0 + j2, (j+4)0 + (j+4)2, j1 + j3, (j+4)1 + (j+4)3].
        let pairs = _mm512_add_epi32(
            _mm512_unpacklo_epi32(low, high),
            _mm512_unpackhi_epi32(low, high),
        );
        // Lanes 0 and 1 of block j: the sums of rows j and j + 4.
        let totals = _mm512_add_epi32(pairs, _mm512_shuffle_epi32::<_MM_PERM_BADC>(pairs));
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
        _mm512_castsi512_si256(_mm512_permutexvar_epi32(order, totals))
    }
}

/// Candidates whose lower bound is sampled to find a threshold below the k-th largest lower
/// bound (lists of fewer than twice as many candidates are not sampled).
const THRESHOLD_SAMPLE: usize = 128;

/// Splits the list at `L`, the k-th largest lower bound (`bounds`, from [`scan`]; `k` must be
/// below the list length): into `sure` go the candidates whose lower bound reaches `L` (at
/// least `k`), into `doubtful` those below it whose upper bound reaches it, both in list
/// order; the others cannot be in the top k.
///
/// `L` is found without selecting among all the bounds: a threshold `T` is read off a sample
/// of the lower bounds (a rank with some margin over where `L` is expected) and accepted once
/// at least `k` lower bounds of the whole list reach it, which proves `T <= L` (else the rank
/// doubles, down to `T = -inf`). The positions of the candidates whose upper bound reaches
/// `T` (a superset of those reaching `L`, holding every lower bound `>= T`, so at least `k`)
/// are collected without a branch, `L` is selected among their lower bounds alone, and they
/// are split at `L`.
#[allow(clippy::too_many_arguments)]
fn split_at_kth_lower(
    candidates: &[u32],
    bounds: &CandidateBounds,
    k: usize,
    positions: &mut Vec<u32>,
    lowers: &mut Vec<u32>,
    sure: &mut Vec<OpenCandidate>,
    doubtful: &mut Vec<OpenCandidate>,
) {
    let count = candidates.len();
    let (lower, upper) = (&bounds.lower[..count], &bounds.upper[..count]);
    // A threshold `T <= L`: the sample's (rank + 1)-th largest lower bound once at least `k`
    // lower bounds of the list reach it, or `-inf`.
    let mut threshold = f32::NEG_INFINITY;
    let sample_stride = count / THRESHOLD_SAMPLE;
    if sample_stride >= 2 {
        lowers.clear();
        lowers.extend(
            lower
                .iter()
                .step_by(sample_stride)
                .map(|&l| descending_key(l)),
        );
        let expected = (k * lowers.len()) as f64 / count as f64;
        let mut rank = (expected + 2.0 * expected.sqrt() + 2.0).ceil() as usize;
        while rank < lowers.len() {
            let (_, key, _) = lowers.select_nth_unstable(rank);
            let sampled = score_of_descending_key(*key);
            // `may_enter` for bounds, which are never NaN; spelled so that the count
            // vectorizes (a pass of its own is cheaper than counting while collecting).
            let reaching: usize = lower.iter().map(|&l| usize::from(l >= sampled)).sum();
            if reaching >= k {
                threshold = sampled;
                break;
            }
            rank = 2 * rank + 1;
        }
    }
    // Grown, never shrunk: only the first `reached` positions are meaningful.
    if positions.len() < count {
        positions.resize(count, 0);
    }
    let mut reached = 0;
    for (position, &bound) in upper.iter().enumerate() {
        positions[reached] = position as u32;
        reached += usize::from(may_enter(bound, threshold));
    }
    let positions = &positions[..reached];
    lowers.clear();
    lowers.extend(
        positions
            .iter()
            .map(|&position| descending_key(lower[position as usize])),
    );
    // At least k were collected (see above); the guard keeps the answer exact regardless.
    let kth_lower = if lowers.len() >= k {
        // The k-th smallest key: the k-th largest lower bound.
        let (_, worst, _) = lowers.select_nth_unstable(k - 1);
        score_of_descending_key(*worst)
    } else {
        f32::NEG_INFINITY
    };
    // The sure ones are compacted without a branch (whether a candidate is sure is a coin
    // toss near `L`); the doubtful ones are few.
    sure.clear();
    sure.resize(reached, OpenCandidate::default());
    doubtful.clear();
    let mut sure_count = 0;
    for &position in positions {
        let position = position as usize;
        let candidate = OpenCandidate {
            row: candidates[position],
            lower: lower[position],
            upper: upper[position],
        };
        sure[sure_count] = candidate;
        let is_sure = may_enter(candidate.lower, kth_lower);
        sure_count += usize::from(is_sure);
        if !is_sure && may_enter(candidate.upper, kth_lower) {
            doubtful.push(candidate);
        }
    }
    sure.truncate(sure_count);
}

/// The best `k` candidate rows for `query`, best first, into `out`: exactly what
/// [`candidates_topk`] returns (same items, same scores bit for bit, same order), computed by
/// scoring `quantized` (which must have been built from `m`) and rescoring with the f32
/// kernel only the candidates the error bound cannot rule out (see the module docs).
///
/// Errors as [`candidates_topk`], plus [`KernelError::QuantizedMismatch`] when `quantized`
/// was not built from `m`.
pub fn quantized_candidates_topk(
    m: RowMatrix<'_>,
    quantized: &QuantizedRows,
    query: &[f32],
    candidates: &[u32],
    k: usize,
    scratch: &mut TopKScratch,
    out: &mut Vec<ScoredItem>,
) -> Result<QuantizedPass, KernelError> {
    let dots_path = DotsPath::detect();
    quantized_candidates_topk_on(m, quantized, query, candidates, k, scratch, out, dots_path)
}

/// [`quantized_candidates_topk`] with the code dot products computed by `dots_path` (every
/// path gives the same answer; the tests run each).
#[allow(clippy::too_many_arguments)]
fn quantized_candidates_topk_on(
    m: RowMatrix<'_>,
    quantized: &QuantizedRows,
    query: &[f32],
    candidates: &[u32],
    k: usize,
    scratch: &mut TopKScratch,
    out: &mut Vec<ScoredItem>,
    dots_path: DotsPath,
) -> Result<QuantizedPass, KernelError> {
    check_k(k)?;
    check_query(m.dim(), query, 0)?;
    check_candidates(m.rows(), candidates)?;
    quantized.check_source(m)?;
    if k >= candidates.len()
        || !quantized.finite
        || !scratch
            .quantized
            .query
            .prepare(query, quantized.max_abs, quantized.stride)
    {
        candidates_topk(m, query, candidates, k, scratch, out)?;
        return Ok(QuantizedPass {
            rescored: candidates.len(),
            pruned: false,
        });
    }
    let QuantizedScratch {
        query: codes,
        bounds,
        positions,
        lowers,
        open,
        doubtful,
        keys,
    } = &mut scratch.quantized;
    bound_candidates(quantized, codes, candidates, bounds, dots_path);
    split_at_kth_lower(candidates, bounds, k, positions, lowers, open, doubtful);
    for candidate in open.iter().chain(doubtful.iter()) {
        prefetch_l2(m.row(candidate.row as usize));
    }
    // Exact rescoring with the f32 kernel's recipe: the sure candidates first.
    scratch.query.prepare(query);
    let exact = &scratch.query;
    let kept = &mut scratch.kept;
    kept.clear();
    rescore(m, exact, open, kept);
    // At least k candidates (every sure one) score `sure_minimum` or more, so the k-th best
    // exact score is at least that: a doubtful candidate whose upper bound is below it
    // cannot be in the top k. (There are always k sure ones; the guard keeps the answer
    // exact even if there were not.)
    let sure_minimum = match kept.len() >= k {
        true => kept
            .iter()
            .fold(f32::INFINITY, |low, item| low.min(item.score)),
        false => f32::NEG_INFINITY,
    };
    doubtful.retain(|candidate| may_enter(candidate.upper, sure_minimum));
    rescore(m, exact, doubtful, kept);
    write_best_sorted(kept, k, keys, out);
    Ok(QuantizedPass {
        rescored: kept.len(),
        pruned: true,
    })
}

/// Appends the exact scores of `candidates` (the f32 kernel's recipe, eight rows at a time)
/// to `kept`.
fn rescore(
    m: RowMatrix<'_>,
    exact: &PreparedQuery,
    candidates: &[OpenCandidate],
    kept: &mut Vec<ScoredItem>,
) {
    let (blocks, rest) = candidates.as_chunks::<ROW_BLOCK>();
    for block in blocks {
        let scores = score_rows8(
            block.map(|candidate| m.row_extended(candidate.row as usize)),
            exact,
        )
        .to_array();
        kept.extend(
            block
                .iter()
                .zip(scores)
                .map(|(candidate, score)| ScoredItem::new(candidate.row, score)),
        );
    }
    kept.extend(rest.iter().map(|candidate| {
        ScoredItem::new(
            candidate.row,
            score_row(m.row_extended(candidate.row as usize), exact),
        )
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{integer_rows, random_rows, random_vec};
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Kinds of rows that stress the quantization.
    #[derive(Debug, Clone, Copy)]
    enum RowKind {
        /// Uniform in [-1, 1).
        Uniform,
        /// Small integers (exact ties).
        Integer,
        /// One huge element, the rest small: the small ones all quantize to zero.
        Spike,
        /// Elements just below a half step: maximal quantization error, all of one sign.
        HalfSteps,
        /// Magnitudes near the smallest floats (power-of-two scales, subnormals).
        Tiny,
        /// All zeros.
        Zero,
        /// One magnitude, signs of the `±1` query shape (or its opposite), a few flipped:
        /// codes of ±127 against query codes of ±32767, the largest dot products.
        Extreme,
    }

    fn row_of(kind: RowKind, rng: &mut ChaCha8Rng, dim: usize) -> Vec<f32> {
        match kind {
            RowKind::Uniform => (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
            RowKind::Integer => (0..dim)
                .map(|_| f32::from(rng.random_range(-4i8..=4)))
                .collect(),
            RowKind::Spike => {
                let mut row: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                row[rng.random_range(0..dim)] = rng.random_range(-1.0e6f32..1.0e6);
                row
            }
            RowKind::HalfSteps => {
                let scale = rng.random_range(0.01f32..100.0);
                let mut row: Vec<f32> = (0..dim)
                    .map(|_| {
                        let level = f32::from(rng.random_range(0i8..126));
                        scale * (level + 0.499_99)
                    })
                    .collect();
                row[0] = scale * 127.0;
                row
            }
            RowKind::Tiny => (0..dim)
                .map(|_| {
                    rng.random_range(-1.0f32..1.0) * f32::from_bits(rng.random_range(1..(40 << 23)))
                })
                .collect(),
            RowKind::Zero => vec![0.0; dim],
            RowKind::Extreme => {
                let scale = rng.random_range(0.01f32..100.0)
                    * if rng.random_bool(0.5) { 1.0 } else { -1.0 };
                (0..dim)
                    .map(|i| {
                        let sign = if i % 3 == 0 { -1.0 } else { 1.0 };
                        let flip = if rng.random_range(0..8) == 0 {
                            -1.0
                        } else {
                            1.0
                        };
                        scale * sign * flip
                    })
                    .collect()
            }
        }
    }

    const KINDS: [RowKind; 7] = [
        RowKind::Uniform,
        RowKind::Integer,
        RowKind::Spike,
        RowKind::HalfSteps,
        RowKind::Tiny,
        RowKind::Zero,
        RowKind::Extreme,
    ];

    /// `rows` rows of dimension `dim` at stride `stride`, each of a kind drawn from `mix`
    /// (a bit set over [`KINDS`]), some duplicated; NaN padding.
    fn mixed_rows(seed: u64, rows: usize, dim: usize, stride: usize, mix: u8) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let kinds: Vec<RowKind> = KINDS
            .iter()
            .enumerate()
            .filter(|(bit, _)| mix & (1 << bit) != 0)
            .map(|(_, kind)| *kind)
            .collect();
        let kinds = if kinds.is_empty() {
            vec![RowKind::Uniform]
        } else {
            kinds
        };
        let mut data = vec![f32::NAN; rows * stride];
        let mut previous: Option<Vec<f32>> = None;
        for chunk in data.chunks_mut(stride).take(rows) {
            let row = match (&previous, rng.random_range(0..8)) {
                (Some(previous), 0) => previous.clone(),
                _ => row_of(kinds[rng.random_range(0..kinds.len())], &mut rng, dim),
            };
            chunk[..dim].copy_from_slice(&row);
            previous = Some(row);
        }
        data
    }

    /// A query of one of several shapes: uniform, integer, signs of one row (aligned with
    /// its quantization errors), spiky, tiny.
    fn query_of(seed: u64, dim: usize, shape: u8) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        match shape % 5 {
            0 => random_vec(seed, dim),
            1 => (0..dim)
                .map(|_| f32::from(rng.random_range(-3i8..=3)))
                .collect(),
            2 => (0..dim)
                .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
                .collect(),
            3 => {
                let mut q = random_vec(seed, dim);
                q[rng.random_range(0..dim)] = 1.0e5;
                q
            }
            _ => random_vec(seed, dim).iter().map(|x| x * 1.0e-20).collect(),
        }
    }

    /// Checks the quantized kernel against the f32 kernel, bit for bit.
    fn check_same_answer(
        m: RowMatrix<'_>,
        quantized: &QuantizedRows,
        query: &[f32],
        candidates: &[u32],
        k: usize,
    ) -> Result<QuantizedPass, TestCaseError> {
        let mut expected = Vec::new();
        candidates_topk(
            m,
            query,
            candidates,
            k,
            &mut TopKScratch::new(),
            &mut expected,
        )
        .unwrap();
        let mut passes = Vec::new();
        for path in DotsPath::all_supported() {
            let mut got = Vec::new();
            let pass = quantized_candidates_topk_on(
                m,
                quantized,
                query,
                candidates,
                k,
                &mut TopKScratch::new(),
                &mut got,
                path,
            )
            .unwrap();
            prop_assert_eq!(got.len(), expected.len());
            for (g, e) in got.iter().zip(&expected) {
                prop_assert_eq!(g.index, e.index);
                prop_assert_eq!(g.score.to_bits(), e.score.to_bits());
            }
            passes.push(pass);
        }
        // The paths compute the same integers, so they prune the same candidates.
        for pass in &passes {
            prop_assert_eq!(*pass, passes[0]);
        }
        Ok(passes[0])
    }

    /// Checks the dot products of every AVX-512 path this CPU runs (BW), for every
    /// block of `rows`, against the portable ones and a plain `i64` sum (true when an
    /// AVX-512 path covered this stride on this CPU).
    #[cfg(target_arch = "x86_64")]
    fn check_avx512_dots(
        quantized: &QuantizedRows,
        query: &QuantizedQuery,
        rows: &[u32],
    ) -> Result<bool, TestCaseError> {
        let mut covered = false;
        for path in DotsPath::all_supported() {
            for block in rows.as_chunks::<ROW_BLOCK>().0 {
                let portable = portable_dots8(quantized, query, block);
                let Some(avx512) = x86::block_dots(path, quantized, query, block) else {
                    break;
                };
                prop_assert_eq!(
                    avx512.to_array(),
                    portable.to_array(),
                    "{:?}, rows {:?}",
                    path,
                    block
                );
                // And both equal the plain integer sum.
                for (lane, &row) in block.iter().enumerate() {
                    let exact: i64 = quantized
                        .codes(row as usize)
                        .iter()
                        .zip(query.lanes.iter().flat_map(|lane| lane.to_array()))
                        .map(|(&c, q)| i64::from(c) * i64::from(q))
                        .sum();
                    prop_assert_eq!(i64::from(portable.to_array()[lane]), exact);
                }
                covered = true;
            }
        }
        Ok(covered)
    }

    /// Checks `lower <= exact <= upper` for every row.
    fn check_bounds(
        m: RowMatrix<'_>,
        quantized: &QuantizedRows,
        query: &[f32],
    ) -> Result<bool, TestCaseError> {
        let mut codes = QuantizedQuery::default();
        if !codes.prepare(query, quantized.max_abs, quantized.stride) {
            return Ok(false);
        }
        let mut exact_query = crate::simd::PreparedQuery::default();
        exact_query.prepare(query);
        for row in 0..m.rows() {
            let exact = score_row(m.row_extended(row), &exact_query);
            let (lower, upper) = bounds1(quantized, &codes, row as u32);
            prop_assert!(
                lower <= exact && exact <= upper,
                "row {row}: {lower} <= {exact} <= {upper} fails"
            );
        }
        Ok(true)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn same_answer_as_the_f32_kernel(
            rows in 1usize..300,
            dim in 1usize..150,
            pad in 0usize..9,
            mix in any::<u8>(),
            shape in any::<u8>(),
            count in 0usize..400,
            k in 1usize..40,
            seed in any::<u64>(),
        ) {
            let stride = dim + pad;
            let data = mixed_rows(seed, rows, dim, stride, mix);
            let m = RowMatrix::new(&data, rows, dim, stride).unwrap();
            let quantized = QuantizedRows::build(m);
            let query = query_of(!seed, dim, shape);
            // With replacement: rows listed twice are scored twice, as the f32 kernel does.
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
            let candidates: Vec<u32> = (0..count).map(|_| rng.random_range(0..rows as u32)).collect();
            check_same_answer(m, &quantized, &query, &candidates, k)?;
            check_bounds(m, &quantized, &query)?;
        }

        #[test]
        fn exact_ties_and_k_beyond_the_list(
            rows in 1usize..120,
            dim in 1usize..20,
            count in 0usize..200,
            k in 1usize..250,
            seed in any::<u64>(),
        ) {
            let data = integer_rows(seed, rows, dim, dim);
            let m = RowMatrix::dense(&data, dim).unwrap();
            let quantized = QuantizedRows::build(m);
            let query = integer_rows(!seed, 1, dim, dim);
            let candidates: Vec<u32> = (0..count).map(|i| ((seed as usize).wrapping_add(i * 31) % rows) as u32).collect();
            let pass = check_same_answer(m, &quantized, &query, &candidates, k)?;
            if k >= count {
                prop_assert!(!pass.pruned);
            }
        }

        #[test]
        #[cfg(target_arch = "x86_64")]
        fn avx512_dots_equal_the_portable_ones(
            rows in 1usize..40,
            dim in 1usize..160,
            pad in 0usize..9,
            mix in any::<u8>(),
            shape in any::<u8>(),
            seed in any::<u64>(),
        ) {
            let stride = dim + pad;
            let data = mixed_rows(seed, rows, dim, stride, mix);
            let m = RowMatrix::new(&data, rows, dim, stride).unwrap();
            let quantized = QuantizedRows::build(m);
            let mut codes = QuantizedQuery::default();
            if codes.prepare(&query_of(!seed, dim, shape), quantized.max_abs, quantized.stride) {
                // Every row, in a scrambled order, repeated to fill whole blocks.
                let order: Vec<u32> = (0..rows.next_multiple_of(ROW_BLOCK) * 2)
                    .map(|i| ((i * 7 + seed as usize) % rows) as u32)
                    .collect();
                let covered = check_avx512_dots(&quantized, &codes, &order)?;
                if x86::Avx512Support::detect().is_some() {
                    prop_assert_eq!(covered, (33..=128).contains(&dim));
                }
            }
        }

        #[test]
        fn the_bound_holds(
            rows in 1usize..64,
            dim in 1usize..200,
            mix in any::<u8>(),
            shape in any::<u8>(),
            seed in any::<u64>(),
        ) {
            let data = mixed_rows(seed, rows, dim, dim, mix);
            let m = RowMatrix::dense(&data, dim).unwrap();
            let quantized = QuantizedRows::build(m);
            check_bounds(m, &quantized, &query_of(!seed, dim, shape))?;
        }
    }

    /// How many of `candidates` the rule before the exact floor rescored: those whose upper
    /// bound reaches the k-th largest lower bound `L` (computed here from [`bounds1`]).
    fn rescored_by_the_lower_bounds_alone(
        quantized: &QuantizedRows,
        query: &[f32],
        candidates: &[u32],
        k: usize,
    ) -> usize {
        let mut codes = QuantizedQuery::default();
        assert!(codes.prepare(query, quantized.max_abs, quantized.stride));
        let bounds: Vec<(f32, f32)> = candidates
            .iter()
            .map(|&row| bounds1(quantized, &codes, row))
            .collect();
        let mut lowers: Vec<f32> = bounds.iter().map(|&(lower, _)| lower).collect();
        lowers.sort_by(|a, b| b.total_cmp(a));
        let threshold = lowers[k - 1];
        bounds
            .iter()
            .filter(|&&(_, upper)| upper >= threshold)
            .count()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Long lists (the sure / doubtful split, the exact floor, several cuts of the lower
        /// bounds) with `k` anywhere up to the list length, on uniform rows or small integer
        /// rows (many exact ties, so that the floor and the threshold are often tied too).
        #[test]
        fn long_lists_any_k_and_ties(
            rows in 50usize..400,
            dim in prop::sample::select(vec![3usize, 16, 64]),
            integer in any::<bool>(),
            count in 1usize..700,
            k_from_end in 0usize..12,
            k_fraction in 0.0f64..1.0,
            near_the_end in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let (data, query) = rows_and_query(integer, seed, rows, dim);
            let m = RowMatrix::dense(&data, dim).unwrap();
            let quantized = QuantizedRows::build(m);
            // Distinct rows first, then repeats (a row listed twice is scored twice).
            let candidates: Vec<u32> = (0..count)
                .map(|i| ((seed as usize).wrapping_add(i * 7) % rows) as u32)
                .collect();
            let k = if near_the_end {
                count.saturating_sub(k_from_end).max(1)
            } else {
                ((count as f64 * k_fraction) as usize).max(1)
            };
            let pass = check_same_answer(m, &quantized, &query, &candidates, k)?;
            if pass.pruned {
                prop_assert!(pass.rescored >= k);
                prop_assert!(
                    pass.rescored
                        <= rescored_by_the_lower_bounds_alone(&quantized, &query, &candidates, k)
                );
            }
        }
    }

    /// Orders of a list that bias a strided sample of it: ascending or descending by some
    /// score, or the best ones exactly at the multiples of the sample stride (so that the
    /// sampled threshold is too high and must be lowered).
    fn biased_order(scores: &[f32], order: u8) -> Vec<usize> {
        let mut by_score: Vec<usize> = (0..scores.len()).collect();
        by_score.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        match order % 4 {
            0 => by_score,
            1 => by_score.into_iter().rev().collect(),
            2 => {
                // Best first at positions 0, stride, 2 stride, ..., the rest after.
                let stride = (scores.len() / THRESHOLD_SAMPLE).max(1);
                let mut placed = vec![usize::MAX; scores.len()];
                let mut best = by_score.iter();
                for slot in placed.iter_mut().step_by(stride) {
                    *slot = *best.next().unwrap();
                }
                for (slot, &row) in placed
                    .iter_mut()
                    .filter(|slot| **slot == usize::MAX)
                    .zip(best)
                {
                    *slot = row;
                }
                placed
            }
            _ => (0..scores.len()).collect(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The split at the k-th largest lower bound equals the one a full sort gives: same
        /// sure and doubtful candidates, in list order, whatever the order of the list (sorted,
        /// reversed, the best at the sample's positions), with ties (bounds on a coarse grid),
        /// short lists (not sampled) and long ones, `k` anywhere below the list length.
        #[test]
        fn the_kth_lower_split_equals_a_full_sort(
            count in 2usize..2000,
            k_fraction in 0.0f64..1.0,
            k_from_end in 1usize..12,
            near_the_end in any::<bool>(),
            coarse in any::<bool>(),
            order in any::<u8>(),
            seed in any::<u64>(),
        ) {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let grid = |x: f32| if coarse { (x * 4.0).round() / 4.0 } else { x };
            let centers: Vec<f32> = (0..count).map(|_| grid(rng.random_range(-3.0f32..3.0))).collect();
            let widths: Vec<f32> = (0..count).map(|_| grid(rng.random_range(0.0f32..0.5))).collect();
            let placed = biased_order(&centers, order);
            let bounds = CandidateBounds {
                lower: placed.iter().map(|&i| centers[i] - widths[i]).collect(),
                upper: placed.iter().map(|&i| centers[i] + widths[i]).collect(),
            };
            let candidates: Vec<u32> = placed.iter().map(|&i| i as u32 * 3 + 1).collect();
            let k = if near_the_end {
                count.saturating_sub(k_from_end).max(1)
            } else {
                ((count as f64 * k_fraction) as usize).clamp(1, count - 1)
            };
            let mut sorted = bounds.lower.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[k - 1];
            let expected_sure: Vec<u32> = (0..count)
                .filter(|&i| bounds.lower[i] >= kth)
                .map(|i| candidates[i])
                .collect();
            let expected_doubtful: Vec<u32> = (0..count)
                .filter(|&i| bounds.lower[i] < kth && bounds.upper[i] >= kth)
                .map(|i| candidates[i])
                .collect();
            let (mut positions, mut lowers, mut sure, mut doubtful) =
                (vec![7; 3], Vec::new(), Vec::new(), vec![OpenCandidate::default(); 5]);
            split_at_kth_lower(&candidates, &bounds, k, &mut positions, &mut lowers, &mut sure, &mut doubtful);
            let rows = |open: &[OpenCandidate]| open.iter().map(|c| c.row).collect::<Vec<u32>>();
            prop_assert!(expected_sure.len() >= k);
            prop_assert_eq!(rows(&sure), expected_sure);
            prop_assert_eq!(rows(&doubtful), expected_doubtful);
        }

        /// Whole lists of a table in orders that bias the sampled threshold (by exact score,
        /// either way, or the best at the sample's positions), long enough to be sampled, on
        /// every dot-product path: the answer is the f32 kernel's.
        #[test]
        fn biased_list_orders_give_the_same_answer(
            rows in 256usize..1200,
            integer in any::<bool>(),
            order in any::<u8>(),
            k_fraction in 0.0f64..1.0,
            k_from_end in 1usize..12,
            near_the_end in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let dim = 64;
            let (data, query) = rows_and_query(integer, seed, rows, dim);
            let m = RowMatrix::dense(&data, dim).unwrap();
            let quantized = QuantizedRows::build(m);
            let mut exact_query = crate::simd::PreparedQuery::default();
            exact_query.prepare(&query);
            let scores: Vec<f32> = (0..rows).map(|row| score_row(m.row_extended(row), &exact_query)).collect();
            let candidates: Vec<u32> = biased_order(&scores, order).into_iter().map(|row| row as u32).collect();
            let k = if near_the_end {
                rows.saturating_sub(k_from_end).max(1)
            } else {
                ((rows as f64 * k_fraction) as usize).max(1)
            };
            let pass = check_same_answer(m, &quantized, &query, &candidates, k)?;
            prop_assert!(pass.pruned);
        }
    }

    #[test]
    fn the_exact_floor_rescores_fewer_than_the_lower_bounds_alone() {
        let (rows, dim) = (4000, 64);
        let data = random_rows(31, rows, dim, dim);
        let m = RowMatrix::dense(&data, dim).unwrap();
        let quantized = QuantizedRows::build(m);
        let candidates: Vec<u32> = (0..1000).map(|i| (i * 37 % rows) as u32).collect();
        let (mut fewer, mut lists) = (0, 0);
        for seed in 0..20 {
            let query = random_vec(100 + seed, dim);
            for k in [10, 100] {
                let pass = check_same_answer(m, &quantized, &query, &candidates, k).unwrap();
                assert!(pass.pruned);
                let before = rescored_by_the_lower_bounds_alone(&quantized, &query, &candidates, k);
                assert!(pass.rescored <= before, "{} > {before}", pass.rescored);
                fewer += usize::from(pass.rescored < before);
                lists += 1;
            }
        }
        // The floor (the smallest exact score of the sure candidates) is above `L` on
        // almost every list: it must rule out some doubtful candidate on most of them.
        assert!(fewer * 2 > lists, "fewer on {fewer} of {lists} lists");
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_dots_at_the_extremes() {
        // Codes of ±127 against query codes of ±32767, all aligned (the largest dot
        // product), all opposed (the smallest), alternating, and single elements at either
        // end of the row, for dimensions around the 32- and 64-code steps.
        for dim in [33, 40, 63, 64, 65, 96, 100, 127, 128] {
            let query: Vec<f32> = (0..dim)
                .map(|i| if i % 5 == 0 { -1.0 } else { 1.0 })
                .collect();
            let mut data = Vec::new();
            for sign in [1.0, -1.0] {
                data.extend(query.iter().map(|q| sign * q * 3.0));
                data.extend((0..dim).map(|i| if i % 2 == 0 { sign } else { -sign }));
                data.extend((0..dim).map(|i| if i == 0 { sign } else { 0.0 }));
                data.extend((0..dim).map(|i| if i == dim - 1 { sign } else { 0.0 }));
            }
            let rows = data.len() / dim;
            let m = RowMatrix::dense(&data, dim).unwrap();
            let quantized = QuantizedRows::build(m);
            let mut codes = QuantizedQuery::default();
            assert!(codes.prepare(&query, quantized.max_abs, quantized.stride));
            let order: Vec<u32> = (0..rows as u32).collect();
            let covered = check_avx512_dots(&quantized, &codes, &order).unwrap();
            assert_eq!(covered, x86::Avx512Support::detect().is_some(), "dim {dim}");
            let largest = i64::from(
                code_dot(quantized.codes(0), &codes.lanes)
                    .to_array()
                    .iter()
                    .sum::<i32>(),
            );
            assert_eq!(largest, 127 * 32767 * dim as i64, "dim {dim}");
        }
    }

    #[test]
    fn rows_quantize_within_half_a_step() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for kind in KINDS {
            for dim in [1, 7, 16, 33, 64, 100] {
                let row = row_of(kind, &mut rng, dim);
                let mut codes = vec![0i8; quantized_stride(dim)];
                let (scale, summary) = quantize_row(&row, &mut codes);
                assert!(summary.finite);
                for (&x, &c) in row.iter().zip(&codes) {
                    let error = (f64::from(x) - f64::from(scale) * f64::from(c)).abs();
                    assert!(
                        error <= f64::from(scale) * 0.5 * (1.0 + 2f64.powi(-14)),
                        "{kind:?}: {x} vs {scale} * {c}"
                    );
                }
                assert!(
                    f64::from(summary.max_abs) <= 127.0 * f64::from(scale) * (1.0 + 2f64.powi(-22))
                );
                assert!(codes[dim..].iter().all(|&c| c == 0));
            }
        }
    }

    #[test]
    fn the_bound_is_needed_in_full() {
        // Query all ones (quantized exactly). Row A's small elements all round down to 0
        // (approx 127, exact 130.43); row B's round up (approx 133, exact 130.0). The true
        // best is A; a bound of half the proven width would rule A out on B's lower bound.
        let dim = 8;
        let a = [127.0, 0.49, 0.49, 0.49, 0.49, 0.49, 0.49, 0.49];
        let b = [127.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.0];
        let data: Vec<f32> = a.iter().chain(&b).copied().collect();
        let m = RowMatrix::dense(&data, dim).unwrap();
        let quantized = QuantizedRows::build(m);
        let query = vec![1.0f32; dim];
        let mut codes = QuantizedQuery::default();
        assert!(codes.prepare(&query, quantized.max_abs, quantized.stride));
        let (a_lower, a_upper) = bounds1(&quantized, &codes, 0);
        let (b_lower, b_upper) = bounds1(&quantized, &codes, 1);
        assert!(a_lower <= 130.43 && 130.43 <= a_upper);
        assert!(b_lower <= 130.0 && 130.0 <= b_upper);
        // Halving the width would put A's upper bound below B's lower bound.
        let half = codes.width / 2.0;
        assert!(127.0 + half < 133.0 - half);
        let mut top = Vec::new();
        let pass = quantized_candidates_topk(
            m,
            &quantized,
            &query,
            &[1, 0],
            1,
            &mut TopKScratch::new(),
            &mut top,
        )
        .unwrap();
        assert!(pass.pruned);
        assert_eq!(top[0].index, 0);
        assert_eq!(pass.rescored, 2);
    }

    #[test]
    fn underflow_is_covered_by_the_floor() {
        // Every product is 2^-150, which the f32 kernel rounds to 0 (ties to even): its score
        // is 0 where the true dot product is 8 * 2^-150. The quantized copy represents the
        // row exactly (scale 2^-149, codes 1), so only the floor η covers the difference.
        let dim = 8;
        let data = vec![f32::from_bits(1); dim];
        let m = RowMatrix::dense(&data, dim).unwrap();
        let quantized = QuantizedRows::build(m);
        let query = vec![0.5f32; dim];
        let mut codes = QuantizedQuery::default();
        assert!(codes.prepare(&query, quantized.max_abs, quantized.stride));
        let (lower, upper) = bounds1(&quantized, &codes, 0);
        let mut exact_query = crate::simd::PreparedQuery::default();
        exact_query.prepare(&query);
        let exact = score_row(m.row_extended(0), &exact_query);
        assert_eq!(exact, 0.0);
        assert!(
            lower <= exact && exact <= upper,
            "{lower} <= {exact} <= {upper}"
        );
        assert!(lower + codes.floor > exact, "the floor is needed here");
    }

    #[test]
    fn prunes_most_of_a_random_list() {
        let (rows, dim) = (4000, 64);
        let data = random_rows(1, rows, dim, dim);
        let m = RowMatrix::dense(&data, dim).unwrap();
        let quantized = QuantizedRows::build(m);
        assert_eq!(quantized.bytes_per_row(), 68);
        let candidates: Vec<u32> = (0..1000).map(|i| (i * 37 % rows) as u32).collect();
        let query = random_vec(2, dim);
        let mut top = Vec::new();
        let pass = quantized_candidates_topk(
            m,
            &quantized,
            &query,
            &candidates,
            10,
            &mut TopKScratch::new(),
            &mut top,
        )
        .unwrap();
        assert!(pass.pruned);
        assert!(pass.rescored < 100, "rescored {}", pass.rescored);
        let mut expected = Vec::new();
        candidates_topk(
            m,
            &query,
            &candidates,
            10,
            &mut TopKScratch::new(),
            &mut expected,
        )
        .unwrap();
        assert_eq!(top, expected);
    }

    #[test]
    fn refuses_a_copy_of_another_matrix_and_falls_back_on_odd_inputs() {
        let data = random_rows(3, 50, 10, 10);
        let other = data.clone();
        let m = RowMatrix::dense(&data, 10).unwrap();
        let mut top = Vec::new();
        let mut scratch = TopKScratch::new();
        // The top of candidates 1, 2 and 3 (row 0 in place of 1 if `rows_0_2_3`).
        let mut run = |m, quantized: &QuantizedRows, query: f32, rows_0_2_3: bool, k| {
            let candidates = if rows_0_2_3 { [0, 2, 3] } else { [1, 2, 3] };
            let query = [query; 10];
            quantized_candidates_topk(m, quantized, &query, &candidates, k, &mut scratch, &mut top)
        };
        let foreign = QuantizedRows::build(RowMatrix::dense(&other, 10).unwrap());
        assert!(matches!(
            run(m, &foreign, 0.5, false, 1),
            Err(KernelError::QuantizedMismatch { .. })
        ));
        let quantized = QuantizedRows::build(m);
        // A zero query, and a table with a NaN: the exact kernel alone.
        assert!(!run(m, &quantized, 0.0, false, 1).unwrap().pruned);
        let mut poisoned = data.clone();
        poisoned[17] = f32::NAN;
        let poisoned_m = RowMatrix::dense(&poisoned, 10).unwrap();
        let poisoned_q = QuantizedRows::build(poisoned_m);
        assert!(!poisoned_q.is_usable());
        assert!(!run(poisoned_m, &poisoned_q, 0.5, true, 1).unwrap().pruned);
        assert_eq!(run(m, &quantized, 0.5, false, 0), Err(KernelError::ZeroK));
        // The same inputs with a usable copy and a real query do prune.
        assert!(run(m, &quantized, 0.5, false, 1).unwrap().pruned);
    }

    #[test]
    fn row_hints_cover_each_row_and_ignore_rows_out_of_range() {
        for dim in [1, 16, 33, 64, 100, 128, 300] {
            for rows in [0, 1, 5] {
                let data: Vec<f32> = (0..rows * dim).map(|i| (i % 7) as f32 - 3.0).collect();
                let quantized = QuantizedRows::build(RowMatrix::dense(&data, dim).unwrap());
                let hints = quantized.row_hints();
                // The hints see every row's codes, the first one on a line boundary (so a
                // hint per 64 bytes of stride covers the row), and every scale.
                assert_eq!(hints.codes.len(), rows * quantized.stride, "dim {dim}");
                assert_eq!(hints.stride as usize, quantized.stride);
                assert_eq!(hints.scales.len(), rows);
                if rows > 0 {
                    assert_eq!(hints.codes.as_ptr().addr() % LINE_BYTES, 0);
                    assert_eq!(hints.codes[..dim], *quantized.codes(0).get(..dim).unwrap());
                }
                // In range or not, a hint never panics.
                for row in (0..rows as u32 + 3).chain([u32::MAX / 2, u32::MAX]) {
                    hints.codes(row);
                    hints.codes_and_scale(row);
                    quantized.prefetch_row(row as usize);
                }
                quantized.prefetch_row(usize::MAX);
            }
        }
    }

    /// Build time of the int8 copy of a 1M x 128 table (BENCHMARKS.md); run with
    /// `cargo test --release -p kernels --lib -- --ignored --nocapture build_time`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn build_time_of_a_large_copy() {
        let (rows, dim) = (1_000_000, 128);
        let data = random_rows(11, rows, dim, dim);
        let m = RowMatrix::dense(&data, dim).unwrap();
        for _ in 0..3 {
            let started = std::time::Instant::now();
            let copy = QuantizedRows::build(m);
            eprintln!(
                "{rows} x {dim}: built in {:.1} ms on {} rayon threads, {} heap bytes",
                started.elapsed().as_secs_f64() * 1e3,
                rayon::current_num_threads(),
                copy.heap_bytes()
            );
        }
    }

    /// `rows` rows of `dim` values and a query, from `seed`: small integers (many exact ties)
    /// when `integer`, else random floats.
    fn rows_and_query(integer: bool, seed: u64, rows: usize, dim: usize) -> (Vec<f32>, Vec<f32>) {
        if integer {
            (
                integer_rows(seed, rows, dim, dim),
                integer_rows(!seed, 1, dim, dim),
            )
        } else {
            (random_rows(seed, rows, dim, dim), random_vec(!seed, dim))
        }
    }

    /// Columns of the T1-shape table.
    const T1_DIM: usize = 64;

    /// The T1 shape: the rows of a 100 000 x [`T1_DIM`] table (seed 21), 64 lists of 1000
    /// distinct random rows (seed 22) and a query (seed 23).
    fn t1_shape() -> (Vec<f32>, Vec<Vec<u32>>, Vec<f32>) {
        let rows = 100_000;
        let data = random_rows(21, rows, T1_DIM, T1_DIM);
        let mut rng = ChaCha8Rng::seed_from_u64(22);
        let mut all: Vec<u32> = (0..rows as u32).collect();
        let lists = (0..64)
            .map(|_| {
                let (chosen, _) =
                    rand::seq::SliceRandom::partial_shuffle(&mut all[..], &mut rng, 1000);
                chosen.to_vec()
            })
            .collect();
        (data, lists, random_vec(23, T1_DIM))
    }

    /// The T1 shape for instruction counts (BENCHMARKS.md): 1000 distinct random rows of a
    /// 100 000 x 64 table, top `k`, 64 lists scored 20 times each. Run under callgrind with
    /// `--toggle-collect='*quantized_candidates_topk*'` on the release test binary, with
    /// `-- --ignored --exact quantized::tests::t1_shape_probe` (k = 10) or
    /// `quantized::tests::t1_shape_probe_k100` (k = 100, the engine's default pool, what T1
    /// runs); divide by 1280 lists.
    fn probe_t1_shape(k: usize) {
        let repeats = 20;
        let (data, lists, query) = t1_shape();
        let m = RowMatrix::dense(&data, T1_DIM).unwrap();
        let quantized = QuantizedRows::build(m);
        let (mut scratch, mut top) = (TopKScratch::new(), Vec::new());
        let mut rescored = 0;
        for _ in 0..repeats {
            for list in &lists {
                let pass = quantized_candidates_topk(
                    m,
                    &quantized,
                    &query,
                    list,
                    k,
                    &mut scratch,
                    &mut top,
                )
                .unwrap();
                rescored += pass.rescored;
            }
        }
        println!(
            "k = {k}: {:.1} rescored per list",
            rescored as f64 / (lists.len() * repeats) as f64
        );
    }

    #[test]
    #[ignore = "a measurement, not a check"]
    fn t1_shape_probe() {
        probe_t1_shape(10);
    }

    #[test]
    #[ignore = "a measurement, not a check"]
    fn t1_shape_probe_k100() {
        probe_t1_shape(100);
    }

    /// Where the T1-shape call waits (BENCHMARKS.md, `vnni`): median wall time at k = 100 of
    /// the whole call, of the scan and the selection of the open candidates, and of the scan
    /// alone, on each dot-product path, with the rows hot (one list repeated), in L3 (64
    /// lists cycled), L2-resident int8 rows with everything else evicted (the server: the id
    /// lookups load the int8 rows just before), and everything evicted. Run with
    /// `cargo test --release -p kernels --lib -- --ignored --nocapture where_the_t1_call_waits`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn where_the_t1_call_waits() {
        let k = 100;
        let (data, lists, query) = t1_shape();
        let m = RowMatrix::dense(&data, T1_DIM).unwrap();
        let quantized = QuantizedRows::build(m);
        let mut evictor = vec![0u64; 64 << 17]; // 64 MiB, twice the L3
        let mut evict = |round: u64| {
            for line in evictor.chunks_mut(8) {
                line[0] = line[0].wrapping_add(round);
            }
            std::hint::black_box(&evictor);
        };
        let (mut scratch, mut top) = (TopKScratch::new(), Vec::new());
        let paths = DotsPath::all_supported();
        for mode in ["hot", "l3-cycled", "int8-in-l2", "cold"] {
            for &path in &paths {
                let mut line = format!("{mode:>10} {path:?}:");
                for phase in ["call", "scan+select", "scan"] {
                    let mut times = Vec::new();
                    for round in 0..300u64 {
                        let list = match mode {
                            "hot" => &lists[0],
                            _ => &lists[round as usize % lists.len()],
                        };
                        if mode == "int8-in-l2" || mode == "cold" {
                            evict(round);
                        }
                        if mode == "int8-in-l2" {
                            let mut touched = 0i32;
                            for &row in list {
                                touched += i32::from(quantized.codes(row as usize)[0]);
                                touched += quantized.scales[row as usize] as i32;
                            }
                            std::hint::black_box(touched);
                        }
                        let started = std::time::Instant::now();
                        if phase == "call" {
                            quantized_candidates_topk_on(
                                m,
                                &quantized,
                                &query,
                                list,
                                k,
                                &mut scratch,
                                &mut top,
                                path,
                            )
                            .unwrap();
                        } else {
                            let QuantizedScratch {
                                query: codes,
                                bounds,
                                positions,
                                lowers,
                                open,
                                doubtful,
                                ..
                            } = &mut scratch.quantized;
                            assert!(codes.prepare(&query, quantized.max_abs, quantized.stride));
                            bound_candidates(&quantized, codes, list, bounds, path);
                            if phase == "scan+select" {
                                split_at_kth_lower(
                                    list, bounds, k, positions, lowers, open, doubtful,
                                );
                                std::hint::black_box(&open);
                            }
                            std::hint::black_box(&bounds.lower);
                        }
                        times.push(started.elapsed().as_nanos() as u64);
                    }
                    times.sort_unstable();
                    line += &format!(" {phase} {:.2}", times[times.len() / 2] as f64 / 1e3,);
                }
                println!("{line} (median us)");
            }
        }
    }

    #[test]
    fn large_copies_are_built_in_parallel_the_same_way() {
        let (rows, dim) = (ROWS_PER_TASK * 3 + 17, 100);
        let data = random_rows(9, rows, dim, 112);
        let m = RowMatrix::new(&data, rows, dim, 112).unwrap();
        assert!(rows * dim >= PARALLEL_MIN_ELEMENTS);
        let parallel = QuantizedRows::build(m);
        for row in [0, 1, ROWS_PER_TASK - 1, ROWS_PER_TASK, rows - 1] {
            let mut codes = vec![0i8; quantized_stride(dim)];
            let (scale, _) = quantize_row(m.row(row), &mut codes);
            assert_eq!(parallel.codes(row), codes.as_slice());
            assert_eq!(parallel.scales[row].to_bits(), scale.to_bits());
            assert_eq!(parallel.codes(row).as_ptr().addr() % LINE_BYTES, 0);
        }
    }
}
