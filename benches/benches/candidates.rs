//! Criterion benchmark of the Rank candidate path outside the server
//! (`cargo bench -p benches --bench candidates`): resolve 1000 candidate ids to rows, then
//! score the rows and keep the top 10 (or 100), as `engine` does for a 1000-candidate request.
//!
//! What each function compares against:
//! - `lookup`: `Table::index_of_many` alone (ids to rows, no row touched).
//! - `lookup_warm_rows`: `Table::index_of_many_prefetch_rows` alone (the same lookups, also
//!   starting to load each found row into L2).
//! - `score`: `kernels::candidates_topk` over already resolved rows (k = 10).
//! - `lookup_then_score`: the two passes one after the other (the path before the rows were
//!   prefetched during the lookups) against `warm_rows_then_score`, the path the engine used
//!   before the int8 copy.
//! - `score_quantized`: `kernels::quantized_candidates_topk` over already resolved rows (the
//!   int8 copy prunes, the f32 kernel rescores the rest; same answer as `score`), and
//!   `warm_quantized_then_score_quantized`: the engine's path with the copy ready (the
//!   lookups prefetch the int8 rows through `Table::index_of_many_hinting_rows`).
//! - `score_k100`, `score_quantized_k100`, `warm_quantized_then_score_quantized_k100`: the
//!   same at k = 100, the shape T1 really runs (its requests leave `pool_size` unset, so the
//!   engine asks the candidate kernel for its default re-ranking pool of 100).
//! - `lookup_hint_rows_then_score_quantized` (and `_k100`): the row hint the engine uses
//!   since branch `dedup` (`QuantizedRowHints::codes_and_scale`, set up once per list),
//!   issued after `index_of_many` while the rows are collected, then the int8-pruned scoring.
//!
//! Before timing, it prints how long the int8 copy takes to build (best of 3, wall clock) and
//! how many candidates the quantized kernel rescores per list at k = 10 and k = 100 (mean
//! over the 64 lists, with every user of the default dataset's user table as the query for
//! the default table).
//!
//! Tables: the built-in default dataset (100 000 x 64, the T1 load test's table; 25.6 MB of
//! rows, so after a few requests most of it sits in the 32 MiB L3) and a synthetic 1M x 128
//! table (512 MB: rows come from DRAM). Each iteration takes the next of 64 lists of 1000
//! distinct random ids, so consecutive iterations do not find the previous list's rows and
//! id slots in L1/L2. `FAIRRANK_BENCH_CANDIDATES_LARGE=0` skips the 1M table (written once to
//! the system temporary directory, removed afterwards). `FAIRRANK_BENCH_CANDIDATES_REPORT=0` skips
//! the rescoring report (for runs under valgrind, where it takes minutes).
//!
//! Times are the benchmark thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), not wall time: on
//! this shared 2-core machine a wall clock also counts the time other processes hold the
//! core, which moved wall-clock results by 2x between identical runs. CPU time still includes
//! the cache misses that other processes cause, so compare variants run in the same window.

use std::hint::black_box;

use benches::synthetic::{ScratchDir, synthetic_table};
use benches::thread_cpu::thread_cpu_nanos;
use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kernels::{
    QuantizedRows, RowMatrix, ScoredItem, TopKScratch, candidates_topk, quantized_candidates_topk,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use store::{Table, TableRole, TableWriter};

const CANDIDATES: usize = 1000;
const LISTS: usize = 64;
/// The top-k of a request's own `k`.
const K: usize = 10;
/// The top-k T1 runs: the engine's default re-ranking pool.
const POOL_K: usize = 100;

/// Criterion measurement: CPU time of the calling thread, in nanoseconds.
struct ThreadCpuTime;

static WALL_TIME: WallTime = WallTime;

impl Measurement for ThreadCpuTime {
    type Intermediate = u64;
    type Value = u64;

    fn start(&self) -> u64 {
        thread_cpu_nanos()
    }
    fn end(&self, started: u64) -> u64 {
        thread_cpu_nanos().saturating_sub(started)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, value: &u64) -> f64 {
        *value as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        // Nanoseconds, like wall time: the same units and scaling.
        WALL_TIME.formatter()
    }
}

/// `LISTS` lists of `CANDIDATES` distinct ids of `table`, in random order.
fn candidate_lists(table: &Table, seed: u64) -> Vec<Vec<String>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut rows: Vec<usize> = (0..table.len()).collect();
    (0..LISTS)
        .map(|_| {
            let (chosen, _) = rows.partial_shuffle(&mut rng, CANDIDATES.min(table.len()));
            chosen.iter().map(|&row| table.id(row).to_owned()).collect()
        })
        .collect()
}

fn matrix(table: &Table) -> RowMatrix<'_> {
    match RowMatrix::new(table.rows(), table.len(), table.dim(), table.row_stride()) {
        Ok(matrix) => matrix,
        Err(e) => panic!("table rows are not a matrix: {e}"),
    }
}

