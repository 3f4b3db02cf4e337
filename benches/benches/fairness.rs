//! Criterion benchmarks for the `fairness` crate: every built-in constraint at k = 10, 100 and
//! 1000, re-ranking plus the per-answer report on a 10,000-candidate pool, and cold mtable
//! computation. The baseline is the `none` constraint (copying the pool's top k), which
//! measures the shared cost of validating the pool; the targets are FA*IR with a cached mtable
//! under 5 us at k = 100 on a pool of 1000, and re-ranking plus report well under 50 us on
//! 10,000 candidates at k = 100.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fairness::{
    AmortizedState, AnswerReport, Candidate, MTable, Registry, RerankOutput, Reranker,
    answer_report,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A pool in score order where groups 1 and 2 are rarer near the top (so constraints work).
fn make_pool(size: usize, seed: u64) -> Vec<Candidate> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut scores: Vec<f32> = (0..size).map(|_| rng.random::<f32>()).collect();
    scores.sort_by(|a, b| b.total_cmp(a));
    scores
        .iter()
        .enumerate()
        .map(|(index, &score)| {
            let depth = index as f64 / size as f64;
            let draw: f64 = rng.random();
            let group = if draw < 0.1 + 0.3 * depth {
                1
            } else if draw < 0.15 + 0.4 * depth {
                2
            } else {
                0
            };
            Candidate::new(index as u32, score, group)
        })
        .collect()
}

/// Constraint specifications as the CLI would pass them: name plus `key=value` parameters.
const SPECS: &[(&str, &[(&str, &str)])] = &[
    ("none", &[]),
    (
        "fa*ir",
        &[("p", "0.5"), ("alpha", "0.1"), ("protected", "1")],
    ),
    ("det-greedy", &[("targets", "0:0.4,1:0.4,2:0.2")]),
    ("det-cons", &[("targets", "0:0.4,1:0.4,2:0.2")]),
    ("det-relaxed", &[("targets", "0:0.4,1:0.4,2:0.2")]),
    ("det-const-sort", &[("targets", "0:0.4,1:0.4,2:0.2")]),
    ("min-exposure", &[("targets", "1:0.35,2:0.15")]),
    ("fairco", &[("lambda", "0.5")]),
    ("plackett-luce", &[("temperature", "0.1")]),
];

/// Every benchmarked re-ranker, built through the registry's string interface.
fn rerankers(registry: &Registry) -> Vec<Box<dyn Reranker>> {
    SPECS
        .iter()
        .filter_map(|&(name, params)| {
            registry
                .build_from_strings(name, params.iter().copied())
                .ok()
        })
        .collect()
}

/// A FairCo state after some rankings, so the controller is active.
fn warm_state(reranker: &dyn Reranker, pool: &[Candidate], k: usize) -> Option<AmortizedState> {
    if !reranker.is_amortized() {
        return None;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut out = RerankOutput::new();
    let mut state = None;
    for _ in 0..20 {
        reranker
            .rerank(pool, k, state.as_ref(), &mut rng, &mut out)
            .ok()?;
        state = out.state.clone();
    }
    state
}

/// Prints what each constraint achieves on the benchmark pools (not timed).
fn print_outcomes(registry: &Registry) {
    let pool = make_pool(10_000, 1);
    let mut out = RerankOutput::new();
    let mut report = AnswerReport::default();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    eprintln!("constraint outcomes on a 10,000-candidate pool, k = 100:");
    for reranker in rerankers(registry) {
        let state = warm_state(reranker.as_ref(), &pool, 100);
        if reranker
            .rerank(&pool, 100, state.as_ref(), &mut rng, &mut out)
            .is_err()
        {
            continue;
        }
        if answer_report(&pool, &out.order, &out.report, &mut report).is_err() {
            continue;
        }
        let shares: Vec<String> = report
            .groups
            .iter()
            .map(|g| format!("{}:{:.3}", g.group, g.share))
            .collect();
        let gap = out.report.optimality.map_or(String::new(), |o| {
            format!(
                " utility {:.4} bound {:.4} gap {:.2e} exact {}",
                o.utility, o.upper_bound, o.gap, o.exact
            )
        });
        eprintln!(
            "  {:<15} satisfied {:<5} ndcg {:.4} exposure shares [{}]{gap}",
            reranker.name(),
            out.report.satisfied,
            report.ndcg,
            shares.join(" ")
        );
    }
}

fn bench_constraints(c: &mut Criterion) {
    let registry = Registry::with_builtins();
    print_outcomes(&registry);
    let mut group = c.benchmark_group("rerank");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    for k in [10usize, 100, 1000] {
        let pool = make_pool((10 * k).max(1000), 1);
        for reranker in rerankers(&registry) {
            let state = warm_state(reranker.as_ref(), &pool, k);
            let mut out = RerankOutput::new();
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            // Warm caches (mtable) and buffers outside the measurement.
            let _ = reranker.rerank(&pool, k, state.as_ref(), &mut rng, &mut out);
            let id = BenchmarkId::new(
                reranker.name().to_string(),
                format!("k={k}/pool={}", pool.len()),
            );
            group.bench_with_input(id, &k, |b, &k| {
                b.iter(|| {
                    let result =
                        reranker.rerank(black_box(&pool), k, state.as_ref(), &mut rng, &mut out);
                    black_box((&result, &out.order));
                })
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("rerank_and_report");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    let pool = make_pool(10_000, 2);
    for reranker in rerankers(&registry) {
        let state = warm_state(reranker.as_ref(), &pool, 100);
        let mut out = RerankOutput::new();
        let mut report = AnswerReport::default();
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let _ = reranker.rerank(&pool, 100, state.as_ref(), &mut rng, &mut out);
        group.bench_function(
            BenchmarkId::new(reranker.name().to_string(), "k=100/pool=10000"),
            |b| {
                b.iter(|| {
                    let result =
                        reranker.rerank(black_box(&pool), 100, state.as_ref(), &mut rng, &mut out);
                    let summary = answer_report(&pool, &out.order, &out.report, &mut report);
                    black_box((&result, &summary, &report));
                })
            },
        );
    }
    group.finish();

    let mut group = c.benchmark_group("mtable_cold");
    group
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10);
    for k in [10usize, 100, 1000, 10_000] {
        group.bench_with_input(
            BenchmarkId::new("adjusted", format!("k={k}")),
            &k,
            |b, &k| b.iter(|| black_box(MTable::adjusted(k, 0.5, 0.1))),
        );
        group.bench_with_input(
            BenchmarkId::new("unadjusted", format!("k={k}")),
            &k,
            |b, &k| b.iter(|| black_box(MTable::unadjusted(k, 0.5, 0.1))),
        );
    }
    group.finish();
}

criterion_group!(benches, bench_constraints);
criterion_main!(benches);
