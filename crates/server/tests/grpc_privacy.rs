//! End-to-end tests of differential privacy over gRPC against the real server process:
//! DP answers withhold scores and report the charge, budgets refuse or degrade at the cap,
//! and a retry with the same request id gets the stored answer without a second charge,
//! also after a restart (the ledger is durable); an answer too large to send costs nothing.

mod grpc_support;

use api::fairrank::v1 as pb;
use api::fairrank::v1::ranker_client::RankerClient;
use api::status::{error_field, error_reason};
use grpc_support::*;
use tonic::Code;
use tonic::transport::Channel;

/// A pseudonym secret for test servers (hex, 32 bytes).
const SECRET: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// Configuration with the state directory `state_dir` (the ledger lives in its database).
fn config(state_dir: &std::path::Path, cap: f64) -> String {
    config_with_commit(state_dir, cap, "per-charge")
}

fn config_with_commit(state_dir: &std::path::Path, cap: f64, commit: &str) -> String {
    format!(
        "[privacy]\nsubject_rho_cap = {cap}\n\n[state]\ndir = {:?}\n\n[ledger]\n\
         commit = {commit:?}\n",
        state_dir.display().to_string()
    )
}

fn env() -> Vec<(&'static str, &'static str)> {
    let mut env = admin_env();
    env.push(("FAIRRANK_PSEUDONYM_SECRET", SECRET));
    env
}

/// A DP request: pool 20, k 5, epsilon 0.2 per pick (charge 20 * 0.04 / 8 = 0.1).
fn dp_request(request_id: &str, user_id: &str) -> pb::RankRequest {
    let mut request = rank_request(request_id, user_id, 5);
    request.pool_size = Some(20);
    request.privacy = Some(pb::PrivacyPolicy {
        mechanism: pb::PrivacyMechanism::GumbelTopK as i32,
        budget: Some(pb::privacy_policy::Budget::EpsilonPerPick(0.2)),
        ..pb::PrivacyPolicy::default()
    });
    request
}

const CHARGE: f64 = 0.1;

/// Ranks `dp_request(request_id, user_id)`, which must succeed.
async fn rank_dp(
    ranker: &mut RankerClient<Channel>,
    request_id: &str,
    user_id: &str,
) -> pb::RankResponse {
    ranker
        .rank(dp_request(request_id, user_id))
        .await
        .expect("ranks")
        .into_inner()
}

fn report(response: &pb::RankResponse) -> pb::PrivacyReport {
    response.privacy.expect("a privacy report")
}

/// The ledger part of `Admin.GetStatus`.
async fn ledger_status(server: &Server) -> pb::PrivacyLedgerStatus {
    server.status().await.privacy_ledger.expect("ledger status")
}

/// Asserts that the ledger's totals were read and are `subjects` and `rho` (charges are
/// stored rounded up to nano-rho, so each may add up to 1e-9).
fn assert_totals(ledger: &pb::PrivacyLedgerStatus, subjects: u64, rho: f64) {
    assert!(ledger.totals_counted, "{ledger:?}");
    assert_eq!(ledger.subjects, subjects, "{ledger:?}");
    assert!(
        (ledger.rho_charged_total - rho).abs() < 1e-8,
        "{ledger:?}: expected {rho}"
    );
}

