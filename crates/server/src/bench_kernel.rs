//! `fairrank bench-kernel`: measures the scoring kernels on a random in-memory table.
//!
//! Everything is measured in the same run on the same table, so the ratios are meaningful:
//! the single-query scan is compared with a plain multi-threaded read of the same bytes (it
//! is memory-bandwidth bound), and the batched kernel with serial scans of the same queries.
//! All timings are the best of `--repeat` runs after one untimed warm-up run (scratch buffers
//! and faer's packing buffers are then allocated, pages resident); compared pairs (scan and
//! read, batch and serial scans) are timed alternately so that both see the same conditions. The machine may be busy:
//! best-of-R filters out interference, it does not hide a slow kernel. The table is backed by
//! transparent huge pages unless `--small-pages` is given (see `kernels::PagePolicy`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kernels::{
    AlignedRows, BatchPath, PagePolicy, RowMatrix, ScoredItem, ScoringPool, TopKScratch,
    batch_path, batch_topk, batch_topk_using, candidates_topk, par_scan_topk, par_sum,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Candidate-list size of the `candidates_ns_per_item` measurement.
const CANDIDATES_PER_REQUEST: usize = 1000;

/// Candidate requests per timed repetition (each with a fresh random list).
const CANDIDATE_REQUESTS: usize = 200;

/// Serial scans actually timed for `batch_speedup_vs_serial` (then extrapolated to `--batch`).
const SERIAL_SUBSET: usize = 8;

/// Arguments of `fairrank bench-kernel`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchKernelArgs {
    /// Rows of the random table.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: usize,
    /// Dimension of rows and queries (rows are padded to 64 bytes).
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    /// Items returned per query.
    #[arg(long, default_value_t = 100)]
    pub k: usize,
    /// Queries scored together by the batched kernel.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Worker threads for the parallel kernels (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed repetitions per measurement (the best is reported).
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// Seed of the random table, queries and candidate lists.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Back the table with ordinary 4 KiB pages instead of transparent huge pages (as a
    /// mapped table file is on kernels whose page cache has no large folios), to see what
    /// huge pages are worth.
    #[arg(long)]
    pub small_pages: bool,
}

impl Default for BenchKernelArgs {
    fn default() -> Self {
        Self {
            rows: 1_000_000,
            dim: 128,
            k: 100,
            batch: 64,
            threads: None,
            repeat: 5,
            seed: 42,
            small_pages: false,
        }
    }
}

