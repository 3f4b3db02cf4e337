//! Hand-worked and published cases for the deterministic re-rankers and the registry.

use fairness::{
    Candidate, DetConstSort, DetRanker, DetVariant, FairnessError, GroupShares, MinExposure,
    Registry, RerankOutput, Reranker, check_min_counts, dcg_weight, floor_share,
};
use rand::{Rng, SeedableRng};

fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}

fn pool(rows: &[(f32, u32)]) -> Vec<Candidate> {
    rows.iter()
        .enumerate()
        .map(|(i, &(score, group))| Candidate::new(i as u32, score, group))
        .collect()
}

#[test]
fn det_const_sort_keeps_items_within_their_max_index() {
    // Two groups at 50%: B1 .9, B2 .8, A1 .1, A2 .05. At k = 4 the published test lets A1 slip
    // from position 2 (its max index) to 3, breaking the minimum at prefix 2.
    let pool = pool(&[(0.9, 1), (0.8, 1), (0.1, 0), (0.05, 0)]);
    let targets = GroupShares::new(&[(0, 0.5), (1, 0.5)]).expect("valid");
    let mut out = RerankOutput::new();
    DetConstSort::new(targets.clone())
        .rerank(&pool, 4, None, &mut rng(0), &mut out)
        .expect("reranks");
    assert_eq!(out.order, vec![0, 2, 1, 3]);
    assert!(out.report.satisfied);
    DetConstSort::new(targets.clone())
        .with_paper_swap_test()
        .rerank(&pool, 4, None, &mut rng(0), &mut out)
        .expect("reranks");
    let violation =
        check_min_counts(&pool, &out.order, &targets).expect("the published test slips");
    assert_eq!(violation.prefix, 2);
}

#[test]
fn det_greedy_follows_the_published_rules_on_a_two_group_case() {
    // 50/50 targets: belowMin forces alternation whenever a group falls behind floor(t/2).
    let pool = pool(&[(0.9, 0), (0.8, 0), (0.7, 0), (0.6, 1), (0.5, 1), (0.4, 1)]);
    let targets = GroupShares::new(&[(0, 0.5), (1, 0.5)]).expect("valid");
    let mut out = RerankOutput::new();
    DetRanker::new(DetVariant::Greedy, targets)
        .rerank(&pool, 6, None, &mut rng(0), &mut out)
        .expect("reranks");
    // t=1: both below max, best is A. t=2: B below min. t=3: both below max (ceil 2), A best.
    assert_eq!(out.order, vec![0, 3, 1, 4, 2, 5]);
    assert!(out.report.notes.is_empty());
}

#[test]
fn det_cons_prefers_the_group_whose_next_minimum_comes_first() {
    // Shares .6 / .4: at t=1 belowMax = both; ceil(.6)/.6 = 1.67 < ceil(.4)/.4 = 2.5, so DetCons
    // takes group 0 even though group 1 has the better item; DetGreedy takes group 1.
    let pool = pool(&[(0.9, 1), (0.8, 0), (0.7, 0), (0.6, 1)]);
    let targets = GroupShares::new(&[(0, 0.6), (1, 0.4)]).expect("valid");
    let mut out = RerankOutput::new();
    DetRanker::new(DetVariant::Cons, targets.clone())
        .rerank(&pool, 1, None, &mut rng(0), &mut out)
        .expect("reranks");
    assert_eq!(out.order, vec![1]);
    DetRanker::new(DetVariant::Greedy, targets.clone())
        .rerank(&pool, 1, None, &mut rng(0), &mut out)
        .expect("reranks");
    assert_eq!(out.order, vec![0]);
    // DetRelaxed: ceil(ceil(.6)/.6) = 2 = ceil(ceil(.4)/.4) - 1 = 3 - 1; group 0 alone minimizes.
    DetRanker::new(DetVariant::Relaxed, targets)
        .rerank(&pool, 1, None, &mut rng(0), &mut out)
        .expect("reranks");
    assert_eq!(out.order, vec![1]);
}

