//! Hot swap: reload, refusal of bad files, in-flight requests on the old table, rollback.

use std::fs;
use std::path::{Path, PathBuf};

use store::{Table, TableRole};

use super::util::{
    DIM, ITEMS, brute_force, fixture, ids_scores, items_data, row, users_data, write, write_marked,
};
use crate::engine::{
    checked_pair, hold_items_change_for_test, prepare_for_test, score_and_finish_for_test,
    table_swaps_for_test,
};
use crate::{
    AbortReason, Engine, EngineConfig, EngineError, PreconditionReason, RankRequest, ReloadProblem,
    ReloadRequest, TableKind, UserRef, open_table,
};

fn request(id: &str) -> RankRequest {
    RankRequest::new(id, UserRef::id("user-5"), 10)
}

/// A user table and an item table (in that order) of `rows` rows generated from `seed`, of
/// the fixtures' dimension, in `dir`, each marked with its role.
fn marked_pair(dir: &Path, seed: u64, rows: usize) -> (PathBuf, PathBuf) {
    let users = write_marked(
        dir,
        "users-marked.frt",
        &users_data(seed, rows, DIM),
        TableRole::Users,
    );
    let items = write_marked(
        dir,
        "items-marked.frt",
        &items_data(seed, rows, true),
        TableRole::Items,
    );
    (users, items)
}

#[test]
fn reloading_a_good_file_swaps_and_bumps_the_generation() {
    let fixture = fixture();
    let before = fixture
        .engine
        .rank_blocking(request("before"))
        .expect("ranks");
    assert_eq!(before.items_table.generation, 1);

    let new_items = items_data(77, ITEMS / 2, true);
    let new_path = write(fixture.dir.path(), "items-v2.frt", &new_items);
    let outcome = fixture
        .engine
        .reload_items(Some(&new_path))
        .expect("reloads");
    assert_eq!(outcome.table.version.generation, 2);
    assert_eq!(outcome.previous, Some(before.items_table));
    assert_eq!(outcome.table.rows, ITEMS / 2);
    assert_eq!(outcome.table.path, new_path);
    assert_ne!(outcome.table.version.checksum, before.items_table.checksum);

    let after = fixture
        .engine
        .rank_blocking(request("after"))
        .expect("ranks");
    assert_eq!(after.items_table, outcome.table.version);
    assert_eq!(
        ids_scores(&after),
        brute_force(&new_items, row(&fixture.users, 5), 0..ITEMS / 2, 10)
    );
    let status = fixture.engine.status().expect("status");
    assert_eq!(status.items.version.generation, 2);
    // The rollback target is the replaced table as it served: what the reload answered.
    assert_eq!(status.items.rollback_target, Some(before.items_table));
    assert_eq!(status.items.rollback_target, outcome.previous);
}

#[test]
fn reloading_the_current_path_picks_up_a_republished_file() {
    let fixture = fixture();
    let new_items = items_data(78, ITEMS, true);
    write(fixture.dir.path(), "items.frt", &new_items);
    let outcome = fixture.engine.reload_items(None).expect("reloads");
    assert_eq!(outcome.table.version.generation, 2);
    assert_eq!(outcome.table.path, fixture.items_path);
    let after = fixture
        .engine
        .rank_blocking(request("republished"))
        .expect("ranks");
    assert_eq!(
        ids_scores(&after),
        brute_force(&new_items, row(&fixture.users, 5), 0..ITEMS, 10)
    );
}