/// The buffers of one resolve-and-score pass, reused across iterations.
#[derive(Default)]
struct Buffers {
    found: Vec<Option<u32>>,
    rows: Vec<u32>,
    scratch: TopKScratch,
    out: Vec<ScoredItem>,
}

/// Resolves `ids` (all known) to rows with `lookup`, then scores them.
fn resolve_and_score(
    table: &Table,
    ids: &[String],
    query: &[f32],
    lookup: impl Fn(&Table, &[String], &mut Vec<Option<u32>>),
    buffers: &mut Buffers,
) -> usize {
    let Buffers {
        found,
        rows,
        scratch,
        out,
    } = buffers;
    found.clear();
    lookup(table, ids, found);
    rows.clear();
    rows.extend(found.iter().flatten());
    if let Err(e) = candidates_topk(matrix(table), query, rows, K, scratch, out) {
        panic!("{e}");
    }
    out.len()
}

/// The int8-pruned top `k` of `rows` into `out`; returns how many items it kept.
fn score_quantized(
    table: &Table,
    quantized: &QuantizedRows,
    query: &[f32],
    rows: &[u32],
    k: usize,
    scratch: &mut TopKScratch,
    out: &mut Vec<ScoredItem>,
) -> usize {
    if let Err(e) =
        quantized_candidates_topk(matrix(table), quantized, query, rows, k, scratch, out)
    {
        panic!("{e}");
    }
    out.len()
}

fn plain_lookup(table: &Table, ids: &[String], found: &mut Vec<Option<u32>>) {
    table.index_of_many(ids, found);
}

fn warm_lookup(table: &Table, ids: &[String], found: &mut Vec<Option<u32>>) {
    table.index_of_many_prefetch_rows(ids, found);
}

/// Builds the int8 copy of `table` three times and prints the best wall time.
fn build_quantized(label: &str, table: &Table) -> QuantizedRows {
    let mut best = std::time::Duration::MAX;
    let mut built = None;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let copy = QuantizedRows::build(matrix(table));
        best = best.min(started.elapsed());
        built = Some(copy);
    }
    let Some(built) = built else {
        unreachable!("built three times")
    };
    eprintln!(
        "candidates/{label}: int8 copy of {} x {} built in {:.1} ms (best of 3, {} rayon threads), {} heap bytes ({} per row)",
        table.len(),
        table.dim(),
        best.as_secs_f64() * 1e3,
        kernels::current_threads(),
        built.heap_bytes(),
        built.bytes_per_row(),
    );
    built
}

