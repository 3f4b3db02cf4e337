//! The fairness stage end to end through the engine: every registered constraint on real
//! pools, infeasible pools under each `on_infeasible` action, amortized state per scope,
//! seeded stochastic rankings and the configured default policy.

use std::collections::{BTreeMap, BTreeSet};

use super::util::{fixture, fixture_with};
use crate::{
    EngineConfig, EngineError, FairnessFallback, FairnessPolicy, InfeasibleAction, ParamValue,
    PreconditionReason, RankRequest, RankResponse, UserRef,
};

fn number(value: f64) -> ParamValue {
    ParamValue::Number(value)
}

fn shares(pairs: &[(&str, f64)]) -> ParamValue {
    ParamValue::Map(
        pairs
            .iter()
            .map(|(label, share)| ((*label).to_owned(), number(*share)))
            .collect(),
    )
}

fn policy(constraint: &str, params: &[(&str, ParamValue)]) -> FairnessPolicy {
    FairnessPolicy {
        constraint: constraint.to_owned(),
        params: params
            .iter()
            .map(|(key, value)| ((*key).to_owned(), value.clone()))
            .collect(),
        ..FairnessPolicy::default()
    }
}

fn request(id: &str, user: &str, k: usize, pool: usize, fairness: FairnessPolicy) -> RankRequest {
    let mut request = RankRequest::new(id, UserRef::id(user), k);
    request.pool_size = Some(pool);
    request.fairness = fairness;
    request
}

/// `provider_group` labels of the answer, best first.
fn labels(response: &RankResponse) -> Vec<u32> {
    response
        .items
        .iter()
        .map(|item| item.group_labels[0])
        .collect()
}

/// Checks the answer is k distinct pool items and the report's shares are consistent.
fn check_answer_shape(response: &RankResponse, k: usize) {
    assert_eq!(response.items.len(), k);
    let ranks: BTreeSet<u32> = response
        .items
        .iter()
        .map(|item| item.unconstrained_rank)
        .collect();
    assert_eq!(ranks.len(), k, "distinct pool items");
    assert!(
        ranks
            .iter()
            .all(|&rank| rank as usize <= response.pool_size)
    );
    let total: f64 = response
        .fairness
        .groups
        .iter()
        .map(|group| group.exposure_share)
        .sum();
    assert!((total - 1.0).abs() < 1e-9, "shares sum to 1: {total}");
    let returned: u32 = response
        .fairness
        .groups
        .iter()
        .map(|group| group.items_returned)
        .sum();
    assert_eq!(returned as usize, k);
    let ndcg = response.fairness.ndcg_vs_unconstrained;
    assert!((0.0..=1.0).contains(&ndcg), "{ndcg}");
}

#[test]
fn fa_star_ir_answers_meet_the_adjusted_mtable_at_every_prefix() {
    let fixture = fixture();
    let (k, p, alpha) = (30, 0.6, 0.1);
    let fair = policy(
        "fa*ir",
        &[
            ("p", number(p)),
            ("alpha", number(alpha)),
            ("protected", number(1.0)),
        ],
    );
    let table = fairness::MTable::adjusted(k, p, alpha).expect("mtable");
    for user in ["user-0", "user-3", "user-7"] {
        let response = fixture
            .engine
            .rank_blocking(request("fair", user, k, 200, fair.clone()))
            .expect("ranks");
        check_answer_shape(&response, k);
        let report = &response.fairness;
        assert_eq!(report.constraint, "fa*ir");
        assert!(report.satisfied, "{report:?}");
        assert_eq!(report.fallback, FairnessFallback::None);
        let mut protected = 0;
        for (prefix, label) in labels(&response).into_iter().enumerate() {
            protected += u32::from(label == 1);
            assert!(
                protected >= table.min_protected[prefix],
                "{user}: prefix {}",
                prefix + 1
            );
        }
        let target = report.groups.iter().find(|group| group.group == 1);
        assert_eq!(target.and_then(|group| group.target_share), Some(p));
    }
}

#[test]
fn det_constraints_keep_every_group_at_its_floor_at_every_prefix() {
    let fixture = fixture();
    let k = 24;
    let targets = [("0", 0.5), ("1", 0.5)];
    for name in ["det-greedy", "det-cons", "det-relaxed", "det-const-sort"] {
        let det = policy(name, &[("targets", shares(&targets))]);
        let response = fixture
            .engine
            .rank_blocking(request("det", "user-2", k, 150, det))
            .expect("ranks");
        check_answer_shape(&response, k);
        assert!(
            response.fairness.satisfied,
            "{name}: {:?}",
            response.fairness
        );
        assert_eq!(response.fairness.constraint, name);
        let mut counts = [0usize; 2];
        for (prefix, label) in labels(&response).into_iter().enumerate() {
            counts[label as usize] += 1;
            for (group, &(_, share)) in targets.iter().enumerate() {
                let floor = fairness::floor_share(prefix + 1, share);
                assert!(counts[group] >= floor, "{name}: prefix {}", prefix + 1);
            }
        }
    }
}