#[test]
fn bad_files_are_refused_and_the_old_table_keeps_serving() {
    let fixture = fixture();
    let before = fixture
        .engine
        .rank_blocking(request("before"))
        .expect("ranks");

    let good = write(fixture.dir.path(), "good.frt", &items_data(5, 50, true));
    let bytes = fs::read(&good).expect("reads");
    let truncated = fixture.dir.path().join("truncated.frt");
    fs::write(&truncated, &bytes[..bytes.len() - 100]).expect("writes");
    let corrupt = fixture.dir.path().join("corrupt.frt");
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0xff;
    fs::write(&corrupt, &flipped).expect("writes");
    let garbage = fixture.dir.path().join("garbage.frt");
    fs::write(&garbage, b"not a table at all").expect("writes");
    let missing = fixture.dir.path().join("missing.frt");

    for (path, problem) in [
        (&truncated, ReloadProblem::InvalidFile),
        (&corrupt, ReloadProblem::InvalidFile),
        (&garbage, ReloadProblem::InvalidFile),
        (&missing, ReloadProblem::FileNotFound),
    ] {
        match fixture.engine.reload_items(Some(path)) {
            Err(EngineError::Reload {
                table,
                path: reported,
                problem: found,
                message,
            }) => {
                assert_eq!(table, TableKind::Items);
                assert_eq!(&reported, path);
                assert_eq!(found, problem, "{message}");
                assert!(!message.is_empty());
            }
            other => panic!("{}: expected a reload error, got {other:?}", path.display()),
        }
        let still = fixture
            .engine
            .rank_blocking(request("still"))
            .expect("ranks");
        assert_eq!(still.items_table, before.items_table);
        assert_eq!(ids_scores(&still), ids_scores(&before));
    }
    // Nothing to roll back to: no reload succeeded.
    assert!(matches!(
        fixture.engine.rollback_items(),
        Err(EngineError::FailedPrecondition {
            reason: PreconditionReason::NoRollbackTarget,
            ..
        })
    ));
}

/// The role refusal's message for `path` offered to the `slot` table.
fn wrong_role_message(path: &std::path::Path, marked: &str, slot: &str) -> String {
    let article = |noun: &str| if noun == "item" { "an" } else { "a" };
    format!(
        "`{}` is marked as {} {marked} table; the {slot} table slot needs {} {slot} table",
        path.display(),
        article(marked),
        article(slot)
    )
}

#[test]
fn a_table_marked_with_the_other_role_is_refused_at_reload_and_the_old_one_serves() {
    let fixture = fixture();
    let before = fixture
        .engine
        .rank_blocking(request("before"))
        .expect("ranks");
    // Same dimension and valid: only the mark says these rows are users (or items).
    let (users_path, items_path) = marked_pair(fixture.dir.path(), 9, 30);
    for (kind, path, marked, slot) in [
        (TableKind::Items, &users_path, "user", "item"),
        (TableKind::Users, &items_path, "item", "user"),
    ] {
        let request = ReloadRequest {
            path: Some(path.clone()),
            ..ReloadRequest::default()
        };
        match fixture.engine.reload(kind, &request) {
            Err(
                error @ EngineError::Reload {
                    problem: ReloadProblem::WrongRole,
                    ..
                },
            ) => {
                let EngineError::Reload {
                    table,
                    path: reported,
                    message,
                    ..
                } = &error
                else {
                    unreachable!("matched above");
                };
                assert_eq!(*table, kind);
                assert_eq!(reported, path);
                assert_eq!(*message, wrong_role_message(path, marked, slot));
                assert_eq!(
                    error.to_string(),
                    format!(
                        "cannot load the {slot} table from {}: {message}",
                        path.display()
                    )
                );
            }
            other => panic!("{}: expected a role refusal, got {other:?}", path.display()),
        }
    }
    let status = fixture.engine.status().expect("status");
    assert_eq!(status.items.version.generation, 1);
    assert_eq!(status.users.expect("users loaded").version.generation, 1);
    let still = fixture
        .engine
        .rank_blocking(request("still"))
        .expect("ranks");
    assert_eq!(still.items_table, before.items_table);
    assert_eq!(ids_scores(&still), ids_scores(&before));
}

#[test]
fn matching_and_unmarked_tables_reload_into_either_slot() {
    let fixture = fixture();
    let dir = fixture.dir.path();
    // Unmarked files (every file from before the role flags) serve in either slot, even
    // one whose rows are users in the item slot: nothing says otherwise.
    let unmarked = write(dir, "unmarked.frt", &users_data(11, 30, DIM));
    let reloaded = fixture
        .engine
        .reload_items(Some(&unmarked))
        .expect("unmarked in the item slot");
    assert_eq!(reloaded.table.version.generation, 2);
    fixture
        .engine
        .reload_users(Some(&unmarked))
        .expect("unmarked in the user slot");
    let items = write_marked(
        dir,
        "items.frt",
        &items_data(12, 40, true),
        TableRole::Items,
    );
    let users = write_marked(dir, "users.frt", &users_data(12, 20, DIM), TableRole::Users);
    fixture.engine.reload_items(Some(&items)).expect("items");
    fixture.engine.reload_users(Some(&users)).expect("users");
    let status = fixture.engine.status().expect("status");
    assert_eq!(status.items.version.generation, 3);
    assert_eq!(status.users.expect("users").version.generation, 3);
}

