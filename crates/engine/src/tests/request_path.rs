//! Rankings against brute force, consent and pause, explanations, reports, deadlines and
//! the exactly-once callback.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::util::{self, DIM, ITEMS, brute_force, fixture, fixture_with, ids, ids_scores, row};
use crate::{
    Consent, ConsentDecision, DeadlineStage, EngineConfig, EngineError, ExplainLevel,
    ExplainOptions, FairnessFallback, FairnessPolicy, NonPersonalizedReason, RankRequest,
    ReasonCode, ScoreKind, UserRef,
};

#[test]
fn whole_catalog_equals_brute_force_top_k() {
    let fixture = fixture();
    for (user, k) in [(0, 1), (3, 10), (7, 100), (11, ITEMS), (5, 1000)] {
        let request = RankRequest::new(
            format!("r{user}-{k}"),
            UserRef::id(format!("user-{user}")),
            k,
        );
        let response = fixture.engine.rank_blocking(request).expect("ranks");
        let query = row(&fixture.users, user);
        assert_eq!(
            ids_scores(&response),
            brute_force(&fixture.items, query, 0..ITEMS, k),
            "user {user} k {k}"
        );
        assert!(response.personalized);
        assert_eq!(response.score_kind, ScoreKind::DotProduct);
        assert_eq!(response.scored_items, ITEMS);
        assert_eq!(response.pool_size, k.clamp(100, ITEMS));
        assert_eq!(response.users_table.map(|v| v.generation), Some(1));
        for (position, item) in response.items.iter().enumerate() {
            assert_eq!(item.rank as usize, position + 1);
            assert_eq!(item.unconstrained_rank, item.rank);
        }
    }
}

#[test]
fn inline_embedding_equals_brute_force() {
    let fixture = fixture();
    let query = util::integer_values(99, DIM);
    let request = RankRequest::new("inline", UserRef::embedding(query.clone()), 25);
    let response = fixture.engine.rank_blocking(request).expect("ranks");
    assert_eq!(
        ids_scores(&response),
        brute_force(&fixture.items, &query, 0..ITEMS, 25)
    );
    assert_eq!(response.users_table, None);
}

#[test]
fn candidate_lists_equal_brute_force_over_the_candidates() {
    let fixture = fixture();
    for (seed, count, k) in [
        (1u64, 1, 1),
        (2, 17, 5),
        (3, 60, 60),
        (4, 90, 200),
        (5, 240, 30),
    ] {
        // A pseudo-random subset in pseudo-random order.
        let mut rows: Vec<usize> = (0..ITEMS).collect();
        let keys = util::integer_values(seed, ITEMS);
        rows.sort_by(|&a, &b| {
            keys[a]
                .total_cmp(&keys[b])
                .then((a * 7919 % 241).cmp(&(b * 7919 % 241)))
        });
        rows.truncate(count);
        let mut request = RankRequest::new("c", UserRef::id("user-4"), k);
        request.candidate_ids = rows.iter().map(|&r| fixture.items.ids[r].clone()).collect();
        let response = fixture.engine.rank_blocking(request).expect("ranks");
        let query = row(&fixture.users, 4);
        assert_eq!(
            ids_scores(&response),
            brute_force(&fixture.items, query, rows.iter().copied(), k),
            "seed {seed}"
        );
        assert_eq!(response.scored_items, count);
    }
}

#[test]
fn unknown_candidates_can_be_skipped() {
    let fixture = fixture();
    let mut request = RankRequest::new("skip", UserRef::id("user-1"), 5);
    request.candidate_ids = ["item-007", "nope", "item-003", "gone"]
        .into_iter()
        .collect();
    request.skip_unknown_candidates = true;
    let response = fixture.engine.rank_blocking(request).expect("ranks");
    assert_eq!(
        response.skipped_candidate_ids,
        vec!["nope".to_owned(), "gone".to_owned()]
    );
    assert_eq!(
        ids_scores(&response),
        brute_force(&fixture.items, row(&fixture.users, 1), [7, 3], 5)
    );
}