/// Prints the mean number of candidates the quantized kernel rescores per list, over every
/// (query, list) pair, after checking each answer against the f32 kernel.
fn report_rescored(
    label: &str,
    table: &Table,
    quantized: &QuantizedRows,
    queries: &[Vec<f32>],
    resolved: &[Vec<u32>],
    k: usize,
) {
    let (mut scratch, mut exact, mut pruned) = (TopKScratch::new(), Vec::new(), Vec::new());
    let (mut rescored, mut runs) = (0usize, 0usize);
    for query in queries {
        for rows in resolved {
            candidates_topk(matrix(table), query, rows, k, &mut scratch, &mut exact)
                .unwrap_or_else(|e| panic!("{e}"));
            let pass = quantized_candidates_topk(
                matrix(table),
                quantized,
                query,
                rows,
                k,
                &mut scratch,
                &mut pruned,
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(exact, pruned, "the quantized kernel changed an answer");
            rescored += pass.rescored;
            runs += 1;
        }
    }
    eprintln!(
        "candidates/{label}: {:.1} of {CANDIDATES} candidates rescored per list at k = {k} (mean over {runs} query x list pairs)",
        rescored as f64 / runs.max(1) as f64
    );
}

fn bench_table(
    c: &mut Criterion<ThreadCpuTime>,
    label: &str,
    table: &Table,
    users: Option<&Table>,
) {
    let lists = candidate_lists(table, 5);
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let query: Vec<f32> = (0..table.dim())
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let quantized = build_quantized(label, table);
    let resolved: Vec<Vec<u32>> = lists
        .iter()
        .map(|ids| {
            let mut found = Vec::new();
            table.index_of_many(ids, &mut found);
            found.into_iter().flatten().collect()
        })
        .collect();
    // The two lookups must agree before either is timed.
    for ids in &lists {
        let (mut plain, mut warm) = (Vec::new(), Vec::new());
        table.index_of_many(ids, &mut plain);
        table.index_of_many_prefetch_rows(ids, &mut warm);
        assert_eq!(plain, warm);
        assert!(plain.iter().all(Option::is_some));
    }
    let queries: Vec<Vec<f32>> = match users {
        Some(users) => (0..users.len()).map(|u| users.row(u).to_vec()).collect(),
        None => vec![query.clone()],
    };
    // `FAIRRANK_BENCH_CANDIDATES_REPORT=0` skips the report (minutes under valgrind).
    if std::env::var("FAIRRANK_BENCH_CANDIDATES_REPORT").as_deref() != Ok("0") {
        for k in [K, POOL_K] {
            report_rescored(label, table, &quantized, &queries, &resolved, k);
        }
    }

    let mut group = c.benchmark_group(format!("candidates/{label}"));
    group.throughput(Throughput::Elements(CANDIDATES as u64));
    group.sample_size(50);
    let mut next = 0;
    let mut take = move || {
        next = (next + 1) % LISTS;
        next
    };
    let mut buffers = Buffers::default();

    group.bench_function("lookup", |b| {
        b.iter(|| {
            buffers.found.clear();
            plain_lookup(table, &lists[take()], &mut buffers.found);
            black_box(buffers.found.len())
        })
    });
    group.bench_function("lookup_warm_rows", |b| {
        b.iter(|| {
            buffers.found.clear();
            warm_lookup(table, &lists[take()], &mut buffers.found);
            black_box(buffers.found.len())
        })
    });
    for (suffix, k) in [("", K), ("_k100", POOL_K)] {
        group.bench_function(format!("score{suffix}"), |b| {
            b.iter(|| {
                let rows = &resolved[take()];
                let Buffers { scratch, out, .. } = &mut buffers;
                if let Err(e) = candidates_topk(matrix(table), &query, rows, k, scratch, out) {
                    panic!("{e}");
                }
                black_box(out.len())
            })
        });
        group.bench_function(format!("score_quantized{suffix}"), |b| {
            b.iter(|| {
                let rows = &resolved[take()];
                let Buffers { scratch, out, .. } = &mut buffers;
                black_box(score_quantized(
                    table, &quantized, &query, rows, k, scratch, out,
                ))
            })
        });
    }
    group.bench_function("lookup_then_score", |b| {
        b.iter(|| {
            let ids = &lists[take()];
            black_box(resolve_and_score(
                table,
                ids,
                &query,
                plain_lookup,
                &mut buffers,
            ))
        })
    });
    group.bench_function("warm_rows_then_score", |b| {
        b.iter(|| {
            let ids = &lists[take()];
            black_box(resolve_and_score(
                table,
                ids,
                &query,
                warm_lookup,
                &mut buffers,
            ))
        })
    });
    for (suffix, k) in [("", K), ("_k100", POOL_K)] {
        group.bench_function(
            format!("warm_quantized_then_score_quantized{suffix}"),
            |b| {
                b.iter(|| {
                    let ids = &lists[take()];
                    let Buffers {
                        found,
                        rows,
                        scratch,
                        out,
                    } = &mut buffers;
                    found.clear();
                    table.index_of_many_hinting_rows(ids, |row| quantized.prefetch_row(row), found);
                    rows.clear();
                    rows.extend(found.iter().flatten());
                    black_box(score_quantized(
                        table, &quantized, &query, rows, k, scratch, out,
                    ))
                })
            },
        );
        // The hint of the engine's path since branch `dedup` (`QuantizedRowHints`: the code
        // and scale lines of each row found), in the pass that collects the rows.
        group.bench_function(
            format!("lookup_hint_rows_then_score_quantized{suffix}"),
            |b| {
                b.iter(|| {
                    let ids = &lists[take()];
                    let Buffers {
                        found,
                        rows,
                        scratch,
                        out,
                    } = &mut buffers;
                    found.clear();
                    table.index_of_many(ids, found);
                    let hints = quantized.row_hints();
                    rows.clear();
                    rows.extend(
                        found
                            .iter()
                            .flatten()
                            .inspect(|&&row| hints.codes_and_scale(row)),
                    );
                    black_box(score_quantized(
                        table, &quantized, &query, rows, k, scratch, out,
                    ))
                })
            },
        );
    }
    group.finish();
}

fn bench_candidates(c: &mut Criterion<ThreadCpuTime>) {
    let default = match datasets::default_dataset() {
        Ok(paths) => paths,
        Err(e) => panic!("cannot generate the default dataset: {e}"),
    };
    let users = match Table::open(&default.users) {
        Ok(users) => users,
        Err(e) => panic!("{e}"),
    };
    match Table::open(&default.items) {
        Ok(table) => bench_table(c, "default-100k-x64", &table, Some(&users)),
        Err(e) => panic!("{e}"),
    }

    if std::env::var("FAIRRANK_BENCH_CANDIDATES_LARGE").as_deref() == Ok("0") {
        return;
    }
    let dir = match ScratchDir::new("candidates") {
        Ok(dir) => dir,
        Err(e) => panic!("cannot create a scratch directory: {e}"),
    };
    let path = dir.path().join("items-1m-128.frt");
    let written = TableWriter::new()
        .role(TableRole::Items)
        .write(&path, &synthetic_table(1_000_000, 128));
    if let Err(e) = written {
        panic!("cannot write the benchmark table: {e}");
    }
    match Table::open(&path) {
        Ok(table) => bench_table(c, "1m-x128", &table, None),
        Err(e) => panic!("{e}"),
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(ThreadCpuTime);
    targets = bench_candidates
}
criterion_main!(benches);