#[test]
fn open_table_refuses_the_other_role_and_accepts_unmarked_in_both() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (users, items) = marked_pair(dir.path(), 1, 5);
    let unmarked = write(dir.path(), "unmarked.frt", &items_data(2, 5, false));
    for (kind, path, marked, slot) in [
        (TableKind::Items, &users, "user", "item"),
        (TableKind::Users, &items, "item", "user"),
    ] {
        for verify in [false, true] {
            match open_table(kind, path, verify) {
                Err(EngineError::Reload {
                    table,
                    path: reported,
                    problem: ReloadProblem::WrongRole,
                    message,
                }) => {
                    assert_eq!((table, &reported), (kind, path));
                    assert_eq!(message, wrong_role_message(path, marked, slot));
                }
                other => panic!("expected a role refusal, got {other:?}"),
            }
        }
    }
    for (kind, path, role) in [
        (TableKind::Items, &items, Some(TableRole::Items)),
        (TableKind::Users, &users, Some(TableRole::Users)),
        (TableKind::Items, &unmarked, None),
        (TableKind::Users, &unmarked, None),
    ] {
        let table = open_table(kind, path, true).expect("opens in its slot");
        assert_eq!(table.role(), role);
    }
}

#[test]
fn an_engine_refuses_tables_given_in_swapped_roles() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (users, items) = marked_pair(dir.path(), 1, 5);
    let open = |path: &Path| Table::open(path).expect("opens");
    for (items_slot, users_slot, refused, message) in [
        (
            &users,
            &items,
            TableKind::Items,
            wrong_role_message(&users, "user", "item"),
        ),
        (
            &items,
            &items,
            TableKind::Users,
            wrong_role_message(&items, "item", "user"),
        ),
    ] {
        match Engine::new(
            EngineConfig::default(),
            open(items_slot),
            Some(open(users_slot)),
        ) {
            Err(EngineError::Reload {
                table,
                problem: ReloadProblem::WrongRole,
                message: reported,
                ..
            }) => assert_eq!((table, reported), (refused, message)),
            other => panic!(
                "expected a role refusal, got {:?}",
                other.map(|_| "an engine")
            ),
        }
    }
    Engine::new(EngineConfig::default(), open(&items), Some(open(&users)))
        .expect("marked tables in their own roles serve");
}

#[test]
fn tables_of_another_dimension_are_refused() {
    let fixture = fixture();
    let wide_users = write(
        fixture.dir.path(),
        "wide-users.frt",
        &users_data(3, 10, DIM + 1),
    );
    match fixture.engine.reload_users(Some(&wide_users)) {
        Err(EngineError::Reload { problem, .. }) => {
            assert_eq!(problem, ReloadProblem::IncompatibleTables)
        }
        other => panic!("expected a dimension refusal, got {other:?}"),
    }
    let users = fixture
        .engine
        .status()
        .expect("status")
        .users
        .expect("users loaded");
    assert_eq!(users.version.generation, 1);
}

#[test]
fn a_user_table_whose_scores_could_overflow_is_refused_and_the_old_one_serves() {
    // Row norms near 1e16 each: finite in every file, but their products pass 2^100.
    let fixture = fixture();
    let mut large_items = items_data(6, ITEMS, true);
    for value in &mut large_items.rows {
        *value *= 1e15;
    }
    let items_path = write(fixture.dir.path(), "large-items.frt", &large_items);
    fixture
        .engine
        .reload_items(Some(&items_path))
        .expect("large items against small users reload");
    let mut huge = users_data(4, 10, DIM);
    for value in &mut huge.rows {
        *value *= 1e15;
    }
    let huge_path = write(fixture.dir.path(), "huge-users.frt", &huge);
    match fixture.engine.reload_users(Some(&huge_path)) {
        Err(EngineError::Reload {
            problem, message, ..
        }) => {
            assert_eq!(problem, ReloadProblem::IncompatibleTables);
            assert!(message.contains("could overflow"), "{message}");
        }
        other => panic!("expected a norm refusal, got {other:?}"),
    }
    let status = fixture.engine.status().expect("status");
    assert_eq!(status.users.expect("users loaded").version.generation, 1);
    fixture
        .engine
        .rank_blocking(request("still-serving"))
        .expect("ranks on the old user table");
}