fn ids(response: &pb::RankResponse) -> Vec<String> {
    response
        .items
        .iter()
        .map(|item| item.item_id.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_answers_charge_the_budget_replay_and_stop_at_the_cap() {
    let tables = tables(41);
    let ledger = tables.dir.path().join("state");
    let server = Server::start(&tables, Some(&config(&ledger, 0.35)), &env());
    let mut ranker = server.ranker().await;
    let user = tables.data.users.ids[2].clone();

    let first = rank_dp(&mut ranker, "dp-first", &user).await;
    assert_eq!(first.items.len(), 5);
    assert_eq!(first.pool_size, 20);
    assert_eq!(first.score_kind, pb::ScoreKind::Withheld as i32);
    assert!(first.items.iter().all(|item| item.score.is_none()));
    let privacy = report(&first);
    assert!(privacy.dp_applied);
    assert_eq!(privacy.mechanism, pb::PrivacyMechanism::GumbelTopK as i32);
    assert!((privacy.rho_charged - CHARGE).abs() < 1e-6, "{privacy:?}");
    assert_eq!(privacy.rho_budget, Some(0.35));
    let remaining_first = privacy.rho_remaining.expect("remaining");
    assert!((remaining_first - 0.25).abs() < 1e-6, "{remaining_first}");
    assert!(privacy.epsilon.is_some() && privacy.delta == Some(1e-6));
    assert_eq!(privacy.user_norm_bound, Some(1.0));

    // A retry gets the same answer, flagged, with no second charge.
    let retry = rank_dp(&mut ranker, "dp-first", &user).await;
    assert!(retry.replayed);
    assert_eq!(ids(&retry), ids(&first));
    assert_eq!(report(&retry).rho_charged, 0.0, "a replay charges nothing");
    assert_eq!(report(&retry).rho_remaining, Some(remaining_first));

    let second = rank_dp(&mut ranker, "dp-second", &user).await;
    let remaining_second = report(&second).rho_remaining.expect("remaining");
    assert!(
        (remaining_first - remaining_second - CHARGE).abs() < 1e-6,
        "{remaining_first} -> {remaining_second}: one charge only"
    );
    let third = ranker
        .rank(dp_request("dp-third", &user))
        .await
        .expect("the third charge fits")
        .into_inner();

    // 0.3 spent of 0.35: the fourth is refused with the remaining budget in the message.
    let status = ranker
        .rank(dp_request("dp-fourth", &user))
        .await
        .expect_err("over the cap");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        error_reason(&status),
        pb::ErrorReason::PrivacyBudgetExhausted
    );
    assert!(
        status.message().contains("0.050000"),
        "{}",
        status.message()
    );

    // Or, by policy, a non-personalized answer with the flag.
    let mut request = dp_request("dp-fifth", &user);
    if let Some(policy) = request.privacy.as_mut() {
        policy.on_budget_exhausted = pb::BudgetExhaustedAction::NonPersonalized as i32;
    }
    let degraded = ranker.rank(request).await.expect("ranks").into_inner();
    assert!(!degraded.personalized);
    assert_eq!(
        degraded.non_personalized_reason,
        pb::NonPersonalizedReason::PrivacyBudgetExhausted as i32
    );
    assert!(!report(&degraded).dp_applied);

    // Noisy scores on request, for another user.
    let other = tables.data.users.ids[3].clone();
    let mut request = dp_request("dp-noisy", &other);
    if let Some(policy) = request.privacy.as_mut() {
        policy.release_noisy_scores = true;
    }
    let noisy = ranker.rank(request).await.expect("ranks").into_inner();
    assert_eq!(noisy.score_kind, pb::ScoreKind::NoisyDotProduct as i32);
    assert!(noisy.items.iter().all(|item| item.score.is_some()));
    assert!(report(&noisy).scores_noised);
    assert!((report(&noisy).rho_charged - 2.0 * CHARGE).abs() < 1e-3);

    // GetStatus counts what happened: five DP answers (the replay included), two requests
    // the budget could not cover (one refused, one degraded), a durable ledger with two
    // subjects and the four charges (not the replay, the refusal or the degraded answer),
    // and both mechanisms.
    let status = server.status().await;
    let counters = status.counters.expect("counters");
    assert_eq!(counters.dp_answers, 5, "{counters:?}");
    assert_eq!(counters.budget_exhausted, 2, "{counters:?}");
    let ledger = status.privacy_ledger.expect("ledger status");
    assert!(ledger.enabled);
    let charged: f64 = [&first, &second, &third, &noisy]
        .into_iter()
        .map(|answer| report(answer).rho_charged)
        .sum();
    assert!((charged - 5.0 * CHARGE).abs() < 1e-3, "{charged}");
    assert_totals(&ledger, 2, charged);
    assert_eq!(
        status.privacy_mechanisms,
        vec![
            pb::PrivacyMechanism::None as i32,
            pb::PrivacyMechanism::GumbelTopK as i32
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_survives_a_kill_and_replays_after_restart() {
    let tables = tables(43);
    let ledger = tables.dir.path().join("state");
    let config = config(&ledger, 1.0);
    let user = tables.data.users.ids[5].clone();
    let mut server = Server::start(&tables, Some(&config), &env());
    let first = {
        let mut ranker = server.ranker().await;
        rank_dp(&mut ranker, "durable-1", &user).await
    };
    let first_charge = report(&first).rho_charged;
    assert_totals(&ledger_status(&server).await, 1, first_charge);
    server.signal("KILL");
    server.wait(CALL_TIMEOUT);

    let server = Server::start(&tables, Some(&config), &env());
    // The totals survived the kill (the per-charge ledger commits them with the charge).
    assert_totals(&ledger_status(&server).await, 1, first_charge);
    let mut ranker = server.ranker().await;
    let retry = rank_dp(&mut ranker, "durable-1", &user).await;
    assert!(retry.replayed, "the ledger's stored answer");
    assert_eq!(ids(&retry), ids(&first));
    assert_eq!(report(&retry).rho_charged, 0.0);
    let next = rank_dp(&mut ranker, "durable-2", &user).await;
    let remaining = report(&next).rho_remaining.expect("remaining");
    assert!(
        (remaining - (1.0 - 2.0 * CHARGE)).abs() < 1e-6,
        "the first charge survived the kill: {remaining}"
    );
    // The replay added nothing; the new charge counts on from the stored total.
    assert_totals(
        &ledger_status(&server).await,
        1,
        first_charge + report(&next).rho_charged,
    );
}

/// A DP answer above `server.max_message_bytes` is refused before the ledger is charged,
/// with both ledgers: the subject's budget and the server's totals are untouched, the
/// request id stays free (the same id with a smaller k is a fresh, charged answer), and a
/// refusal repeats without a charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dp_answer_too_large_to_send_is_refused_before_it_is_charged() {
    let tables = tables(47);
    let user = tables.data.users.ids[8].clone();
    let cap = 1.0;
    for commit in ["per-charge", "leased"] {
        let state = tables.dir.path().join(format!("state-{commit}"));
        let config = format!(
            "{}
[server]
max_message_bytes = 4096
",
            config_with_commit(&state, cap, commit)
        );
        let server = Server::start(&tables, Some(&config), &env());
        let mut ranker = server.ranker().await;
        // 50 items explained in sentences: about 10 KB, from a pool costing 0.25.
        let large = |request_id: &str| {
            let mut request = dp_request(request_id, &user);
            request.k = 50;
            request.pool_size = Some(50);
            request.explain = Some(pb::ExplainOptions {
                level: pb::ExplainLevel::Text as i32,
                max_dimensions: 0,
            });
            request
        };
        for _ in 0..2 {
            let status = ranker
                .rank(large("large"))
                .await
                .expect_err("above 4096 bytes");
            assert_eq!(
                status.code(),
                Code::ResourceExhausted,
                "{commit}: {status:?}"
            );
            assert_eq!(error_reason(&status), pb::ErrorReason::LimitExceeded);
            assert_eq!(error_field(&status), Some("k"));
            for words in ["`server.max_message_bytes`", "nothing was charged"] {
                assert!(
                    status.message().contains(words),
                    "{commit}: {}",
                    status.message()
                );
            }
        }
        assert_totals(&ledger_status(&server).await, 0, 0.0);

        // The same request id, with a k whose answer fits: charged once, from the whole cap.
        let answer = rank_dp(&mut ranker, "large", &user).await;
        assert!(!answer.replayed, "{commit}");
        let privacy = report(&answer);
        assert!((privacy.rho_charged - CHARGE).abs() < 1e-6, "{privacy:?}");
        let remaining = privacy.rho_remaining.expect("remaining");
        assert!(
            (remaining - (cap - CHARGE)).abs() < 1e-6,
            "{commit}: a refused answer was charged: {remaining} left of {cap}"
        );
        assert_totals(&ledger_status(&server).await, 1, privacy.rho_charged);
        let counters = server.status().await.counters.expect("counters");
        assert_eq!(counters.dp_answers, 1, "{commit}: {counters:?}");
    }
}

/// With leased budget blocks (the default), a kill wastes the unused rest of the user's
/// block but never loses a released answer's charge: after the restart the user has at most
/// the cap minus what was released left, and the first answer is either replayed (its
/// record was written) or charged again (never free).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_ledger_never_refunds_a_released_charge_after_a_kill() {
    let tables = tables(44);
    let ledger = tables.dir.path().join("state");
    let cap = 2.0;
    let config = config_with_commit(&ledger, cap, "leased");
    let user = tables.data.users.ids[6].clone();
    let mut server = Server::start(&tables, Some(&config), &env());
    let released = {
        let mut ranker = server.ranker().await;
        let mut charged = 0.0;
        for attempt in 0..3 {
            let answer = rank_dp(&mut ranker, &format!("leased-{attempt}"), &user).await;
            charged += report(&answer).rho_charged;
        }
        charged
    };
    assert!((released - 3.0 * CHARGE).abs() < 1e-6, "{released}");
    // Counted from memory at once, the leased block (here the whole cap) not at all.
    assert_totals(&ledger_status(&server).await, 1, released);
    server.signal("KILL");
    server.wait(CALL_TIMEOUT);

    let server = Server::start(&tables, Some(&config), &env());
    // The kill may have dropped charges whose answers were not yet committed (the last
    // ~100 ms), never added one, and never counts the wasted rest of the block.
    let after_kill = ledger_status(&server).await;
    assert!(after_kill.totals_counted, "{after_kill:?}");
    assert_eq!(after_kill.subjects, 1, "{after_kill:?}");
    assert!(
        after_kill.rho_charged_total <= released + 1e-8,
        "{after_kill:?}: more than the {released} released"
    );
    let mut ranker = server.ranker().await;
    match ranker.rank(dp_request("leased-after", &user)).await {
        Ok(answer) => {
            let answer = answer.into_inner();
            let remaining = report(&answer).rho_remaining.expect("remaining");
            assert!(
                remaining <= cap - released - CHARGE + 1e-6,
                "a released charge was refunded: {remaining} left of {cap}"
            );
        }
        // The whole rest of the window's budget may have been leased and wasted.
        Err(status) => assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}"),
    }
}

/// Without any state configuration the ledger is durable in the default state directory
/// (here `$FAIRRANK_STATE_DIR`): one database and the generated pseudonym secret, both kept
/// across a restart, so a released charge is never forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_state_directory_keeps_budgets_across_a_restart() {
    let tables = tables(45);
    let state_dir = tables.dir.path().join("default-state");
    let state_dir_text = state_dir.display().to_string();
    // No pseudonym secret variable: the server generates one into the state directory.
    let env = [
        ("FAIRRANK_STATE_DIR", state_dir_text.as_str()),
        ("FAIRRANK_PSEUDONYM_SECRET", ""),
        ("FAIRRANK_ADMIN_TOKEN", ADMIN_TOKEN),
    ];
    let user = tables.data.users.ids[7].clone();
    let mut server = Server::start(&tables, Some("[privacy]\nsubject_rho_cap = 1.0\n"), &env);
    let first_charge = {
        let mut ranker = server.ranker().await;
        let first = rank_dp(&mut ranker, "default-1", &user).await;
        assert!(report(&first).dp_applied);
        report(&first).rho_charged
    };
    assert!(state_dir.join("state.redb").is_file());
    assert!(state_dir.join("pseudonym.secret").is_file());
    assert!(!server.logs().contains("IN MEMORY"), "{}", server.logs());
    server.signal("TERM");
    assert!(server.wait(CALL_TIMEOUT).success(), "{}", server.logs());
    // The stopped server's ledger, read offline: the user's spend and the totals.
    let shown = std::process::Command::new(env!("CARGO_BIN_EXE_fairrank"))
        .args(["privacy", "ledger", "show", &user, "--state-dir"])
        .arg(&state_dir)
        .env_remove("FAIRRANK_PSEUDONYM_SECRET")
        .output()
        .expect("the CLI runs");
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("JSON output");
    assert_eq!(json["charges"], 1, "{json}");
    assert_eq!(json["ledger_subjects"], 1, "{json}");
    let shown_total = json["ledger_rho_charged_total"].as_f64().expect("a number");
    assert!((shown_total - first_charge).abs() < 1e-8, "{json}");

    let server = Server::start(&tables, Some("[privacy]\nsubject_rho_cap = 1.0\n"), &env);
    // The leased ledger (the default) wrote its totals at the clean shutdown.
    assert_totals(&ledger_status(&server).await, 1, first_charge);
    let mut ranker = server.ranker().await;
    let next = rank_dp(&mut ranker, "default-2", &user).await;
    let remaining = report(&next).rho_remaining.expect("remaining");
    // A clean shutdown returned the unused lease: exactly two charges are spent.
    assert!(
        (remaining - (1.0 - 2.0 * CHARGE)).abs() < 1e-6,
        "the first charge survived the restart: {remaining}"
    );
    assert_totals(
        &ledger_status(&server).await,
        1,
        first_charge + report(&next).rho_charged,
    );
}

