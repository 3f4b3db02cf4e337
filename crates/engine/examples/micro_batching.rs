//! Measures what the whole-catalog micro-batcher buys: closed-loop load of concurrent
//! personalized whole-catalog requests, batched (default policy) against unbatched
//! (`batch_max_queries = 1`, every request its own parallel scan). Prints throughput,
//! latency percentiles and the mean batch size.
//!
//! ```sh
//! cargo run --release -p engine --example micro_batching -- [items] [dim] [requests] [concurrency] [k]
//! ```
//! Defaults: 200000 items, dim 64, 2000 requests, 32 outstanding, k 10.

use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use engine::{Engine, EngineConfig, RankRequest, UserRef};
use store::{Table, TableData, TableRole, TableWriter};

/// Uniform values in [-1, 1) from a seeded LCG.
fn values(seed: u64, count: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

fn argument(position: usize, default: usize) -> usize {
    std::env::args()
        .nth(position)
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Runs `requests` requests keeping `concurrency` outstanding; returns (wall time, sorted
/// latencies).
fn closed_loop(
    engine: &Engine,
    dim: usize,
    requests: usize,
    concurrency: usize,
    k: usize,
) -> (Duration, Vec<Duration>) {
    let (sender, receiver) = channel();
    let submit = |index: usize| {
        let sender = sender.clone();
        let started = Instant::now();
        let request = RankRequest::new(
            format!("bench-{index}"),
            UserRef::embedding(values(index as u64 + 1000, dim)),
            k,
        );
        engine.submit(
            request,
            Box::new(move |result| {
                let _ = sender.send((started.elapsed(), result.is_ok()));
            }),
        );
    };
    let started = Instant::now();
    let mut submitted = 0;
    while submitted < concurrency.min(requests) {
        submit(submitted);
        submitted += 1;
    }
    let mut latencies = Vec::with_capacity(requests);
    while latencies.len() < requests {
        let Ok((latency, ok)) = receiver.recv() else {
            break;
        };
        assert!(ok, "a benchmark request failed");
        latencies.push(latency);
        if submitted < requests {
            submit(submitted);
            submitted += 1;
        }
    }
    let wall = started.elapsed();
    latencies.sort();
    (wall, latencies)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let items = argument(1, 200_000);
    let dim = argument(2, 64);
    let requests = argument(3, 2000);
    let concurrency = argument(4, 32);
    let k = argument(5, 10);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("items.frt");
    TableWriter::new().role(TableRole::Items).write(
        &path,
        &TableData {
            dim,
            rows: values(7, items * dim),
            ids: (0..items).map(|row| format!("item-{row}")).collect(),
            groups: Vec::new(),
            prior: None,
            dim_names: None,
        },
    )?;
    println!(
        "{items} items x dim {dim} ({:.0} MB), {requests} whole-catalog requests, {concurrency} outstanding, k {k}, {} rayon threads",
        (items * dim * 4) as f64 / 1e6,
        rayon::current_num_threads()
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>10} {:>11}",
        "policy", "req/s", "p50 ms", "p99 ms", "max ms", "mean batch"
    );
    let policies = [
        ("unbatched (max_queries 1)", 1, Duration::ZERO),
        ("batched, no wait", 64, Duration::ZERO),
        ("batched, wait 1 ms (default)", 64, Duration::from_millis(1)),
    ];
    for (name, max_queries, max_wait) in policies {
        let config = EngineConfig {
            batch_max_queries: max_queries,
            batch_max_wait: max_wait,
            ..EngineConfig::default()
        };
        let engine = Engine::new(config, Table::open(&path)?, None)?;
        closed_loop(&engine, dim, concurrency * 2, concurrency, k); // warm-up
        let before = engine.status()?.batcher;
        let (wall, latencies) = closed_loop(&engine, dim, requests, concurrency, k);
        let after = engine.status()?.batcher;
        let batches = (after.batches - before.batches).max(1);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{name:<28} {:>10.0} {:>10.2} {:>10.2} {:>10.2} {:>11.1}",
            latencies.len() as f64 / wall.as_secs_f64(),
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.99)),
            ms(percentile(&latencies, 1.0)),
            (after.queries - before.queries) as f64 / batches as f64
        );
    }
    Ok(())
}