#[test]
fn concurrent_submissions_equal_individual_results() {
    let config = EngineConfig {
        batch_max_wait: Duration::from_millis(2),
        batch_max_queries: 8,
        ..EngineConfig::default()
    };
    let fixture = fixture_with(config, true);
    let engine = &fixture.engine;
    let threads = 8;
    let per_thread = 12;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let sender = sender.clone();
            scope.spawn(move || {
                for i in 0..per_thread {
                    let user = (thread * per_thread + i) % util::USERS;
                    let k = 1 + (thread + i) % 40;
                    let sender = sender.clone();
                    let request = RankRequest::new(
                        format!("t{thread}-{i}"),
                        UserRef::id(format!("user-{user}")),
                        k,
                    );
                    engine.submit(
                        request,
                        Box::new(move |result| {
                            let _ = sender.send((user, k, result));
                        }),
                    );
                }
            });
        }
    });
    drop(sender);
    let answers: Vec<_> = receiver.iter().collect();
    assert_eq!(answers.len(), threads * per_thread);
    for (user, k, result) in answers {
        let response = result.expect("ranks");
        assert_eq!(
            ids_scores(&response),
            brute_force(&fixture.items, row(&fixture.users, user), 0..ITEMS, k)
        );
    }
    let status = engine.status().expect("status");
    assert_eq!(status.batcher.queries, (threads * per_thread) as u64);
    assert_eq!(engine.in_flight(), 0);
}

#[test]
fn consent_denied_ranks_by_prior_without_reading_the_user() {
    let fixture = fixture();
    let mut request = RankRequest::new("optout", UserRef::id("no-such-user"), 12);
    request.consent = Consent::personalization(ConsentDecision::Denied);
    request.explain = ExplainOptions::full();
    let response = fixture
        .engine
        .rank_blocking(request)
        .expect("ranks without reading the user");
    assert!(!response.personalized);
    assert_eq!(
        response.non_personalized_reason,
        Some(NonPersonalizedReason::ConsentDenied)
    );
    assert_eq!(response.score_kind, ScoreKind::Prior);
    assert_eq!(response.users_table, None);
    let prior = fixture.items.prior.as_ref().expect("fixture prior");
    let mut expected: Vec<usize> = (0..ITEMS).collect();
    expected.sort_by(|&a, &b| prior[b].total_cmp(&prior[a]).then(a.cmp(&b)));
    let expected: Vec<(String, f32)> = expected
        .iter()
        .take(12)
        .map(|&r| (fixture.items.ids[r].clone(), prior[r]))
        .collect();
    assert_eq!(ids_scores(&response), expected);
    assert_eq!(
        response.fairness.fallback,
        FairnessFallback::NonPersonalized
    );
    assert_eq!(response.explain_level, ExplainLevel::Text);
    let explanation = response.items[0].explanation.as_ref().expect("explained");
    assert_eq!(explanation.reasons[0].code, ReasonCode::ItemPrior);
    assert!(
        explanation.reasons[0].text.contains("not consented"),
        "{explanation:?}"
    );
    assert!(explanation.contributions.is_empty());
}

#[test]
fn consent_denied_on_candidates_ranks_them_by_prior() {
    let fixture = fixture();
    let mut request = RankRequest::new("optout-c", UserRef::id("user-0"), 3);
    request.consent = Consent::personalization(ConsentDecision::Denied);
    request.candidate_ids = ["item-010", "item-001", "item-011", "item-002"]
        .into_iter()
        .collect();
    let response = fixture.engine.rank_blocking(request).expect("ranks");
    let prior = fixture.items.prior.as_ref().expect("prior");
    let mut expected = [10usize, 1, 11, 2];
    expected.sort_by(|&a, &b| prior[b].total_cmp(&prior[a]).then(a.cmp(&b)));
    let expected: Vec<String> = expected
        .iter()
        .take(3)
        .map(|&r| fixture.items.ids[r].clone())
        .collect();
    assert_eq!(ids(&response), expected);
}

#[test]
fn pause_and_explicit_consent_make_answers_non_personalized() {
    let fixture = fixture();
    let change = fixture.engine.set_personalization_paused(true);
    assert!(change.paused && change.changed);
    assert!(!fixture.engine.set_personalization_paused(true).changed);
    let response = fixture
        .engine
        .rank_blocking(RankRequest::new("paused", UserRef::id("user-1"), 5))
        .expect("ranks");
    assert!(!response.personalized);
    assert_eq!(
        response.non_personalized_reason,
        Some(NonPersonalizedReason::PersonalizationPaused)
    );
    assert!(
        fixture
            .engine
            .status()
            .expect("status")
            .personalization_paused
    );
    fixture.engine.set_personalization_paused(false);
    let response = fixture
        .engine
        .rank_blocking(RankRequest::new("resumed", UserRef::id("user-1"), 5))
        .expect("ranks");
    assert!(response.personalized);

    let strict = fixture_with(
        EngineConfig {
            require_explicit_consent: true,
            ..EngineConfig::default()
        },
        true,
    );
    let unspecified = strict
        .engine
        .rank_blocking(RankRequest::new("u", UserRef::id("user-1"), 5))
        .expect("ranks");
    assert!(!unspecified.personalized);
    let mut granted = RankRequest::new("g", UserRef::id("user-1"), 5);
    granted.consent = Consent::personalization(ConsentDecision::Granted);
    assert!(
        strict
            .engine
            .rank_blocking(granted)
            .expect("ranks")
            .personalized
    );
}