#[test]
fn min_exposure_gives_the_group_its_share_and_states_the_optimality_gap() {
    let fixture = fixture();
    let share = 0.45;
    let policy = policy("min-exposure", &[("targets", shares(&[("1", share)]))]);
    let response = fixture
        .engine
        .rank_blocking(request("exposure", "user-4", 20, 100, policy))
        .expect("ranks");
    check_answer_shape(&response, 20);
    let report = &response.fairness;
    assert!(report.satisfied, "{report:?}");
    let group = report
        .groups
        .iter()
        .find(|group| group.group == 1)
        .expect("protected group in the pool");
    assert!(group.exposure_share >= share - 1e-9, "{group:?}");
    let optimality = report.optimality.expect("min-exposure states its gap");
    assert!(optimality.gap >= 0.0 && optimality.utility <= optimality.upper_bound + 1e-9);
}

#[test]
fn infeasible_pools_follow_the_requested_action() {
    let fixture = fixture();
    // Candidates: eleven of group 0 and one of group 1 (every third row is group 1).
    let candidates: Vec<String> = (0..18)
        .filter(|row| row % 3 != 0 || *row == 3)
        .map(|row| format!("item-{row:03}"))
        .collect();
    let greedy = |action| FairnessPolicy {
        on_infeasible: action,
        ..policy("det-greedy", &[("targets", shares(&[("1", 0.5)]))])
    };
    let ask = |action| {
        let mut request = request("infeasible", "user-1", 8, 13, greedy(action));
        request.candidate_ids = candidates.clone().into();
        fixture.engine.rank_blocking(request)
    };

    let best_effort = ask(InfeasibleAction::Unspecified).expect("best effort by default");
    let report = &best_effort.fairness;
    assert!(!report.satisfied);
    assert_eq!(report.fallback, FairnessFallback::BestEffort);
    assert!(!report.fallback_reason.is_empty());
    assert!(!report.violations.is_empty(), "{report:?}");
    assert_eq!(labels(&best_effort).iter().filter(|&&l| l == 1).count(), 1);

    let unconstrained = ask(InfeasibleAction::Unconstrained).expect("unconstrained");
    assert_eq!(
        unconstrained.fairness.fallback,
        FairnessFallback::Unconstrained
    );
    let ranks: Vec<u32> = unconstrained
        .items
        .iter()
        .map(|item| item.unconstrained_rank)
        .collect();
    assert_eq!(ranks, (1..=8).collect::<Vec<u32>>());

    let refused = ask(InfeasibleAction::Reject).unwrap_err();
    assert!(matches!(
        refused,
        EngineError::FailedPrecondition {
            reason: PreconditionReason::FairnessInfeasible,
            ..
        }
    ));
    assert_eq!(refused.field(), Some("fairness.constraint"));
}

#[test]
fn fairco_keeps_amortized_state_per_scope() {
    let fixture = fixture();
    let fairco = |scope: &str| FairnessPolicy {
        exposure_scope: scope.to_owned(),
        ..policy("fairco", &[("lambda", number(5.0))])
    };
    for round in 0..3 {
        let response = fixture
            .engine
            .rank_blocking(request("fairco", "user-5", 10, 60, fairco("home")))
            .expect("ranks");
        check_answer_shape(&response, 10);
        let report = &response.fairness;
        assert_eq!(report.exposure_scope, "home");
        assert!(!report.amortized.is_empty(), "round {round}");
        let exposure: f64 = report.amortized.iter().map(|g| g.exposure_share).sum();
        assert!((exposure - 1.0).abs() < 1e-9);
        assert!(report.amortized_disparity.is_some());
    }
    let state = fixture
        .engine
        .exposure_state("provider_group", "home")
        .expect("readable")
        .expect("recorded");
    assert_eq!(state.rankings, 3);
    assert!(state.group_exposure.values().all(|&value| value > 0.0));
    assert_eq!(
        fixture
            .engine
            .exposure_state("provider_group", "other")
            .expect("readable"),
        None
    );
    fixture
        .engine
        .rank_blocking(request("fairco", "user-5", 10, 60, fairco("other")))
        .expect("ranks");
    let other = fixture
        .engine
        .exposure_state("provider_group", "other")
        .expect("readable")
        .expect("recorded");
    assert_eq!(other.rankings, 1);
    // A per-ranking constraint does not report a scope.
    let none = fixture
        .engine
        .rank_blocking(request(
            "none",
            "user-5",
            10,
            60,
            FairnessPolicy {
                exposure_scope: "home".into(),
                ..FairnessPolicy::none()
            },
        ))
        .expect("ranks");
    assert_eq!(none.fairness.exposure_scope, "");
    assert!(none.fairness.amortized.is_empty());
}