/// Runs the kernel benchmark and returns `(name, value)` pairs, in the order below. It first
/// prints `batch_path: NAME` (`bf16-rescore` or `faer`, see `kernels::batch_path`): the path
/// the batched figures measure.
///
/// - `scan_ms`: one query over the whole table with `par_scan_topk` (best of R).
/// - `scan_gbps`: table bytes (rows x padded stride x 4) / scan time, in GB/s (1e9 B/s).
/// - `read_gbps`: STREAM-like read of the same table buffer: a SIMD sum split over the same
///   threads (`kernels::par_sum`), best of R. The table (512 MB by default) is far larger than
///   the last-level cache, so this is the DRAM read bandwidth available to the scan.
/// - `scan_bandwidth_ratio`: `scan_gbps / read_gbps`.
/// - `batch_ms`: `batch_topk` of `--batch` queries over the whole table (best of R).
/// - `batch_gflops`: `2 * rows * dim * batch / batch time`, in GFLOP/s.
/// - `batch_speedup_vs_serial`: time of `--batch` serial `par_scan_topk` calls / batch time.
///   The serial time is extrapolated: only the first `min(8, batch)` queries are scanned (the
///   time of one scan does not depend on the query), and their mean time is multiplied by
///   `--batch`.
/// - `candidates_ns_per_item`: `candidates_topk` over 1000 random distinct rows (fewer if the
///   table is smaller), `k = min(K, 100)`, on one thread, in nanoseconds per candidate; every
///   request uses a fresh list, so rows come from DRAM as they would in a server.
/// - `batch_faer_ms` (only when the batched path is not faer): the same batch on the faer
///   path, for comparison (best of R).
pub fn run(args: &BenchKernelArgs) -> Result<Vec<(&'static str, f64)>> {
    ensure!(args.rows > 0, "--rows must be positive");
    ensure!(args.dim > 0, "--dim must be positive");
    ensure!(args.k > 0, "--k must be positive");
    ensure!(args.batch > 0, "--batch must be positive");
    ensure!(args.repeat > 0, "--repeat must be positive");
    let pool = ScoringPool::new(args.threads.unwrap_or(0)).context("building the thread pool")?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let pages = match args.small_pages {
        true => PagePolicy::Standard,
        false => PagePolicy::HugePages,
    };
    let table = random_rows(&mut rng, args.rows, args.dim, pages)?;
    let queries = random_rows(&mut rng, args.batch, args.dim, PagePolicy::Standard)?;
    let table_view = table.as_matrix();
    let query_view = queries.as_matrix();
    let table_bytes = std::mem::size_of_val(table.as_padded_slice()) as f64;

    // One query over the whole table on all threads, interleaved with a plain read of the
    // same bytes on the same threads, so that both see the same machine conditions.
    let mut top = Vec::with_capacity(args.k);
    let mut next_query = 0;
    let (read, scan) = best_times_interleaved(
        args.repeat,
        || {
            std::hint::black_box(pool.install(|| par_sum(table.as_padded_slice())));
            Ok(())
        },
        || {
            let query = query_view.row(next_query % args.batch);
            next_query += 1;
            pool.install(|| par_scan_topk(table_view, query, args.k, &mut top))?;
            std::hint::black_box(&top);
            Ok(())
        },
    )?;
    let read_gbps = table_bytes / read.as_secs_f64() / 1e9;
    let scan_gbps = table_bytes / scan.as_secs_f64() / 1e9;

    // Many queries at once, interleaved with the same queries scanned one after another (a
    // subset, extrapolated; see the doc comment).
    let mut answers: Vec<Vec<ScoredItem>> = Vec::with_capacity(args.batch);
    let subset = args.batch.min(SERIAL_SUBSET);
    let (batch, serial_subset) = best_times_interleaved(
        args.repeat,
        || {
            pool.install(|| batch_topk(table_view, query_view, args.k, &mut answers))?;
            std::hint::black_box(&answers);
            Ok(())
        },
        || {
            for q in 0..subset {
                pool.install(|| par_scan_topk(table_view, query_view.row(q), args.k, &mut top))?;
                std::hint::black_box(&top);
            }
            Ok(())
        },
    )?;
    let path = batch_path(args.dim);
    println!("batch_path: {path}");
    let faer = match path {
        BatchPath::Faer => None,
        _ => Some(best_time(args.repeat, || {
            pool.install(|| {
                batch_topk_using(
                    BatchPath::Faer,
                    table_view,
                    query_view,
                    args.k,
                    &mut answers,
                )
            })?;
            std::hint::black_box(&answers);
            Ok(())
        })?),
    };
    let flops = 2.0 * args.rows as f64 * args.dim as f64 * args.batch as f64;
    let serial = serial_subset.as_secs_f64() / subset as f64 * args.batch as f64;

    let candidates_ns = candidates_ns_per_item(args, table_view, query_view, &mut rng)?;

    let mut figures = vec![
        ("scan_ms", scan.as_secs_f64() * 1e3),
        ("scan_gbps", scan_gbps),
        ("read_gbps", read_gbps),
        ("scan_bandwidth_ratio", scan_gbps / read_gbps),
        ("batch_ms", batch.as_secs_f64() * 1e3),
        ("batch_gflops", flops / batch.as_secs_f64() / 1e9),
        ("batch_speedup_vs_serial", serial / batch.as_secs_f64()),
        ("candidates_ns_per_item", candidates_ns),
    ];
    if let Some(faer) = faer {
        figures.push(("batch_faer_ms", faer.as_secs_f64() * 1e3));
    }
    Ok(figures)
}