#[test]
fn without_a_prior_non_personalized_answers_use_row_order_and_say_so() {
    let fixture = fixture_with(EngineConfig::default(), false);
    let mut request = RankRequest::new("noprior", UserRef::id("user-1"), 4);
    request.consent = Consent::personalization(ConsentDecision::Denied);
    request.explain = ExplainOptions {
        level: ExplainLevel::Text,
        max_dimensions: 0,
    };
    let response = fixture.engine.rank_blocking(request).expect("ranks");
    assert_eq!(
        ids(&response),
        ["item-000", "item-001", "item-002", "item-003"]
    );
    assert_eq!(response.score_kind, ScoreKind::Withheld);
    assert!(response.items.iter().all(|item| item.score.is_none()));
    let reason = &response.items[0]
        .explanation
        .as_ref()
        .expect("explained")
        .reasons[0];
    assert_eq!(reason.code, ReasonCode::CatalogOrder);
    assert!(
        reason.text.contains("no popularity prior"),
        "{}",
        reason.text
    );

    let mut candidates = RankRequest::new("noprior-c", UserRef::id("user-1"), 2);
    candidates.consent = Consent::personalization(ConsentDecision::Denied);
    candidates.candidate_ids = ["item-009", "item-004", "item-006"].into_iter().collect();
    let response = fixture.engine.rank_blocking(candidates).expect("ranks");
    assert_eq!(ids(&response), ["item-004", "item-006"]);
}

#[test]
fn unknown_user_fallback_is_non_personalized() {
    let fixture = fixture();
    let mut request = RankRequest::new("cold", UserRef::id("stranger"), 3);
    request.fallback_for_unknown_user = true;
    let response = fixture.engine.rank_blocking(request).expect("ranks");
    assert!(!response.personalized);
    assert_eq!(
        response.non_personalized_reason,
        Some(NonPersonalizedReason::UserNotFound)
    );
}

#[test]
fn explanations_list_the_top_three_contributions() {
    let fixture = fixture();
    let mut request = RankRequest::new("explain", UserRef::id("user-2"), 5);
    request.explain = ExplainOptions::full();
    let response = fixture.engine.rank_blocking(request).expect("ranks");
    assert_eq!(response.explain_level, ExplainLevel::Dimensions);
    let user = row(&fixture.users, 2);
    for item in &response.items {
        let explanation = item.explanation.as_ref().expect("explained");
        assert_eq!(explanation.reasons[0].code, ReasonCode::ProfileMatch);
        assert!(!explanation.reasons[0].text.is_empty());
        let item_row = fixture
            .items
            .ids
            .iter()
            .position(|id| *id == item.id)
            .expect("known id");
        let mut all: Vec<(u32, f32)> = user
            .iter()
            .zip(row(&fixture.items, item_row))
            .enumerate()
            .map(|(d, (u, v))| (d as u32, u * v))
            .collect();
        all.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then(a.0.cmp(&b.0)));
        let found: Vec<(u32, f32)> = explanation
            .contributions
            .iter()
            .map(|c| (c.dimension, c.contribution))
            .collect();
        assert_eq!(found, all[..3].to_vec());
        for contribution in &explanation.contributions {
            assert_eq!(
                contribution.name,
                Some(format!("dim{}", contribution.dimension))
            );
        }
    }
    let plain = fixture
        .engine
        .rank_blocking(RankRequest::new("plain", UserRef::id("user-2"), 5))
        .expect("ranks");
    assert!(plain.items.iter().all(|item| item.explanation.is_none()));
}

