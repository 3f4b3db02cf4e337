//! The overhead target of issue 4: on a 10,000-candidate request with k = 100 (re-ranking
//! pool of 10,000), fairness re-ranking plus the per-answer report add at most 5% to
//! server-side latency. Measures `Engine::rank_blocking` (resolve 10,000 candidate ids, score
//! them, select the pool, re-rank, report, explain and build the answer) with constraint
//! `none` against `fa*ir`, `det-greedy`, `det-const-sort`, `min-exposure`, `fairco` and
//! `plackett-luce` (criterion), then prints per constraint, over requests interleaved
//! round-robin across the constraints (so machine load hits all alike), the median total
//! server-side latency, the median fairness stage (`rerank_us + report_us`; for `none` the
//! pool hand-over and the report), its share of the total, the overhead it adds to the rest
//! of the request (`stage / (total - stage)`, the target) and the ratio of the median
//! total to `none`'s. The gRPC encoding of the answer is not included (it would only lower
//! the shares).
//!
//! Environment: `RERANK_OVERHEAD_SUMMARY_ONLY=1` skips the criterion groups,
//! `RERANK_OVERHEAD_REQUESTS=N` sets the requests per constraint of the summary (default
//! 300), `RERANK_OVERHEAD_CONSTRAINTS=none,fairco` keeps only the named constraints (for
//! `valgrind --tool=callgrind` runs), `RERANK_OVERHEAD_POOL=N` sets the re-ranking pool
//! (default 10,000: every candidate; the server's default pool is `ranking.default_pool`,
//! raised to k).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use engine::{Engine, EngineConfig, FairnessPolicy, ParamValue, RankRequest, UserRef};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use store::{GroupAttribute, Table, TableData, TableRole, TableWriter};

/// Items in the table (the request lists `CANDIDATES` of them).
const ITEMS: usize = 20_000;
/// Candidates per request; by default all of them form the re-ranking pool.
const CANDIDATES: usize = 10_000;
/// Answer length.
const K: usize = 100;
/// Embedding dimension.
const DIM: usize = 64;
/// Requests per constraint in the latency summary.
const SUMMARY_REQUESTS: usize = 300;

/// Constraints and their parameters.
fn policies() -> Vec<(&'static str, FairnessPolicy)> {
    let number = ParamValue::Number;
    let shares = |pairs: &[(&str, f64)]| {
        ParamValue::Map(
            pairs
                .iter()
                .map(|(label, share)| ((*label).to_owned(), ParamValue::Number(*share)))
                .collect(),
        )
    };
    let policy = |name: &str, params: Vec<(&str, ParamValue)>| FairnessPolicy {
        constraint: name.to_owned(),
        params: params
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect::<BTreeMap<_, _>>(),
        exposure_scope: "bench".to_owned(),
        ..FairnessPolicy::default()
    };
    vec![
        ("none", policy("none", vec![])),
        (
            "fa*ir",
            policy(
                "fa*ir",
                vec![
                    ("p", number(0.5)),
                    ("alpha", number(0.1)),
                    ("protected", number(1.0)),
                ],
            ),
        ),
        (
            "det-greedy",
            policy(
                "det-greedy",
                vec![("targets", shares(&[("0", 0.5), ("1", 0.4)]))],
            ),
        ),
        (
            "det-const-sort",
            policy(
                "det-const-sort",
                vec![("targets", shares(&[("0", 0.5), ("1", 0.4)]))],
            ),
        ),
        (
            "min-exposure",
            policy("min-exposure", vec![("targets", shares(&[("1", 0.4)]))]),
        ),
        ("fairco", policy("fairco", vec![("lambda", number(1.0))])),
        (
            "plackett-luce",
            policy("plackett-luce", vec![("temperature", number(0.1))]),
        ),
    ]
}