#[test]
fn a_user_table_change_is_refused_while_an_item_change_runs() {
    // While an item change runs, a user change would check the user table against an item
    // table about to be replaced: it is refused (one change lock for both slots).
    let fixture = fixture();
    let users_path = write(fixture.dir.path(), "users-v2.frt", &users_data(5, 10, DIM));
    {
        let _item_change = hold_items_change_for_test(&fixture.engine);
        match fixture.engine.reload_users(Some(&users_path)) {
            Err(EngineError::Aborted {
                reason: AbortReason::TableChangeInProgress,
                ..
            }) => {}
            other => panic!("expected a refusal while the item table changes, got {other:?}"),
        }
    }
    fixture
        .engine
        .reload_users(Some(&users_path))
        .expect("reloads once the item change is over");
}

#[test]
fn every_swap_is_counted_and_failed_changes_are_not() {
    let fixture = fixture();
    let swaps = || table_swaps_for_test(&fixture.engine);
    assert_eq!(swaps(), 0);
    let new_path = write(
        fixture.dir.path(),
        "items-v2.frt",
        &items_data(9, ITEMS, true),
    );
    fixture
        .engine
        .reload_items(Some(&new_path))
        .expect("reloads");
    assert_eq!(swaps(), 1);
    let missing = fixture.dir.path().join("missing.frt");
    fixture
        .engine
        .reload_items(Some(&missing))
        .expect_err("no such file");
    assert_eq!(swaps(), 1);
    fixture.engine.rollback_items().expect("rolls back");
    assert_eq!(swaps(), 2);
    fixture.engine.reload_users(None).expect("reloads in place");
    assert_eq!(swaps(), 3);
}

#[test]
fn a_pair_loaded_across_two_swaps_is_loaded_again() {
    use std::cell::Cell;
    // The count grows by two during the first load (two changes landed between the two
    // slots' loads), by one during the second (one change: a checked pair either way).
    let count = Cell::new(10_u64);
    let loads = Cell::new(0);
    let pair = checked_pair(
        || count.get(),
        || {
            loads.set(loads.get() + 1);
            count.set(count.get() + if loads.get() == 1 { 2 } else { 1 });
            loads.get()
        },
    );
    assert_eq!((pair, loads.get()), (2, 2));
    let steady = checked_pair(|| 7, || "first");
    assert_eq!(steady, "first");
}

#[test]
fn rollback_restores_the_previous_table_and_a_second_rollback_undoes_it() {
    let fixture = fixture();
    let original = fixture.engine.rank_blocking(request("v1")).expect("ranks");
    let new_path = write(
        fixture.dir.path(),
        "items-v2.frt",
        &items_data(9, ITEMS, true),
    );
    let reloaded = fixture
        .engine
        .reload_items(Some(&new_path))
        .expect("reloads");
    let v2 = fixture.engine.rank_blocking(request("v2")).expect("ranks");

    let rolled = fixture.engine.rollback_items().expect("rolls back");
    assert_eq!(rolled.table.version.generation, 3);
    assert_eq!(rolled.table.version.checksum, original.items_table.checksum);
    assert_eq!(rolled.previous, Some(reloaded.table.version));
    let back = fixture
        .engine
        .rank_blocking(request("back"))
        .expect("ranks");
    assert_eq!(ids_scores(&back), ids_scores(&original));

    let again = fixture
        .engine
        .rollback_items()
        .expect("undoes the rollback");
    assert_eq!(again.table.version.generation, 4);
    assert_eq!(
        again.table.version.checksum,
        reloaded.table.version.checksum
    );
    let forward = fixture
        .engine
        .rank_blocking(request("forward"))
        .expect("ranks");
    assert_eq!(ids_scores(&forward), ids_scores(&v2));
}