#[test]
fn fairness_report_gives_exposure_shares_by_group() {
    let fixture = fixture();
    let mut request = RankRequest::new("report", UserRef::id("user-3"), 10);
    request.pool_size = Some(30);
    let response = fixture
        .engine
        .rank_blocking(request.clone())
        .expect("ranks");
    let report = &response.fairness;
    assert_eq!(report.constraint, "none");
    assert_eq!(report.group_attribute, "provider_group");
    assert!(report.satisfied);
    assert_eq!(report.ndcg_vs_unconstrained, 1.0);
    assert_eq!(report.fallback, FairnessFallback::None);
    // Brute force over the pool (top 30) and the answer (top 10).
    let pool = brute_force(&fixture.items, row(&fixture.users, 3), 0..ITEMS, 30);
    let label = |id: &str| u32::from(id[5..].parse::<usize>().expect("numeric id") % 3 == 0);
    let total: f64 = (1..=10).map(|r| 1.0 / (1.0 + r as f64).log2()).sum();
    for group in &report.groups {
        let in_pool = pool
            .iter()
            .filter(|(id, _)| label(id) == group.group)
            .count();
        assert_eq!(group.items_in_pool as usize, in_pool);
        let exposure: f64 = pool[..10]
            .iter()
            .enumerate()
            .filter(|(_, (id, _))| label(id) == group.group)
            .map(|(position, _)| 1.0 / (2.0 + position as f64).log2())
            .sum();
        assert!((group.exposure_share - exposure / total).abs() < 1e-12);
    }
    let labels_in_answer: Vec<u32> = response
        .items
        .iter()
        .map(|item| item.group_labels[0])
        .collect();
    assert_eq!(
        labels_in_answer,
        pool[..10]
            .iter()
            .map(|(id, _)| label(id))
            .collect::<Vec<_>>()
    );
    assert_eq!(response.group_attributes, ["provider_group", "region"]);

    request.fairness = FairnessPolicy {
        group_attribute: "region".into(),
        ..FairnessPolicy::default()
    };
    let by_region = fixture.engine.rank_blocking(request).expect("ranks");
    assert_eq!(by_region.fairness.group_attribute, "region");
    assert_eq!(by_region.fairness.groups.len(), 4);
}

#[test]
fn passed_deadlines_are_refused() {
    let fixture = fixture();
    for candidates in [Vec::new(), vec!["item-001".to_owned()]] {
        let mut request = RankRequest::new("late", UserRef::id("user-1"), 5);
        request.deadline = Some(Instant::now());
        request.candidate_ids = candidates.into();
        assert_eq!(
            fixture.engine.rank_blocking(request).unwrap_err(),
            EngineError::DeadlineExceeded {
                stage: DeadlineStage::BeforeScoring
            }
        );
    }
    let mut late = RankRequest::new("late-entry", UserRef::id("user-1"), 5);
    late.deadline = Some(Instant::now());
    let on_time = RankRequest::new("on-time", UserRef::id("user-1"), 5);
    let batch = fixture
        .engine
        .rank_batch(vec![late, on_time])
        .expect("batch runs");
    assert!(matches!(
        batch.results[0],
        Err(EngineError::DeadlineExceeded { .. })
    ));
    assert!(batch.results[1].is_ok());
}

