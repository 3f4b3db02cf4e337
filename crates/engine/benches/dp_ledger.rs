//! Rank latency at a fixed open-loop arrival rate (default 5000 requests/s) with and
//! without the privacy ledger: no DP (baseline), DP with an in-memory ledger (the cost of
//! scoring every item and the Gumbel selection), and DP with the durable redb ledger, both
//! as the server runs it by default (`ledger.commit = "leased"`, `lease_charges` 8: budget
//! reserved durably in blocks) and per charge (group-committed, one fsync per batch). Prints
//! mean, p50, p99 and the achieved rate of the steady state (every subject already charged
//! twice), and the mean of the warm-up, where each subject's first charges wait for a commit. Run: `cargo bench -p engine --bench dp_ledger [-- RATE SECONDS]`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::{
    Engine, EngineConfig, PrivacyBudget, PrivacyConfig, PrivacyMechanism, PrivacyPolicy,
    PrivacySetup, RankRequest, StateLedger, UserRef,
};
use state::{
    BudgetLedger, InMemoryLedger, LeaseOptions, LedgerOptions, PseudonymKey, StateDatabase,
};
use store::{Table, TableData, write_table};

const ITEMS: usize = 10_000;
const DIM: usize = 64;
const SUBJECTS: usize = 1000;

fn values(seed: u64, count: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.25
        })
        .collect()
}

fn engine(dir: &std::path::Path, ledger: Option<Arc<dyn BudgetLedger>>) -> Engine {
    let path = dir.join("items.frt");
    if !path.exists() {
        write_table(
            &path,
            &TableData {
                dim: DIM,
                rows: values(1, ITEMS * DIM),
                ids: (0..ITEMS).map(|i| format!("item-{i}")).collect(),
                groups: Vec::new(),
                prior: None,
                dim_names: None,
            },
        )
        .expect("table writes");
    }
    let privacy = match ledger {
        Some(store) => PrivacySetup {
            config: PrivacyConfig {
                subject_rho_cap: 1e9,
                budget_window_secs: 0,
                ..PrivacyConfig::default()
            },
            ledger: Arc::new(StateLedger::new(
                store,
                PseudonymKey::new(&[9_u8; 32]).expect("key"),
            )),
        },
        None => PrivacySetup::default(),
    };
    Engine::with_privacy(
        EngineConfig::default(),
        privacy,
        Table::open(&path).expect("table opens"),
        None,
    )
    .expect("engine starts")
}

fn request(id: usize, dp: bool) -> RankRequest {
    let mut request = RankRequest::new(
        format!("bench-{id}"),
        UserRef::Inline {
            embedding: values(id as u64 + 7, DIM),
            subject_id: format!("subject-{}", id % SUBJECTS),
        },
        10,
    );
    request.pool_size = Some(20);
    request.privacy = PrivacyPolicy {
        mechanism: if dp {
            PrivacyMechanism::GumbelTopK
        } else {
            PrivacyMechanism::None
        },
        budget: dp.then_some(PrivacyBudget::EpsilonPerPick(0.1)),
        ..PrivacyPolicy::default()
    };
    request
}

/// Sends `count` requests at `rate` per second starting at id `first`; returns latencies
/// in microseconds, the achieved rate, and the number of errors.
fn run(engine: &Engine, dp: bool, first: usize, count: usize, rate: f64) -> (Vec<u64>, f64, usize) {
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let errors = Arc::new(Mutex::new(0_usize));
    let (done_sender, done) = std::sync::mpsc::channel();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    for i in 0..count {
        let due = start + interval * i as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let sent = Instant::now();
        let latencies = Arc::clone(&latencies);
        let errors = Arc::clone(&errors);
        let done_sender = done_sender.clone();
        engine.submit(
            request(first + i, dp),
            Box::new(move |result| {
                let micros = sent.elapsed().as_micros() as u64;
                match result {
                    Ok(_) => latencies.lock().expect("lock").push(micros),
                    Err(_) => *errors.lock().expect("lock") += 1,
                }
                let _ = done_sender.send(());
            }),
        );
    }
    for _ in 0..count {
        let _ = done.recv();
    }
    let achieved = count as f64 / start.elapsed().as_secs_f64();
    let mut latencies = latencies.lock().expect("lock").clone();
    latencies.sort_unstable();
    let errors = *errors.lock().expect("lock");
    (latencies, achieved, errors)
}