#[test]
fn feasibility_guard_fixes_published_failures_with_many_groups() {
    // Random instances with 3-5 groups and plentiful items: the published rules sometimes
    // leave two minimums due at once; the guarded version never does.
    let mut published_failures = 0;
    let mut generator = rng(42);
    for _ in 0..600 {
        let groups = generator.random_range(3u32..=5);
        let mut weights: Vec<f64> = (0..groups)
            .map(|_| f64::from(generator.random_range(1u32..10)))
            .collect();
        let total: f64 = weights.iter().sum();
        for weight in &mut weights {
            *weight /= total;
        }
        let shares: Vec<(u32, f64)> = weights
            .iter()
            .enumerate()
            .map(|(label, &share)| (label as u32, share))
            .collect();
        let targets = GroupShares::new(&shares).expect("valid");
        let n = 200;
        let mut rows: Vec<(f32, u32)> = (0..n)
            .map(|_| (generator.random::<f32>(), generator.random_range(0..groups)))
            .collect();
        rows.sort_by(|a, b| b.0.total_cmp(&a.0));
        let pool = pool(&rows);
        let k = 40;
        for variant in [DetVariant::Greedy, DetVariant::Cons, DetVariant::Relaxed] {
            let mut out = RerankOutput::new();
            DetRanker::new(variant, targets.clone())
                .rerank(&pool, k, None, &mut rng(0), &mut out)
                .expect("reranks");
            let available = |label: u32| pool.iter().filter(|c| c.group == label).count();
            let mut counts = vec![0usize; groups as usize];
            for (index, &position) in out.order.iter().enumerate() {
                counts[pool[position].group as usize] += 1;
                for &(label, share) in &shares {
                    assert!(
                        counts[label as usize]
                            >= floor_share(index + 1, share).min(available(label))
                    );
                }
            }
            DetRanker::new(variant, targets.clone())
                .without_guard()
                .rerank(&pool, k, None, &mut rng(0), &mut out)
                .expect("reranks");
            let plentiful = shares
                .iter()
                .all(|&(label, share)| available(label) >= floor_share(k, share));
            if plentiful && check_min_counts(&pool, &out.order, &targets).is_some() {
                published_failures += 1;
            }
        }
    }
    assert!(
        published_failures > 0,
        "expected the published rules to fail on some instance"
    );
}

/// Best utility over all label sequences meeting the exposure targets (brute force).
fn brute_force_min_exposure(
    pool: &[Candidate],
    k: usize,
    targets: &[(u32, f64)],
    labels: &[u32],
) -> Option<f64> {
    let per_group: Vec<Vec<usize>> = labels
        .iter()
        .map(|&label| {
            (0..pool.len())
                .filter(|&p| pool[p].group == label)
                .collect()
        })
        .collect();
    let total: f64 = (1..=k).map(dcg_weight).sum();
    let mut best = None;
    let sequences = labels.len().pow(k as u32);
    for code in 0..sequences {
        let mut rest = code;
        let mut counts = vec![0usize; labels.len()];
        let mut exposure = vec![0.0; labels.len()];
        let mut utility = 0.0;
        let mut valid = true;
        for rank in 1..=k {
            let group = rest % labels.len();
            rest /= labels.len();
            let Some(&position) = per_group[group].get(counts[group]) else {
                valid = false;
                break;
            };
            counts[group] += 1;
            exposure[group] += dcg_weight(rank);
            utility += dcg_weight(rank) * f64::from(pool[position].score);
        }
        let meets = targets.iter().all(|&(label, share)| {
            let index = labels.iter().position(|&l| l == label).unwrap_or(0);
            exposure[index] >= share * total - 1e-12
        });
        if valid && meets && best.is_none_or(|b| utility > b) {
            best = Some(utility);
        }
    }
    best
}