#[test]
fn callbacks_run_exactly_once_and_in_flight_returns_to_zero() {
    let fixture = fixture();
    let calls = Arc::new(AtomicUsize::new(0));
    let (sender, receiver) = std::sync::mpsc::channel();
    let requests = [
        RankRequest::new("ok", UserRef::id("user-1"), 5),
        RankRequest::new("", UserRef::id("user-1"), 5),
        RankRequest::new("missing", UserRef::id("nobody"), 5),
    ];
    for request in requests {
        let calls = Arc::clone(&calls);
        let sender = sender.clone();
        fixture.engine.submit(
            request,
            Box::new(move |result| {
                calls.fetch_add(1, Ordering::SeqCst);
                let _ = sender.send(result.is_ok());
            }),
        );
    }
    drop(sender);
    let outcomes: Vec<bool> = receiver.iter().collect();
    assert_eq!(outcomes.len(), 3);
    assert_eq!(outcomes.iter().filter(|&&ok| ok).count(), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(fixture.engine.in_flight(), 0);
}

#[test]
fn rank_batch_equals_individual_requests() {
    let fixture = fixture();
    let mut requests = Vec::new();
    for i in 0..10 {
        let mut request =
            RankRequest::new(format!("b{i}"), UserRef::id(format!("user-{i}")), 3 + i);
        if i % 3 == 1 {
            request.candidate_ids = (0..50)
                .map(|r| fixture.items.ids[(r * 4 + i) % ITEMS].clone())
                .collect();
        }
        if i % 5 == 4 {
            request.consent = Consent::personalization(ConsentDecision::Denied);
        }
        requests.push(request);
    }
    requests.push(RankRequest::new("bad-k", UserRef::id("user-1"), 0));
    let batch = fixture
        .engine
        .rank_batch(requests.clone())
        .expect("batch runs");
    assert_eq!(batch.results.len(), requests.len());
    for (request, result) in requests.into_iter().zip(batch.results) {
        match (fixture.engine.rank_blocking(request), result) {
            (Ok(single), Ok(batched)) => {
                assert_eq!(ids_scores(&single), ids_scores(&batched));
                assert_eq!(single.personalized, batched.personalized);
            }
            (Err(single), Err(batched)) => assert_eq!(single, batched),
            (single, batched) => panic!("{single:?} vs {batched:?}"),
        }
    }
    assert_eq!(fixture.engine.in_flight(), 0);
}

#[test]
fn rank_batch_refuses_batch_level_problems() {
    let fixture = fixture_with(
        EngineConfig {
            max_batch_requests: 2,
            ..EngineConfig::default()
        },
        true,
    );
    let request = |id: &str| RankRequest::new(id, UserRef::id("user-1"), 1);
    let field = |requests: Vec<RankRequest>| {
        fixture
            .engine
            .rank_batch(requests)
            .map(|_| ())
            .unwrap_err()
            .field()
            .map(str::to_owned)
    };
    assert_eq!(field(Vec::new()), Some("requests".to_owned()));
    assert_eq!(
        field(vec![request("a"), request("b"), request("c")]),
        Some("requests".to_owned())
    );
    assert_eq!(
        field(vec![request("a"), request("a")]),
        Some("requests[1].request_id".to_owned())
    );
}

/// Waits (up to 10 s) until the serving item table's int8 copy is built.
fn wait_for_quantized_copy(engine: &crate::Engine) -> u64 {
    let started = Instant::now();
    loop {
        let status = engine.status().expect("status");
        if let Some(bytes) = status.items.quantized_copy_bytes {
            return bytes;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the quantized copy was not built"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn quantized_candidates_answer_exactly_like_the_f32_kernel() {
    // Non-integer rows (so the int8 copy is inexact) and inline queries; two engines over
    // the same files, one without the copy.
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut items = util::items_data(3, ITEMS, false);
    for (i, value) in items.rows.iter_mut().enumerate() {
        *value = *value * 0.731 + (i * 7919 % 1000) as f32 / 997.0;
    }
    let path = util::write(dir.path(), "items.frt", &items);
    let open = || store::Table::open(&path).expect("items open");
    let quantized = crate::Engine::new(EngineConfig::default(), open(), None).expect("starts");
    let exact = crate::Engine::new(
        EngineConfig {
            quantized_candidates: false,
            ..EngineConfig::default()
        },
        open(),
        None,
    )
    .expect("starts");
    let bytes = wait_for_quantized_copy(&quantized);
    // Dimension 8: 16 code bytes and a 4-byte scale per row, plus alignment slack.
    assert!(bytes >= (ITEMS * 20) as u64, "{bytes}");
    assert_eq!(
        exact.status().expect("status").items.quantized_copy_bytes,
        None
    );
    for seed in 0..40u64 {
        let query: Vec<f32> = util::integer_values(100 + seed, DIM)
            .iter()
            .enumerate()
            .map(|(d, v)| v * 0.9 + d as f32 * 0.013)
            .collect();
        let count = [3, 40, 200, ITEMS][seed as usize % 4];
        let k = [1, 5, 10, 50][seed as usize / 4 % 4];
        let mut request = RankRequest::new(format!("q{seed}"), UserRef::embedding(query), k);
        request.candidate_ids = (0..count)
            .map(|i| items.ids[(i * 97 + seed as usize) % ITEMS].clone())
            .collect();
        let a = quantized.rank_blocking(request.clone()).expect("ranks");
        let b = exact.rank_blocking(request).expect("ranks");
        let bits = |response: &crate::RankResponse| -> Vec<(String, u32)> {
            ids_scores(response)
                .into_iter()
                .map(|(id, score)| (id, score.to_bits()))
                .collect()
        };
        assert_eq!(bits(&a), bits(&b), "seed {seed}");
    }
}

#[test]
fn a_reloaded_item_table_gets_its_own_quantized_copy() {
    let fixture = fixture();
    wait_for_quantized_copy(&fixture.engine);
    let bigger = util::items_data(9, 2 * ITEMS, true);
    let path = util::write(fixture.dir.path(), "bigger.frt", &bigger);
    let outcome = fixture.engine.reload_items(Some(&path)).expect("reloads");
    assert_eq!(outcome.table.rows, 2 * ITEMS);
    let bytes = wait_for_quantized_copy(&fixture.engine);
    assert!(bytes >= (2 * ITEMS * 20) as u64, "{bytes}");
    let mut request = RankRequest::new("after", UserRef::id("user-2"), 7);
    request.candidate_ids = (0..2 * ITEMS).map(|r| bigger.ids[r].clone()).collect();
    let response = fixture.engine.rank_blocking(request).expect("ranks");
    assert_eq!(
        ids_scores(&response),
        brute_force(&bigger, row(&fixture.users, 2), 0..2 * ITEMS, 7)
    );
}
