//! Property tests over every built-in constraint: outputs are partial permutations of the pool,
//! constraints hold at every prefix when feasible, and `none` is the score order.

use fairness::{
    AmortizedState, Candidate, DetConstSort, DetRanker, DetVariant, GroupShares, MTable,
    MinExposure, Registry, RerankOutput, Reranker, check_min_counts, check_min_exposure,
    check_mtable, dcg_weight, floor_share,
};
use proptest::prelude::*;
use rand::SeedableRng;

fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}

/// A pool in non-increasing score order (ties allowed) with labels below `labels`.
fn pool_strategy(max_len: usize, labels: u32) -> impl Strategy<Value = Vec<Candidate>> {
    prop::collection::vec((0u32..20, 0..labels), 0..max_len).prop_map(|raw| {
        let mut scores: Vec<u32> = raw.iter().map(|&(score, _)| score).collect();
        scores.sort_unstable_by(|a, b| b.cmp(a));
        raw.iter()
            .zip(scores)
            .enumerate()
            .map(|(i, (&(_, group), score))| Candidate::new(i as u32, score as f32 / 10.0, group))
            .collect()
    })
}

fn shares_strategy(labels: u32) -> impl Strategy<Value = Vec<(u32, f64)>> {
    prop::collection::vec(1u32..10, labels as usize).prop_map(move |weights| {
        // Listed shares summing to at most 1 (the last label is left to the rest group half the time).
        let total: u32 = weights.iter().sum::<u32>() + weights[0];
        weights
            .iter()
            .enumerate()
            .map(|(label, &w)| (label as u32, f64::from(w) / f64::from(total)))
            .collect()
    })
}

fn assert_partial_permutation(pool: &[Candidate], k: usize, order: &[usize]) {
    assert_eq!(order.len(), k.min(pool.len()));
    let mut sorted = order.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), order.len(), "duplicates in {order:?}");
    assert!(order.iter().all(|&position| position < pool.len()));
}

fn assert_group_order_kept(pool: &[Candidate], order: &[usize]) {
    let mut last: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for &position in order {
        let group = pool[position].group;
        if let Some(&previous) = last.get(&group) {
            assert!(
                previous < position,
                "group {group} items out of score order in {order:?}"
            );
        }
        last.insert(group, position);
    }
}

