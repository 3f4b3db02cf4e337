//! End-to-end tests of `fairrank.v1.Ranker` against the real server process: answers equal
//! the exact scalar top-k, every bad input gets its status code, reason and field, replays
//! are idempotent, and no input takes the server down.

mod grpc_support;

use std::time::Duration;

use api::fairrank::v1 as pb;
use api::fairrank::v1::rank_batch_result::Outcome;
use api::status::{error_field, error_reason};
use grpc_support::*;
use rand::{Rng, SeedableRng};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank_matches_the_exact_top_k_of_the_table() {
    let tables = tables(11);
    let server = Server::start(&tables, None, &[]);
    let mut ranker = server.ranker().await;

    for (user, k) in [(0usize, 1u32), (3, 10), (17, 100), (49, 1000)] {
        let user_id = tables.data.users.ids[user].clone();
        let response = ranker
            .rank(rank_request(&format!("catalog-{user}"), &user_id, k))
            .await
            .expect("ranks")
            .into_inner();
        let expected = reference_topk(
            &tables.items_path,
            row(&tables.data.users, user),
            k as usize,
        );
        assert_ranking(&response, &expected);
        assert!(response.personalized);
        assert_eq!(response.score_kind, pb::ScoreKind::DotProduct as i32);
        assert_eq!(response.scored_items as usize, ITEMS);
        assert_eq!(response.items_table.map(|v| v.generation), Some(1));
        assert_eq!(response.users_table.map(|v| v.generation), Some(1));
        assert!(!response.replayed);
        let timings = response.timings.expect("timings");
        assert!(timings.total_us >= timings.score_us);
    }

    // Inline embedding and a candidate list.
    let query: Vec<f32> = (0..DIM).map(|d| (d as f32 * 0.37).sin()).collect();
    let response = ranker
        .rank(inline_request("inline", query.clone(), 7))
        .await
        .expect("ranks")
        .into_inner();
    assert_ranking(&response, &reference_topk(&tables.items_path, &query, 7));
    assert_eq!(response.users_table, None);

    let candidates: Vec<String> = tables.data.items.ids.iter().step_by(37).cloned().collect();
    let mut request = inline_request("candidates", query.clone(), 5);
    request.candidate_ids = candidates.clone();
    let response = ranker.rank(request).await.expect("ranks").into_inner();
    assert_eq!(response.scored_items as usize, candidates.len());
    assert_ranking(
        &response,
        &reference_candidates(&tables.data.items, &candidates, &query, 5),
    );

    // Explanations at the fullest level.
    let mut request = rank_request("explained", &tables.data.users.ids[2], 3);
    request.explain = Some(pb::ExplainOptions {
        level: pb::ExplainLevel::Dimensions as i32,
        max_dimensions: 2,
    });
    let response = ranker.rank(request).await.expect("ranks").into_inner();
    assert_eq!(response.explain_level, pb::ExplainLevel::Dimensions as i32);
    for item in &response.items {
        let explanation = item.explanation.as_ref().expect("explained");
        assert_eq!(
            explanation.reasons[0].code,
            pb::ReasonCode::ProfileMatch as i32
        );
        assert!(!explanation.reasons[0].text.is_empty());
        assert_eq!(explanation.contributions.len(), 2);
    }
    let fairness = response.fairness.expect("fairness report");
    assert_eq!(fairness.constraint, "none");
    assert_eq!(fairness.fallback, pb::FairnessFallback::None as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank_batch_answers_each_entry_like_rank() {
    let tables = tables(12);
    let server = Server::start(&tables, None, &[]);
    let mut ranker = server.ranker().await;

    let mut requests: Vec<pb::RankRequest> = (0..6)
        .map(|user| rank_request(&format!("batch-{user}"), &tables.data.users.ids[user], 10))
        .collect();
    requests.push(rank_request("batch-unknown", "no-such-user", 10));
    let mut bad_k = rank_request("batch-bad-k", &tables.data.users.ids[0], 0);
    bad_k.k = 0;
    requests.push(bad_k);
    let response = ranker
        .rank_batch(pb::RankBatchRequest { requests })
        .await
        .expect("the batch call succeeds")
        .into_inner();
    assert_eq!(response.results.len(), 8);
    for (user, result) in response.results.iter().take(6).enumerate() {
        let Some(Outcome::Response(answer)) = &result.outcome else {
            panic!("entry {user} failed: {result:?}");
        };
        assert_ranking(
            answer,
            &reference_topk(&tables.items_path, row(&tables.data.users, user), 10),
        );
    }
    let Some(Outcome::Error(unknown)) = &response.results[6].outcome else {
        panic!("unknown user must fail: {:?}", response.results[6]);
    };
    assert_eq!(unknown.code, Code::NotFound as i32);
    assert_eq!(unknown.reason(), pb::ErrorReason::UserNotFound);
    assert_eq!(unknown.field, "user_id");
    let Some(Outcome::Error(bad_k)) = &response.results[7].outcome else {
        panic!("k = 0 must fail: {:?}", response.results[7]);
    };
    assert_eq!(bad_k.code, Code::InvalidArgument as i32);
    assert_eq!(bad_k.field, "k");

    // Batch-level refusals.
    let duplicate = ranker
        .rank_batch(pb::RankBatchRequest {
            requests: vec![
                rank_request("same", &tables.data.users.ids[0], 1),
                rank_request("same", &tables.data.users.ids[1], 1),
            ],
        })
        .await
        .expect_err("duplicate ids are refused");
    assert_eq!(duplicate.code(), Code::InvalidArgument);
    assert_eq!(error_field(&duplicate), Some("requests[1].request_id"));
    let empty = ranker
        .rank_batch(pb::RankBatchRequest { requests: vec![] })
        .await
        .expect_err("an empty batch is refused");
    assert_eq!(error_field(&empty), Some("requests"));
}

/// Calls Rank and returns the error, asserting its code, reason and field.
async fn expect_error(
    ranker: &mut api::fairrank::v1::ranker_client::RankerClient<tonic::transport::Channel>,
    request: pb::RankRequest,
    code: Code,
    reason: pb::ErrorReason,
    field: Option<&str>,
) -> tonic::Status {
    let label = format!("{request:?}");
    let status = ranker
        .rank(request)
        .await
        .expect_err(&format!("must fail: {label}"));
    assert_eq!(status.code(), code, "{label}: {}", status.message());
    assert_eq!(
        error_reason(&status),
        reason,
        "{label}: {}",
        status.message()
    );
    assert_eq!(error_field(&status), field, "{label}");
    if let Some(field) = field {
        assert!(
            status.message().contains(field),
            "the message names {field}: {}",
            status.message()
        );
    }
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_code_reason_and_field() {
    let tables = tables(13);
    let server = Server::start(
        &tables,
        Some("[ranking]\nmax_k = 50\nmax_pool = 200\n"),
        &[],
    );
    let mut ranker = server.ranker().await;
    let user = tables.data.users.ids[0].clone();
    let invalid = Code::InvalidArgument;

    let status = expect_error(
        &mut ranker,
        inline_request("dim", vec![0.5; DIM - 1], 5),
        invalid,
        pb::ErrorReason::DimensionMismatch,
        Some("inline_user.embedding"),
    )
    .await;
    assert!(status.message().contains(&DIM.to_string()));
    let mut nan = vec![0.5; DIM];
    nan[3] = f32::NAN;
    let status = expect_error(
        &mut ranker,
        inline_request("nan", nan, 5),
        invalid,
        pb::ErrorReason::InvalidField,
        Some("inline_user.embedding"),
    )
    .await;
    assert!(status.message().contains("NaN"), "{}", status.message());
    let mut infinite = vec![0.5; DIM];
    infinite[0] = f32::INFINITY;
    let status = expect_error(
        &mut ranker,
        inline_request("inf", infinite, 5),
        invalid,
        pb::ErrorReason::InvalidField,
        Some("inline_user.embedding"),
    )
    .await;
    assert!(
        status.message().contains("infinite"),
        "{}",
        status.message()
    );

    expect_error(
        &mut ranker,
        rank_request("k0", &user, 0),
        invalid,
        pb::ErrorReason::InvalidField,
        Some("k"),
    )
    .await;
    expect_error(
        &mut ranker,
        rank_request("k-big", &user, 51),
        invalid,
        pb::ErrorReason::LimitExceeded,
        Some("k"),
    )
    .await;
    let mut small_pool = rank_request("pool", &user, 10);
    small_pool.pool_size = Some(9);
    expect_error(
        &mut ranker,
        small_pool,
        invalid,
        pb::ErrorReason::InvalidField,
        Some("pool_size"),
    )
    .await;
    let mut big_pool = rank_request("pool-big", &user, 10);
    big_pool.pool_size = Some(201);
    expect_error(
        &mut ranker,
        big_pool,
        invalid,
        pb::ErrorReason::LimitExceeded,
        Some("pool_size"),
    )
    .await;
    expect_error(
        &mut ranker,
        rank_request("", &user, 5),
        invalid,
        pb::ErrorReason::InvalidField,
        Some("request_id"),
    )
    .await;
    let mut no_user = rank_request("no-user", &user, 5);
    no_user.user = None;
    expect_error(
        &mut ranker,
        no_user,
        invalid,
        pb::ErrorReason::InvalidField,
        Some("user"),
    )
    .await;
    expect_error(
        &mut ranker,
        rank_request("unknown-user", "nobody-here", 5),
        Code::NotFound,
        pb::ErrorReason::UserNotFound,
        Some("user_id"),
    )
    .await;

    // Unknown and duplicate candidates name the ids, up to five.
    let mut unknown = rank_request("unknown-items", &user, 5);
    unknown.candidate_ids = vec![tables.data.items.ids[0].clone()];
    unknown
        .candidate_ids
        .extend((0..7).map(|i| format!("ghost-{i}")));
    let status = expect_error(
        &mut ranker,
        unknown,
        Code::NotFound,
        pb::ErrorReason::ItemNotFound,
        Some("candidate_ids"),
    )
    .await;
    assert!(status.message().contains("ghost-0"), "{}", status.message());
    assert!(status.message().contains("ghost-4"), "{}", status.message());
    assert!(
        !status.message().contains("ghost-5"),
        "{}",
        status.message()
    );
    assert!(status.message().contains("2 more"), "{}", status.message());
    let mut duplicates = rank_request("duplicate-items", &user, 2);
    let id = tables.data.items.ids[5].clone();
    duplicates.candidate_ids = vec![id.clone(), tables.data.items.ids[6].clone(), id.clone()];
    let status = expect_error(
        &mut ranker,
        duplicates,
        invalid,
        pb::ErrorReason::InvalidField,
        Some("candidate_ids"),
    )
    .await;
    assert!(status.message().contains(&id), "{}", status.message());

    // Policies.
    let mut constraint = rank_request("constraint", &user, 5);
    constraint.fairness = Some(pb::FairnessPolicy {
        constraint: "no-such-constraint".into(),
        ..Default::default()
    });
    expect_error(
        &mut ranker,
        constraint,
        invalid,
        pb::ErrorReason::UnknownConstraint,
        Some("fairness.constraint"),
    )
    .await;
    let mut params = rank_request("params", &user, 5);
    let json = serde_json::json!({"alpha": 0.1});
    params.fairness = Some(pb::FairnessPolicy {
        constraint: "none".into(),
        params: Some(api::params::json_to_struct(json.as_object().unwrap()).unwrap()),
        ..Default::default()
    });
    expect_error(
        &mut ranker,
        params,
        invalid,
        pb::ErrorReason::InvalidConstraintParams,
        Some("fairness.params.alpha"),
    )
    .await;
    let mut group = rank_request("group", &user, 5);
    group.fairness = Some(pb::FairnessPolicy {
        group_attribute: "no-such-attribute".into(),
        ..Default::default()
    });
    expect_error(
        &mut ranker,
        group,
        Code::FailedPrecondition,
        pb::ErrorReason::GroupAttributeNotFound,
        Some("fairness.group_attribute"),
    )
    .await;
    // Differential privacy needs a subject to charge: an inline embedding without one is
    // refused (the DP path itself is tested in grpc_privacy.rs).
    let mut dp = inline_request("dp", vec![0.1; DIM], 5);
    dp.privacy = Some(pb::PrivacyPolicy {
        mechanism: pb::PrivacyMechanism::GumbelTopK as i32,
        ..Default::default()
    });
    expect_error(
        &mut ranker,
        dp,
        Code::InvalidArgument,
        pb::ErrorReason::InvalidField,
        Some("inline_user.subject_id"),
    )
    .await;

    // A deadline that has passed on arrival. (tonic's own client would cancel the call
    // itself; this client leaves the deadline to the server.)
    let mut late = tonic::Request::new(rank_request("late", &user, 5));
    late.set_timeout(Duration::ZERO);
    let status = server
        .ranker_without_client_deadline()
        .rank(late)
        .await
        .expect_err("too late");
    assert_eq!(
        status.code(),
        Code::DeadlineExceeded,
        "{}",
        status.message()
    );
    let mut generous = tonic::Request::new(rank_request("in-time", &user, 5));
    generous.set_timeout(Duration::from_secs(30));
    server
        .ranker_without_client_deadline()
        .rank(generous)
        .await
        .expect("a generous deadline is met");

    // The server is still healthy and counted every error.
    ranker
        .rank(rank_request("still-alive", &user, 5))
        .await
        .expect("the server still answers");
    let text = server.metrics_text();
    assert_eq!(
        calls_counted(&text, "Rank", "InvalidArgument"),
        Some(13.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_replays_its_answer_and_refuses_other_content() {
    let tables = tables(14);
    let server = Server::start(&tables, None, &[]);
    let mut ranker = server.ranker().await;
    let request = rank_request("idempotent-1", &tables.data.users.ids[4], 8);

    let first = ranker
        .rank(request.clone())
        .await
        .expect("ranks")
        .into_inner();
    assert!(!first.replayed);
    let second = ranker
        .rank(request.clone())
        .await
        .expect("replays")
        .into_inner();
    assert!(second.replayed);
    assert_eq!(second.items, first.items);
    assert_eq!(second.items_table, first.items_table);

    let mut changed = request.clone();
    changed.k = 9;
    let status = ranker.rank(changed).await.expect_err("reuse is refused");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(error_reason(&status), pb::ErrorReason::RequestIdReused);
    assert_eq!(error_field(&status), Some("request_id"));

    // With candidate ids (hashed from the request's body for the digest): a retry replays,
    // one id changed is a reuse, and a batch entry with the same content replays too.
    let mut with_ids = rank_request("idempotent-4", &tables.data.users.ids[4], 3);
    with_ids.candidate_ids = tables.data.items.ids[..20].to_vec();
    let first_with_ids = ranker
        .rank(with_ids.clone())
        .await
        .expect("ranks")
        .into_inner();
    assert!(!first_with_ids.replayed);
    let again = ranker
        .rank(with_ids.clone())
        .await
        .expect("replays")
        .into_inner();
    assert!(again.replayed);
    assert_eq!(again.items, first_with_ids.items);
    let mut one_id_changed = with_ids.clone();
    one_id_changed.candidate_ids[7] = tables.data.items.ids[30].clone();
    let status = ranker
        .rank(one_id_changed)
        .await
        .expect_err("reuse is refused");
    assert_eq!(error_reason(&status), pb::ErrorReason::RequestIdReused);
    let batch = ranker
        .rank_batch(pb::RankBatchRequest {
            requests: vec![with_ids],
        })
        .await
        .expect("the batch call succeeds")
        .into_inner();
    let Some(Outcome::Response(batch_replay)) = &batch.results[0].outcome else {
        panic!("{:?}", batch.results[0]);
    };
    assert!(batch_replay.replayed);
    assert_eq!(batch_replay.items, first_with_ids.items);

    // A failed request is not stored: a retry runs again (and fails again).
    let failing = rank_request("idempotent-2", "nobody", 8);
    for _ in 0..2 {
        let status = ranker.rank(failing.clone()).await.expect_err("fails");
        assert_eq!(status.code(), Code::NotFound);
    }

    // Batch entries replay too.
    let response = ranker
        .rank_batch(pb::RankBatchRequest {
            requests: vec![
                request,
                rank_request("idempotent-3", &tables.data.users.ids[5], 3),
            ],
        })
        .await
        .expect("the batch call succeeds")
        .into_inner();
    let Some(Outcome::Response(replayed)) = &response.results[0].outcome else {
        panic!("{:?}", response.results[0]);
    };
    assert!(replayed.replayed);
    assert_eq!(replayed.items, first.items);
    let text = server.metrics_text();
    assert_eq!(
        metric_value(&text, "fairrank_replayed_answers_total"),
        Some(4.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_input_never_takes_the_server_down() {
    let tables = tables(15);
    let server = Server::start(
        &tables,
        Some("[ranking]\nmax_k = 200\nmax_pool = 400\nmax_candidates = 300\n"),
        &[],
    );
    let mut ranker = server.ranker().await;
    let mut random = rand_chacha::ChaCha8Rng::seed_from_u64(99);
    let strings = ["", "x", "é", "\u{0}", "a b", "-_.:", &"z".repeat(300)];
    let allowed = [
        Code::Ok,
        Code::InvalidArgument,
        Code::NotFound,
        Code::FailedPrecondition,
        Code::Unimplemented,
        Code::Aborted,
    ];
    for attempt in 0..150 {
        let mut request = pb::RankRequest {
            request_id: if random.random_bool(0.8) {
                format!("fuzz-{attempt}")
            } else {
                strings[random.random_range(0..strings.len())].to_owned()
            },
            k: random.random_range(0..300),
            pool_size: random.random_bool(0.5).then(|| random.random_range(0..500)),
            skip_unknown_candidates: random.random_bool(0.3),
            fallback_for_unknown_user: random.random_bool(0.3),
            ..Default::default()
        };
        request.user = match random.random_range(0..4) {
            0 => None,
            1 => Some(pb::rank_request::User::UserId(
                tables.data.users.ids[random.random_range(0..USERS)].clone(),
            )),
            2 => Some(pb::rank_request::User::UserId(
                strings[random.random_range(0..strings.len())].to_owned(),
            )),
            _ => {
                let length = if random.random_bool(0.7) {
                    DIM
                } else {
                    random.random_range(0..40)
                };
                let embedding = (0..length)
                    .map(|_| match random.random_range(0..20) {
                        0 => f32::NAN,
                        1 => f32::INFINITY,
                        2 => f32::MAX,
                        3 => -f32::MAX,
                        _ => random.random_range(-3.0..3.0),
                    })
                    .collect();
                Some(pb::rank_request::User::InlineUser(pb::InlineUser {
                    embedding,
                    subject_id: strings[random.random_range(0..strings.len())].to_owned(),
                }))
            }
        };
        for _ in 0..random.random_range(0..8) {
            request.candidate_ids.push(if random.random_bool(0.8) {
                tables.data.items.ids[random.random_range(0..ITEMS)].clone()
            } else {
                strings[random.random_range(0..strings.len())].to_owned()
            });
        }
        if random.random_bool(0.3) {
            request.explain = Some(pb::ExplainOptions {
                level: random.random_range(-1..6),
                max_dimensions: random.random_range(0..40),
            });
        }
        if random.random_bool(0.3) {
            request.fairness = Some(pb::FairnessPolicy {
                constraint: ["", "none", "fa*ir", "??"][random.random_range(0..4)].to_owned(),
                group_attribute: ["", "provider_group", "nope"][random.random_range(0..3)]
                    .to_owned(),
                on_infeasible: random.random_range(-1..5),
                ..Default::default()
            });
        }
        if random.random_bool(0.3) {
            request.consent = Some(pb::Consent {
                personalization: random.random_range(-1..4),
                consent_reference: strings[random.random_range(0..strings.len())].to_owned(),
            });
        }
        let label = format!("{request:?}");
        let code = match ranker.rank(request).await {
            Ok(response) => {
                let response = response.into_inner();
                assert!(response.items.len() <= 300);
                Code::Ok
            }
            Err(status) => status.code(),
        };
        assert!(allowed.contains(&code), "{code:?} for {label}");
    }
    ranker
        .rank(rank_request("after-fuzz", &tables.data.users.ids[0], 5))
        .await
        .expect("the server still answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused_and_echo_works() {
    let tables = tables(16);
    let server = Server::start(
        &tables,
        Some("[server]\nmax_message_bytes = 4096\necho_service = true\n"),
        &admin_env(),
    );
    let mut ranker = server.ranker().await;
    let mut request = rank_request("huge", &tables.data.users.ids[0], 5);
    request.candidate_ids = tables.data.items.ids[..1000].to_vec();
    let bytes = prost::Message::encoded_len(&request);
    let too_large = |status: &tonic::Status| {
        // RESOURCE_EXHAUSTED, as gRPC's own implementations answer (tonic: OUT_OF_RANGE).
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(error_reason(status), pb::ErrorReason::LimitExceeded);
        assert!(
            status.message().contains("`server.max_message_bytes`")
                && status.message().contains("4096 bytes"),
            "{}",
            status.message()
        );
    };
    let status = ranker.rank(request.clone()).await.expect_err("too large");
    too_large(&status);
    assert!(
        status.message().contains(&format!("of {bytes} bytes")),
        "the size: {}",
        status.message()
    );
    let batch = pb::RankBatchRequest {
        requests: vec![request],
    };
    let status = ranker.rank_batch(batch).await.expect_err("too large");
    too_large(&status);
    ranker
        .rank(rank_request("small", &tables.data.users.ids[0], 5))
        .await
        .expect("small messages still pass");
    // An answer above the limit (k = 500: about 10 KB) is refused by the handler, naming
    // `k`, and counted as such; its request id keeps refusing; a smaller k answers.
    for _ in 0..2 {
        let status = ranker
            .rank(rank_request("large-answer", &tables.data.users.ids[0], 500))
            .await
            .expect_err("the answer is too large");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(error_reason(&status), pb::ErrorReason::LimitExceeded);
        assert_eq!(error_field(&status), Some("k"));
        assert!(
            status.message().contains("`server.max_message_bytes`"),
            "{}",
            status.message()
        );
    }
    ranker
        .rank(rank_request(
            "smaller-answer",
            &tables.data.users.ids[0],
            20,
        ))
        .await
        .expect("a smaller answer passes");
    // Admin answers are the server's own: GetStatus (the whole configuration, above 4 KiB)
    // is not held to the clients' limit.
    let status = server.status().await;
    assert!(prost::Message::encoded_len(&status) > 4096);
    // Refused before any handler ran, and still counted.
    let text = server.metrics_text();
    for (method, refused) in [("Rank", 3.0), ("RankBatch", 1.0)] {
        assert_eq!(
            calls_counted(&text, method, "ResourceExhausted"),
            Some(refused),
            "{method}:\n{text}"
        );
    }

    let mut echo = api::fairrank::bench::v1::echo_client::EchoClient::new(server.channel().await);
    let payload = prost::bytes::Bytes::from_static(b"fairrank");
    let answer = echo
        .echo(api::fairrank::bench::v1::EchoRequest {
            payload: payload.clone(),
            response_bytes: None,
        })
        .await
        .expect("echoes")
        .into_inner();
    assert_eq!(answer.payload, payload);
    let answer = echo
        .echo(api::fairrank::bench::v1::EchoRequest {
            payload,
            response_bytes: Some(1000),
        })
        .await
        .expect("echoes")
        .into_inner();
    assert_eq!(answer.payload.len(), 1000);
    // A sized answer above the limit is refused naming the field, with a reason (not
    // ended by tonic's encoder with OUT_OF_RANGE and none).
    let status = echo
        .echo(api::fairrank::bench::v1::EchoRequest {
            payload: prost::bytes::Bytes::new(),
            response_bytes: Some(5000),
        })
        .await
        .expect_err("the answer is too large");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(error_reason(&status), pb::ErrorReason::LimitExceeded);
    assert_eq!(error_field(&status), Some("response_bytes"));
    let listed = reflection_v1_services(&server).await;
    assert!(
        listed.contains("fairrank.bench.v1.Echo"),
        "Echo is on and listed: {listed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rank_command_prints_a_table_and_json() {
    let tables = tables(17);
    let server = Server::start(&tables, None, &[]);
    let addr = server.addr.to_string();
    let user = tables.data.users.ids[7].clone();
    let expected = reference_topk(&tables.items_path, row(&tables.data.users, 7), 5);
    let run = move |extra: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_fairrank"))
            .args(["rank", "--addr", &addr, "--user", &user, "--k", "5"])
            .args(extra)
            .output()
            .expect("the client runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("UTF-8")
    };
    let table = tokio::task::spawn_blocking(move || {
        let table = run(&["--explain"]);
        let json = run(&["--format", "json"]);
        (table, json)
    })
    .await
    .expect("the client task runs");
    let (table, json) = table;
    assert!(table.contains("rank"), "{table}");
    assert!(table.contains("provider_group="), "{table}");
    assert!(table.contains("REASON_CODE_PROFILE_MATCH"), "{table}");
    for (id, _) in &expected {
        assert!(table.contains(id.as_str()), "{id} missing:\n{table}");
    }
    let json: serde_json::Value = serde_json::from_str(&json).expect("JSON output");
    let ids: Vec<&str> = json["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| item["item_id"].as_str().expect("an id"))
        .collect();
    assert_eq!(ids.len(), 5);
    assert_eq!(json["personalized"], true);

    // A refusal exits non-zero and names the field.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fairrank"))
        .args([
            "rank",
            "--addr",
            &server.addr.to_string(),
            "--user",
            "nobody",
        ])
        .output()
        .expect("the client runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ERROR_REASON_USER_NOT_FOUND"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_are_invalid_arguments_naming_the_field() {
    let tables = tables(17);
    let server = Server::start(&tables, None, &[]);
    let user = tables.data.users.ids[0].clone();
    let mut request = rank_request("undecodable", &user, 3);
    request.candidate_ids = vec![tables.data.items.ids[0].clone(), "PLACE".into()];
    let batch = pb::RankBatchRequest {
        requests: vec![request.clone()],
    };
    // A last candidate id (field 10, length-delimited) that says 5 bytes and has 1.
    let mut truncated = prost::Message::encode_to_vec(&request);
    truncated.extend_from_slice(&[(10 << 3) | 2, 5, b'i']);

    let cases = [
        ("Rank", with_invalid_utf8_id(&request), "candidate_ids"),
        ("RankBatch", with_invalid_utf8_id(&batch), "candidate_ids"),
        ("Rank", truncated, "RankRequest.candidate_ids"),
    ];
    for (method, body, named) in cases {
        let path = format!("/fairrank.v1.Ranker/{method}");
        let status = server
            .raw_call(&path, body, &[])
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{method}: {status:?}");
        assert_eq!(error_reason(&status), pb::ErrorReason::InvalidField);
        assert!(
            status.message().contains(named),
            "{method}: the message names {named}: {}",
            status.message()
        );
    }

    // The same requests with valid ids are answered: the server is still up.
    let mut ranker = server.ranker().await;
    let mut valid = request;
    valid.candidate_ids[1] = tables.data.items.ids[1].clone();
    let response = ranker.rank(valid).await.expect("ranks").into_inner();
    assert_eq!(response.items.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answer_above_the_message_limit_is_refused_and_counted_as_refused() {
    let tables = tables(13);
    let server = Server::start(&tables, Some("[server]\nmax_message_bytes = 16384\n"), &[]);
    let mut ranker = server.ranker().await;
    // 40 answers of 50 explained items: far above 16 KiB, from a request far below it.
    let explained = |entry: usize| {
        let mut request = rank_request(
            &format!("big-{entry}"),
            &tables.data.users.ids[entry % 6],
            50,
        );
        request.explain = Some(pb::ExplainOptions {
            level: pb::ExplainLevel::Text as i32,
            max_dimensions: 0,
        });
        request
    };
    let refused = ranker
        .rank_batch(pb::RankBatchRequest {
            requests: (0..40).map(explained).collect(),
        })
        .await
        .expect_err("the answer cannot be sent");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(error_field(&refused), Some("requests"));
    assert!(
        refused.message().contains("max_message_bytes"),
        "{}",
        refused.message()
    );
    // Each answer was kept for its request id: a retry one by one returns it.
    let single = ranker
        .rank(explained(0))
        .await
        .expect("the kept answer fits alone")
        .into_inner();
    assert!(single.replayed);
    assert_eq!(single.items.len(), 50);
    let text = server.metrics_text();
    assert_eq!(
        calls_counted(&text, "RankBatch", "ResourceExhausted"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(calls_counted(&text, "RankBatch", "Ok"), None, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_candidates_than_the_limit_are_refused_naming_the_field() {
    let tables = tables(14);
    let server = Server::start(&tables, Some("[ranking]\nmax_candidates = 10\n"), &[]);
    let mut ranker = server.ranker().await;
    let mut request = rank_request("too-many", &tables.data.users.ids[0], 3);
    request.candidate_ids = tables.data.items.ids[..11].to_vec();
    let status = ranker.rank(request.clone()).await.expect_err("11 > 10");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(error_field(&status), Some("candidate_ids"));
    assert_eq!(error_reason(&status), pb::ErrorReason::LimitExceeded);
    assert!(
        status.message().contains("at most 10"),
        "{}",
        status.message()
    );
    // Refused by the route's decoder, before any handler: still counted.
    let text = server.metrics_text();
    assert_eq!(
        calls_counted(&text, "Rank", "InvalidArgument"),
        Some(1.0),
        "{text}"
    );
    request.request_id = "at-the-limit".into();
    request.candidate_ids.truncate(10);
    ranker.rank(request).await.expect("10 candidates rank");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_baseline_is_off_unless_configured() {
    let tables = tables(15);
    let server = Server::start(&tables, None, &[]);
    let mut echo = api::fairrank::bench::v1::echo_client::EchoClient::new(server.channel().await);
    let status = echo
        .echo(api::fairrank::bench::v1::EchoRequest {
            payload: prost::bytes::Bytes::from_static(b"x"),
            response_bytes: Some(4 * 1024 * 1024),
        })
        .await
        .expect_err("no Echo on a default server");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_more_candidate_ids_in_all_than_the_limit_is_refused() {
    let tables = tables(17);
    let server = Server::start(&tables, Some("[ranking]\nmax_batch_candidates = 5\n"), &[]);
    let mut ranker = server.ranker().await;
    let entry = |id: &str, candidates: usize| {
        let mut request = rank_request(id, &tables.data.users.ids[0], 1);
        request.candidate_ids = tables.data.items.ids[..candidates].to_vec();
        request
    };
    let status = ranker
        .rank_batch(pb::RankBatchRequest {
            requests: vec![entry("a", 3), entry("b", 3)],
        })
        .await
        .expect_err("6 ids in all > 5");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(error_field(&status), Some("requests"));
    assert_eq!(error_reason(&status), pb::ErrorReason::LimitExceeded);
    let answer = ranker
        .rank_batch(pb::RankBatchRequest {
            requests: vec![entry("c", 3), entry("d", 2)],
        })
        .await
        .expect("5 ids in all")
        .into_inner();
    assert_eq!(answer.results.len(), 2);
}
