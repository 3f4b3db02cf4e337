//! The overhead target of issue 4: on a 10,000-candidate request with k = 100 (re-ranking
//! pool of 10,000), fairness re-ranking plus the per-answer report add at most 5% to
//! server-side latency. Measures `Engine::rank_blocking` with constraint `none` against
//! `fa*ir`, `det-greedy`, `det-const-sort`, `min-exposure`, `fairco` and `plackett-luce`
//! (criterion), then prints per constraint the median total latency, the median time of the
//! fairness stage (`rerank_us + report_us`, which for `none` is the pool hand-over and the
//! report), its share of the total, and the ratio of the median total to `none`'s.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use engine::{Engine, EngineConfig, FairnessPolicy, ParamValue, RankRequest, UserRef};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use store::{GroupAttribute, Table, TableData, write_table};

/// Items in the table (the request lists `CANDIDATES` of them).
const ITEMS: usize = 20_000;
/// Candidates per request, all of which form the re-ranking pool.
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
    if let Err(error) = write_table(&path, &data) {
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

fn request(candidates: &[String], user: &[f32], policy: &FairnessPolicy) -> RankRequest {
    let mut request = RankRequest::new("bench", UserRef::embedding(user.to_vec()), K);
    request.candidate_ids = candidates.to_vec().into();
    request.pool_size = Some(CANDIDATES);
    request.fairness = policy.clone();
    request
}

fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}

fn rerank_overhead(c: &mut Criterion) {
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(error) => panic!("no temporary folder: {error}"),
    };
    let (engine, candidates, user) = setup(dir.path());
    let policies = policies();

    let mut group = c.benchmark_group("rank_blocking_10k_candidates_k100");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(4));
    for (name, policy) in &policies {
        group.bench_with_input(BenchmarkId::from_parameter(name), policy, |b, policy| {
            b.iter_batched(
                || request(&candidates, &user, policy),
                |request| black_box(engine.rank_blocking(request)),
                criterion::BatchSize::SmallInput,
            );
        });
    }
    group.finish();

    // Server-side stage timings of many requests per constraint.
    println!(
        "\nfairness overhead, {CANDIDATES} candidates (pool {CANDIDATES}), k = {K}, {SUMMARY_REQUESTS} requests each (medians):"
    );
    println!(
        "{:<16} {:>10} {:>14} {:>10} {:>12}",
        "constraint", "total_us", "rerank+report", "share", "vs none"
    );
    let mut none_total = None;
    for (name, policy) in &policies {
        let mut totals = Vec::with_capacity(SUMMARY_REQUESTS);
        let mut stages = Vec::with_capacity(SUMMARY_REQUESTS);
        for _ in 0..SUMMARY_REQUESTS {
            match engine.rank_blocking(request(&candidates, &user, policy)) {
                Ok(response) => {
                    totals.push(response.timings.total_us);
                    stages.push(response.timings.rerank_us + response.timings.report_us);
                }
                Err(error) => panic!("{name}: {error}"),
            }
        }
        let total = median(&mut totals);
        let stage = median(&mut stages);
        let baseline = *none_total.get_or_insert(total);
        println!(
            "{:<16} {:>10} {:>14} {:>9.2}% {:>11.3}x",
            name,
            total,
            stage,
            100.0 * stage as f64 / total.max(1) as f64,
            total as f64 / baseline.max(1) as f64
        );
    }
}

criterion_group!(benches, rerank_overhead);
criterion_main!(benches);
