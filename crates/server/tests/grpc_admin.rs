//! End-to-end tests of `fairrank.v1.Admin`: bearer-token authentication, table reloads
//! (good and bad files, paths outside the allowed folder or not usable) under concurrent
//! load, rollback, the personalization switch and status.

mod grpc_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use api::fairrank::v1 as pb;
use api::status::{error_field, error_reason};
use grpc_support::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_the_configured_bearer_token() {
    let tables = tables(21);
    let server = Server::start(&tables, None, &admin_env());
    let mut admin = server.admin().await;

    let missing = admin
        .get_status(pb::GetStatusRequest {})
        .await
        .expect_err("no token");
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert_eq!(error_reason(&missing), pb::ErrorReason::AdminTokenInvalid);
    for wrong in [
        "wrong",
        "test-admin-token-012345678",
        "test-admin-token-01234567890",
    ] {
        let status = admin
            .get_status(with_token(pb::GetStatusRequest {}, wrong))
            .await
            .expect_err("wrong token");
        assert_eq!(status.code(), Code::Unauthenticated, "{wrong}");
    }
    let mut basic = tonic::Request::new(pb::GetStatusRequest {});
    basic.metadata_mut().insert(
        "authorization",
        format!("Basic {ADMIN_TOKEN}").parse().unwrap(),
    );
    let status = admin
        .get_status(basic)
        .await
        .expect_err("not a bearer token");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = admin
        .reload_table(pb::ReloadTableRequest {
            table: pb::TableKind::Items as i32,
            ..Default::default()
        })
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);

    let status = server.status().await;
    assert_eq!(status.server_version, env!("CARGO_PKG_VERSION"));
    let items = status.items_table.expect("items table");
    assert_eq!(items.rows as usize, ITEMS);
    assert_eq!(items.dim as usize, DIM);
    assert_eq!(items.version.map(|v| v.generation), Some(1));
    assert_eq!(
        status.users_table.as_ref().map(|t| t.rows as usize),
        Some(USERS)
    );
    for name in ["none", "fa*ir", "det-greedy", "fairco", "plackett-luce"] {
        assert!(
            status
                .fairness_constraints
                .iter()
                .any(|known| known == name),
            "{name} in {:?}",
            status.fairness_constraints
        );
    }
    assert!(status.config.contains("[ranking]"), "{}", status.config);
    assert!(
        status.config.contains("vectored_writes = false"),
        "the default is documented in the effective configuration: {}",
        status.config
    );
    assert!(!status.config.contains(ADMIN_TOKEN));
    // A fresh durable ledger: its totals are read, and nothing has been charged yet.
    let ledger = status.privacy_ledger.expect("ledger status");
    assert!(ledger.enabled && ledger.totals_counted, "{ledger:?}");
    assert_eq!(
        (ledger.subjects, ledger.rho_charged_total),
        (0, 0.0),
        "{ledger:?}"
    );
    // The int8 copy of the item rows is built in the background after the load: it appears
    // with its size (one code per padded dimension plus a scale per row, at least); the
    // user table never has one.
    assert_eq!(
        status
            .users_table
            .as_ref()
            .and_then(|t| t.quantized_copy_bytes),
        None
    );
    let mut copy_bytes = items.quantized_copy_bytes;
    for _ in 0..200 {
        if copy_bytes.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        copy_bytes = server
            .status()
            .await
            .items_table
            .and_then(|t| t.quantized_copy_bytes);
    }
    let copy_bytes = copy_bytes.expect("the int8 copy is built within 5 s") as usize;
    assert!(copy_bytes >= ITEMS * (DIM + 4), "{copy_bytes}");

    // Without a configured token the service is off.
    let plain = Server::start(&tables, None, &[]);
    let status = plain
        .admin()
        .await
        .get_status(with_token(pb::GetStatusRequest {}, ADMIN_TOKEN))
        .await
        .expect_err("admin is off");
    assert_eq!(status.code(), Code::Unimplemented);
    assert_eq!(error_reason(&status), pb::ErrorReason::NotSupported);
    assert!(
        status.message().contains("admin token"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_concurrent_load_lose_no_request() {
    let tables = tables(22);
    let server = Server::start(&tables, None, &admin_env());
    let folder = tables.dir.path();
    let version_a = folder.join("items-a.frt");
    let version_b = folder.join("items-b.frt");
    std::fs::copy(&tables.items_path, &version_a).expect("copy");
    write_items(&version_b, 23);
    let bad = folder.join("broken.frt");
    std::fs::write(&bad, b"this is not a table file at all").expect("write");

    let user = 9;
    let query = row(&tables.data.users, user).to_vec();
    let expected_a = reference_topk(&version_a, &query, 10);
    let expected_b = reference_topk(&version_b, &query, 10);
    let checksum = |path: &std::path::Path| {
        store::Table::open(path)
            .expect("opens")
            .header()
            .data_checksum
    };
    let (checksum_a, checksum_b) = (checksum(&version_a), checksum(&version_b));
    assert_ne!(checksum_a, checksum_b);

    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for task in 0..4 {
        let mut ranker = server.ranker().await;
        let stop = Arc::clone(&stop);
        let user_id = tables.data.users.ids[user].clone();
        let (expected_a, expected_b) = (expected_a.clone(), expected_b.clone());
        load.push(tokio::spawn(async move {
            let mut answered = 0u32;
            let mut generations = Vec::new();
            while !stop.load(Ordering::Acquire) || answered < 5 {
                let request = rank_request(&format!("load-{task}-{answered}"), &user_id, 10);
                let response = ranker
                    .rank(request)
                    .await
                    .unwrap_or_else(|status| panic!("task {task} lost a request: {status:?}"))
                    .into_inner();
                let version = response.items_table.expect("a table version");
                if version.checksum == checksum_a {
                    assert_ranking(&response, &expected_a);
                } else if version.checksum == checksum_b {
                    assert_ranking(&response, &expected_b);
                } else {
                    panic!("an answer from an unknown table: {version:?}");
                }
                generations.push(version.generation);
                answered += 1;
            }
            generations
        }));
    }

    let mut admin = server.admin().await;
    for round in 0..5u64 {
        let path = if round % 2 == 0 {
            "items-b.frt"
        } else {
            "items-a.frt"
        };
        let response = admin
            .reload_table(with_token(
                pb::ReloadTableRequest {
                    table: pb::TableKind::Items as i32,
                    path: Some(path.to_owned()),
                    reason: format!("round {round}"),
                    ..Default::default()
                },
                ADMIN_TOKEN,
            ))
            .await
            .expect("a good file reloads")
            .into_inner();
        let table = response.table.expect("the new table");
        assert_eq!(table.version.map(|v| v.generation), Some(round + 2));
        assert_eq!(response.previous.map(|v| v.generation), Some(round + 1));

        // A broken file between good ones: refused, the table keeps serving.
        let status = admin
            .reload_table(with_token(
                pb::ReloadTableRequest {
                    table: pb::TableKind::Items as i32,
                    path: Some("broken.frt".to_owned()),
                    ..Default::default()
                },
                ADMIN_TOKEN,
            ))
            .await
            .expect_err("a broken file is refused");
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(error_reason(&status), pb::ErrorReason::TableInvalid);
        assert!(
            status.message().contains("broken.frt"),
            "{}",
            status.message()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Release);
    for task in load {
        let generations = task
            .await
            .expect("the load task finishes without losing a request");
        assert!(generations.windows(2).all(|pair| pair[0] <= pair[1]));
    }

    let status = server.status().await;
    let items = status.items_table.expect("items");
    assert_eq!(items.version.map(|v| v.generation), Some(6));
    assert_eq!(items.version.map(|v| v.checksum), Some(checksum_b));
    let counters = status.counters.expect("counters");
    assert_eq!(counters.reloads, 5);
    assert_eq!(counters.reload_failures, 5);
    assert_eq!(counters.rank_errors, 0);
    assert_eq!(counters.in_flight, 0);
    let text = server.metrics_text();
    assert_eq!(
        metric_value(
            &text,
            "fairrank_table_changes_total{table=\"items\",operation=\"reload\",outcome=\"failed\"}"
        ),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "fairrank_table_generation{table=\"items\"}"),
        Some(6.0)
    );
    assert!(server.logs().contains("keeps serving"), "{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_paths_rollback_and_the_personalization_switch() {
    let tables = tables(24);
    let server = Server::start(&tables, None, &admin_env());
    let mut admin = server.admin().await;
    let mut ranker = server.ranker().await;
    fn call<T>(message: T) -> tonic::Request<T> {
        with_token(message, ADMIN_TOKEN)
    }

    for (path, code, reason) in [
        (
            "../items.frt",
            Code::PermissionDenied,
            pb::ErrorReason::PathNotAllowed,
        ),
        (
            "/etc/hostname",
            Code::PermissionDenied,
            pb::ErrorReason::PathNotAllowed,
        ),
        (
            "missing.frt",
            Code::NotFound,
            pb::ErrorReason::TableFileNotFound,
        ),
    ] {
        let status = admin
            .reload_table(call(pb::ReloadTableRequest {
                table: pb::TableKind::Items as i32,
                path: Some(path.to_owned()),
                ..Default::default()
            }))
            .await
            .expect_err(path);
        assert_eq!(status.code(), code, "{path}: {}", status.message());
        assert_eq!(error_reason(&status), reason, "{path}");
        assert_eq!(error_field(&status), Some("path"));
    }
    let status = admin
        .reload_table(call(pb::ReloadTableRequest::default()))
        .await
        .expect_err("no table kind");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(error_field(&status), Some("table"));
    let status = admin
        .reload_table(call(pb::ReloadTableRequest {
            table: pb::TableKind::Items as i32,
            if_generation: Some(7),
            ..Default::default()
        }))
        .await
        .expect_err("generation mismatch");
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(error_reason(&status), pb::ErrorReason::GenerationMismatch);
    let status = admin
        .rollback_table(call(pb::RollbackTableRequest {
            table: pb::TableKind::Items as i32,
            ..Default::default()
        }))
        .await
        .expect_err("nothing to roll back to");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(error_reason(&status), pb::ErrorReason::NoRollbackTarget);

    // Reload a new file, then roll back to the original.
    let new_path = tables.dir.path().join("items-v2.frt");
    write_items(&new_path, 25);
    admin
        .reload_table(call(pb::ReloadTableRequest {
            table: pb::TableKind::Items as i32,
            path: Some(new_path.display().to_string()),
            if_generation: Some(1),
            verify_checksum: Some(true),
            reason: "new catalog".into(),
        }))
        .await
        .expect("reloads");
    let query = row(&tables.data.users, 1);
    let response = ranker
        .rank(rank_request("after-reload", &tables.data.users.ids[1], 10))
        .await
        .expect("ranks")
        .into_inner();
    assert_ranking(&response, &reference_topk(&new_path, query, 10));
    let rolled = admin
        .rollback_table(call(pb::RollbackTableRequest {
            table: pb::TableKind::Items as i32,
            if_generation: Some(2),
            reason: "bad catalog".into(),
        }))
        .await
        .expect("rolls back")
        .into_inner();
    assert_eq!(
        rolled.table.and_then(|t| t.version).map(|v| v.generation),
        Some(3)
    );
    let response = ranker
        .rank(rank_request(
            "after-rollback",
            &tables.data.users.ids[1],
            10,
        ))
        .await
        .expect("ranks")
        .into_inner();
    assert_ranking(&response, &reference_topk(&tables.items_path, query, 10));

    // Pause personalization: answers come from the prior, without the user's embedding.
    let paused = admin
        .set_personalization(call(pb::SetPersonalizationRequest {
            paused: true,
            reason: "incident 42".into(),
        }))
        .await
        .expect("pauses")
        .into_inner();
    assert!(paused.paused && paused.changed);
    let response = ranker
        .rank(rank_request("paused", &tables.data.users.ids[1], 5))
        .await
        .expect("ranks")
        .into_inner();
    assert!(!response.personalized);
    assert_eq!(
        response.non_personalized_reason,
        pb::NonPersonalizedReason::PersonalizationPaused as i32
    );
    assert_eq!(response.score_kind, pb::ScoreKind::Prior as i32);
    let again = admin
        .set_personalization(call(pb::SetPersonalizationRequest {
            paused: true,
            reason: String::new(),
        }))
        .await
        .expect("idempotent")
        .into_inner();
    assert!(!again.changed);
    let status = admin
        .get_status(call(pb::GetStatusRequest {}))
        .await
        .expect("status")
        .into_inner();
    assert!(status.personalization_paused);
    let counters = status.counters.expect("counters");
    assert_eq!(counters.rollbacks, 1);
    assert_eq!(counters.non_personalized_answers, 1);
    assert!(server.logs().contains("incident 42"), "{}", server.logs());
}

/// Every reload path the server cannot open names the field `path`, quoting the path
/// clipped: a file name too long for the file system, a folder, a file used as a folder, a
/// missing file under a long path. The table keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_path_errors_name_the_path_field_and_clip_the_path() {
    let tables = tables(25);
    std::fs::create_dir(tables.dir.path().join("folder")).expect("a folder");
    let server = Server::start(&tables, None, &admin_env());
    let mut admin = server.admin().await;
    let long_name = format!("{}.frt", "x".repeat(5000));
    let long_missing = format!("{}/missing.frt", "folder/.".repeat(400));
    for (path, code, reason) in [
        (
            long_name.as_str(),
            Code::FailedPrecondition,
            pb::ErrorReason::TableInvalid,
        ),
        (
            "folder",
            Code::FailedPrecondition,
            pb::ErrorReason::TableInvalid,
        ),
        (
            "items.frt/inside.frt",
            Code::FailedPrecondition,
            pb::ErrorReason::TableInvalid,
        ),
        (
            long_missing.as_str(),
            Code::NotFound,
            pb::ErrorReason::TableFileNotFound,
        ),
    ] {
        let label = &path[..path.len().min(40)];
        let status = admin
            .reload_table(with_token(
                pb::ReloadTableRequest {
                    table: pb::TableKind::Items as i32,
                    path: Some(path.to_owned()),
                    ..Default::default()
                },
                ADMIN_TOKEN,
            ))
            .await
            .expect_err(label);
        assert_eq!(status.code(), code, "{label}: {}", status.message());
        assert_eq!(error_reason(&status), reason, "{label}");
        assert_eq!(error_field(&status), Some("path"), "{label}");
        assert!(
            status.message().len() < 1024,
            "{label}: {} bytes: {}",
            status.message().len(),
            status.message()
        );
    }
    let status = server.status().await;
    let items = status.items_table.expect("items");
    assert_eq!(items.version.map(|v| v.generation), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_admin_requests_are_invalid_arguments_naming_the_field() {
    let tables = tables(29);
    let server = Server::start(&tables, None, &admin_env());
    let reload = pb::ReloadTableRequest {
        table: pb::TableKind::Items as i32,
        path: Some("PLACE".into()),
        ..Default::default()
    };
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let status = server
        .raw_call(
            "/fairrank.v1.Admin/ReloadTable",
            with_invalid_utf8_id(&reload),
            &[("authorization", &bearer)],
        )
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(error_reason(&status), pb::ErrorReason::InvalidField);
    assert!(
        status.message().contains("ReloadTableRequest.path"),
        "the message names the field: {}",
        status.message()
    );

    // Refused before the handler ran, and still counted.
    let text = server.metrics_text();
    assert_eq!(
        calls_counted(&text, "ReloadTable", "InvalidArgument"),
        Some(1.0),
        "{text}"
    );

    // A valid call still answers through the route.
    let mut admin = server.admin().await;
    let status = admin
        .get_status(with_token(pb::GetStatusRequest {}, ADMIN_TOKEN))
        .await
        .expect("status");
    assert!(status.into_inner().items_table.is_some());
    // Every other method has its route too: a body whose field 1 says 5 bytes and has 1
    // decodes as no message, whatever the method's request type.
    for method in ["RollbackTable", "SetPersonalization", "GetStatus"] {
        let status = server
            .raw_call(
                &format!("/fairrank.v1.Admin/{method}"),
                vec![0x0a, 0x05, b'x'],
                &[("authorization", &bearer)],
            )
            .await
            .expect_err("a truncated field");
        assert_eq!(status.code(), Code::InvalidArgument, "{method}: {status:?}");
        // Without the token the body is never read: UNAUTHENTICATED, not its decode error.
        for metadata in [&[][..], &[("authorization", "Bearer wrong")][..]] {
            let status = server
                .raw_call(
                    &format!("/fairrank.v1.Admin/{method}"),
                    vec![0x0a, 0x05, b'x'],
                    metadata,
                )
                .await
                .expect_err("no valid token");
            assert_eq!(status.code(), Code::Unauthenticated, "{method}: {status:?}");
            assert_eq!(error_reason(&status), pb::ErrorReason::AdminTokenInvalid);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_marked_with_the_other_role_is_refused_at_reload_and_the_old_one_serves() {
    let tables = tables(26);
    let server = Server::start(&tables, None, &admin_env());
    let mut admin = server.admin().await;
    let mut ranker = server.ranker().await;
    let user = 4;
    let query = row(&tables.data.users, user).to_vec();
    let expected = reference_topk(&tables.items_path, &query, 10);
    let before = ranker
        .rank(rank_request("before", &tables.data.users.ids[user], 10))
        .await
        .expect("ranks")
        .into_inner();
    assert_ranking(&before, &expected);

    // Valid tables of the serving dimension, marked with a role: the users' rows could be
    // served as a catalog, and only the mark says they must not.
    let folder = tables.dir.path();
    let users_marked = folder.join("users-marked.frt");
    store::TableWriter::new()
        .role(store::TableRole::Users)
        .write(&users_marked, &tables.data.users)
        .expect("users write");
    let items_marked = folder.join("items-marked.frt");
    store::TableWriter::new()
        .role(store::TableRole::Items)
        .write(&items_marked, &tables.data.items)
        .expect("items write");
    for (kind, path, message) in [
        (
            pb::TableKind::Items,
            &users_marked,
            format!(
                "`{}` is marked as a user table; the item table slot needs an item table",
                users_marked.display()
            ),
        ),
        (
            pb::TableKind::Users,
            &items_marked,
            format!(
                "`{}` is marked as an item table; the user table slot needs a user table",
                items_marked.display()
            ),
        ),
    ] {
        let status = admin
            .reload_table(with_token(
                pb::ReloadTableRequest {
                    table: kind as i32,
                    path: Some(path.file_name().unwrap().to_str().unwrap().to_owned()),
                    reason: "swapped roles".into(),
                    ..Default::default()
                },
                ADMIN_TOKEN,
            ))
            .await
            .expect_err("a table of the other role is refused");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(error_reason(&status), pb::ErrorReason::TableInvalid);
        assert!(
            status.message().contains(&message),
            "{}\nexpected: {message}",
            status.message()
        );
    }

    let still = ranker
        .rank(rank_request("still", &tables.data.users.ids[user], 10))
        .await
        .expect("still serving")
        .into_inner();
    assert_eq!(still.items_table, before.items_table);
    assert_eq!(still.items_table.map(|v| v.generation), Some(1));
    assert_ranking(&still, &expected);
    let counters = server.status().await.counters.expect("counters");
    assert_eq!((counters.reloads, counters.reload_failures), (0, 2));
    let logs = server.logs();
    assert!(
        logs.contains("keeps serving") && logs.contains("is marked as a user table"),
        "{logs}"
    );

    // A table marked with its slot's role loads, and GetStatus shows each table's mark (the
    // fixture's user table is unmarked).
    admin
        .reload_table(with_token(
            pb::ReloadTableRequest {
                table: pb::TableKind::Items as i32,
                path: Some("items-marked.frt".into()),
                reason: "marked items".into(),
                ..Default::default()
            },
            ADMIN_TOKEN,
        ))
        .await
        .expect("a table of the slot's role loads");
    let status = server.status().await;
    let items = status.items_table.expect("items");
    assert_eq!(items.marked_role, pb::TableKind::Items as i32, "{items:?}");
    let users = status.users_table.expect("users");
    assert_eq!(
        users.marked_role,
        pb::TableKind::Unspecified as i32,
        "{users:?}"
    );
}
