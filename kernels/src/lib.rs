//! Scoring kernels: scalar reference and SIMD dot products, fused top-k scans, batched scoring.
//!
//! # Overview
//!
//! fairrank scores items by the dot product of an item embedding (a row of a table) with a
//! user or query embedding. This crate holds every way of doing that, fast:
//!
//! | kernel | use | bound by |
//! |---|---|---|
//! | [`dot`] | one pair of vectors | latency |
//! | [`scan_topk`] / [`par_scan_topk`] | one query over the whole table | memory bandwidth |
//! | [`score_candidates`] / [`candidates_topk`] | one query over a candidate list | memory latency |
//! | [`quantized_candidates_topk`] | one query over a candidate list, pruned on an int8 copy ([`QuantizedRows`], one cache line per row at dimension 64) and rescored exactly | memory latency |
//! | [`batch_topk`] | many queries over the whole table | compute (AVX-512 BF16 with exact rescoring, else faer GEMM) |
//!
//! [`scalar`] holds the specification of each kernel, written for clarity; every fast
//! variant is private beside the public entry point and is property-tested against it.
//!
//! # Determinism
//!
//! Every top-k result is ordered by score descending ([`f32::total_cmp`], with -0.0 equal to
//! +0.0) with ties broken by row index ascending, in every path ([`ScoredItem::rank_cmp`]). The scan, parallel scan and candidate kernels share one
//! per-row arithmetic recipe, so they return identical scores bit for bit (and the parallel
//! scan returns exactly what the single-threaded scan returns, whatever the thread count). The
//! batched kernel returns the same on CPUs with AVX-512 BF16 (its bf16 pass only prunes; every
//! kept row is rescored with the scan's recipe); its faer fallback sums in GEMM order, so those
//! scores can differ in the last bits ([`batch_path`] says which path runs). The quantized
//! candidate kernel returns exactly what [`candidates_topk`] returns: its int8 pass only
//! prunes, with a proven error bound, and every candidate it keeps is rescored in f32.
//!
//! # Allocation and memory
//!
//! Hot paths take `&mut` output vectors and scratch ([`TopKScratch`]; per-thread scratch for
//! the parallel kernels) that grow to the largest request seen and are then reused. Large
//! tables held in memory should use [`AlignedRows`] with [`PagePolicy::HugePages`]: scans and
//! random gathers are then markedly faster (see [`PagePolicy`]).
//!
//! # Threads
//!
//! [`par_scan_topk`] and [`batch_topk`] run on the current rayon pool; [`ScoringPool`] makes a
//! dedicated one without the caller depending on rayon. For a single query prefer
//! [`par_scan_topk`] (bandwidth bound); from a few dozen concurrent queries on, [`batch_topk`]
//! is several times faster than scanning them one by one.
//!
//! # Example
//!
//! ```
//! use kernels::{RowMatrix, ScoredItem, TopKScratch, scan_topk};
//!
//! // Three rows of dimension 2, padded to a stride of 4 floats.
//! let data = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0];
//! let table = RowMatrix::new(&data, 3, 2, 4)?;
//! let mut scratch = TopKScratch::new();
//! let mut best = Vec::new();
//! scan_topk(table, &[1.0, 0.5], 2, &mut scratch, &mut best)?;
//! assert_eq!(best, vec![ScoredItem::new(2, 1.5), ScoredItem::new(0, 1.0)]);
//! # Ok::<(), kernels::KernelError>(())
//! ```

mod bandwidth;
mod batch;
mod bf16;
mod candidates;
mod error;
mod matrix;
mod pool;
mod quantized;
pub mod scalar;
mod scan;
mod simd;
mod topk;
mod validate;

#[cfg(test)]
mod testutil;

pub use bandwidth::{measure_read_bandwidth_gbps, par_sum, sum};
pub use batch::{BatchPath, batch_path, batch_topk, batch_topk_using};
pub use candidates::{candidates_topk, score_candidates};
pub use error::KernelError;
pub use matrix::{AlignedRows, MAX_ROWS, PagePolicy, ROW_ALIGN_FLOATS, RowMatrix};
pub use pool::{ScoringPool, current_threads};
pub use quantized::{QuantizedPass, QuantizedRowHints, QuantizedRows, quantized_candidates_topk};
pub use scan::{par_scan_topk, scan_topk};
pub use simd::{dot, prefetch_l2};
pub use topk::{ScoredItem, TopKScratch, sort_ranked};