fn count_in(pool: &[Candidate], group: u32) -> usize {
    pool.iter()
        .filter(|candidate| candidate.group == group)
        .count()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn every_builtin_returns_a_partial_permutation(pool in pool_strategy(50, 4), k in 0usize..60, seed in 0u64..1000) {
        let registry = Registry::with_builtins();
        let specs = [
            serde_json::json!({"name": "none"}),
            serde_json::json!({"name": "fa*ir", "p": 0.4, "protected": 1}),
            serde_json::json!({"name": "det-greedy", "targets": {"0": 0.3, "1": 0.3, "2": 0.2}}),
            serde_json::json!({"name": "det-cons", "targets": {"0": 0.3, "1": 0.3, "2": 0.2}}),
            serde_json::json!({"name": "det-relaxed", "targets": {"0": 0.3, "1": 0.3, "2": 0.2}}),
            serde_json::json!({"name": "det-const-sort", "targets": {"0": 0.3, "1": 0.3, "2": 0.2}}),
            serde_json::json!({"name": "min-exposure", "targets": {"1": 0.3}}),
            serde_json::json!({"name": "fairco", "lambda": 0.5}),
            serde_json::json!({"name": "plackett-luce", "temperature": 0.3}),
        ];
        let mut out = RerankOutput::new();
        for spec in &specs {
            let reranker = registry.build(spec).expect("builtin builds");
            reranker.rerank(&pool, k, None, &mut rng(seed), &mut out).expect("valid pool");
            assert_partial_permutation(&pool, k, &out.order);
            if reranker.name() != "plackett-luce" {
                assert_group_order_kept(&pool, &out.order);
            }
            assert_eq!(out.report.satisfied, out.report.violation.is_none(), "{spec}");
            assert_eq!(out.state.is_some(), reranker.is_amortized());
        }
    }

    #[test]
    fn none_is_the_score_order(pool in pool_strategy(50, 3), k in 0usize..60) {
        let reranker = Registry::with_builtins().build(&serde_json::json!({"name": "none"})).expect("builds");
        let mut out = RerankOutput::new();
        reranker.rerank(&pool, k, None, &mut rng(0), &mut out).expect("valid pool");
        prop_assert_eq!(out.order, (0..k.min(pool.len())).collect::<Vec<_>>());
    }

    #[test]
    fn fair_keeps_min_of_mtable_and_supply_at_every_prefix(
        pool in pool_strategy(60, 3), k in 1usize..60, p in 0.05f64..0.95, alpha in 0.01f64..0.2, adjust in any::<bool>()
    ) {
        let spec = serde_json::json!({"name": "fa*ir", "p": p, "alpha": alpha, "protected": 1, "adjust_alpha": adjust});
        let reranker = Registry::with_builtins().build(&spec).expect("builds");
        let mut out = RerankOutput::new();
        reranker.rerank(&pool, k, None, &mut rng(0), &mut out).expect("valid pool");
        let length = out.order.len();
        let table = MTable::compute(length, p, alpha, adjust).expect("valid");
        let supply = count_in(&pool, 1);
        let mut protected = 0;
        for (index, &position) in out.order.iter().enumerate() {
            protected += usize::from(pool[position].group == 1);
            prop_assert!(protected >= table.required(index + 1).min(supply));
        }
        let violation = check_mtable(&pool, &out.order, 1, &table);
        prop_assert_eq!(violation.is_none(), out.report.satisfied);
        if supply >= table.required(length) {
            prop_assert!(out.report.satisfied);
        }
    }

    #[test]
    fn det_algorithms_keep_every_available_minimum_at_every_prefix(
        pool in pool_strategy(60, 6), k in 1usize..60, shares in shares_strategy(4), full in any::<bool>()
    ) {
        // `full`: shares sum to 1, so unlisted labels (4, 5) only fill in when groups run out.
        let shares: Vec<(u32, f64)> = if full {
            let total: f64 = shares.iter().map(|&(_, share)| share).sum();
            shares.iter().map(|&(label, share)| (label, share / total)).collect()
        } else {
            shares
        };
        let targets = GroupShares::new(&shares).expect("valid shares");
        let rerankers: Vec<Box<dyn Reranker>> = vec![
            Box::new(DetRanker::new(DetVariant::Greedy, targets.clone())),
            Box::new(DetRanker::new(DetVariant::Cons, targets.clone())),
            Box::new(DetRanker::new(DetVariant::Relaxed, targets.clone())),
            Box::new(DetConstSort::new(targets.clone())),
        ];
        let mut out = RerankOutput::new();
        for reranker in &rerankers {
            reranker.rerank(&pool, k, None, &mut rng(0), &mut out).expect("valid pool");
            assert_partial_permutation(&pool, k, &out.order);
            let mut counts = [0usize; 6];
            for (index, &position) in out.order.iter().enumerate() {
                counts[pool[position].group as usize] += 1;
                for &(label, share) in &shares {
                    let needed = floor_share(index + 1, share).min(count_in(&pool, label));
                    prop_assert!(counts[label as usize] >= needed, "{} prefix {} group {}", reranker.name(), index + 1, label);
                }
            }
            prop_assert_eq!(check_min_counts(&pool, &out.order, &targets).is_none(), out.report.satisfied);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn min_exposure_meets_targets_when_it_says_so_and_stays_below_its_bound(
        pool in pool_strategy(40, 3), k in 1usize..30, share in 0.05f64..0.6
    ) {
        let targets = GroupShares::new(&[(1, share)]).expect("valid");
        let reranker = MinExposure::new(targets.clone());
        let mut out = RerankOutput::new();
        reranker.rerank(&pool, k, None, &mut rng(0), &mut out).expect("valid pool");
        assert_partial_permutation(&pool, k, &out.order);
        let optimality = out.report.optimality.expect("optimality reported");
        let utility: f64 = out.order.iter().enumerate().map(|(i, &p)| dcg_weight(i + 1) * f64::from(pool[p].score)).sum();
        prop_assert!((utility - optimality.utility).abs() < 1e-9 * (1.0 + utility.abs()));
        prop_assert!(optimality.utility <= optimality.upper_bound + 1e-9 * (1.0 + utility.abs()));
        prop_assert_eq!(check_min_exposure(&pool, &out.order, &targets).is_none(), out.report.satisfied);
        // One constrained group: feasible iff ranking its items first reaches the share.
        let supply = count_in(&pool, 1).min(out.order.len());
        let best: f64 = (1..=supply).map(dcg_weight).sum();
        let total: f64 = (1..=out.order.len()).map(dcg_weight).sum();
        if total > 0.0 && best >= share * total + 1e-9 {
            prop_assert!(out.report.satisfied);
        }
    }
}

#[test]
fn fairco_state_round_trips_and_counts_rankings() {
    let registry = Registry::with_builtins();
    let reranker = registry
        .build(&serde_json::json!({"name": "fairco", "lambda": 1.0}))
        .expect("builds");
    let pool: Vec<Candidate> = (0..10)
        .map(|i| Candidate::new(i, 1.0 - 0.05 * i as f32, i % 2))
        .collect();
    let mut out = RerankOutput::new();
    let mut state: Option<AmortizedState> = None;
    for _ in 0..3 {
        reranker
            .rerank(&pool, 4, state.as_ref(), &mut rng(0), &mut out)
            .expect("reranks");
        let text = serde_json::to_string(out.state.as_ref().expect("state")).expect("serializes");
        state = Some(serde_json::from_str(&text).expect("deserializes"));
    }
    assert_eq!(state.expect("state").rankings, 3);
}