/// A measured configuration: name, whether requests ask for DP, and the ledger store.
type Setup = (&'static str, bool, Option<Arc<dyn BudgetLedger>>);

fn main() {
    let args: Vec<f64> = std::env::args()
        .skip(1)
        .filter_map(|arg| arg.parse().ok())
        .collect();
    let rate = args.first().copied().unwrap_or(5000.0);
    let seconds = args.get(1).copied().unwrap_or(3.0);
    let count = (rate * seconds) as usize;
    let dir = tempfile::tempdir().expect("temporary folder");
    let durable = StateDatabase::open(dir.path().join("ledger.redb"))
        .and_then(|database| database.ledger(LedgerOptions::default()))
        .expect("durable ledger opens");
    // The server's default commit policy and block size (`[ledger]` in fairrank.toml).
    let leased = StateDatabase::open(dir.path().join("leased.redb"))
        .and_then(|database| {
            database.leased_ledger(LeaseOptions {
                lease_charges: std::env::var("DP_LEDGER_LEASE_CHARGES")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(8),
                ..LeaseOptions::default()
            })
        })
        .expect("leased ledger opens");
    let setups: Vec<Setup> = vec![
        ("no DP (baseline)", false, None),
        (
            "DP, in-memory ledger",
            true,
            Some(Arc::new(InMemoryLedger::new())),
        ),
        ("DP, leased redb ledger", true, Some(Arc::new(leased))),
        ("DP, per-charge redb ledger", true, Some(Arc::new(durable))),
    ];
    println!(
        "Rank over {ITEMS} items x {DIM} dims, k 10, pool 20, open loop at {rate} req/s for \
         {seconds} s; latency from submit to answer"
    );
    let mut means = Vec::new();
    for (offset, (name, dp, ledger)) in setups.into_iter().enumerate() {
        let engine = engine(dir.path(), ledger);
        // Request ids never repeat within a setup (a repeated id would be a free replay).
        let first = offset * (2 * SUBJECTS + count);
        // Warm-up: every subject charges twice, so the measured window sees the steady state
        // of known users (a leased ledger renews their blocks ahead of need). A user's very
        // first charge in a window waits for one group commit (an fsync) before release:
        // the warm-up's mean, printed too, shows that cost.
        let (warm_up, _, _) = run(&engine, dp, first, 2 * SUBJECTS, rate);
        let warm_up_mean = warm_up.iter().sum::<u64>() as f64 / warm_up.len().max(1) as f64;
        let (latencies, achieved, errors) = run(&engine, dp, first + 2 * SUBJECTS, count, rate);
        let pick = |q: f64| {
            latencies
                .get(((latencies.len() as f64 - 1.0) * q) as usize)
                .copied()
                .unwrap_or(0)
        };
        let mean = latencies.iter().sum::<u64>() as f64 / latencies.len().max(1) as f64;
        means.push(mean);
        println!(
            "{name:<26} achieved {achieved:>7.0} req/s  mean {mean:>8.1} us  p50 {:>6} us  \
             p99 {:>7} us  errors {errors}  (warm-up, first charges: mean {warm_up_mean:.1} us)",
            pick(0.5),
            pick(0.99)
        );
    }
    if let [_, memory, leased, per_charge] = means[..] {
        for (name, mean) in [("leased", leased), ("per-charge", per_charge)] {
            println!(
                "{name} ledger charge adds {:.1} us ({:.1}%) to the mean DP Rank latency",
                mean - memory,
                100.0 * (mean - memory) / memory
            );
        }
    }
}