#[test]
fn min_exposure_is_exact_on_small_k_and_bounded_on_larger_k() {
    let mut generator = rng(5);
    for case in 0..12 {
        let n = 30;
        let mut rows: Vec<(f32, u32)> = (0..n)
            .map(|_| {
                let group = if generator.random::<f64>() < 0.2 {
                    1
                } else if generator.random::<bool>() {
                    0
                } else {
                    2
                };
                (generator.random::<f32>(), group)
            })
            .collect();
        rows.sort_by(|a, b| b.0.total_cmp(&a.0));
        let pool = pool(&rows);
        let targets = [(1u32, 0.35), (2, 0.2)];
        let k = if case % 2 == 0 { 8 } else { 11 };
        let reranker = MinExposure::new(GroupShares::new(&targets).expect("valid"));
        let mut out = RerankOutput::new();
        reranker
            .rerank(&pool, k, None, &mut rng(0), &mut out)
            .expect("reranks");
        let optimality = out.report.optimality.expect("reported");
        let optimum = brute_force_min_exposure(&pool, k, &targets, &[0, 1, 2]);
        match optimum {
            Some(optimum) => {
                assert!(
                    optimality.upper_bound >= optimum - 1e-9,
                    "bound {} below optimum {optimum}",
                    optimality.upper_bound
                );
                if out.report.satisfied {
                    assert!(optimality.utility <= optimum + 1e-9);
                }
                if optimality.exact {
                    assert!(out.report.satisfied);
                    assert!(
                        (optimality.utility - optimum).abs() < 1e-9,
                        "exact search missed the optimum"
                    );
                }
            }
            None => assert!(!out.report.satisfied),
        }
    }
}

