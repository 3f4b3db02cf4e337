//! Behaviour every [`BudgetLedger`] must have, run against each implementation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{
    BudgetLedger, ChargeOutcome, ChargeRequest, InMemoryLedger, LeaseOptions, LedgerOptions,
    LedgerTotals, Pseudonym, PseudonymKey, Rho, StateDatabase, StateError,
};

pub(crate) fn user(name: &str) -> Pseudonym {
    PseudonymKey::new(&[3_u8; 32]).unwrap().pseudonym(name)
}

pub(crate) fn at(seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + seconds)
}

pub(crate) fn request(who: &str, id: &str, rho: u64, cap: u64, seconds: u64) -> ChargeRequest {
    ChargeRequest {
        pseudonym: user(who),
        request_id: id.to_string(),
        rho: Rho::from_nano(rho),
        cap: Rho::from_nano(cap),
        window: Duration::from_secs(3600),
        now: at(seconds),
        answer: format!("answer to {id}").into_bytes(),
    }
}

fn charged(spent: u64, remaining: u64) -> ChargeOutcome {
    ChargeOutcome::Charged {
        spent: Rho::from_nano(spent),
        remaining: Rho::from_nano(remaining),
    }
}

fn exceeded(spent: u64, remaining: u64) -> ChargeOutcome {
    ChargeOutcome::Exceeded {
        spent: Rho::from_nano(spent),
        remaining: Rho::from_nano(remaining),
    }
}

/// Charged, Replayed and Exceeded, per user.
fn charge_replay_exceed(ledger: &dyn BudgetLedger) {
    assert_eq!(
        ledger.charge(&request("a", "r1", 40, 100, 0)).unwrap(),
        charged(40, 60)
    );
    assert_eq!(
        ledger.charge(&request("a", "r2", 60, 100, 1)).unwrap(),
        charged(100, 0)
    );
    // Same id, different new answer and charge: the first answer comes back, nothing charged.
    let mut retry = request("a", "r1", 999, 100, 2);
    retry.answer = b"fresh noise".to_vec();
    assert_eq!(
        ledger.charge(&retry).unwrap(),
        ChargeOutcome::Replayed {
            answer: b"answer to r1".to_vec(),
            spent: Rho::from_nano(100),
            remaining: Rho::ZERO,
        }
    );
    assert_eq!(
        ledger.charge(&request("a", "r3", 1, 100, 3)).unwrap(),
        exceeded(100, 0)
    );
    // Nothing was written for the refused request: no stored answer, no charge count.
    assert_eq!(ledger.lookup(&user("a"), "r3").unwrap(), None);
    let spend = ledger.spend(&user("a"), at(4)).unwrap();
    assert_eq!(spend.spent, Rho::from_nano(100));
    assert_eq!(spend.charges, 2);
    assert_eq!(spend.cap, Some(Rho::from_nano(100)));
    assert_eq!(spend.window_start, Some(at(0)));
    // Another user and the same request id are independent.
    assert_eq!(
        ledger.charge(&request("b", "r1", 10, 100, 5)).unwrap(),
        charged(10, 90)
    );
    let stored = ledger.lookup(&user("a"), "r1").unwrap().unwrap();
    assert_eq!(stored.answer, b"answer to r1");
    assert_eq!(stored.rho, Rho::from_nano(40));
    assert_eq!(stored.charged_at, at(0));
    // A user never charged.
    let nobody = ledger.spend(&user("nobody"), at(5)).unwrap();
    assert_eq!(
        (nobody.spent, nobody.cap, nobody.charges),
        (Rho::ZERO, None, 0)
    );
}

/// A zero charge is recorded (for replay); a charge above the whole cap is refused.
fn zero_and_oversized_charges(ledger: &dyn BudgetLedger) {
    assert_eq!(
        ledger.charge(&request("z", "free", 0, 10, 0)).unwrap(),
        charged(0, 10)
    );
    assert!(matches!(
        ledger.charge(&request("z", "free", 0, 10, 1)).unwrap(),
        ChargeOutcome::Replayed { .. }
    ));
    assert_eq!(
        ledger.charge(&request("z", "big", 11, 10, 2)).unwrap(),
        exceeded(0, 10)
    );
}