/// A second server on a state directory in use refuses to start, naming the database and
/// how to choose another directory; it never falls back to memory. The first keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_state_directory_refuses_to_start() {
    let tables = tables(46);
    let state_dir = tables.dir.path().join("shared-state");
    let config_text = config(&state_dir, 1.0);
    let server = Server::start(&tables, Some(&config_text), &env());

    let config_path = tables.dir.path().join("second.toml");
    std::fs::write(&config_path, &config_text).expect("config file");
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_fairrank"))
        .arg("serve")
        .args(["--addr", "127.0.0.1:0", "--metrics-addr", ""])
        .arg("--table")
        .arg(&tables.items_path)
        .arg("--users")
        .arg(&tables.users_path)
        .arg("--config")
        .arg(&config_path)
        .env("FAIRRANK_PSEUDONYM_SECRET", SECRET)
        .env("FAIRRANK_CACHE", tables.dir.path().join("cache"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the fairrank binary starts");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = second.try_wait().expect("the process can be polled") {
            break status;
        }
        if started.elapsed() > START_TIMEOUT {
            let _ = second.kill();
            let _ = second.wait();
            panic!("the second server did not refuse to start");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(
        &mut second.stderr.take().expect("piped stderr"),
        &mut stderr,
    )
    .expect("stderr");
    assert!(!status.success(), "{stderr}");
    let database = state_dir.join("state.redb").display().to_string();
    assert!(stderr.contains(&database), "{stderr}");
    assert!(stderr.contains("--state-dir"), "{stderr}");
    assert!(!stderr.contains("IN MEMORY"), "{stderr}");

    let mut ranker = server.ranker().await;
    let user = tables.data.users.ids[8].clone();
    let answer = ranker
        .rank(dp_request("still-serving", &user))
        .await
        .expect("the first server still ranks")
        .into_inner();
    assert!(report(&answer).dp_applied);
}

/// `state.mode = "memory"` is an explicit opt-in: nothing is written to the state
/// directory, the server warns, and a restart forgets the spend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_memory_state_is_an_explicit_opt_in_that_warns() {
    let tables = tables(48);
    let state_dir = tables.dir.path().join("unused-state");
    let config_text = format!(
        "[privacy]\nsubject_rho_cap = 1.0\n\n[state]\ndir = {:?}\nmode = \"memory\"\n",
        state_dir.display().to_string()
    );
    let user = tables.data.users.ids[9].clone();
    for round in 0..2 {
        let server = Server::start(&tables, Some(&config_text), &env());
        let mut ranker = server.ranker().await;
        let answer = rank_dp(&mut ranker, &format!("memory-{round}"), &user).await;
        let remaining = report(&answer).rho_remaining.expect("remaining");
        assert!(
            (remaining - (1.0 - CHARGE)).abs() < 1e-6,
            "round {round}: {remaining}"
        );
        // Counted in memory, from zero again after the restart.
        let ledger = ledger_status(&server).await;
        assert!(!ledger.enabled);
        assert_totals(&ledger, 1, report(&answer).rho_charged);
        assert!(
            server.logs().contains("STATE IN MEMORY ONLY"),
            "{}",
            server.logs()
        );
        assert!(!state_dir.exists());
    }
}

/// `fairrank privacy ledger show` reads the state directory's database, and refuses (rather
/// than inventing a secret that matches no user) when the server's pseudonym secret is
/// neither in the environment nor in the directory.
#[test]
fn ledger_show_needs_the_servers_pseudonym_secret() {
    let dir = tempfile::tempdir().expect("temporary folder");
    drop(state::StateDatabase::open(dir.path().join("state.redb")).expect("a state database"));
    let show = |secret: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_fairrank"));
        command
            .args(["privacy", "ledger", "show", "u000001", "--state-dir"])
            .arg(dir.path())
            .env_remove("FAIRRANK_PSEUDONYM_SECRET");
        if let Some(secret) = secret {
            command.env("FAIRRANK_PSEUDONYM_SECRET", secret);
        }
        command.output().expect("the CLI runs")
    };
    let refused = show(None);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("no pseudonym secret"), "{stderr}");
    assert!(!dir.path().join("pseudonym.secret").exists());

    let shown = show(Some(SECRET));
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("JSON output");
    assert_eq!(json["charges"], 0);
    assert_eq!(json["rho_spent"], 0.0);
    assert_eq!(json["ledger_subjects"], 0);
    assert_eq!(json["ledger_rho_charged_total"], 0.0);
}
