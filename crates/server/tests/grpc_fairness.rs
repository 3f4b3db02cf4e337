//! End-to-end tests of fairness over gRPC: a real `fairrank serve` on loopback, a tonic
//! client, every registered constraint answering with a satisfied report whose prefix counts
//! hold, refused policies naming their field, seeded Plackett-Luce reproducibility, the
//! constraint list of GetStatus and FairCo state kept across a restart.

mod grpc_support;

use api::fairrank::v1 as pb;
use api::status::{error_field, error_reason};
use grpc_support::*;
use tonic::Code;

/// A fairness policy with JSON parameters.
fn policy(constraint: &str, params: serde_json::Value) -> pb::FairnessPolicy {
    let params = params
        .as_object()
        .map(|object| api::params::json_to_struct(object).expect("valid parameters"));
    pb::FairnessPolicy {
        constraint: constraint.to_owned(),
        params,
        group_attribute: "provider_group".to_owned(),
        ..pb::FairnessPolicy::default()
    }
}

/// A whole-catalog request of `k` items from a pool of `pool` under `fairness`.
fn fair_request(
    id: &str,
    user: &str,
    k: u32,
    pool: u32,
    fairness: pb::FairnessPolicy,
) -> pb::RankRequest {
    pb::RankRequest {
        pool_size: Some(pool),
        fairness: Some(fairness),
        ..rank_request(id, user, k)
    }
}

/// `provider_group` labels of the answer, best first.
fn labels(response: &pb::RankResponse) -> Vec<u32> {
    let attribute = response
        .group_attributes
        .iter()
        .position(|name| name == "provider_group")
        .expect("the table has provider_group");
    response
        .items
        .iter()
        .map(|item| item.group_labels[attribute])
        .collect()
}