/// Windows: spend resets when the window is over; answers stay replayable until pruned.
fn windows_and_pruning(ledger: &dyn BudgetLedger) {
    assert_eq!(
        ledger.charge(&request("w", "1", 100, 100, 0)).unwrap(),
        charged(100, 0)
    );
    assert_eq!(
        ledger.charge(&request("w", "2", 1, 100, 3599)).unwrap(),
        exceeded(100, 0)
    );
    assert_eq!(ledger.spend(&user("w"), at(3600)).unwrap().spent, Rho::ZERO);
    assert_eq!(
        ledger.spend(&user("w"), at(3600)).unwrap().window_start,
        None
    );
    assert_eq!(
        ledger.charge(&request("w", "2", 30, 100, 3600)).unwrap(),
        charged(30, 70)
    );
    let spend = ledger.spend(&user("w"), at(3601)).unwrap();
    assert_eq!((spend.spent, spend.charges), (Rho::from_nano(30), 1));
    assert_eq!(spend.window_start, Some(at(3600)));
    // A replay of a request from the previous window reports the current window's spend.
    assert_eq!(
        ledger.charge(&request("w", "1", 100, 100, 3602)).unwrap(),
        ChargeOutcome::Replayed {
            answer: b"answer to 1".to_vec(),
            spent: Rho::from_nano(30),
            remaining: Rho::from_nano(70),
        }
    );
    // Pruning deletes answers charged strictly before the cutoff.
    assert_eq!(ledger.prune(at(3600)).unwrap(), 1);
    assert_eq!(ledger.lookup(&user("w"), "1").unwrap(), None);
    assert!(ledger.lookup(&user("w"), "2").unwrap().is_some());
    assert_eq!(ledger.prune(at(3600)).unwrap(), 0);
    // A retry whose answer was pruned is a new charge (never a refund).
    assert_eq!(
        ledger.charge(&request("w", "1", 10, 100, 3603)).unwrap(),
        charged(40, 60)
    );
}

