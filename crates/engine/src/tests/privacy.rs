//! Differential privacy on the request path: charges, budgets, replays, noisy scores,
//! explanations and the utility of the private selection.

use std::sync::Arc;

use store::Table;

use super::util::{DIM, ITEMS, brute_force, ids, items_data, row, users_data, write};
use crate::private::LedgerFailure;
use crate::{
    AnswerLimit, BudgetExhaustedAction, Engine, EngineConfig, EngineError, ExhaustedPolicy,
    ExplainLevel, ExplainOptions, LedgerCharge, LedgerOutcome, MemoryLedger, NonPersonalizedReason,
    PreconditionReason, PrivacyBudget, PrivacyConfig, PrivacyLedger, PrivacyMechanism,
    PrivacyPolicy, PrivacySetup, RankRequest, ReasonCode, ScoreKind, UserRef,
};

struct DpFixture {
    _dir: tempfile::TempDir,
    items: store::TableData,
    users: store::TableData,
    ledger: Arc<MemoryLedger>,
    engine: Engine,
}

fn dp_fixture(config: PrivacyConfig) -> DpFixture {
    dp_fixture_with_limit(config, None)
}

fn dp_fixture_with_limit(
    config: PrivacyConfig,
    answer_limit: Option<Arc<dyn AnswerLimit>>,
) -> DpFixture {
    let dir = tempfile::tempdir().expect("temporary directory");
    let items = items_data(1, ITEMS, true);
    let users = users_data(2, 24, DIM);
    let items_path = write(dir.path(), "items.frt", &items);
    let users_path = write(dir.path(), "users.frt", &users);
    let ledger = Arc::new(MemoryLedger::new());
    let engine = Engine::with_privacy(
        EngineConfig::default(),
        PrivacySetup {
            config,
            ledger: Arc::clone(&ledger) as Arc<dyn PrivacyLedger>,
            answer_limit,
        },
        Table::open(&items_path).expect("items open"),
        Some(Table::open(&users_path).expect("users open")),
    )
    .expect("engine starts");
    DpFixture {
        _dir: dir,
        items,
        users,
        ledger,
        engine,
    }
}

fn dp_request(id: &str, user: &str, k: usize, pool: usize, epsilon_per_pick: f64) -> RankRequest {
    let mut request = RankRequest::new(id, UserRef::id(user), k);
    request.pool_size = Some(pool);
    request.privacy = PrivacyPolicy {
        mechanism: PrivacyMechanism::GumbelTopK,
        budget: Some(PrivacyBudget::EpsilonPerPick(epsilon_per_pick)),
        ..PrivacyPolicy::default()
    };
    request
}

#[test]
fn a_dp_answer_withholds_scores_and_charges_pool_times_epsilon_squared_over_eight() {
    let fixture = dp_fixture(PrivacyConfig::default());
    let (k, pool, epsilon) = (5, 20, 0.2);
    let expected = pool as f64 * epsilon * epsilon / 8.0;
    let first = fixture
        .engine
        .rank_blocking(dp_request("dp-1", "user-3", k, pool, epsilon))
        .expect("answers");
    assert_eq!(first.items.len(), k);
    assert_eq!(first.pool_size, pool);
    assert_eq!(first.score_kind, ScoreKind::Withheld);
    assert!(first.items.iter().all(|item| item.score.is_none()));
    let report = &first.privacy;
    assert!(report.dp_applied && !report.ledger_replay);
    assert_eq!(report.mechanism, PrivacyMechanism::GumbelTopK);
    assert!((report.rho_charged - expected).abs() < 1e-9, "{report:?}");
    let cap = PrivacyConfig::default().subject_rho_cap;
    assert_eq!(report.rho_budget, Some(cap));
    let remaining = report.rho_remaining.expect("remaining budget");
    assert!((remaining - (cap - expected)).abs() < 1e-9);
    let epsilon_total = report.epsilon.expect("epsilon");
    let bun_steinke =
        privacy::rho_to_epsilon_bun_steinke(report.rho_charged, 1e-6).expect("converts");
    assert!(epsilon_total > 0.0 && epsilon_total <= bun_steinke);
    assert_eq!(report.delta, Some(1e-6));
    assert_eq!(report.user_norm_bound, Some(1.0));
    assert!(report.budget_resets_at.is_some());

    let second = fixture
        .engine
        .rank_blocking(dp_request("dp-2", "user-3", k, pool, epsilon))
        .expect("answers");
    let after = second.privacy.rho_remaining.expect("remaining budget");
    assert!(
        (remaining - after - expected).abs() < 1e-9,
        "{remaining} -> {after}"
    );
    assert!((fixture.ledger.spent("user-3") - 2.0 * expected).abs() < 1e-9);
}

