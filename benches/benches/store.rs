//! Criterion benchmarks for the `store` crate: `Table::open` on a large table already in the
//! page cache (target: under 50 ms for 1M x 128, no rows copied), `Table::verify` (full
//! checksum, reported as bytes per second) and `Table::index_of`.
//!
//! The table is written once to the system temporary directory and removed afterwards.
//! The `index_of` batch repeats the same 1000 ids, so it measures lookups with a warm cache;
//! the `open_speed` example of the `store` crate measures cold lookups over 200k ids.
//! `FAIRRANK_BENCH_STORE_ROWS` and `FAIRRANK_BENCH_STORE_DIM` override the size
//! (default 1_000_000 x 128, a 516 MiB file). There is no external baseline: the numbers
//! are compared against the 50 ms open target and against `verify`, which reads every byte
//! once and so shows what one pass over the file costs on this machine.

use benches::synthetic::{ScratchDir, item_id, synthetic_table};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use store::{Table, TableRole, TableWriter};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn bench_store(c: &mut Criterion) {
    let rows = env_usize("FAIRRANK_BENCH_STORE_ROWS", 1_000_000);
    let dim = env_usize("FAIRRANK_BENCH_STORE_DIM", 128);
    let scratch = match ScratchDir::new("store") {
        Ok(scratch) => scratch,
        Err(e) => panic!("cannot create a scratch directory: {e}"),
    };
    let path = scratch.path().join("bench.frt");
    let written = TableWriter::new()
        .role(TableRole::Items)
        .write(&path, &synthetic_table(rows, dim));
    let summary = match written {
        Ok(summary) => summary,
        Err(e) => panic!("cannot write the benchmark table: {e}"),
    };
    let label = format!("{rows}x{dim}");
    let open = || match Table::open(&path) {
        Ok(table) => table,
        Err(e) => panic!("{e}"),
    };
    drop(open()); // bring the file into the page cache

    let mut group = c.benchmark_group("store");
    group.sample_size(20);
    group.measurement_time(std::time::Duration::from_secs(8));
    // The previous table's unmap is not part of opening: drop outside the timing.
    group.bench_function(format!("open/{label}"), |b| b.iter_with_large_drop(open));

    let table = open();
    group.throughput(Throughput::Bytes(summary.file_bytes));
    group.bench_function(format!("verify/{label}"), |b| {
        b.iter(|| black_box(table.verify().is_ok()))
    });

    let lookups: Vec<String> = (0..1000)
        .map(|i| item_id((i * 7919) % rows.max(1)))
        .collect();
    group.throughput(Throughput::Elements(lookups.len() as u64));
    group.sample_size(50);
    group.bench_function(format!("index_of_1000/{label}"), |b| {
        b.iter(|| {
            lookups
                .iter()
                .filter(|id| table.index_of(id).is_some())
                .count()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_store);
criterion_main!(benches);