/// Many threads charging one user never exceed the cap, and every acceptance is counted.
fn concurrent_charges_respect_the_cap(ledger: Arc<dyn BudgetLedger>) {
    let accepted = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..8)
        .map(|thread| {
            let ledger = Arc::clone(&ledger);
            let accepted = Arc::clone(&accepted);
            std::thread::spawn(move || {
                for index in 0..25 {
                    let id = format!("t{thread}-{index}");
                    match ledger.charge(&request("shared", &id, 7, 500, 0)).unwrap() {
                        ChargeOutcome::Charged { spent, .. } => {
                            assert!(spent <= Rho::from_nano(500));
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        ChargeOutcome::Exceeded { remaining, .. } => {
                            assert!(remaining < Rho::from_nano(7));
                        }
                        other => panic!("{other:?}"),
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    // 500 / 7 = 71 charges fit; 200 were tried.
    assert_eq!(accepted.load(Ordering::Relaxed), 71);
    let spend = ledger.spend(&user("shared"), at(1)).unwrap();
    assert_eq!(spend.spent, Rho::from_nano(71 * 7));
    assert_eq!(spend.charges, 71);
}

/// Bad requests are refused before anything is written; closed ledgers refuse everything.
fn invalid_requests_and_close(ledger: &dyn BudgetLedger) {
    let bad = request("v", "", 1, 10, 0);
    assert!(matches!(
        ledger.charge(&bad),
        Err(StateError::InvalidArgument {
            field: "request_id",
            ..
        })
    ));
    ledger.charge(&request("v", "ok", 1, 10, 0)).unwrap();
    ledger.flush().unwrap();
    ledger.close().unwrap();
    ledger.close().unwrap();
    assert_eq!(
        ledger.charge(&request("v", "later", 1, 10, 0)),
        Err(StateError::Closed)
    );
    assert_eq!(ledger.spend(&user("v"), at(0)), Err(StateError::Closed));
    assert_eq!(ledger.lookup(&user("v"), "ok"), Err(StateError::Closed));
    assert_eq!(ledger.flush(), Err(StateError::Closed));
    assert_eq!(ledger.totals(), Err(StateError::Closed));
}

fn totals(subjects: u64, rho: u64) -> LedgerTotals {
    LedgerTotals {
        subjects,
        rho_charged: Rho::from_nano(rho),
    }
}

/// Totals count accepted charges and the subjects they created; replays and refusals add
/// nothing, and pruning stored answers removes no subject.
fn totals_count_accepted_charges_only(ledger: &dyn BudgetLedger) {
    assert_eq!(ledger.totals().unwrap(), totals(0, 0));
    ledger.charge(&request("a", "r1", 40, 100, 0)).unwrap();
    assert_eq!(ledger.totals().unwrap(), totals(1, 40));
    ledger.charge(&request("a", "r2", 50, 100, 1)).unwrap();
    // A replay charges nothing, whatever it asks for.
    let replayed = ledger.charge(&request("a", "r1", 7, 100, 2)).unwrap();
    assert!(matches!(replayed, ChargeOutcome::Replayed { .. }));
    // Refused: over the cap (a known subject), and above a whole cap (a new one).
    assert_eq!(
        ledger.charge(&request("a", "r3", 11, 100, 3)).unwrap(),
        exceeded(90, 10)
    );
    assert_eq!(
        ledger.charge(&request("c", "r1", 101, 100, 3)).unwrap(),
        exceeded(0, 100)
    );
    assert_eq!(ledger.totals().unwrap(), totals(1, 90));
    ledger.charge(&request("b", "r1", 5, 100, 4)).unwrap();
    ledger.charge(&request("d", "r1", 1, 100, 4)).unwrap();
    assert_eq!(ledger.totals().unwrap(), totals(3, 96));
    // A new window charges again and is counted again; the subject stays one.
    ledger.charge(&request("a", "r4", 30, 100, 3600)).unwrap();
    assert_eq!(ledger.totals().unwrap(), totals(3, 126));
    // Pruning deletes stored answers, not user records (nor what was charged).
    assert_eq!(ledger.prune(at(3600)).unwrap(), 4);
    assert_eq!(ledger.lookup(&user("a"), "r1").unwrap(), None);
    assert_eq!(ledger.totals().unwrap(), totals(3, 126));
    // The retry of a pruned answer is a new charge, and counts.
    assert_eq!(
        ledger.charge(&request("b", "r1", 5, 100, 3601)).unwrap(),
        charged(10, 90)
    );
    assert_eq!(ledger.totals().unwrap(), totals(3, 131));
}

/// The charged total saturates instead of wrapping.
fn totals_saturate(ledger: &dyn BudgetLedger) {
    let huge = u64::MAX - 1;
    for who in ["x", "y"] {
        assert_eq!(
            ledger
                .charge(&request(who, "r", huge, u64::MAX, 0))
                .unwrap(),
            charged(huge, 1)
        );
    }
    assert_eq!(ledger.totals().unwrap(), totals(2, u64::MAX));
    ledger.charge(&request("z", "r", 1, 10, 0)).unwrap();
    assert_eq!(ledger.totals().unwrap(), totals(3, u64::MAX));
}

/// Runs every contract check on fresh ledgers from `make`.
fn run_contract(make: &dyn Fn() -> Arc<dyn BudgetLedger>) {
    totals_count_accepted_charges_only(make().as_ref());
    totals_saturate(make().as_ref());
    charge_replay_exceed(make().as_ref());
    zero_and_oversized_charges(make().as_ref());
    windows_and_pruning(make().as_ref());
    let ledger = make();
    concurrent_charges_respect_the_cap(Arc::clone(&ledger));
    assert_eq!(ledger.totals().unwrap(), totals(1, 71 * 7));
    invalid_requests_and_close(make().as_ref());
}

#[test]
fn in_memory_ledger_meets_the_contract() {
    run_contract(&|| Arc::new(InMemoryLedger::new()));
}

#[test]
fn durable_ledger_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let counter = AtomicU64::new(0);
    run_contract(&|| {
        let name = format!("ledger-{}.redb", counter.fetch_add(1, Ordering::Relaxed));
        let database = StateDatabase::open(dir.path().join(name)).unwrap();
        Arc::new(database.ledger(LedgerOptions::default()).unwrap())
    });
}

#[test]
fn durable_ledger_with_batches_of_one_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let counter = AtomicU64::new(0);
    run_contract(&|| {
        let name = format!("ledger-{}.redb", counter.fetch_add(1, Ordering::Relaxed));
        let database = StateDatabase::open(dir.path().join(name)).unwrap();
        let options = LedgerOptions {
            max_batch: 1,
            ..LedgerOptions::default()
        };
        Arc::new(database.ledger(options).unwrap())
    });
}

/// A durable ledger of one kind on a database.
type OpenLedger = fn(&StateDatabase) -> Box<dyn BudgetLedger>;

fn durable(database: &StateDatabase) -> Box<dyn BudgetLedger> {
    Box::new(database.ledger(LedgerOptions::default()).unwrap())
}

fn leased(database: &StateDatabase) -> Box<dyn BudgetLedger> {
    Box::new(database.leased_ledger(LeaseOptions::default()).unwrap())
}

/// Small blocks (one charge each), renewed ahead at once, answers written one by one.
fn leased_small_blocks(database: &StateDatabase) -> Box<dyn BudgetLedger> {
    let options = LeaseOptions {
        lease_charges: 1,
        lease_cap_fraction: 0.0,
        renew_below: 1.0,
        answer_batch: 1,
        ..LeaseOptions::default()
    };
    Box::new(database.leased_ledger(options).unwrap())
}

/// Blocks of a whole cap, nothing renewed ahead, answers held in memory until flushed.
fn leased_large_blocks(database: &StateDatabase) -> Box<dyn BudgetLedger> {
    let options = LeaseOptions {
        lease_cap_fraction: 1.0,
        renew_below: 0.0,
        answer_interval: Duration::from_secs(3600),
        answer_batch: usize::MAX,
        max_unwritten_answers: usize::MAX,
        ..LeaseOptions::default()
    };
    Box::new(database.leased_ledger(options).unwrap())
}

const DURABLE_KINDS: [(&str, OpenLedger); 4] = [
    ("durable", durable),
    ("leased", leased),
    ("leased small blocks", leased_small_blocks),
    ("leased large blocks", leased_large_blocks),
];

/// Runs the contract on fresh databases with ledgers from `open`.
fn run_durable_contract(open: OpenLedger) {
    let dir = tempfile::tempdir().unwrap();
    let counter = AtomicU64::new(0);
    run_contract(&|| {
        let name = format!("ledger-{}.redb", counter.fetch_add(1, Ordering::Relaxed));
        let database = StateDatabase::open(dir.path().join(name)).unwrap();
        Arc::from(open(&database))
    });
}

#[test]
fn leased_ledger_meets_the_contract() {
    run_durable_contract(leased);
}

#[test]
fn leased_ledger_with_small_blocks_meets_the_contract() {
    run_durable_contract(leased_small_blocks);
}

#[test]
fn leased_ledger_with_large_blocks_meets_the_contract() {
    run_durable_contract(leased_large_blocks);
}

#[test]
fn reopening_after_close_keeps_spend_and_answers() {
    for (kind, open) in DURABLE_KINDS {
        reopening_after_close_keeps_spend_and_answers_of(kind, open);
    }
}

/// A clean close keeps every charge and answer; a leased ledger returns its unused blocks.
fn reopening_after_close_keeps_spend_and_answers_of(kind: &str, open: OpenLedger) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    {
        let database = StateDatabase::open(&path).unwrap();
        let ledger = open(&database);
        ledger.charge(&request("a", "r1", 40, 100, 0)).unwrap();
        ledger.charge(&request("a", "r2", 50, 100, 1)).unwrap();
        ledger.charge(&request("b", "r1", 5, 100, 2)).unwrap();
        assert_eq!(ledger.totals().unwrap(), totals(2, 95), "{kind}");
        ledger.close().unwrap();
    }
    let database = StateDatabase::open_existing(&path).unwrap();
    let ledger = open(&database);
    // The totals survive the restart (unused lease blocks returned, never counted).
    assert_eq!(ledger.totals().unwrap(), totals(2, 95), "{kind}");
    let spend = ledger.spend(&user("a"), at(3)).unwrap();
    assert_eq!(
        (spend.spent, spend.charges, spend.leased_unused),
        (Rho::from_nano(90), 2, Rho::ZERO),
        "{kind}"
    );
    assert_eq!(spend.window_start, Some(at(0)));
    assert_eq!(
        ledger.charge(&request("a", "r2", 50, 100, 4)).unwrap(),
        ChargeOutcome::Replayed {
            answer: b"answer to r2".to_vec(),
            spent: Rho::from_nano(90),
            remaining: Rho::from_nano(10),
        }
    );
    assert_eq!(
        ledger.charge(&request("a", "r3", 11, 100, 5)).unwrap(),
        exceeded(90, 10)
    );
    assert_eq!(
        ledger.spend(&user("b"), at(3)).unwrap().spent,
        Rho::from_nano(5)
    );
    // Counting goes on from the stored total, across another restart.
    ledger.charge(&request("e", "r1", 3, 100, 6)).unwrap();
    assert_eq!(ledger.totals().unwrap(), totals(3, 98), "{kind}");
    ledger.close().unwrap();
    drop(ledger);
    let ledger = open(&database);
    assert_eq!(ledger.totals().unwrap(), totals(3, 98), "{kind}");
}

#[test]
fn dropping_without_close_keeps_every_returned_charge() {
    for (kind, open) in DURABLE_KINDS {
        dropping_without_close_keeps_every_returned_charge_of(kind, open);
    }
}

fn dropping_without_close_keeps_every_returned_charge_of(kind: &str, open: OpenLedger) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    {
        let database = StateDatabase::open(&path).unwrap();
        let ledger = open(&database);
        for index in 0..20 {
            ledger
                .charge(&request("d", &format!("r{index}"), 1, 100, index))
                .unwrap();
        }
    }
    let ledger = open(&StateDatabase::open(&path).unwrap());
    assert_eq!(ledger.totals().unwrap(), totals(1, 20), "{kind}");
    let spend = ledger.spend(&user("d"), at(30)).unwrap();
    assert_eq!(
        (spend.charges, spend.spent),
        (20, Rho::from_nano(20)),
        "{kind}"
    );
    for index in 0..20 {
        assert!(
            ledger
                .lookup(&user("d"), &format!("r{index}"))
                .unwrap()
                .is_some(),
            "{kind}"
        );
    }
}

#[test]
fn a_database_without_the_counter_opens_and_counts_from_zero() {
    for (kind, open) in DURABLE_KINDS {
        a_database_without_the_counter_opens_and_counts_from_zero_of(kind, open);
    }
}

/// A file written before the charged-rho counter existed (simulated by deleting the key)
/// opens, keeps its subjects, and counts charged rho from 0.
fn a_database_without_the_counter_opens_and_counts_from_zero_of(kind: &str, open: OpenLedger) {
    use crate::database::{META, RHO_CHARGED_KEY};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    {
        let database = StateDatabase::open(&path).unwrap();
        let ledger = open(&database);
        ledger.charge(&request("a", "r1", 40, 100, 0)).unwrap();
        ledger.charge(&request("b", "r1", 5, 100, 1)).unwrap();
        ledger.close().unwrap();
        let transaction = database.begin_write("test").unwrap();
        {
            let mut meta = transaction.open_table(META).unwrap();
            assert_eq!(
                meta.remove(RHO_CHARGED_KEY).unwrap().map(|v| v.value()),
                Some(45),
                "{kind}"
            );
        }
        transaction.commit().unwrap();
    }
    let database = StateDatabase::open_existing(&path).unwrap();
    let ledger = open(&database);
    assert_eq!(ledger.totals().unwrap(), totals(2, 0), "{kind}");
    ledger.charge(&request("a", "r2", 10, 100, 2)).unwrap();
    assert_eq!(ledger.totals().unwrap(), totals(2, 10), "{kind}");
    ledger.close().unwrap();
    drop(ledger);
    assert_eq!(open(&database).totals().unwrap(), totals(2, 10), "{kind}");
}

#[test]
fn automatic_pruning_deletes_answers_older_than_the_retention() {
    let options = LedgerOptions {
        retention: Some(Duration::from_secs(3600)),
        prune_interval: Duration::ZERO,
        prune_limit: 2,
        ..LedgerOptions::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let database = StateDatabase::open(dir.path().join("durable.redb")).unwrap();
    automatic_pruning_of(&database.ledger(options.clone()).unwrap());
    let database = StateDatabase::open(dir.path().join("leased.redb")).unwrap();
    let leased = LeaseOptions {
        store: options,
        ..LeaseOptions::default()
    };
    automatic_pruning_of(&database.leased_ledger(leased).unwrap());
}

fn automatic_pruning_of(ledger: &dyn BudgetLedger) {
    // Charged "years ago" by the request clock: older than the retention by the server clock.
    for index in 0..5 {
        ledger
            .charge(&request("p", &format!("old{index}"), 1, 100, index))
            .unwrap();
    }
    let recent = ChargeRequest {
        now: SystemTime::now(),
        ..request("p", "recent", 1, 100, 0)
    };
    ledger.charge(&recent).unwrap();
    // Each batch prunes at most two; a few more batches finish the job.
    for _ in 0..3 {
        ledger.flush().unwrap();
    }
    for index in 0..5 {
        assert_eq!(
            ledger.lookup(&user("p"), &format!("old{index}")).unwrap(),
            None
        );
    }
    assert!(ledger.lookup(&user("p"), "recent").unwrap().is_some());
}
