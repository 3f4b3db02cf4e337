//! Crash test of the privacy ledger: load the server with DP requests, SIGKILL it mid-load,
//! and check that every answer a client received has its charge in the ledger (read with
//! `fairrank privacy ledger show`), and that after a restart each of those request ids
//! replays its stored answer instead of being charged again.
//!
//! Run it alone with output: `scripts/crash_test.sh` (or
//! `cargo test -p server --test grpc_privacy_crash -- --nocapture`).

mod grpc_support;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::fairrank::v1 as pb;
use grpc_support::*;

const SECRET: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
const CLIENTS: usize = 8;
const USERS_USED: usize = 10;
/// Each answer: pool 20 at epsilon 0.2 per pick = 0.1 rho.
const CHARGE: f64 = 0.1;

/// One answer a client received.
#[derive(Debug, Clone)]
struct Released {
    request_id: String,
    user: String,
    rho: f64,
    items: Vec<String>,
}

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

/// `fairrank privacy ledger show USER --state-dir DIR` as JSON.
fn ledger_show(state_dir: &std::path::Path, user: &str) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_fairrank"))
        .args(["privacy", "ledger", "show", user, "--state-dir"])
        .arg(state_dir)
        .env("FAIRRANK_PSEUDONYM_SECRET", SECRET)
        .output()
        .expect("the CLI runs");
    assert!(
        output.status.success(),
        "ledger show failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_released_charge_is_lost_when_the_server_is_killed_mid_load() {
    crash_under_load("per-charge").await;
}

/// Leased blocks: the ledger's spent covers every released answer (the per-answer records
/// are written in the background, so only the spent is checked).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_released_charge_is_lost_with_leased_blocks() {
    crash_under_load("leased").await;
}

async fn crash_under_load(commit: &str) {
    let exact_records = commit == "per-charge";
    let tables = tables(47);
    let ledger = tables.dir.path().join("state");
    let config = format!(
        "[privacy]\nsubject_rho_cap = 1000000.0\n\n[state]\ndir = {:?}\n\n[ledger]\n\
         commit = {commit:?}\n",
        ledger.display().to_string()
    );
    let env = [("FAIRRANK_PSEUDONYM_SECRET", SECRET)];
    let users: Vec<String> = tables.data.users.ids[..USERS_USED].to_vec();
    let mut server = Server::start(&tables, Some(&config), &env);

    let released = Arc::new(Mutex::new(Vec::<Released>::new()));
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let mut ranker = server.ranker().await;
        let released = Arc::clone(&released);
        let users = users.clone();
        clients.push(tokio::spawn(async move {
            let mut failures = 0;
            for i in 0.. {
                let request_id = format!("crash-{client}-{i}");
                let user = users[(client + i) % users.len()].clone();
                match ranker.rank(dp_request(&request_id, &user)).await {
                    Ok(response) => {
                        let response = response.into_inner();
                        let rho = response.privacy.map_or(0.0, |p| p.rho_charged);
                        let items = response
                            .items
                            .into_iter()
                            .map(|item| item.item_id)
                            .collect();
                        released.lock().expect("lock").push(Released {
                            request_id,
                            user,
                            rho,
                            items,
                        });
                    }
                    Err(_) => {
                        failures += 1;
                        if failures > 3 {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    // Let the load run, then kill the server without warning while requests are in flight.
    let started = Instant::now();
    while released.lock().expect("lock").len() < 300 && started.elapsed() < Duration::from_secs(20)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.signal("KILL");
    let killed_at = released.lock().expect("lock").len();
    server.wait(CALL_TIMEOUT);
    for client in clients {
        let _ = client.await;
    }
    let released = released.lock().expect("lock").clone();
    assert!(killed_at > 0, "some answers were released before the kill");

    // Every released answer's charge is in the ledger.
    let mut recorded: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for answer in &released {
        assert!((answer.rho - CHARGE).abs() < 1e-6, "{answer:?}");
        let entry = recorded.entry(answer.user.as_str()).or_default();
        entry.0 += answer.rho;
        entry.1 += 1;
    }
    let mut wasted = 0.0;
    for (user, (rho, answers)) in &recorded {
        let shown = ledger_show(&ledger, user);
        let spent = shown["rho_spent"].as_f64().expect("rho_spent");
        let charges = shown["charges"].as_u64().expect("charges") as usize;
        assert!(
            spent + 1e-6 >= *rho && (!exact_records || charges >= *answers),
            "user {user}: clients received {answers} answers costing {rho}, the ledger has \
             {charges} charges totalling {spent}"
        );
        wasted += spent - rho;
    }
    println!(
        "crash test: {} answers released before SIGKILL ({} clients), all {} charges found in \
         the ledger; {:.1} rho charged but never delivered (allowed: a crash may waste budget)",
        released.len(),
        CLIENTS,
        released.len(),
        wasted
    );

    // After a restart, every released request id replays its stored answer (per-charge
    // commits; leased blocks write answers in the background, so a retry of an answer
    // released just before the kill may be charged anew: never free).
    if !exact_records {
        return;
    }
    let server = Server::start(&tables, Some(&config), &env);
    let mut ranker = server.ranker().await;
    for answer in released.iter().step_by(7) {
        let retry = ranker
            .rank(dp_request(&answer.request_id, &answer.user))
            .await
            .expect("the retry is answered")
            .into_inner();
        assert!(retry.replayed, "{} replays", answer.request_id);
        let items: Vec<String> = retry.items.into_iter().map(|item| item.item_id).collect();
        assert_eq!(items, answer.items, "{} same answer", answer.request_id);
        assert_eq!(retry.privacy.map(|p| p.rho_charged), Some(0.0));
    }
}
