//! Rank latency at a fixed open-loop arrival rate (default 5000 requests/s) with and
//! without the privacy ledger: no DP (baseline), DP with an in-memory ledger (the cost of
//! scoring every item and the Gumbel selection), and DP with the durable redb ledger, both
//! as the server runs it by default (`ledger.commit = "leased"`, `lease_charges` 8: budget
//! reserved durably in blocks) and per charge (group-committed, one fsync per batch).
//!
//! Prints mean, p50, p99 and the achieved rate of the steady state (every subject already
//! charged twice), the mean of the warm-up (where each subject's first charge waits for a
//! lease commit), the mean time spent in the ledger charge (`ledger_us` of the answers), and
//! for the leased ledger where its charges waited ([`state::LeaseStats`]).
//!
//! Run: `cargo bench -p engine --bench dp_ledger [-- RATE SECONDS]`. Environment:
//! - `DP_LEDGER_REQUEST`: `catalog` (default: the whole catalog of 10 000 items x 64 dims is
//!   scored per request, pool 20) or `t1` (the T1 request of `BENCHMARKS.md`: 1000 random
//!   candidates of a 100 000 x 64 table, k 10, the server's default pool of 100);
//! - `DP_LEDGER_ROUNDS`: rounds (default 1); each round runs the four setups one after the
//!   other, so the setups alternate over time and share the machine's load alike;
//! - `DP_LEDGER_LEASE_CHARGES`: the leased ledger's `lease_charges` (default 8, the server's);
//! - `DP_LEDGER_ONLY`: run only the setups whose name contains this (e.g. `leased`);
//! - `DP_LEDGER_CAP`: each subject's rho cap (default 10, the server's, with its one-day
//!   window; blocks are then 0.5 rho and renewed ahead of need). `0` means a cap of 1e9 and a
//!   lifetime budget (one block per subject covers the whole run: the earlier layout).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use engine::{
    CandidateIds, Engine, EngineConfig, PrivacyBudget, PrivacyConfig, PrivacyMechanism,
    PrivacyPolicy, PrivacySetup, RankRequest, StateLedger, UserRef,
};
use state::{
    BudgetLedger, InMemoryLedger, LeaseOptions, LeaseStats, LeasedLedger, LedgerOptions,
    PseudonymKey, StateDatabase,
};
use store::{Table, TableData, TableRole, TableWriter};

const DIM: usize = 64;
const SUBJECTS: usize = 1000;

/// The request shape measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// The whole catalog of 10 000 items, pool 20.
    Catalog,
    /// 1000 candidates of 100 000 items, the default pool (100).
    T1,
}

impl Shape {
    fn items(self) -> usize {
        match self {
            Shape::Catalog => 10_000,
            Shape::T1 => 100_000,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Shape::Catalog => "the whole catalog of 10000 items x 64 dims, k 10, pool 20",
            Shape::T1 => "1000 random candidates of 100000 items x 64 dims (T1), k 10, pool 100",
        }
    }
}

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