fn report(response: &pb::RankResponse) -> &pb::FairnessReport {
    response
        .fairness
        .as_ref()
        .expect("every answer has a fairness report")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_constraint_answers_with_a_satisfied_report_whose_prefixes_hold() {
    let tables = tables(11);
    let server = Server::start(&tables, None, &[]);
    let mut ranker = server.ranker().await;
    let user = tables.data.users.ids[3].clone();
    let (k, pool) = (40u32, 400u32);
    let (p, alpha) = (0.5, 0.1);
    let mtable = fairness::MTable::adjusted(k as usize, p, alpha).expect("mtable");
    let targets = serde_json::json!({"0": 0.5, "1": 0.4});

    let cases = [
        (
            "fa*ir",
            serde_json::json!({"p": p, "alpha": alpha, "protected": 1}),
        ),
        ("det-greedy", serde_json::json!({"targets": targets})),
        ("det-cons", serde_json::json!({"targets": targets})),
        ("det-relaxed", serde_json::json!({"targets": targets})),
        ("det-const-sort", serde_json::json!({"targets": targets})),
        ("min-exposure", serde_json::json!({"targets": {"1": 0.4}})),
        ("fairco", serde_json::json!({"lambda": 1.0})),
        ("plackett-luce", serde_json::json!({"temperature": 0.5})),
        ("none", serde_json::json!({})),
    ];
    for (index, (name, params)) in cases.into_iter().enumerate() {
        let request = fair_request(
            &format!("each-{index}"),
            &user,
            k,
            pool,
            policy(name, params),
        );
        let response = ranker
            .rank(request)
            .await
            .unwrap_or_else(|status| panic!("{name}: {status:?}"))
            .into_inner();
        assert_eq!(response.items.len(), k as usize, "{name}");
        let report = report(&response);
        assert_eq!(report.constraint, name);
        assert!(report.satisfied, "{name}: {report:?}");
        assert_eq!(report.fallback, pb::FairnessFallback::None as i32, "{name}");
        assert_eq!(report.group_attribute, "provider_group");
        let shares: f64 = report.groups.iter().map(|group| group.exposure_share).sum();
        assert!((shares - 1.0).abs() < 1e-9, "{name}: {shares}");
        let labels = labels(&response);
        match name {
            "fa*ir" => {
                let mut protected = 0;
                for (prefix, &label) in labels.iter().enumerate() {
                    protected += u32::from(label == 1);
                    assert!(
                        protected >= mtable.min_protected[prefix],
                        "fa*ir prefix {}",
                        prefix + 1
                    );
                }
            }
            name if name.starts_with("det-") => {
                let mut counts = [0usize; 2];
                for (prefix, &label) in labels.iter().enumerate() {
                    counts[label as usize] += 1;
                    assert!(
                        counts[0] >= fairness::floor_share(prefix + 1, 0.5),
                        "{name} {prefix}"
                    );
                    assert!(
                        counts[1] >= fairness::floor_share(prefix + 1, 0.4),
                        "{name} {prefix}"
                    );
                }
            }
            "min-exposure" => {
                let group = report
                    .groups
                    .iter()
                    .find(|group| group.group == 1)
                    .expect("group 1");
                assert!(group.exposure_share >= 0.4 - 1e-9, "{group:?}");
                assert!(report.optimality.is_some());
            }
            "fairco" => {
                assert!(!report.amortized.is_empty());
                assert!(report.amortized_disparity.is_some());
            }
            "plackett-luce" => assert!(report.seed.is_some()),
            _ => {
                let ranks: Vec<u32> = response
                    .items
                    .iter()
                    .map(|item| item.unconstrained_rank)
                    .collect();
                assert_eq!(ranks, (1..=k).collect::<Vec<_>>());
                assert_eq!(report.ndcg_vs_unconstrained, 1.0);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_constraints_and_parameters_are_invalid_arguments_naming_the_field() {
    let tables = tables(12);
    let server = Server::start(&tables, None, &[]);
    let mut ranker = server.ranker().await;
    let user = tables.data.users.ids[0].clone();
    let cases = [
        (
            policy("fair", serde_json::json!({})),
            pb::ErrorReason::UnknownConstraint,
            "fairness.constraint",
        ),
        (
            policy("fa*ir", serde_json::json!({"p": 1.5, "protected": 1})),
            pb::ErrorReason::InvalidConstraintParams,
            "fairness.params.p",
        ),
        (
            policy("fa*ir", serde_json::json!({"p": 0.5})),
            pb::ErrorReason::InvalidConstraintParams,
            "fairness.params.protected",
        ),
        (
            policy(
                "det-greedy",
                serde_json::json!({"targets": {"1": 0.5}, "target": 1}),
            ),
            pb::ErrorReason::InvalidConstraintParams,
            "fairness.params.target",
        ),
        (
            policy("plackett-luce", serde_json::json!({"temperature": 0})),
            pb::ErrorReason::InvalidConstraintParams,
            "fairness.params.temperature",
        ),
        // Long values are quoted clipped: the status stays within clients' trailer limits
        // (a 60 KB quote reached tonic clients as an h2 protocol error, INTERNAL).
        (
            policy(
                "fa*ir",
                serde_json::json!({"p": "x".repeat(60_000), "protected": 1}),
            ),
            pb::ErrorReason::InvalidConstraintParams,
            "fairness.params.p",
        ),
        (
            policy(
                "fa*ir",
                serde_json::json!({"p": 0.5, "protected": "\u{1}".repeat(10_000)}),
            ),
            pb::ErrorReason::InvalidConstraintParams,
            "fairness.params.protected",
        ),
        // A policy above its wire limit is refused before it is decoded.
        (
            policy(
                "none",
                serde_json::json!({"pad": vec![serde_json::Value::Null; 40_000]}),
            ),
            pb::ErrorReason::LimitExceeded,
            "fairness",
        ),
        // So is one whose string is above the wire limit: the string is named.
        (
            pb::FairnessPolicy {
                exposure_scope: "s".repeat(70_000),
                ..policy("none", serde_json::json!({}))
            },
            pb::ErrorReason::LimitExceeded,
            "fairness.exposure_scope",
        ),
        (
            pb::FairnessPolicy {
                group_attribute: "g".repeat(70_000),
                ..policy("none", serde_json::json!({}))
            },
            pb::ErrorReason::LimitExceeded,
            "fairness.group_attribute",
        ),
        (
            policy(&"c".repeat(70_000), serde_json::json!({})),
            pb::ErrorReason::LimitExceeded,
            "fairness.constraint",
        ),
    ];
    for (index, (fairness, reason, field)) in cases.into_iter().enumerate() {
        let status = ranker
            .rank(fair_request(
                &format!("bad-{index}"),
                &user,
                5,
                50,
                fairness,
            ))
            .await
            .expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert_eq!(error_reason(&status), reason, "{field}");
        assert_eq!(error_field(&status), Some(field), "{status:?}");
        assert!(
            status.message().len() < 1024,
            "{field}: {}",
            status.message()
        );
    }
    // The unknown-constraint message lists the registered names.
    let status = ranker
        .rank(fair_request(
            "bad-list",
            &user,
            5,
            50,
            policy("fair", serde_json::json!({})),
        ))
        .await
        .expect_err("unknown");
    assert!(status.message().contains("fa*ir") && status.message().contains("det-greedy"));
    // In a batch, the entry's string is named.
    let status = ranker
        .rank_batch(pb::RankBatchRequest {
            requests: vec![
                fair_request("ok", &user, 5, 50, policy("none", serde_json::json!({}))),
                fair_request(
                    "long-scope",
                    &user,
                    5,
                    50,
                    pb::FairnessPolicy {
                        exposure_scope: "s".repeat(70_000),
                        ..policy("none", serde_json::json!({}))
                    },
                ),
            ],
        })
        .await
        .expect_err("a string above the wire limit");
    assert_eq!(error_reason(&status), pb::ErrorReason::LimitExceeded);
    assert_eq!(
        error_field(&status),
        Some("requests[1].fairness.exposure_scope"),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_group_attribute_the_table_lacks_is_warned_about_at_start() {
    let tables = tables(14);
    let warning = "the item table has no ranking.default_group_attribute";
    let server = Server::start(&tables, None, &[]);
    assert!(!server.logs().contains(warning), "{}", server.logs());
    let server = Server::start(
        &tables,
        Some("[ranking]\ndefault_group_attribute = \"region\"\n"),
        &[],
    );
    let logs = server.logs();
    assert!(logs.contains(warning), "{logs}");
    assert!(
        logs.contains("provider_group"),
        "the table's attributes are listed: {logs}"
    );
    // It still serves, and `none` answers without group figures.
    let mut ranker = server.ranker().await;
    let user = tables.data.users.ids[0].clone();
    let answer = ranker
        .rank(rank_request("no-group", &user, 5))
        .await
        .expect("serves")
        .into_inner();
    assert!(report(&answer).groups.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plackett_luce_with_a_seed_is_reproducible() {
    let tables = tables(13);
    let server = Server::start(&tables, None, &[]);
    let mut ranker = server.ranker().await;
    let user = tables.data.users.ids[5].clone();
    let mut ask = async |id: &str, seed: Option<u64>| {
        let mut fairness = policy("plackett-luce", serde_json::json!({"temperature": 0.2}));
        fairness.seed = seed;
        ranker
            .rank(fair_request(id, &user, 20, 300, fairness))
            .await
            .expect("ranks")
            .into_inner()
    };
    let ids = |response: &pb::RankResponse| {
        response
            .items
            .iter()
            .map(|item| item.item_id.clone())
            .collect::<Vec<_>>()
    };
    let first = ask("pl-1", Some(7)).await;
    let second = ask("pl-2", Some(7)).await;
    assert!(!second.replayed, "distinct request ids are ranked again");
    assert_eq!(ids(&first), ids(&second));
    assert_eq!(report(&first).seed, Some(7));
    let drawn = ask("pl-3", None).await;
    let seed = report(&drawn).seed.expect("the drawn seed is reported");
    assert_eq!(ids(&ask("pl-4", Some(seed)).await), ids(&drawn));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_status_lists_every_constraint_with_its_parameters() {
    let tables = tables(14);
    let server = Server::start(&tables, None, &admin_env());
    let status = server.status().await;
    for name in [
        "none",
        "fa*ir",
        "det-greedy",
        "det-const-sort",
        "min-exposure",
        "fairco",
        "plackett-luce",
    ] {
        assert!(
            status
                .fairness_constraints
                .iter()
                .any(|known| known == name),
            "{name}"
        );
    }
    let names: Vec<&str> = status
        .fairness_constraint_details
        .iter()
        .map(|info| info.name.as_str())
        .collect();
    assert_eq!(names, status.fairness_constraints);
    let fair = status
        .fairness_constraint_details
        .iter()
        .find(|info| info.name == "fa*ir")
        .expect("fa*ir");
    let alpha = fair
        .params
        .iter()
        .find(|param| param.name == "alpha")
        .expect("alpha");
    assert!(!alpha.required);
    assert_eq!(alpha.default_value.as_deref(), Some("0.1"));
    assert!(
        fair.params
            .iter()
            .any(|param| param.name == "p" && param.required)
    );
}

/// Sends FairCo requests of `users` (in order) in scope `home`; returns the last answer.
async fn fairco_rounds(server: &Server, users: &[String], first_id: usize) -> pb::RankResponse {
    let mut ranker = server.ranker().await;
    let mut last = None;
    for (offset, user) in users.iter().enumerate() {
        let mut fairness = policy("fairco", serde_json::json!({"lambda": 2.0}));
        fairness.exposure_scope = "home".to_owned();
        let request = fair_request(
            &format!("fairco-{}", first_id + offset),
            user,
            10,
            80,
            fairness,
        );
        last = Some(ranker.rank(request).await.expect("ranks").into_inner());
    }
    last.expect("at least one round")
}

fn amortized(response: &pb::RankResponse) -> Vec<(u32, f64, f64)> {
    report(response)
        .amortized
        .iter()
        .map(|group| (group.group, group.exposure_share, group.merit_share))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fairco_state_survives_a_restart_with_a_state_database() {
    let tables = tables(15);
    let state_dir = tempfile::tempdir().expect("temporary folder");
    let config = format!(
        "[state]\ndir = {:?}\n",
        state_dir.path().display().to_string()
    );
    let users: Vec<String> = (0..4)
        .map(|user| tables.data.users.ids[user * 7].clone())
        .collect();
    let (before, after) = users.split_at(3);

    // Three rankings, a graceful restart, a fourth ranking.
    let mut server = Server::start(&tables, Some(&config), &[]);
    fairco_rounds(&server, before, 0).await;
    server.signal("TERM");
    assert!(server.wait(CALL_TIMEOUT).success(), "{}", server.logs());
    let restarted = Server::start(&tables, Some(&config), &[]);
    let resumed = fairco_rounds(&restarted, after, 3).await;

    // The same four rankings without a restart, and the fourth alone.
    let continuous = Server::start(&tables, None, &[]);
    let uninterrupted = fairco_rounds(&continuous, &users, 0).await;
    let fresh = Server::start(&tables, None, &[]);
    let alone = fairco_rounds(&fresh, after, 3).await;

    let ids = |response: &pb::RankResponse| {
        response
            .items
            .iter()
            .map(|item| item.item_id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&resumed), ids(&uninterrupted));
    let (resumed, uninterrupted, alone) = (
        amortized(&resumed),
        amortized(&uninterrupted),
        amortized(&alone),
    );
    assert_eq!(resumed.len(), uninterrupted.len());
    for (a, b) in resumed.iter().zip(&uninterrupted) {
        assert_eq!(a.0, b.0);
        assert!(
            (a.1 - b.1).abs() < 1e-9 && (a.2 - b.2).abs() < 1e-9,
            "{a:?} vs {b:?}"
        );
    }
    assert!(
        resumed
            .iter()
            .zip(&alone)
            .any(|(a, b)| (a.2 - b.2).abs() > 1e-9),
        "the restarted server remembers the earlier rankings: {resumed:?} vs {alone:?}"
    );
}