/// An engine over a random table of `ITEMS` rows with a 20% minority group, the candidate
/// ids of one request and a user embedding. The table lives in `dir`.
fn setup(dir: &std::path::Path) -> (Engine, Vec<String>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let rows: Vec<f32> = (0..ITEMS * DIM)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let ids: Vec<String> = (0..ITEMS).map(|row| format!("item-{row:05}")).collect();
    let labels: Vec<u32> = (0..ITEMS)
        .map(|_| u32::from(rng.random_bool(0.2)))
        .collect();
    let path = dir.join("items.frt");
    let data = TableData {
        dim: DIM,
        rows,
        ids: ids.clone(),
        groups: vec![GroupAttribute {
            name: "provider_group".to_owned(),
            labels,
        }],
        prior: None,
        dim_names: None,
    };
    if let Err(error) = TableWriter::new()
        .role(TableRole::Items)
        .write(&path, &data)
    {
        panic!("the bench table cannot be written: {error}");
    }
    let table = match Table::open(&path) {
        Ok(table) => table,
        Err(error) => panic!("the bench table cannot be opened: {error}"),
    };
    let engine = match Engine::new(EngineConfig::default(), table, None) {
        Ok(engine) => engine,
        Err(error) => panic!("the engine cannot start: {error}"),
    };
    let candidates: Vec<String> = ids.into_iter().step_by(ITEMS / CANDIDATES).collect();
    let user: Vec<f32> = (0..DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    (engine, candidates, user)
}

fn request(
    candidates: &[String],
    user: &[f32],
    policy: &FairnessPolicy,
    pool: usize,
) -> RankRequest {
    let mut request = RankRequest::new("bench", UserRef::embedding(user.to_vec()), K);
    request.candidate_ids = candidates.to_vec().into();
    request.pool_size = Some(pool);
    request.fairness = policy.clone();
    request
}

fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}

/// A positive integer from the environment, or `default`.
fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|text| text.parse().ok())
        .filter(|&count| count > 0)
        .unwrap_or(default)
}

fn rerank_overhead(c: &mut Criterion) {
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(error) => panic!("no temporary folder: {error}"),
    };
    let (engine, candidates, user) = setup(dir.path());
    let mut policies = policies();
    if let Ok(names) = std::env::var("RERANK_OVERHEAD_CONSTRAINTS") {
        let wanted: Vec<&str> = names.split(',').map(str::trim).collect();
        policies.retain(|(name, _)| wanted.contains(name));
    }
    let summary_only = std::env::var_os("RERANK_OVERHEAD_SUMMARY_ONLY").is_some();
    let requests = env_count("RERANK_OVERHEAD_REQUESTS", SUMMARY_REQUESTS);
    let pool = env_count("RERANK_OVERHEAD_POOL", CANDIDATES).clamp(K, CANDIDATES);

    if !summary_only {
        let mut group = c.benchmark_group("rank_blocking_10k_candidates_k100");
        group.sample_size(30);
        group.measurement_time(Duration::from_secs(4));
        for (name, policy) in &policies {
            group.bench_with_input(BenchmarkId::from_parameter(name), policy, |b, policy| {
                b.iter_batched(
                    || request(&candidates, &user, policy, pool),
                    |request| black_box(engine.rank_blocking(request)),
                    criterion::BatchSize::SmallInput,
                );
            });
        }
        group.finish();
    }

    // Server-side stage timings, requests interleaved round-robin across the constraints.
    let mut totals = vec![Vec::with_capacity(requests); policies.len()];
    let mut stages = vec![Vec::with_capacity(requests); policies.len()];
    for _ in 0..requests {
        for (slot, (name, policy)) in policies.iter().enumerate() {
            match engine.rank_blocking(request(&candidates, &user, policy, pool)) {
                Ok(response) => {
                    totals[slot].push(response.timings.total_us);
                    stages[slot].push(response.timings.rerank_us + response.timings.report_us);
                }
                Err(error) => panic!("{name}: {error}"),
            }
        }
    }
    println!(
        "\nfairness overhead, {CANDIDATES} candidates (pool {pool}), k = {K}, {requests} requests each, interleaved (medians):"
    );
    println!(
        "{:<16} {:>10} {:>14} {:>10} {:>10} {:>10}",
        "constraint", "total_us", "rerank+report", "share", "adds", "vs none"
    );
    let mut none_total = None;
    for (slot, (name, _)) in policies.iter().enumerate() {
        let total = median(&mut totals[slot]);
        let stage = median(&mut stages[slot]);
        let baseline = *none_total.get_or_insert(total);
        println!(
            "{:<16} {:>10} {:>14} {:>9.2}% {:>9.2}% {:>9.3}x",
            name,
            total,
            stage,
            100.0 * stage as f64 / total.max(1) as f64,
            100.0 * stage as f64 / total.saturating_sub(stage).max(1) as f64,
            total as f64 / baseline.max(1) as f64
        );
    }
}

criterion_group!(benches, rerank_overhead);
criterion_main!(benches);