#[test]
fn registry_builds_every_builtin_from_json_and_strings_and_round_trips_configs() {
    let registry = Registry::with_builtins();
    let names: Vec<&str> = registry
        .constraints()
        .map(|info| info.name.as_str())
        .collect();
    for expected in [
        "none",
        "fa*ir",
        "det-greedy",
        "det-cons",
        "det-relaxed",
        "det-const-sort",
        "min-exposure",
        "fairco",
        "plackett-luce",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let fair = registry
        .build_from_strings(
            "fa*ir",
            [
                ("p", "0.5"),
                ("alpha", "0.05"),
                ("protected", "2"),
                ("adjust_alpha", "false"),
            ],
        )
        .expect("builds");
    assert_eq!(fair.config()["alpha"], 0.05);
    assert_eq!(fair.config()["adjust_alpha"], false);
    let det = registry
        .build_from_strings("det-greedy", [("targets", "0:0.5,1:0.25")])
        .expect("builds");
    let rebuilt = registry.build(&det.config()).expect("round trip");
    assert_eq!(rebuilt.config(), det.config());
    for spec in [
        serde_json::json!({"name": "fa*ir", "p": 0.3, "protected": 1}),
        serde_json::json!({"name": "min-exposure", "targets": {"1": 0.2}}),
        serde_json::json!({"name": "fairco", "lambda": 2}),
        serde_json::json!({"name": "plackett-luce"}),
        serde_json::json!({"name": "det-const-sort", "targets": "{\"3\": 0.5}"}),
    ] {
        let built = registry.build(&spec).expect("builds");
        assert_eq!(
            registry
                .build(&built.config())
                .expect("round trip")
                .config(),
            built.config()
        );
    }
}

#[test]
fn registry_errors_name_the_constraint_and_parameter() {
    let registry = Registry::with_builtins();
    let error = registry
        .build(&serde_json::json!({"name": "fiar"}))
        .expect_err("unknown");
    assert!(
        matches!(&error, FairnessError::UnknownConstraint { known, .. } if known.contains("fa*ir")),
        "{error}"
    );
    let error = registry
        .build(&serde_json::json!({"name": "fa*ir", "protected": 1}))
        .expect_err("missing p");
    assert!(
        matches!(&error, FairnessError::MissingParameter { parameter, .. } if parameter == "p"),
        "{error}"
    );
    let error = registry
        .build(&serde_json::json!({"name": "fa*ir", "p": 1.5, "protected": 1}))
        .expect_err("bad p");
    assert!(
        matches!(&error, FairnessError::InvalidParameter { parameter, .. } if parameter == "p"),
        "{error}"
    );
    let error = registry
        .build(&serde_json::json!({"name": "fa*ir", "p": 0.5, "protected": 1, "alfa": 0.1}))
        .expect_err("typo");
    assert!(
        matches!(&error, FairnessError::UnknownParameter { parameter, .. } if parameter == "alfa"),
        "{error}"
    );
    let error = registry
        .build(&serde_json::json!({"name": "det-cons", "targets": {"0": 0.8, "1": 0.4}}))
        .expect_err("sum > 1");
    assert!(
        matches!(&error, FairnessError::InvalidParameter { parameter, .. } if parameter == "targets"),
        "{error}"
    );
    let error = registry
        .build(&serde_json::json!({"name": "fairco", "lambda": -1}))
        .expect_err("negative");
    assert!(error.to_string().contains("lambda"), "{error}");
    let error = registry
        .build(&serde_json::json!({"name": "plackett-luce", "temperature": "hot"}))
        .expect_err("not a number");
    assert!(error.to_string().contains("temperature"), "{error}");
    assert!(matches!(
        registry.build(&serde_json::json!(["fa*ir"])),
        Err(FairnessError::InvalidSpec { .. })
    ));
    assert!(matches!(
        registry.build(&serde_json::json!({"p": 0.5})),
        Err(FairnessError::InvalidSpec { .. })
    ));
    let error = registry
        .build(&serde_json::json!({"name": "none", "k": 3}))
        .expect_err("none takes nothing");
    assert!(error.to_string().contains("no parameters"), "{error}");
}

#[test]
fn invalid_pools_are_rejected_not_panicked_on() {
    let registry = Registry::with_builtins();
    let unsorted = pool(&[(0.1, 0), (0.9, 1)]);
    let nan = pool(&[(f32::NAN, 0)]);
    for info in registry.constraints() {
        let spec = match info.name.as_str() {
            "fa*ir" => serde_json::json!({"name": "fa*ir", "p": 0.5, "protected": 1}),
            "fairco" => serde_json::json!({"name": "fairco", "lambda": 1}),
            name if name.starts_with("det") || name == "min-exposure" => {
                serde_json::json!({"name": name, "targets": {"1": 0.5}})
            }
            name => serde_json::json!({"name": name}),
        };
        let reranker = registry.build(&spec).expect("builds");
        let mut out = RerankOutput::new();
        assert!(matches!(
            reranker.rerank(&unsorted, 2, None, &mut rng(0), &mut out),
            Err(FairnessError::InvalidPool { .. })
        ));
        assert!(matches!(
            reranker.rerank(&nan, 1, None, &mut rng(0), &mut out),
            Err(FairnessError::InvalidPool { .. })
        ));
    }
}

#[test]
fn registry_names_are_exact_and_case_sensitive() {
    let mut registry = Registry::with_builtins();
    let params = serde_json::Map::new();
    for asked in ["FA*IR", "Fa*ir", " fa*ir", "fa*ir ", "NONE"] {
        let error = registry
            .build_named(asked, &params)
            .expect_err("only the exact spelling is registered");
        let FairnessError::UnknownConstraint { name, known, hint } = &error else {
            panic!("{asked:?}: expected UnknownConstraint, got {error}");
        };
        assert_eq!(name, asked);
        assert!(known.contains("fa*ir") && known.contains("none"), "{known}");
        assert!(hint.contains("did you mean"), "{asked:?}: {hint}");
        let message = error.to_string();
        assert!(message.contains("case-sensitive"), "{message}");
        assert!(
            message.contains("det-const-sort"),
            "lists every name: {message}"
        );
    }
    let error = registry.build_named("fiar", &params).expect_err("unknown");
    assert!(
        matches!(&error, FairnessError::UnknownConstraint { hint, .. } if hint.is_empty()),
        "no hint without a case-insensitive match: {error}"
    );
    assert!(registry.info("fa*ir").is_some());
    assert!(registry.info("FA*IR").is_none());
    // Registration keeps the exact spelling and refuses names that would only differ in case.
    registry
        .register(
            fairness::ConstraintInfo::new("MyRank", "research constraint"),
            |_: &fairness::Params<'_>| Ok(Box::new(fairness::ScoreOrder) as Box<_>),
        )
        .expect("registers");
    assert!(registry.build_named("MyRank", &params).is_ok());
    assert!(registry.build_named("myrank", &params).is_err());
    for clash in ["FAIRCO", "myRank", " padded", ""] {
        assert!(
            registry
                .register(
                    fairness::ConstraintInfo::new(clash, "clash"),
                    |_: &fairness::Params<'_>| Ok(Box::new(fairness::ScoreOrder) as Box<_>),
                )
                .is_err(),
            "{clash:?} must be refused"
        );
    }
}

#[test]
fn violation_checks_any_returned_order_against_the_constraint() {
    // Eight majority items on top, then four of group 1.
    let rows: Vec<(f32, u32)> = (0..12)
        .map(|i| (100.0 - i as f32, u32::from(i >= 8)))
        .collect();
    let pool = pool(&rows);
    let top: Vec<usize> = (0..6).collect();
    let registry = Registry::with_builtins();
    let build = |spec: serde_json::Value| registry.build(&spec).expect("builds");
    let fair = build(serde_json::json!({"name": "fa*ir", "p": 0.5, "protected": 1}));
    let greedy = build(serde_json::json!({"name": "det-greedy", "targets": {"1": 0.5}}));
    let sort = build(serde_json::json!({"name": "det-const-sort", "targets": {"1": 0.5}}));
    let exposure = build(serde_json::json!({"name": "min-exposure", "targets": {"1": 0.3}}));
    let targets = GroupShares::new(&[(1, 0.5)]).expect("valid");
    for reranker in [&greedy, &sort] {
        let violation = reranker
            .violation(&pool, &top)
            .expect("checks")
            .expect("the score order starves group 1");
        assert_eq!(Some(violation), check_min_counts(&pool, &top, &targets));
        assert_eq!((violation.prefix, violation.group), (2, 1));
        assert_eq!((violation.required, violation.actual), (1.0, 0.0));
    }
    let violation = fair
        .violation(&pool, &top)
        .expect("checks")
        .expect("the score order fails the mtable");
    assert_eq!(violation.group, 1);
    assert_eq!(violation.actual, 0.0);
    let exposure_violation = exposure
        .violation(&pool, &top)
        .expect("checks")
        .expect("no exposure for group 1");
    assert_eq!(exposure_violation.prefix, 6);
    assert_eq!(exposure_violation.actual, 0.0);
    // The re-rankers' own answers pass their checks; constraints without a per-ranking
    // requirement never report one.
    let mut out = RerankOutput::new();
    for reranker in [&fair, &greedy, &sort, &exposure] {
        reranker
            .rerank(&pool, 6, None, &mut rng(1), &mut out)
            .expect("reranks");
        assert!(out.report.satisfied, "{}", reranker.name());
        assert_eq!(reranker.violation(&pool, &out.order).expect("checks"), None);
    }
    for name in ["none", "plackett-luce"] {
        let reranker = build(serde_json::json!({ "name": name }));
        assert_eq!(reranker.violation(&pool, &top).expect("checks"), None);
    }
    assert_eq!(fair.violation(&pool, &[]).expect("checks"), None);
}
