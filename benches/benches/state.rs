//! Criterion benchmarks for the `state` crate: budget-ledger charge latency from one thread
//! and throughput from 16 threads, for the durable ledger (group commit, an fsync per
//! charge batch), the leased ledger (an fsync per lease block, renewed ahead of time) and the
//! in-memory ledger as the no-durability baseline, plus amortized-state updates.
//!
//! Every durable charge is fsynced before it returns, so the numbers depend on the disk:
//! the database lives in `FAIRRANK_BENCH_DIR` if set, else in the system temporary directory
//! (use a directory on the disk the server will use; tmpfs makes fsync free). The target is a
//! ledger that adds under 10% to Rank latency at 5,000 requests/s: the 16-thread throughput
//! must be well above 5,000 charges/s, and the single-thread latency is the cost a request
//! pays at low load (one commit).
//!
//! The leased ledger runs with blocks of 32 charges (`lease_cap_fraction` 0, so the cap does
//! not make blocks larger) renewed when half used: every user takes a durable block commit
//! every 32 charges, ahead of time, so the numbers include the lease traffic a server with
//! tight caps would see. Its cap (10 rho) never binds in the run.
//!
//! `ledger_charge_at_5k_per_s` measures the target directly: 16 threads charge on a fixed
//! schedule totalling 5,000 charges/s and the mean latency of one charge is reported (the
//! durable ledger is left out: it cannot sustain that rate on a slow disk). The closed-loop
//! benchmarks above charge as fast as they can, so for the leased ledger they measure how
//! fast its writer stores answers (charges wait when more than `max_unwritten_answers` are
//! waiting), not the latency at a realistic load.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use state::{
    AmortizedOptions, AmortizedState, AmortizedStore, BudgetLedger, ChargeRequest, InMemoryLedger,
    LeaseOptions, LedgerOptions, Pseudonym, PseudonymKey, Rho, StateDatabase,
};

/// Distinct users the charges rotate over.
const USERS: u64 = 1_000;
/// Threads for the throughput benchmark.
const THREADS: u64 = 16;

/// A temporary directory for the database files.
fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("FAIRRANK_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).expect("a directory in FAIRRANK_BENCH_DIR"),
        None => tempfile::tempdir().expect("a temporary directory"),
    }
}

fn pseudonyms() -> Vec<Pseudonym> {
    let key = PseudonymKey::new(&[5_u8; 32]).expect("a key");
    (0..USERS)
        .map(|user| key.pseudonym(&format!("user-{user}")))
        .collect()
}

/// A charge with a fresh request id (a typical 200-byte answer; the cap, 10 rho = 10^7
/// charges per user, never binds).
fn charge_request(pseudonyms: &[Pseudonym], sequence: u64) -> ChargeRequest {
    ChargeRequest {
        pseudonym: pseudonyms[(sequence % USERS) as usize],
        request_id: format!("request-{sequence}"),
        rho: Rho::from_nano(1_000),
        cap: Rho::from_nano(10 * Rho::UNITS_PER_RHO),
        window: Duration::from_secs(86_400),
        now: SystemTime::now(),
        answer: vec![7_u8; 200],
    }
}

/// Charges from one thread, one after another.
fn bench_single_thread(c: &mut Criterion, name: &str, ledger: &dyn BudgetLedger) {
    let pseudonyms = pseudonyms();
    let sequence = AtomicU64::new(0);
    let mut group = c.benchmark_group("ledger_charge_1_thread");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    group.bench_function(name, |b| {
        b.iter(|| {
            let request = charge_request(&pseudonyms, sequence.fetch_add(1, Ordering::Relaxed));
            black_box(ledger.charge(&request).expect("charged"))
        });
    });
    group.finish();
}

/// Charges from 16 threads at once; reports time per charge (inverse throughput).
fn bench_many_threads(c: &mut Criterion, name: &str, ledger: &dyn BudgetLedger) {
    let pseudonyms = pseudonyms();
    let sequence = AtomicU64::new(1 << 40);
    let mut group = c.benchmark_group("ledger_charge_16_threads");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function(name, |b| {
        b.iter_custom(|iterations| {
            let per_thread = iterations.div_ceil(THREADS);
            let start = Instant::now();
            std::thread::scope(|scope| {
                for _ in 0..THREADS {
                    scope.spawn(|| {
                        for _ in 0..per_thread {
                            let next = sequence.fetch_add(1, Ordering::Relaxed);
                            let request = charge_request(&pseudonyms, next);
                            black_box(ledger.charge(&request).expect("charged"));
                        }
                    });
                }
            });
            // Scale to the requested count (the threads ran per_thread * THREADS charges).
            start
                .elapsed()
                .mul_f64(iterations as f64 / (per_thread * THREADS) as f64)
        });
    });
    group.finish();
}

