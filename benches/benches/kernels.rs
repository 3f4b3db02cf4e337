//! Criterion benchmarks of the scoring kernels (`cargo bench -p benches --bench kernels`).
//!
//! What each group compares against:
//! - `dot`: `kernels::dot` (f32x8, four accumulators) against `kernels::scalar::dot`, the
//!   left-to-right specification, at dimensions 128 and 768.
//! - `scan_topk`: the single-threaded fused scan (SIMD scores, threshold prefilter, heap)
//!   against `scalar::scan_topk` (score every row, sort), k = 100, dim 128.
//! - `par_scan_topk`: the parallel fused scan on all threads against `par_sum` over the same
//!   table bytes (a plain streaming read: the memory-bandwidth ceiling of any scan). The
//!   1M x 128 table (512 MB) is far larger than the last-level cache.
//! - `candidates_topk`: 1000 random rows of a 1M x 128 table, k = 100, one thread, against
//!   `scalar::candidates_topk`.
//! - `batch_topk`: 64 queries at once on every path this CPU runs (`bf16_rescore_64_queries`:
//!   AVX-512 BF16 pass with a proven error bound and exact f32 rescoring, if available;
//!   `faer_64_queries`: faer GEMM over row blocks, fused top-k) against 64 serial
//!   `par_scan_topk` calls with the same queries.
//!
//! Throughput is reported in bytes of table read (scans) or elements (dot, candidates).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kernels::{
    AlignedRows, BatchPath, ScoredItem, TopKScratch, batch_path, batch_topk_using, candidates_topk,
    dot, par_scan_topk, par_sum, scalar, scan_topk,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DIM: usize = 128;
const K: usize = 100;

/// A 64-byte aligned table of uniform values in [-1, 1).
fn random_rows(seed: u64, rows: usize, dim: usize) -> AlignedRows {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut matrix = AlignedRows::zeros(rows, dim).expect("benchmark shape is valid");
    for i in 0..rows {
        for x in matrix.row_mut(i) {
            *x = rng.random_range(-1.0f32..1.0);
        }
    }
    matrix
}

fn bench_dot(c: &mut Criterion) {
    let mut group = c.benchmark_group("dot");
    for dim in [128, 768] {
        let a = random_rows(1, 1, dim);
        let b = random_rows(2, 1, dim);
        let (a, b) = (a.as_matrix().row(0).to_vec(), b.as_matrix().row(0).to_vec());
        group.throughput(Throughput::Elements(dim as u64));
        group.bench_with_input(BenchmarkId::new("simd", dim), &dim, |bench, _| {
            bench.iter(|| dot(black_box(&a), black_box(&b)))
        });
        group.bench_with_input(BenchmarkId::new("scalar", dim), &dim, |bench, _| {
            bench.iter(|| scalar::dot(black_box(&a), black_box(&b)))
        });
    }
    group.finish();
}

fn bench_scans(c: &mut Criterion) {
    let queries = random_rows(3, 64, DIM);
    let query = queries.as_matrix().row(0);
    for rows in [100_000, 1_000_000] {
        let table = random_rows(4, rows, DIM);
        let m = table.as_matrix();
        let bytes = std::mem::size_of_val(table.as_padded_slice()) as u64;

        let mut group = c.benchmark_group("scan_topk");
        group.sample_size(20).throughput(Throughput::Bytes(bytes));
        let mut scratch = TopKScratch::with_capacity(K, DIM);
        let mut out = Vec::with_capacity(K);
        group.bench_with_input(BenchmarkId::new("fused", rows), &rows, |bench, _| {
            bench.iter(|| scan_topk(m, black_box(query), K, &mut scratch, &mut out))
        });
        if rows <= 100_000 {
            group.bench_with_input(BenchmarkId::new("scalar", rows), &rows, |bench, _| {
                bench.iter(|| scalar::scan_topk(m, black_box(query), K))
            });
        }
        group.finish();

        let mut group = c.benchmark_group("par_scan_topk");
        group.sample_size(20).throughput(Throughput::Bytes(bytes));
        group.bench_with_input(BenchmarkId::new("fused", rows), &rows, |bench, _| {
            bench.iter(|| par_scan_topk(m, black_box(query), K, &mut out))
        });
        group.bench_with_input(BenchmarkId::new("read_ceiling", rows), &rows, |bench, _| {
            bench.iter(|| par_sum(black_box(table.as_padded_slice())))
        });
        group.finish();

        let qm = queries.as_matrix();
        let mut group = c.benchmark_group("batch_topk");
        group.sample_size(10).throughput(Throughput::Bytes(bytes));
        let mut answers: Vec<Vec<ScoredItem>> = Vec::new();
        let mut paths = vec![BatchPath::Faer];
        if batch_path(DIM) == BatchPath::Bf16Rescore {
            paths.insert(0, BatchPath::Bf16Rescore);
        }
        for path in paths {
            let name = format!("{}_64_queries", path.name().replace('-', "_"));
            group.bench_with_input(BenchmarkId::new(name, rows), &rows, |bench, _| {
                bench.iter(|| batch_topk_using(path, m, black_box(qm), K, &mut answers))
            });
        }
        group.bench_with_input(
            BenchmarkId::new("serial_64_scans", rows),
            &rows,
            |bench, _| {
                bench.iter(|| {
                    for q in 0..qm.rows() {
                        par_scan_topk(m, black_box(qm.row(q)), K, &mut out).expect("valid query");
                    }
                })
            },
        );
        group.finish();

        if rows == 1_000_000 {
            bench_candidates(c, &table, query);
        }
    }
}

fn bench_candidates(c: &mut Criterion, table: &AlignedRows, query: &[f32]) {
    let m = table.as_matrix();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // Fresh lists cycle through 256 x 1000 random rows (about 128 MB), so rows mostly come
    // from DRAM, as in a server.
    let lists: Vec<Vec<u32>> = (0..256)
        .map(|_| {
            rand::seq::index::sample(&mut rng, m.rows(), 1000)
                .into_iter()
                .map(|i| i as u32)
                .collect()
        })
        .collect();
    let mut group = c.benchmark_group("candidates_topk");
    group.throughput(Throughput::Elements(1000));
    let mut scratch = TopKScratch::with_capacity(K, DIM);
    let mut out = Vec::with_capacity(K);
    let mut next = 0;
    group.bench_function("simd_1000", |bench| {
        bench.iter(|| {
            next = (next + 1) % lists.len();
            candidates_topk(m, black_box(query), &lists[next], K, &mut scratch, &mut out)
        })
    });
    group.bench_function("scalar_1000", |bench| {
        bench.iter(|| {
            next = (next + 1) % lists.len();
            scalar::candidates_topk(m, black_box(query), &lists[next], K)
        })
    });
    group.finish();
}

criterion_group!(benches, bench_dot, bench_scans);
criterion_main!(benches);