fn engine(
    dir: &std::path::Path,
    shape: Shape,
    cap: f64,
    ledger: Option<Arc<dyn BudgetLedger>>,
) -> Engine {
    let items = shape.items();
    let path = dir.join(format!("items-{items}.frt"));
    if !path.exists() {
        TableWriter::new()
            .role(TableRole::Items)
            .write(
                &path,
                &TableData {
                    dim: DIM,
                    rows: values(1, items * DIM),
                    ids: (0..items).map(|i| format!("item-{i}")).collect(),
                    groups: Vec::new(),
                    prior: None,
                    dim_names: None,
                },
            )
            .expect("table writes");
    }
    let privacy = match ledger {
        Some(store) => PrivacySetup {
            config: if cap > 0.0 {
                PrivacyConfig {
                    subject_rho_cap: cap,
                    ..PrivacyConfig::default()
                }
            } else {
                PrivacyConfig {
                    subject_rho_cap: 1e9,
                    budget_window_secs: 0,
                    ..PrivacyConfig::default()
                }
            },
            ledger: Arc::new(StateLedger::new(
                store,
                PseudonymKey::new(&[9_u8; 32]).expect("key"),
            )),
            answer_limit: None,
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

/// Distinct candidate lists of the T1 shape, built once (formatting 1000 ids per request
/// would load the sending thread more than Rank's own work does).
const T1_LISTS: usize = 257;

fn t1_candidates() -> &'static [CandidateIds] {
    static LISTS: OnceLock<Vec<CandidateIds>> = OnceLock::new();
    LISTS.get_or_init(|| {
        let items = Shape::T1.items() as u64;
        (0..T1_LISTS as u64)
            .map(|list| {
                // 1000 distinct ids spread over the table: a random start and a stride
                // prime to the table size.
                let mut state = (list + 1).wrapping_mul(0x2545_F491_4F6C_DD1D);
                state ^= state >> 29;
                let start = state % items;
                let stride = [7919_u64, 15_013, 30_011, 49_999][(state >> 40) as usize % 4];
                let ids: Vec<String> = (0..1000)
                    .map(|j| format!("item-{}", (start + j * stride) % items))
                    .collect();
                CandidateIds::from(ids)
            })
            .collect()
    })
}

fn request(shape: Shape, round: usize, id: usize, dp: bool) -> RankRequest {
    let mut request = RankRequest::new(
        format!("bench-{id}"),
        UserRef::Inline {
            embedding: values(id as u64 + 7, DIM),
            subject_id: format!("subject-{round}-{}", id % SUBJECTS),
        },
        10,
    );
    match shape {
        Shape::Catalog => request.pool_size = Some(20),
        Shape::T1 => {
            request.candidate_ids = t1_candidates()[id % T1_LISTS].clone();
        }
    }
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

/// What one run measured.
struct Run {
    /// Latencies from submit to answer, sorted, in microseconds.
    latencies: Vec<u64>,
    achieved: f64,
    errors: usize,
    /// Sum of the answers' `ledger_us`.
    ledger_us: u64,
}

impl Run {
    fn mean(&self) -> f64 {
        self.latencies.iter().sum::<u64>() as f64 / self.latencies.len().max(1) as f64
    }

    fn pick(&self, q: f64) -> u64 {
        self.latencies
            .get(((self.latencies.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0)
    }
}

/// Sends `count` requests at `rate` per second starting at id `first`. Requests are built
/// before their send time is taken (building 1000 candidate ids is not Rank's cost).
fn run(
    engine: &Engine,
    (shape, round): (Shape, usize),
    dp: bool,
    first: usize,
    count: usize,
    rate: f64,
) -> Run {
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let errors = Arc::new(Mutex::new(0_usize));
    let ledger_us = Arc::new(Mutex::new(0_u64));
    let (done_sender, done) = std::sync::mpsc::channel();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    for i in 0..count {
        let request = request(shape, round, first + i, dp);
        let due = start + interval * i as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let sent = Instant::now();
        let latencies = Arc::clone(&latencies);
        let errors = Arc::clone(&errors);
        let ledger_us = Arc::clone(&ledger_us);
        let done_sender = done_sender.clone();
        engine.submit(
            request,
            Box::new(move |result| {
                let micros = sent.elapsed().as_micros() as u64;
                match result {
                    Ok(response) => {
                        latencies.lock().expect("lock").push(micros);
                        *ledger_us.lock().expect("lock") += response.timings.ledger_us;
                    }
                    Err(error) => {
                        let mut errors = errors.lock().expect("lock");
                        if *errors == 0 {
                            eprintln!("first error: {error}");
                        }
                        *errors += 1;
                    }
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
    let ledger_us = *ledger_us.lock().expect("lock");
    Run {
        latencies,
        achieved,
        errors,
        ledger_us,
    }
}

/// A measured configuration: name, whether requests ask for DP, and the ledger store.
type Setup = (&'static str, bool, Option<Arc<dyn BudgetLedger>>);

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// The change of the leased ledger's counters over one run.
fn stats_delta(after: LeaseStats, before: LeaseStats) -> String {
    let charges = after.charges - before.charges;
    let written = after.answers_written - before.answers_written;
    let busy = after.writer_busy_us - before.writer_busy_us;
    let average = |total: u64, count: u64| total as f64 / count.max(1) as f64;
    format!(
        "charges {charges}: lease waits {} (mean {:.0} us, max so far {} us), renewal waits {} \
         (mean {:.0} us), backpressure waits {}, answer reads {} (mean {:.1} us), renewals {}; \
         writer: {} commits ({} fsynced), {written} answers, busy {:.1} us per answer",
        after.lease_waits - before.lease_waits,
        average(
            after.lease_wait_us - before.lease_wait_us,
            after.lease_waits - before.lease_waits
        ),
        after.lease_wait_max_us,
        after.renewal_waits - before.renewal_waits,
        average(
            after.renewal_wait_us - before.renewal_wait_us,
            after.renewal_waits - before.renewal_waits
        ),
        after.backpressure_waits - before.backpressure_waits,
        after.answer_reads - before.answer_reads,
        average(
            after.answer_read_us - before.answer_read_us,
            after.answer_reads - before.answer_reads
        ),
        after.renewals - before.renewals,
        after.commits - before.commits,
        after.fsynced_commits - before.fsynced_commits,
        average(busy, written),
    )
}

fn main() {
    let args: Vec<f64> = std::env::args()
        .skip(1)
        .filter_map(|arg| arg.parse().ok())
        .collect();
    let rate = args.first().copied().unwrap_or(5000.0);
    let seconds = args.get(1).copied().unwrap_or(3.0);
    let count = (rate * seconds) as usize;
    let shape = match std::env::var("DP_LEDGER_REQUEST").as_deref() {
        Ok("t1") => Shape::T1,
        _ => Shape::Catalog,
    };
    let rounds: usize = env("DP_LEDGER_ROUNDS", 1_usize).max(1);
    let cap: f64 = env("DP_LEDGER_CAP", 10.0);
    let dir = tempfile::tempdir().expect("temporary folder");
    let durable = StateDatabase::open(dir.path().join("ledger.redb"))
        .and_then(|database| database.ledger(LedgerOptions::default()))
        .expect("durable ledger opens");
    // The server's default commit policy and block size (`[ledger]` in fairrank.toml).
    let leased = Arc::new(
        StateDatabase::open(dir.path().join("leased.redb"))
            .and_then(|database| {
                database.leased_ledger(LeaseOptions {
                    lease_charges: env("DP_LEDGER_LEASE_CHARGES", 8),
                    ..LeaseOptions::default()
                })
            })
            .expect("leased ledger opens"),
    );
    let leased_store: Arc<LeasedLedger> = Arc::clone(&leased);
    let setups: Vec<Setup> = vec![
        ("no DP (baseline)", false, None),
        (
            "DP, in-memory ledger",
            true,
            Some(Arc::new(InMemoryLedger::new())),
        ),
        ("DP, leased redb ledger", true, Some(leased)),
        ("DP, per-charge redb ledger", true, Some(Arc::new(durable))),
    ];
    println!(
        "Rank over {}, open loop at {rate} req/s for {seconds} s, {rounds} round(s), cap {}; \
         latency from submit to answer",
        shape.describe(),
        if cap > 0.0 {
            format!("{cap} rho per day")
        } else {
            "1e9 rho, lifetime".to_owned()
        }
    );
    // `DP_LEDGER_ONLY=leased` (a substring of the names) runs that setup alone, for
    // profiling; the comparison line needs all four.
    let only = std::env::var("DP_LEDGER_ONLY").unwrap_or_default();
    let setups: Vec<Setup> = setups
        .into_iter()
        .filter(|(name, _, _)| name.contains(only.as_str()))
        .collect();
    for round in 0..rounds {
        let mut means = Vec::new();
        let mut p99s = Vec::new();
        for (offset, (name, dp, ledger)) in setups.iter().enumerate() {
            let engine = engine(dir.path(), shape, cap, ledger.clone());
            // Request ids never repeat (a repeated id would be a free replay); each round
            // has subjects of its own, so a round's warm-up takes their first leases.
            let first = (round * setups.len() + offset) * (2 * SUBJECTS + count);
            let before = leased_store.stats();
            // Warm-up: every subject charges twice, so the measured window sees the steady
            // state of known users (a leased ledger renews their blocks ahead of need). A
            // user's very first charge in a window waits for one lease commit (an fsync)
            // before release: the warm-up's mean, printed too, shows that cost.
            let warm_up = run(&engine, (shape, round), *dp, first, 2 * SUBJECTS, rate);
            let middle = leased_store.stats();
            let measured = run(
                &engine,
                (shape, round),
                *dp,
                first + 2 * SUBJECTS,
                count,
                rate,
            );
            let after = leased_store.stats();
            means.push(measured.mean());
            p99s.push(measured.pick(0.99));
            println!(
                "round {round} {name:<26} achieved {:>7.0} req/s  mean {:>8.1} us  p50 {:>6} us  \
                 p99 {:>7} us  errors {}  ledger {:.1} us/answer  (warm-up, first charges: \
                 mean {:.1} us)",
                measured.achieved,
                measured.mean(),
                measured.pick(0.5),
                measured.pick(0.99),
                measured.errors,
                measured.ledger_us as f64 / measured.latencies.len().max(1) as f64,
                warm_up.mean(),
            );
            if name.contains("leased") {
                println!("    warm-up:  {}", stats_delta(middle, before));
                println!("    measured: {}", stats_delta(after, middle));
            }
        }
        if let ([baseline, memory, leased, per_charge], [_, memory_p99, leased_p99, _]) =
            (&means[..], &p99s[..])
        {
            println!(
                "round {round}: leased ledger adds {:.1} us ({:+.1}%) to the mean vs DP in \
                 memory (p99 {memory_p99} -> {leased_p99} us), {:+.1}% vs no DP; per-charge \
                 adds {:+.1}% vs DP in memory",
                leased - memory,
                100.0 * (leased - memory) / memory,
                100.0 * (leased - baseline) / baseline,
                100.0 * (per_charge - memory) / memory,
            );
        }
    }
}