#[test]
fn plackett_luce_with_a_seed_is_reproducible() {
    let fixture = fixture();
    let sampled = |seed: Option<u64>| {
        let mut pl = policy("plackett-luce", &[("temperature", number(2.0))]);
        pl.seed = seed;
        fixture
            .engine
            .rank_blocking(request("pl", "user-6", 15, 80, pl))
            .expect("ranks")
    };
    let ids = |response: &RankResponse| {
        response
            .items
            .iter()
            .map(|item| item.id.clone())
            .collect::<Vec<_>>()
    };
    let first = sampled(Some(42));
    check_answer_shape(&first, 15);
    assert_eq!(first.fairness.seed, Some(42));
    assert_eq!(ids(&first), ids(&sampled(Some(42))));
    // Unseeded answers report the seed they used; sending it back reproduces them.
    let drawn = sampled(None);
    let seed = drawn.fairness.seed.expect("the drawn seed is reported");
    assert_eq!(ids(&drawn), ids(&sampled(Some(seed))));
    // Different seeds give different samples (80 items at temperature 2: a collision of
    // all 15 positions is negligible).
    let others: BTreeSet<Vec<String>> = (0..4).map(|s| ids(&sampled(Some(s)))).collect();
    assert!(others.len() > 1);
}

#[test]
fn the_configured_default_policy_applies_to_requests_without_one() {
    let config = EngineConfig {
        default_fairness_constraint: "det-greedy".to_owned(),
        default_fairness_params: BTreeMap::from([(
            "targets".to_owned(),
            serde_json::json!({"1": 0.5}),
        )]),
        ..EngineConfig::default()
    };
    let fixture = fixture_with(config, true);
    let response = fixture
        .engine
        .rank_blocking(request(
            "default",
            "user-1",
            10,
            100,
            FairnessPolicy::default(),
        ))
        .expect("ranks");
    assert_eq!(response.fairness.constraint, "det-greedy");
    assert!(response.fairness.satisfied);
    let protected = labels(&response).iter().filter(|&&l| l == 1).count();
    assert!(protected >= 5);
    // Explicit `none` overrides the default.
    let none = fixture
        .engine
        .rank_blocking(request("none", "user-1", 10, 100, FairnessPolicy::none()))
        .expect("ranks");
    assert_eq!(none.fairness.constraint, "none");
}

#[test]
fn constraints_need_a_group_attribute() {
    let config = EngineConfig {
        default_group_attribute: "missing".to_owned(),
        ..EngineConfig::default()
    };
    let fixture = fixture_with(config, true);
    let error = fixture
        .engine
        .rank_blocking(request(
            "group",
            "user-1",
            5,
            50,
            policy("fairco", &[("lambda", number(1.0))]),
        ))
        .unwrap_err();
    assert_eq!(error.field(), Some("fairness.group_attribute"));
    // `none` still answers, without groups.
    let none = fixture
        .engine
        .rank_blocking(request("none", "user-1", 5, 50, FairnessPolicy::default()))
        .expect("ranks");
    assert!(none.fairness.groups.is_empty());
}

#[test]
fn every_registered_constraint_is_listed_with_its_parameters() {
    let fixture = fixture();
    let constraints = fixture.engine.fairness_constraints();
    let names: Vec<&str> = constraints.iter().map(|info| info.name.as_str()).collect();
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
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    let fair = constraints
        .iter()
        .find(|info| info.name == "fa*ir")
        .expect("fa*ir");
    assert!(
        fair.params
            .iter()
            .any(|param| param.name == "p" && param.required)
    );
}