/// The target request rate of the paced benchmark.
const PACED_RATE: f64 = 5_000.0;

/// Charges at a fixed total rate of 5,000/s from 16 threads (each on its own schedule, like a
/// server at that load) and reports the mean time one charge takes: the latency a request
/// pays for the ledger at the target load, to compare with Rank's ~0.3 ms.
fn bench_paced(c: &mut Criterion, name: &str, ledger: &dyn BudgetLedger) {
    let pseudonyms = pseudonyms();
    let sequence = AtomicU64::new(1 << 50);
    let mut group = c.benchmark_group("ledger_charge_at_5k_per_s");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.warm_up_time(Duration::from_secs(2));
    let period = Duration::from_secs_f64(THREADS as f64 / PACED_RATE);
    group.bench_function(name, |b| {
        b.iter_custom(|iterations| {
            let per_thread = iterations.div_ceil(THREADS);
            let busy: Vec<Duration> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..THREADS)
                    .map(|thread| {
                        let (pseudonyms, sequence) = (&pseudonyms, &sequence);
                        scope.spawn(move || {
                            // Stagger the threads over one period.
                            let start =
                                Instant::now() + period.mul_f64(thread as f64 / THREADS as f64);
                            let mut busy = Duration::ZERO;
                            for index in 0..per_thread {
                                let due = start + period.mul_f64(index as f64);
                                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                    std::thread::sleep(wait);
                                }
                                let next = sequence.fetch_add(1, Ordering::Relaxed);
                                let request = charge_request(pseudonyms, next);
                                let began = Instant::now();
                                black_box(ledger.charge(&request).expect("charged"));
                                busy += began.elapsed();
                            }
                            busy
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|handle| handle.join().expect("a benchmark thread"))
                    .collect()
            });
            // Criterion divides by `iterations`: the mean charge latency.
            busy.iter()
                .sum::<Duration>()
                .mul_f64(iterations as f64 / (per_thread * THREADS) as f64)
        });
    });
    group.finish();
}

fn ledger_benches(c: &mut Criterion) {
    let dir = bench_dir();
    let database = StateDatabase::open(dir.path().join("ledger.redb")).expect("a database");
    let durable = database.ledger(LedgerOptions::default()).expect("a ledger");
    let memory = InMemoryLedger::new();
    bench_single_thread(c, "durable", &durable);
    bench_single_thread(c, "in_memory", &memory);
    bench_many_threads(c, "durable", &durable);
    bench_many_threads(c, "in_memory", &memory);
    durable.close().expect("closed");
    // A fresh file: the request ids repeat, and they must not replay the durable run's.
    let leased_database = StateDatabase::open(dir.path().join("leased.redb")).expect("a database");
    let leased = leased_database
        .leased_ledger(LeaseOptions {
            lease_charges: 32,
            lease_cap_fraction: 0.0,
            renew_below: 0.5,
            ..LeaseOptions::default()
        })
        .expect("a leased ledger");
    bench_single_thread(c, "leased", &leased);
    bench_many_threads(c, "leased", &leased);
    bench_paced(c, "leased", &leased);
    bench_paced(c, "in_memory", &memory);
    leased.close().expect("closed");
}

fn amortized_benches(c: &mut Criterion) {
    let dir = bench_dir();
    let database = StateDatabase::open(dir.path().join("amortized.redb")).expect("a database");
    let store = database
        .amortized_store(AmortizedOptions::default())
        .expect("a store");
    let delta = AmortizedState {
        group_exposure: [(0, 1.2), (1, 0.4), (2, 0.1)].into_iter().collect(),
        group_relevance: [(0, 0.9), (1, 0.5), (2, 0.3)].into_iter().collect(),
        rankings: 1,
    };
    let mut loaded = AmortizedState::default();
    let mut group = c.benchmark_group("amortized");
    group.sample_size(20);
    group.bench_function("durable_update", |b| {
        b.iter(|| {
            store
                .update(black_box("home"), black_box(&delta))
                .expect("updated")
        });
    });
    group.bench_function("durable_load_into", |b| {
        b.iter(|| {
            store
                .load_into(black_box("home"), &mut loaded)
                .expect("loaded");
            black_box(loaded.rankings)
        });
    });
    group.finish();
    store.close().expect("closed");
}

criterion_group!(benches, ledger_benches, amortized_benches);
criterion_main!(benches);