#[test]
fn a_retry_with_the_same_request_id_returns_the_stored_answer_without_a_second_charge() {
    let fixture = dp_fixture(PrivacyConfig::default());
    let first = fixture
        .engine
        .rank_blocking(dp_request("same-id", "user-1", 8, 40, 0.05))
        .expect("answers");
    let spent = fixture.ledger.spent("user-1");
    for _ in 0..3 {
        let again = fixture
            .engine
            .rank_blocking(dp_request("same-id", "user-1", 8, 40, 0.05))
            .expect("answers");
        assert_eq!(again.items, first.items, "same order, no new noise");
        // Ranks in the pool, explanations, pool size and fairness report as released (the
        // record holds the answer's ids and pool positions, not the pool).
        assert_eq!(again.pool_size, first.pool_size);
        assert_eq!(again.fairness, first.fairness);
        assert!(again.privacy.ledger_replay);
        assert_eq!(again.privacy.rho_charged, 0.0);
        assert_eq!(fixture.ledger.spent("user-1"), spent, "no second charge");
    }
    // The same id with other content is refused, not replayed.
    let error = fixture
        .engine
        .rank_blocking(dp_request("same-id", "user-1", 7, 40, 0.05))
        .expect_err("content differs");
    assert!(
        matches!(
            error,
            EngineError::FailedPrecondition {
                reason: PreconditionReason::RequestIdReused,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn the_cap_refuses_or_answers_non_personalized_by_policy() {
    let config = PrivacyConfig {
        subject_rho_cap: 0.25,
        ..PrivacyConfig::default()
    };
    let fixture = dp_fixture(config);
    // Each answer costs 10 * 0.4^2 / 8 = 0.2: the second one does not fit.
    fixture
        .engine
        .rank_blocking(dp_request("cap-1", "user-2", 5, 10, 0.4))
        .expect("fits");
    let error = fixture
        .engine
        .rank_blocking(dp_request("cap-2", "user-2", 5, 10, 0.4))
        .expect_err("over the cap");
    match error {
        EngineError::PrivacyBudgetExhausted {
            rho_remaining,
            message,
        } => {
            assert!((rho_remaining - 0.05).abs() < 1e-9, "{rho_remaining}");
            assert!(message.contains("0.050000"), "{message}");
        }
        other => panic!("expected PrivacyBudgetExhausted, got {other:?}"),
    }
    let mut request = dp_request("cap-3", "user-2", 5, 10, 0.4);
    request.privacy.on_budget_exhausted = BudgetExhaustedAction::NonPersonalized;
    let answer = fixture.engine.rank_blocking(request).expect("answers");
    assert!(!answer.personalized);
    assert_eq!(
        answer.non_personalized_reason,
        Some(NonPersonalizedReason::PrivacyBudgetExhausted)
    );
    assert!(!answer.privacy.dp_applied);
    assert_eq!(answer.score_kind, ScoreKind::Prior);
    assert!((fixture.ledger.spent("user-2") - 0.2).abs() < 1e-9);
    // Another subject still has its whole budget.
    fixture
        .engine
        .rank_blocking(dp_request("cap-4", "user-5", 5, 10, 0.4))
        .expect("a fresh budget");
}

#[test]
fn with_negligible_noise_the_private_pool_is_the_exact_top_pool() {
    // Integer embeddings of dimension 8 in -3..=3 have norm below 9 and are not clipped;
    // sensitivity is about 2 * 9 * 8.5 = 153, so epsilon 1.9e4 per pick gives Gumbel noise
    // of scale 0.016: it would need a spread of 31 scales (probability ~1e-11) to swap
    // two integer scores.
    let config = PrivacyConfig {
        user_norm_bound: 9.0,
        max_request_rho: 1e9,
        subject_rho_cap: 1e9,
        ..PrivacyConfig::default()
    };
    let fixture = dp_fixture(config);
    let user = row(&fixture.users, 4).to_vec();
    let candidates: Vec<usize> = (0..ITEMS).step_by(3).collect();
    for (name, rows) in [("catalog", None), ("candidates", Some(candidates))] {
        let mut request = dp_request(&format!("exact-{name}"), "user-4", 10, 10, 1.9e4);
        if let Some(rows) = &rows {
            request.candidate_ids = rows.iter().map(|&r| fixture.items.ids[r].clone()).collect();
        }
        let answer = fixture.engine.rank_blocking(request).expect("answers");
        let all_rows: Vec<usize> = rows.clone().unwrap_or_else(|| (0..ITEMS).collect());
        let expected = brute_force(&fixture.items, &user, all_rows.iter().copied(), 10);
        let row_of = |id: &str| fixture.items.ids.iter().position(|x| x == id).expect("id");
        let score_of = |id: &str| brute_force(&fixture.items, &user, [row_of(id)], 1)[0].1;
        let got: Vec<f32> = answer.items.iter().map(|item| score_of(&item.id)).collect();
        let want: Vec<f32> = expected.iter().map(|(_, score)| *score).collect();
        assert_eq!(got, want, "{name}: scores of the released order");
        if let Some(rows) = &rows {
            for item in &answer.items {
                assert!(
                    rows.contains(&row_of(&item.id)),
                    "{name}: only candidates are released"
                );
            }
        }
    }
}

#[test]
fn noisy_scores_are_released_and_charged_when_asked_for() {
    let config = PrivacyConfig {
        user_norm_bound: 100.0,
        max_request_rho: 1e9,
        subject_rho_cap: 1e9,
        ..PrivacyConfig::default()
    };
    let fixture = dp_fixture(config);
    let mut request = dp_request("noisy", "user-6", 5, 10, 1e3);
    request.privacy.release_noisy_scores = true;
    let answer = fixture.engine.rank_blocking(request).expect("answers");
    assert_eq!(answer.score_kind, ScoreKind::NoisyDotProduct);
    assert!(answer.privacy.scores_noised);
    let stddev = answer.privacy.score_noise_stddev.expect("noise stddev");
    assert!(stddev > 0.0);
    // Order 10 * 1e6 / 8; scores the same again (share 0.5): about twice the order.
    let order = 10.0 * 1e6 / 8.0;
    let ratio = answer.privacy.rho_charged / order;
    assert!((ratio - 2.0).abs() < 1e-3, "{ratio}");
    let user = row(&fixture.users, 6).to_vec();
    for item in &answer.items {
        let r = fixture
            .items
            .ids
            .iter()
            .position(|x| *x == item.id)
            .expect("id");
        let exact = brute_force(&fixture.items, &user, [r], 1)[0].1;
        let noisy = item.score.expect("a noisy score");
        assert!(
            (noisy - exact).abs() < 12.0 * stddev as f32 + 1e-3,
            "{noisy} vs {exact} (sd {stddev})"
        );
    }
}

#[test]
fn dp_explanations_use_only_the_released_order() {
    let fixture = dp_fixture(PrivacyConfig::default());
    let mut request = dp_request("explain", "user-7", 3, 10, 0.1);
    request.explain = ExplainOptions::full();
    let answer = fixture.engine.rank_blocking(request).expect("answers");
    assert_eq!(answer.explain_level, ExplainLevel::Text);
    for item in &answer.items {
        let explanation = item.explanation.as_ref().expect("explained");
        assert_eq!(explanation.reasons[0].code, ReasonCode::PrivacyRandomized);
        assert!(explanation.contributions.is_empty());
        assert!(!explanation.reasons[0].text.contains("score "));
    }
}

#[test]
fn server_policy_mandatory_dp_and_per_request_maximum_are_enforced() {
    let config = PrivacyConfig {
        require_dp: true,
        max_request_rho: 0.1,
        ..PrivacyConfig::default()
    };
    let fixture = dp_fixture(config);
    let mut plain = RankRequest::new("plain", UserRef::id("user-1"), 3);
    plain.privacy.mechanism = PrivacyMechanism::None;
    let too_costly = dp_request("costly", "user-1", 3, 100, 1.0);
    for request in [plain, too_costly] {
        let error = fixture.engine.rank_blocking(request).expect_err("refused");
        assert!(
            matches!(
                error,
                EngineError::FailedPrecondition {
                    reason: PreconditionReason::PrivacyPolicyNotAllowed,
                    ..
                }
            ),
            "{error}"
        );
    }
    // A DP request within the maximum is answered; an inline embedding needs a subject id.
    let mut inline = RankRequest::new(
        "inline",
        UserRef::Inline {
            embedding: vec![1.0; DIM],
            subject_id: "subject-9".into(),
        },
        3,
    );
    inline.privacy.mechanism = PrivacyMechanism::GumbelTopK;
    inline.pool_size = Some(10);
    let answer = fixture.engine.rank_blocking(inline).expect("answers");
    assert!(answer.privacy.dp_applied);
    assert!(fixture.ledger.spent("subject-9") > 0.0);
}

#[test]
fn the_default_mechanism_and_exhausted_policy_come_from_the_configuration() {
    let config = PrivacyConfig {
        default_mechanism: crate::DefaultMechanism::GumbelTopK,
        subject_rho_cap: 0.2,
        on_budget_exhausted: ExhaustedPolicy::NonPersonalized,
        ..PrivacyConfig::default()
    };
    let fixture = dp_fixture(config);
    // Default pool 100 at 0.1 per pick: 0.125 per answer.
    let first = fixture
        .engine
        .rank_blocking(RankRequest::new("d-1", UserRef::id("user-8"), 4))
        .expect("answers");
    assert!(first.privacy.dp_applied);
    assert!((first.privacy.rho_charged - 0.125).abs() < 1e-9);
    let second = fixture
        .engine
        .rank_blocking(RankRequest::new("d-2", UserRef::id("user-8"), 4))
        .expect("answers");
    assert!(!second.personalized);
}

/// A memory ledger that records the name of every thread that charges it.
#[derive(Debug)]
struct ThreadRecordingLedger {
    inner: MemoryLedger,
    threads: std::sync::Mutex<Vec<String>>,
}

impl PrivacyLedger for ThreadRecordingLedger {
    fn charge(&self, charge: &LedgerCharge<'_>) -> Result<LedgerOutcome, LedgerFailure> {
        let name = std::thread::current().name().unwrap_or_default().to_owned();
        self.threads.lock().expect("not poisoned").push(name);
        self.inner.charge(charge)
    }
}

#[test]
fn batch_dp_entries_are_charged_on_the_dp_workers_not_the_compute_pool() {
    // Ledger commits block on storage: a batch must not hold the rayon pool on them.
    let dir = tempfile::tempdir().expect("temporary directory");
    let items_path = write(dir.path(), "items.frt", &items_data(1, ITEMS, true));
    let users_path = write(dir.path(), "users.frt", &users_data(2, 24, DIM));
    let ledger = Arc::new(ThreadRecordingLedger {
        inner: MemoryLedger::new(),
        threads: std::sync::Mutex::new(Vec::new()),
    });
    let engine = Engine::with_privacy(
        EngineConfig::default(),
        PrivacySetup {
            config: PrivacyConfig::default(),
            ledger: Arc::clone(&ledger) as Arc<dyn PrivacyLedger>,
            answer_limit: None,
        },
        Table::open(&items_path).expect("items open"),
        Some(Table::open(&users_path).expect("users open")),
    )
    .expect("engine starts");
    let requests = vec![
        dp_request("w-1", "user-10", 3, 10, 0.1),
        RankRequest::new("w-2", UserRef::id("user-12"), 3),
        dp_request("w-3", "user-11", 3, 10, 0.1),
    ];
    let batch = engine.rank_batch(requests).expect("answers");
    let applied: Vec<bool> = batch
        .results
        .iter()
        .map(|result| result.as_ref().expect("answers").privacy.dp_applied)
        .collect();
    assert_eq!(applied, [true, false, true]);
    let threads = ledger.threads.lock().expect("not poisoned").clone();
    assert_eq!(threads.len(), 2, "{threads:?}");
    assert!(
        threads.iter().all(|name| name.starts_with("fairrank-dp-")),
        "{threads:?}"
    );
}

/// A memory ledger whose every charge takes `delay` (a slow disk).
#[derive(Debug)]
struct SlowLedger {
    inner: MemoryLedger,
    delay: std::time::Duration,
}

impl PrivacyLedger for SlowLedger {
    fn charge(&self, charge: &LedgerCharge<'_>) -> Result<LedgerOutcome, LedgerFailure> {
        std::thread::sleep(self.delay);
        self.inner.charge(charge)
    }
}

#[test]
fn a_batch_scoring_time_runs_to_its_last_dp_entry() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let items_path = write(dir.path(), "items.frt", &items_data(1, ITEMS, true));
    let users_path = write(dir.path(), "users.frt", &users_data(2, 24, DIM));
    let delay = std::time::Duration::from_millis(40);
    let engine = Engine::with_privacy(
        EngineConfig::default(),
        PrivacySetup {
            config: PrivacyConfig::default(),
            ledger: Arc::new(SlowLedger {
                inner: MemoryLedger::new(),
                delay,
            }),
            answer_limit: None,
        },
        Table::open(&items_path).expect("items open"),
        Some(Table::open(&users_path).expect("users open")),
    )
    .expect("engine starts");
    let requests = vec![
        RankRequest::new("s-1", UserRef::id("user-12"), 3),
        dp_request("s-2", "user-10", 3, 10, 0.1),
    ];
    let batch = engine.rank_batch(requests).expect("answers");
    assert!(batch.results.iter().all(Result::is_ok), "{batch:?}");
    // The DP entry's charge ran on the DP workers after the rest was scored; the batch's
    // scoring time includes it.
    assert!(
        batch.timings.score_us >= delay.as_micros() as u64,
        "{:?}",
        batch.timings
    );
    assert!(batch.timings.total_us >= batch.timings.score_us);
}

#[derive(Debug)]
struct BrokenLedger;

impl PrivacyLedger for BrokenLedger {
    fn charge(&self, _: &LedgerCharge<'_>) -> Result<LedgerOutcome, LedgerFailure> {
        Err(LedgerFailure {
            message: "disk on fire".into(),
        })
    }
}

#[test]
fn a_ledger_failure_fails_closed() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let items_path = write(dir.path(), "items.frt", &items_data(1, ITEMS, true));
    let engine = Engine::with_privacy(
        EngineConfig::default(),
        PrivacySetup {
            config: PrivacyConfig::default(),
            ledger: Arc::new(BrokenLedger),
            answer_limit: None,
        },
        Table::open(&items_path).expect("items open"),
        None,
    )
    .expect("engine starts");
    let request = RankRequest {
        privacy: PrivacyPolicy {
            mechanism: PrivacyMechanism::GumbelTopK,
            ..PrivacyPolicy::default()
        },
        ..RankRequest::new(
            "broken",
            UserRef::Inline {
                embedding: vec![0.5; DIM],
                subject_id: "s".into(),
            },
            3,
        )
    };
    let error = engine.rank_blocking(request).expect_err("fails closed");
    assert!(
        matches!(&error, EngineError::LedgerUnavailable { message } if message.contains("disk on fire")),
        "{error}"
    );
}

#[test]
fn batch_entries_are_charged_individually() {
    let fixture = dp_fixture(PrivacyConfig::default());
    let requests = vec![
        dp_request("b-1", "user-10", 3, 10, 0.1),
        dp_request("b-2", "user-11", 3, 10, 0.1),
        RankRequest::new("b-3", UserRef::id("user-12"), 3),
    ];
    let batch = fixture.engine.rank_batch(requests).expect("answers");
    let charged: Vec<bool> = batch
        .results
        .iter()
        .map(|result| result.as_ref().expect("answers").privacy.dp_applied)
        .collect();
    assert_eq!(charged, [true, true, false]);
    assert!(fixture.ledger.spent("user-10") > 0.0);
    assert_eq!(fixture.ledger.spent("user-12"), 0.0);
}

/// The auditor's table: 40 rows x 8, row `i` = `[1 - 0.02 i, 0.1, ..., 0.1]` times `scale`
/// (rounded to f32 once): the exact top 5 for the user `[1, 0, ..., 0]` is rows 0 to 4, with
/// gaps of `0.02 * scale` between neighbours.
fn scaled_items(scale: f64) -> store::TableData {
    let (rows, dim) = (40, 8);
    store::TableData {
        dim,
        rows: (0..rows)
            .flat_map(|row| {
                (0..dim).map(move |column| {
                    let value = if column == 0 {
                        1.0 - 0.02 * row as f64
                    } else {
                        0.1
                    };
                    (value * scale) as f32
                })
            })
            .collect(),
        ids: (0..rows).map(|row| format!("item-{row:02}")).collect(),
        groups: Vec::new(),
        prior: None,
        dim_names: None,
    }
}

/// An engine over `data` with the default privacy setup, and the directory holding its file.
fn scaled_engine(data: &store::TableData) -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = write(dir.path(), "tiny-items.frt", data);
    let engine = Engine::with_privacy(
        EngineConfig::default(),
        PrivacySetup::default(),
        Table::open(&path).expect("items open"),
        None,
    )
    .expect("engine starts");
    (dir, engine)
}

/// A DP request over every candidate of `data`, pool = k = 5, epsilon 0.01 per pick.
fn scaled_request(id: String, data: &store::TableData) -> RankRequest {
    let mut embedding = vec![0.0; data.dim];
    embedding[0] = 1.0;
    let mut request = RankRequest::new(
        id,
        UserRef::Inline {
            embedding,
            subject_id: "auditor".into(),
        },
        5,
    );
    request.candidate_ids = data.ids.clone().into();
    request.pool_size = Some(5);
    request.privacy = PrivacyPolicy {
        mechanism: PrivacyMechanism::GumbelTopK,
        budget: Some(PrivacyBudget::EpsilonPerPick(0.01)),
        ..PrivacyPolicy::default()
    };
    request
}

/// The auditor's reproduction: at epsilon 0.01 per pick the Gumbel noise (scale about
/// `2 * 2 * |v| / 0.01`, 400 times the item norm) swamps score gaps of 2 % of it, so the
/// exact top 5 in order should (almost) never come out, whatever the table's scale. With the
/// item norm computed in f32, a table scaled by 1e-24 had norm 0, the sensitivity became
/// `f64::MIN_POSITIVE` and every one of 200 answers was the exact order, reported as DP.
#[test]
fn tiny_item_rows_keep_their_dp_noise() {
    let exact_order: Vec<String> = (0..5).map(|row| format!("item-{row:02}")).collect();
    for scale in [1.0, 1e-18, 1e-22, 1e-24] {
        let data = scaled_items(scale);
        let (_dir, engine) = scaled_engine(&data);
        let mut exact = 0;
        for run in 0..200 {
            let answer = engine
                .rank_blocking(scaled_request(format!("scale-{scale:e}-{run}"), &data))
                .expect("answers");
            assert!(answer.privacy.dp_applied);
            let order: Vec<String> = answer.items.iter().map(|item| item.id.clone()).collect();
            exact += usize::from(order == exact_order);
        }
        // Uniform noise would give the exact order with probability 1 / (40*39*38*37*36).
        assert!(exact <= 5, "scale {scale:e}: exact order in {exact} of 200");
    }
}

/// Item tables whose certified norm cannot carry a sensitivity are refused for DP requests
/// with FAILED_PRECONDITION naming the table and the reason (they used to get
/// `f64::MIN_POSITIVE`, that is no noise); requests without DP are still answered.
#[test]
fn item_tables_without_a_usable_norm_refuse_dp_requests() {
    for (scale, reason) in [(0.0, "is 0"), (1e-40, "subnormal")] {
        let data = scaled_items(scale);
        let (_dir, engine) = scaled_engine(&data);
        let error = engine
            .rank_blocking(scaled_request("refused".into(), &data))
            .expect_err("refused");
        match &error {
            EngineError::FailedPrecondition {
                field,
                reason: PreconditionReason::PrivacyPolicyNotAllowed,
                message,
            } => {
                assert_eq!(field.as_deref(), Some("privacy"));
                assert!(
                    message.contains("\"tiny-items.frt\"") && message.contains(reason),
                    "{message}"
                );
            }
            other => panic!("scale {scale:e}: {other}"),
        }
        let mut plain = scaled_request("plain".into(), &data);
        plain.privacy = PrivacyPolicy::default();
        let answer = engine.rank_blocking(plain).expect("answers without DP");
        assert!(!answer.privacy.dp_applied);
    }
}

/// A dimension the f32 rounding bound does not cover (the store accepts it) is refused for
/// DP requests as a failed precondition naming the cause, not as an internal error.
#[test]
fn an_item_dimension_beyond_the_sensitivity_bound_refuses_dp_requests() {
    let dim = privacy::MAX_SCORE_DIMENSION + 1;
    let mut rows = vec![0.0; dim];
    rows[0] = 1.0;
    let data = store::TableData {
        dim,
        rows,
        ids: vec!["wide".into()],
        groups: Vec::new(),
        prior: None,
        dim_names: None,
    };
    let (_dir, engine) = scaled_engine(&data);
    let error = engine
        .rank_blocking(scaled_request("wide".into(), &data))
        .expect_err("refused");
    match &error {
        EngineError::FailedPrecondition {
            reason: PreconditionReason::PrivacyPolicyNotAllowed,
            message,
            ..
        } => assert!(
            message.contains("tiny-items.frt") && message.contains(&dim.to_string()),
            "{message}"
        ),
        other => panic!("{other}"),
    }
}

/// An answer limit of `max` bytes that counts 100 bytes per item, and remembers the items
/// of the last answer it measured.
#[derive(Debug)]
struct ItemCountLimit {
    max: std::sync::atomic::AtomicUsize,
    measured: std::sync::Mutex<Vec<String>>,
}

impl ItemCountLimit {
    const ITEM_BYTES: usize = 100;

    fn new(items: usize) -> Arc<ItemCountLimit> {
        Arc::new(ItemCountLimit {
            max: (items * Self::ITEM_BYTES).into(),
            measured: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn set_items(&self, items: usize) {
        self.max.store(
            items * Self::ITEM_BYTES,
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    fn measured(&self) -> Vec<String> {
        self.measured.lock().expect("not poisoned").clone()
    }
}

impl AnswerLimit for ItemCountLimit {
    fn size_bound(&self, answer: &crate::RankResponse) -> usize {
        *self.measured.lock().expect("not poisoned") =
            answer.items.iter().map(|item| item.id.clone()).collect();
        answer.items.len() * Self::ITEM_BYTES
    }

    fn max_bytes(&self) -> usize {
        self.max.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A DP answer its caller could not deliver is refused before the ledger is charged: the
/// subject's budget is untouched and nothing is stored for the request id, which a smaller
/// request may then use. The answer measured is the one released.
#[test]
fn a_dp_answer_too_large_to_deliver_is_refused_without_a_charge() {
    let limit = ItemCountLimit::new(10);
    let fixture = dp_fixture_with_limit(
        PrivacyConfig::default(),
        Some(Arc::clone(&limit) as Arc<dyn AnswerLimit>),
    );
    let error = fixture
        .engine
        .rank_blocking(dp_request("big", "user-4", 20, 40, 0.1))
        .expect_err("20 items do not fit in 10");
    assert_eq!(
        error,
        EngineError::AnswerTooLarge {
            field: "k".into(),
            bytes: 2000,
            limit: 1000,
        }
    );
    assert_eq!(fixture.ledger.spent("user-4"), 0.0, "nothing was charged");
    assert_eq!(fixture.ledger.stored_answer("user-4", "big"), Ok(None));

    // The same request id, asking for less: a fresh answer, charged once.
    let (k, pool, epsilon) = (5, 40, 0.1);
    let answer = fixture
        .engine
        .rank_blocking(dp_request("big", "user-4", k, pool, epsilon))
        .expect("5 items fit");
    assert_eq!(answer.items.len(), k);
    assert!(!answer.privacy.ledger_replay);
    let charge = pool as f64 * epsilon * epsilon / 8.0;
    assert!((answer.privacy.rho_charged - charge).abs() < 1e-9);
    assert!((fixture.ledger.spent("user-4") - charge).abs() < 1e-9);
    assert_eq!(
        limit.measured(),
        ids(&answer),
        "the answer measured is released"
    );

    // In a batch, the entry too large is refused alone and uncharged.
    let batch = fixture
        .engine
        .rank_batch(vec![
            dp_request("big-entry", "user-6", 20, 40, 0.1),
            dp_request("small-entry", "user-6", 5, 40, 0.1),
        ])
        .expect("answers");
    assert!(
        matches!(
            &batch.results[0],
            Err(EngineError::AnswerTooLarge { field, .. }) if field == "k"
        ),
        "{:?}",
        batch.results[0]
    );
    assert!(batch.results[1].is_ok(), "{:?}", batch.results[1]);
    assert!((fixture.ledger.spent("user-6") - charge).abs() < 1e-9);
}

/// A retry of a charged request whose fresh answer (new noise, other items) would be too
/// large to deliver still gets the answer the ledger stored, without a second charge.
#[test]
fn a_retry_gets_its_stored_answer_when_a_fresh_one_would_be_too_large() {
    let limit = ItemCountLimit::new(10);
    let fixture = dp_fixture_with_limit(
        PrivacyConfig::default(),
        Some(Arc::clone(&limit) as Arc<dyn AnswerLimit>),
    );
    let first = fixture
        .engine
        .rank_blocking(dp_request("kept", "user-7", 8, 30, 0.1))
        .expect("8 items fit in 10");
    let spent = fixture.ledger.spent("user-7");
    assert!(spent > 0.0);
    limit.set_items(4);
    let retry = fixture
        .engine
        .rank_blocking(dp_request("kept", "user-7", 8, 30, 0.1))
        .expect("the stored answer");
    assert!(retry.privacy.ledger_replay);
    assert_eq!(retry.privacy.rho_charged, 0.0);
    assert_eq!(retry.items, first.items);
    assert_eq!(fixture.ledger.spent("user-7"), spent, "no second charge");
    // A request id the ledger does not hold is refused, uncharged.
    let error = fixture
        .engine
        .rank_blocking(dp_request("not-kept", "user-7", 8, 30, 0.1))
        .expect_err("8 items do not fit in 4");
    assert!(
        matches!(error, EngineError::AnswerTooLarge { .. }),
        "{error}"
    );
    assert_eq!(fixture.ledger.spent("user-7"), spent);
}
