//! `rerank_summarized` with `PoolSummary::of(pool)` gives exactly `rerank`'s output for every
//! built-in constraint (random pools with 1 to 4 groups, absent groups, ties, k up to 150).

use fairness::{AmortizedState, Candidate, PoolSummary, Registry, RerankOutput, Reranker};
use proptest::prelude::*;
use rand::SeedableRng;

fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}

/// Labels the pools draw from (a subset of 1 to 4 of them per pool); the specs below also
/// name labels that are absent from a pool.
const PALETTE: [u32; 6] = [0, 1, 2, 3, 5, 70];

/// A pool in non-increasing score order (many ties, some non-positive scores) whose labels
/// come from 1 to 4 entries of [`PALETTE`].
fn pool_strategy(max_len: usize) -> impl Strategy<Value = Vec<Candidate>> {
    (
        prop::sample::subsequence(PALETTE.to_vec(), 1..=4),
        prop::collection::vec((-5i32..25, 0usize..4), 0..max_len),
    )
        .prop_map(|(labels, raw)| {
            let mut scores: Vec<i32> = raw.iter().map(|&(score, _)| score).collect();
            scores.sort_unstable_by(|a, b| b.cmp(a));
            raw.iter()
                .zip(scores)
                .enumerate()
                .map(|(i, (&(_, pick), score))| {
                    Candidate::new(i as u32, score as f32 / 4.0, labels[pick % labels.len()])
                })
                .collect()
        })
}

fn specs() -> Vec<serde_json::Value> {
    let mut specs = vec![
        serde_json::json!({"name": "none"}),
        serde_json::json!({"name": "fa*ir", "p": 0.4, "alpha": 0.1, "protected": 1}),
        serde_json::json!({"name": "min-exposure", "targets": {"1": 0.3}}),
        serde_json::json!({"name": "min-exposure", "targets": {"0": 0.2, "3": 0.3, "70": 0.1}}),
        serde_json::json!({"name": "fairco", "lambda": 0.5}),
        serde_json::json!({"name": "plackett-luce", "temperature": 0.3}),
    ];
    let targets = [
        // A rest group with a positive share (present or absent in the pool).
        serde_json::json!({"0": 0.5, "1": 0.4}),
        // Listed shares summing to 1 (zero-share rest group).
        serde_json::json!({"0": 0.3, "1": 0.3, "2": 0.4}),
        // Labels often absent, one zero share.
        serde_json::json!({"3": 0.2, "5": 0.0, "70": 0.3, "9": 0.1}),
        // One group.
        serde_json::json!({"1": 0.25}),
    ];
    for name in ["det-greedy", "det-cons", "det-relaxed", "det-const-sort"] {
        for target in &targets {
            specs.push(serde_json::json!({"name": name, "targets": target}));
        }
    }
    specs
}

fn run(
    reranker: &dyn Reranker,
    pool: &[Candidate],
    summary: Option<&PoolSummary>,
    k: usize,
    state: Option<&AmortizedState>,
    seed: u64,
    out: &mut RerankOutput,
) {
    let mut generator = rng(seed);
    let result = match summary {
        Some(summary) => reranker.rerank_summarized(pool, summary, k, state, &mut generator, out),
        None => reranker.rerank(pool, k, state, &mut generator, out),
    };
    result.expect("valid pool");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn summarized_rerank_equals_rerank(
        pool in pool_strategy(320),
        k in 0usize..=150,
        seed in 0u64..1000,
    ) {
        let registry = Registry::with_builtins();
        let summary = PoolSummary::of(&pool);
        let mut state = AmortizedState::default();
        state.group_exposure.insert(1, 3.0);
        state.group_relevance.insert(1, 0.5);
        state.group_exposure.insert(0, 1.0);
        state.group_relevance.insert(0, 2.0);
        state.rankings = 4;
        let (mut plain, mut summarized) = (RerankOutput::new(), RerankOutput::new());
        for spec in specs() {
            let reranker = registry.build(&spec).expect("valid spec");
            let states: &[Option<&AmortizedState>] = if reranker.is_amortized() {
                &[None, Some(&state)]
            } else {
                &[None]
            };
            for &state in states {
                run(&*reranker, &pool, None, k, state, seed, &mut plain);
                run(&*reranker, &pool, Some(&summary), k, state, seed, &mut summarized);
                prop_assert_eq!(&plain.order, &summarized.order, "{}", spec);
                prop_assert_eq!(&plain.report, &summarized.report, "{}", spec);
                prop_assert_eq!(&plain.state, &summarized.state, "{}", spec);
            }
        }
    }

    #[test]
    fn a_summary_of_another_pool_never_panics(
        pool in pool_strategy(120),
        other in pool_strategy(120),
        k in 0usize..=150,
    ) {
        let registry = Registry::with_builtins();
        let wrong = PoolSummary::of(&other);
        let mut out = RerankOutput::new();
        for spec in specs() {
            let reranker = registry.build(&spec).expect("valid spec");
            let result = reranker.rerank_summarized(&pool, &wrong, k, None, &mut rng(1), &mut out);
            if result.is_ok() {
                prop_assert!(out.order.len() <= k.min(pool.len()), "{}", spec);
                prop_assert!(out.order.iter().all(|&position| position < pool.len()));
            }
        }
    }
}

#[test]
fn a_summary_with_the_wrong_item_total_is_rejected_by_det() {
    let pool: Vec<Candidate> = (0..10)
        .map(|i| Candidate::new(i, 10.0 - i as f32, i % 2))
        .collect();
    let registry = Registry::with_builtins();
    let reranker = registry
        .build(&serde_json::json!({"name": "det-greedy", "targets": {"1": 0.5}}))
        .expect("valid spec");
    let mut out = RerankOutput::new();
    let short = PoolSummary::of(&pool[..9]);
    let result = reranker.rerank_summarized(&pool, &short, 5, None, &mut rng(0), &mut out);
    assert!(result.is_err());
}