/// Under differential privacy only the released answer may update the amortized state: a
/// personalized answer discarded for an exhausted budget (non-personalized fallback), a
/// refused one, and a retry that replays the stored answer add nothing.
#[test]
fn only_released_dp_answers_update_the_amortized_state() {
    use std::sync::Arc;

    use store::Table;

    use super::util::{DIM, ITEMS, USERS, items_data, users_data, write};
    use crate::{
        BudgetExhaustedAction, Engine, MemoryLedger, PrivacyBudget, PrivacyConfig, PrivacyLedger,
        PrivacyMechanism, PrivacyPolicy, PrivacySetup,
    };

    let dir = tempfile::tempdir().expect("temporary directory");
    let items_path = write(dir.path(), "items.frt", &items_data(1, ITEMS, true));
    let users_path = write(dir.path(), "users.frt", &users_data(2, USERS, DIM));
    let engine = Engine::with_privacy(
        EngineConfig::default(),
        PrivacySetup {
            // Each answer below costs 10 * 0.4^2 / 8 = 0.2: the second one does not fit.
            config: PrivacyConfig {
                subject_rho_cap: 0.25,
                ..PrivacyConfig::default()
            },
            ledger: Arc::new(MemoryLedger::new()) as Arc<dyn PrivacyLedger>,
            answer_limit: None,
        },
        Table::open(&items_path).expect("items open"),
        Some(Table::open(&users_path).expect("users open")),
    )
    .expect("engine starts");
    let dp_fairco = |id: &str, exhausted: BudgetExhaustedAction| {
        let mut request = request(
            id,
            "user-2",
            5,
            10,
            FairnessPolicy {
                exposure_scope: "dp".to_owned(),
                ..policy("fairco", &[("lambda", number(1.0))])
            },
        );
        request.privacy = PrivacyPolicy {
            mechanism: PrivacyMechanism::GumbelTopK,
            budget: Some(PrivacyBudget::EpsilonPerPick(0.4)),
            on_budget_exhausted: exhausted,
            ..PrivacyPolicy::default()
        };
        request
    };
    let rankings = || {
        engine
            .exposure_state("provider_group", "dp")
            .expect("readable")
            .map_or(0, |state| state.rankings)
    };

    let first = engine
        .rank_blocking(dp_fairco("dp-1", BudgetExhaustedAction::Reject))
        .expect("fits the budget");
    assert!(first.privacy.dp_applied);
    assert_eq!(rankings(), 1);
    let replay = engine
        .rank_blocking(dp_fairco("dp-1", BudgetExhaustedAction::Reject))
        .expect("replays");
    assert!(replay.privacy.ledger_replay);
    assert_eq!(rankings(), 1, "a replay releases the stored answer again");
    engine
        .rank_blocking(dp_fairco("dp-2", BudgetExhaustedAction::Reject))
        .expect_err("over the budget");
    assert_eq!(rankings(), 1, "a refused answer is not released");
    let fallback = engine
        .rank_blocking(dp_fairco("dp-3", BudgetExhaustedAction::NonPersonalized))
        .expect("answers non-personalized");
    assert!(!fallback.personalized && !fallback.privacy.dp_applied);
    assert_eq!(
        rankings(),
        2,
        "only the released non-personalized answer counts"
    );
}

/// With `on_infeasible = unconstrained` the report describes the order actually returned:
/// not satisfied, and the first prefix and group at which the unconstrained top-k misses
/// the constraint.
#[test]
fn an_unconstrained_fallback_reports_the_violations_of_the_returned_order() {
    let fixture = fixture();
    // Candidates: eleven of group 0 and one of group 1 (every third row is group 1).
    let candidates: Vec<String> = (0..18)
        .filter(|row| row % 3 != 0 || *row == 3)
        .map(|row| format!("item-{row:03}"))
        .collect();
    let mut request = request(
        "unconstrained-violations",
        "user-1",
        8,
        13,
        FairnessPolicy {
            on_infeasible: InfeasibleAction::Unconstrained,
            ..policy("det-greedy", &[("targets", shares(&[("1", 0.5)]))])
        },
    );
    request.candidate_ids = candidates.into();
    let response = fixture.engine.rank_blocking(request).expect("answers");
    let report = &response.fairness;
    assert_eq!(report.fallback, FairnessFallback::Unconstrained);
    assert!(!report.satisfied);
    let returned = labels(&response);
    // The first prefix of the returned order with fewer than floor(t / 2) items of group 1.
    let mut count = 0;
    let expected = returned
        .iter()
        .enumerate()
        .find_map(|(index, &label)| {
            count += usize::from(label == 1);
            let prefix = index + 1;
            (count < prefix / 2).then_some((prefix, count))
        })
        .expect("the unconstrained order misses the target");
    assert_eq!(report.violations.len(), 1, "{report:?}");
    let violation = &report.violations[0];
    assert_eq!(violation.group, 1);
    assert_eq!(violation.position as usize, expected.0);
    assert_eq!(violation.actual, expected.1 as f64);
    assert_eq!(violation.required, (expected.0 / 2) as f64);
    assert!(!violation.description.is_empty());
}