#[test]
fn generation_preconditions_abort_on_mismatch() {
    let fixture = fixture();
    let reload = |if_generation| {
        fixture.engine.reload(
            TableKind::Items,
            &ReloadRequest {
                if_generation: Some(if_generation),
                ..ReloadRequest::default()
            },
        )
    };
    assert!(matches!(
        reload(7),
        Err(EngineError::Aborted {
            reason: AbortReason::GenerationMismatch,
            ..
        })
    ));
    assert_eq!(reload(1).expect("matches").table.version.generation, 2);
    assert!(matches!(
        fixture.engine.rollback(TableKind::Items, Some(1)),
        Err(EngineError::Aborted {
            reason: AbortReason::GenerationMismatch,
            ..
        })
    ));
}

#[test]
fn a_request_in_flight_finishes_on_the_table_it_started_with() {
    let fixture = fixture();
    for candidates in [
        Vec::new(),
        vec!["item-001".to_owned(), "item-002".to_owned()],
    ] {
        let mut old_request = request("in-flight");
        old_request.candidate_ids = candidates.clone().into();
        let expected = fixture
            .engine
            .rank_blocking(old_request.clone())
            .expect("ranks");
        // Validated and holding its snapshot; then the file is republished and reloaded.
        let prepared = prepare_for_test(&fixture.engine, old_request).expect("prepares");
        let replacement = items_data(123, ITEMS, true);
        write(fixture.dir.path(), "items.frt", &replacement);
        let outcome = fixture.engine.reload_items(None).expect("reloads");
        assert_ne!(
            outcome.table.version.checksum,
            expected.items_table.checksum
        );

        let finished = score_and_finish_for_test(prepared).expect("finishes on the old table");
        assert_eq!(finished.items_table, expected.items_table);
        assert_eq!(ids_scores(&finished), ids_scores(&expected));

        let mut new_request = request("new");
        new_request.candidate_ids = candidates.into();
        let fresh = fixture.engine.rank_blocking(new_request).expect("ranks");
        assert_eq!(fresh.items_table, outcome.table.version);
        // Put the original content back for the next round.
        write(fixture.dir.path(), "items.frt", &fixture.items);
        fixture.engine.reload_items(None).expect("reloads");
    }
}

#[test]
fn requests_racing_reloads_answer_from_the_table_they_report() {
    let fixture = fixture();
    let contents = [items_data(31, ITEMS, true), items_data(32, ITEMS, true)];
    let paths = [
        write(fixture.dir.path(), "a.frt", &contents[0]),
        write(fixture.dir.path(), "b.frt", &contents[1]),
    ];
    let checksum = |path| {
        store::Table::open(path)
            .expect("opens")
            .header()
            .data_checksum
    };
    let checksums = [checksum(&paths[0]), checksum(&paths[1])];
    let engine = &fixture.engine;
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for round in 0..12 {
                engine
                    .reload_items(Some(&paths[round % 2]))
                    .expect("reloads");
            }
        });
        for thread in 0..3 {
            let (contents, checksums, users) = (&contents, &checksums, &fixture.users);
            scope.spawn(move || {
                for i in 0..15 {
                    let user = (thread * 15 + i) % super::util::USERS;
                    let mut request = RankRequest::new(
                        format!("race-{thread}-{i}"),
                        UserRef::id(format!("user-{user}")),
                        7,
                    );
                    if i % 2 == 1 {
                        request.candidate_ids = (0..30)
                            .map(|r| format!("item-{:03}", (r * 7 + i) % ITEMS))
                            .collect();
                    }
                    let candidates: Vec<usize> = request
                        .candidate_ids
                        .iter()
                        .map(|id| id[5..].parse().expect("numeric"))
                        .collect();
                    let response = engine.rank_blocking(request).expect("ranks");
                    let checksum = response.items_table.checksum;
                    let Some(content) = checksums.iter().position(|&c| c == checksum) else {
                        // Generation 1: the fixture's own table.
                        continue;
                    };
                    let rows: Vec<usize> = if candidates.is_empty() {
                        (0..ITEMS).collect()
                    } else {
                        candidates
                    };
                    assert_eq!(
                        ids_scores(&response),
                        brute_force(&contents[content], row(users, user), rows, 7)
                    );
                }
            });
        }
    });
}