/// Single-threaded `candidates_topk` over fresh random candidate lists, ns per candidate.
fn candidates_ns_per_item(
    args: &BenchKernelArgs,
    table: RowMatrix<'_>,
    queries: RowMatrix<'_>,
    rng: &mut ChaCha8Rng,
) -> Result<f64> {
    let per_request = CANDIDATES_PER_REQUEST.min(args.rows);
    let k = args.k.min(100);
    // Lists for the warm-up and every repetition, generated before timing.
    let lists: Vec<Vec<u32>> = (0..CANDIDATE_REQUESTS * (args.repeat + 1))
        .map(|_| {
            rand::seq::index::sample(rng, args.rows, per_request)
                .into_iter()
                .map(|i| i as u32)
                .collect()
        })
        .collect();
    let mut scratch = TopKScratch::with_capacity(k, args.dim);
    let mut top = Vec::with_capacity(k);
    let mut round = 0;
    let time = best_time(args.repeat, || {
        let requests = &lists[round * CANDIDATE_REQUESTS..(round + 1) * CANDIDATE_REQUESTS];
        round += 1;
        for (r, list) in requests.iter().enumerate() {
            let query = queries.row(r % queries.rows());
            candidates_topk(table, query, list, k, &mut scratch, &mut top)?;
            std::hint::black_box(&top);
        }
        Ok(())
    })?;
    Ok(time.as_secs_f64() * 1e9 / (CANDIDATE_REQUESTS * per_request) as f64)
}

/// Runs `first` and `second` once untimed, then alternately `repeat` times each, and returns
/// the fastest run of each.
fn best_times_interleaved(
    repeat: usize,
    mut first: impl FnMut() -> Result<()>,
    mut second: impl FnMut() -> Result<()>,
) -> Result<(Duration, Duration)> {
    first()?;
    second()?;
    let (mut best_first, mut best_second) = (Duration::MAX, Duration::MAX);
    for _ in 0..repeat {
        let start = Instant::now();
        first()?;
        best_first = best_first.min(start.elapsed());
        let start = Instant::now();
        second()?;
        best_second = best_second.min(start.elapsed());
    }
    Ok((best_first, best_second))
}

/// Runs `op` once untimed, then `repeat` times timed, and returns the fastest run.
fn best_time(repeat: usize, mut op: impl FnMut() -> Result<()>) -> Result<Duration> {
    op()?;
    let mut best = Duration::MAX;
    for _ in 0..repeat {
        let start = Instant::now();
        op()?;
        best = best.min(start.elapsed());
    }
    Ok(best)
}

/// A 64-byte aligned, padded matrix of uniform values in [-1, 1); writing every row makes
/// its pages resident before anything is timed.
fn random_rows(
    rng: &mut ChaCha8Rng,
    rows: usize,
    dim: usize,
    pages: PagePolicy,
) -> Result<AlignedRows> {
    let mut matrix =
        AlignedRows::zeros_with_pages(rows, dim, pages).context("allocating a random table")?;
    let stride = matrix.stride();
    for row in matrix.as_padded_slice_mut().chunks_exact_mut(stride) {
        for x in &mut row[..dim] {
            *x = rng.random_range(-1.0f32..1.0);
        }
        // Padding stays zero but is written too, so every page is touched.
        row[dim..].fill(0.0);
    }
    Ok(matrix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_reports_every_metric() {
        let args = BenchKernelArgs {
            rows: 2000,
            dim: 16,
            k: 10,
            batch: 4,
            threads: Some(2),
            repeat: 1,
            seed: 7,
            small_pages: true,
        };
        let metrics = run(&args).unwrap();
        let names: Vec<&str> = metrics.iter().map(|(name, _)| *name).collect();
        let mut expected = vec![
            "scan_ms",
            "scan_gbps",
            "read_gbps",
            "scan_bandwidth_ratio",
            "batch_ms",
            "batch_gflops",
            "batch_speedup_vs_serial",
            "candidates_ns_per_item",
        ];
        if batch_path(args.dim) != BatchPath::Faer {
            expected.push("batch_faer_ms");
        }
        assert_eq!(names, expected);
        for (name, value) in metrics {
            assert!(value.is_finite() && value > 0.0, "{name} = {value}");
        }
    }

    #[test]
    fn run_rejects_zero_sizes() {
        let args = BenchKernelArgs {
            k: 0,
            ..BenchKernelArgs::default()
        };
        assert!(run(&args).is_err());
    }
}
