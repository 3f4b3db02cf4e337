//! The leased [`BudgetLedger`]: budget is reserved durably in blocks (leases), charges inside
//! a lease are answered from memory, and per-request answers are written in the background.
//!
//! The semantics (leases, what is durable, crashes, retries) are documented on [`LeasedLedger`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::answer_log::{AnswerLog, LogRecovery, Lookup, key_hash, log_dir};
use crate::database::{LEDGER_ANSWERS, StateDatabase, read_totals};
use crate::durable_ledger::{
    LedgerOptions, LedgerTables, answer_key, decode_user, prune_answers, read_answer_at, read_user,
};
use crate::error::StateError;
use crate::ledger::{
    BudgetLedger, ChargeOutcome, ChargeParams, ChargeRequest, LedgerTotals, RequestRecord,
    StoredAnswer, UserRecord, UserSpend, current_window, replay, unix_millis,
};
use crate::ledger_writer::{AutoPrune, WriterCommand, apply_batch, reply_all};
use crate::pseudonym::Pseudonym;
use crate::rho::Rho;

/// Shards of the in-memory maps (users and unwritten answers); a power of two.
const SHARDS: usize = 64;

/// The longest a renewal asked for ahead of need waits for an fsync that is due anyway
/// (bounded by [`LeaseOptions::answer_interval`] too).
const MAX_RENEWAL_DELAY: Duration = Duration::from_millis(50);

/// The most answers a commit that a charge waits for writes (their callers may wait
/// for it; the other answers follow in commits of their own).
const ANSWERS_WITH_LEASES: usize = 64;

/// Charges between two sweeps of one user shard (idle and expired users leave memory).
const SWEEP_EVERY: u64 = 1024;

/// Tuning of the leased ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseOptions {
    /// A lease block covers at least this many charges of the size that requested it.
    pub lease_charges: u64,
    /// A lease block is at least this fraction of the cap (0 to 1). The block is
    /// `max(rho * lease_charges, cap * lease_cap_fraction)`, never beyond the cap. It is
    /// also the most budget a crash can waste per user.
    pub lease_cap_fraction: f64,
    /// The next block is requested ahead of time when the unused lease falls below this
    /// fraction of a block (0 to 1; 0 disables renewing ahead).
    pub renew_below: f64,
    /// Stored answers are written when this many are waiting (and at most this many per
    /// commit, so that leases committed with them are not delayed long) ...
    pub answer_batch: usize,
    /// ... or when the oldest has waited this long. Commits of answers alone skip the fsync
    /// unless the last fsynced commit is older than this, so a written answer is durable
    /// after at most about twice this interval (at once after [`BudgetLedger::flush`]).
    pub answer_interval: Duration,
    /// Backpressure: a charge waits while more answers than this are waiting to be written
    /// (bounds memory when charges outrun the disk; at least `answer_batch`).
    pub max_unwritten_answers: usize,
    /// A user without charges for this long is dropped from memory and the unused rest of
    /// its lease is returned (bounds memory to the recently active users).
    pub idle_eviction: Duration,
    /// The most stored answers kept for replays (at least 1). The answer log's index holds
    /// about 50 bytes of memory per stored answer for the whole retention (one day by the
    /// server's default), so under a sustained high rate of DP answers this bounds memory:
    /// beyond it, the oldest answers are pruned (whole log segments at a time, each at most
    /// an eighth of this bound) before their retention is over, and a retry of one is
    /// charged again as a new request (never a refund). Such early prunings are counted in
    /// [`LeaseStats::early_prunings`]. Default 8 000 000 (about 400 MB).
    pub max_stored_answers: u64,
    /// Batch size, retention and pruning of the underlying store (see [`LedgerOptions`]).
    pub store: LedgerOptions,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        Self {
            lease_charges: 32,
            lease_cap_fraction: 0.05,
            renew_below: 0.5,
            answer_batch: 1024,
            answer_interval: Duration::from_millis(50),
            max_unwritten_answers: 65_536,
            idle_eviction: Duration::from_secs(600),
            max_stored_answers: 8_000_000,
            store: LedgerOptions::default(),
        }
    }
}

impl LeaseOptions {
    /// Checks the ranges.
    fn validate(&self) -> Result<(), StateError> {
        let fraction = |field: &'static str, value: f64| {
            if (0.0..=1.0).contains(&value) {
                Ok(())
            } else {
                Err(StateError::InvalidArgument {
                    field,
                    reason: format!("must be between 0 and 1, is {value}"),
                })
            }
        };
        fraction("lease_cap_fraction", self.lease_cap_fraction)?;
        fraction("renew_below", self.renew_below)?;
        let at_least_one = |field: &'static str, value: u64| {
            if value >= 1 {
                Ok(())
            } else {
                Err(StateError::InvalidArgument {
                    field,
                    reason: "must be at least 1".to_string(),
                })
            }
        };
        at_least_one("lease_charges", self.lease_charges)?;
        at_least_one("max_stored_answers", self.max_stored_answers)?;
        at_least_one("answer_batch", self.answer_batch as u64)?;
        at_least_one("max_batch", self.store.max_batch as u64)?;
        if self.max_unwritten_answers < self.answer_batch {
            return Err(StateError::InvalidArgument {
                field: "max_unwritten_answers",
                reason: format!("must be at least answer_batch ({})", self.answer_batch),
            });
        }
        Ok(())
    }

    /// The block a charge of `rho` under `cap` asks for (before clamping to the cap).
    fn block(&self, rho: u64, cap: u64) -> u64 {
        // f64 has 53 bits of mantissa: the fraction of a cap is rounded down, which only
        // makes the block smaller.
        let of_cap = (cap as f64 * self.lease_cap_fraction).floor();
        let of_cap = if of_cap >= u64::MAX as f64 {
            u64::MAX
        } else {
            of_cap as u64
        };
        rho.saturating_mul(self.lease_charges).max(of_cap)
    }

    /// Below this many unused units, the next block is requested ahead of time.
    fn renew_threshold(&self, block: u64) -> u64 {
        (block as f64 * self.renew_below).floor() as u64
    }
}

/// Where the charges of a [`LeasedLedger`] waited and what its writer did, counted since it
/// opened ([`LeasedLedger::stats`]). Waits are wall-clock time on the charging thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseStats {
    /// Charges answered (charged, replayed or refused).
    pub charges: u64,
    /// Charges that asked for a lease block and waited for its durable commit (a user's
    /// first charge in a window, or a lease used up before its renewal was asked for).
    pub lease_waits: u64,
    /// Their total wait, in microseconds.
    pub lease_wait_us: u64,
    /// The longest of them, in microseconds.
    pub lease_wait_max_us: u64,
    /// Charges that waited for a block requested ahead of time (the lease ran out before
    /// the renewal's commit came back).
    pub renewal_waits: u64,
    /// Their total wait, in microseconds.
    pub renewal_wait_us: u64,
    /// Charges that waited because too many answers were waiting to be written.
    pub backpressure_waits: u64,
    /// Their total wait, in microseconds.
    pub backpressure_wait_us: u64,
    /// Reads of a stored answer from the answer log (a request id that the log's index
    /// knows: a retry, or a rare hash collision; a new request id is never read).
    pub answer_reads: u64,
    /// Their total time, in microseconds.
    pub answer_read_us: u64,
    /// Lease blocks requested ahead of time (renewals).
    pub renewals: u64,
    /// Batches of the writer thread: answers appended to the log, with a database commit
    /// when the batch carried commands or an fsync was due (answers alone need none).
    pub commits: u64,
    /// Fsynced commits.
    pub fsynced_commits: u64,
    /// Answers written (appended to the answer log).
    pub answers_written: u64,
    /// Time the writer spent appending answers and building and committing transactions, in
    /// microseconds (its busy time; divide by `answers_written` for the writer's cost per
    /// charge).
    pub writer_busy_us: u64,
    /// Prunings forced by [`LeaseOptions::max_stored_answers`] before the retention was over.
    pub early_prunings: u64,
}

/// The counters behind [`LeaseStats`] (relaxed atomics: diagnostics only).
#[derive(Debug, Default)]
struct StatCounters {
    charges: AtomicU64,
    lease_waits: AtomicU64,
    lease_wait_us: AtomicU64,
    lease_wait_max_us: AtomicU64,
    renewal_waits: AtomicU64,
    renewal_wait_us: AtomicU64,
    backpressure_waits: AtomicU64,
    backpressure_wait_us: AtomicU64,
    answer_reads: AtomicU64,
    answer_read_us: AtomicU64,
    renewals: AtomicU64,
    commits: AtomicU64,
    fsynced_commits: AtomicU64,
    answers_written: AtomicU64,
    writer_busy_us: AtomicU64,
    early_prunings: AtomicU64,
}

/// Adds the time since `since` to `total` (in microseconds) and counts one in `count`.
fn count_wait(count: &AtomicU64, total: &AtomicU64, since: Instant) -> u64 {
    let micros = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
    count.fetch_add(1, Ordering::Relaxed);
    total.fetch_add(micros, Ordering::Relaxed);
    micros
}

impl StatCounters {
    fn snapshot(&self) -> LeaseStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        LeaseStats {
            charges: get(&self.charges),
            lease_waits: get(&self.lease_waits),
            lease_wait_us: get(&self.lease_wait_us),
            lease_wait_max_us: get(&self.lease_wait_max_us),
            renewal_waits: get(&self.renewal_waits),
            renewal_wait_us: get(&self.renewal_wait_us),
            backpressure_waits: get(&self.backpressure_waits),
            backpressure_wait_us: get(&self.backpressure_wait_us),
            answer_reads: get(&self.answer_reads),
            answer_read_us: get(&self.answer_read_us),
            renewals: get(&self.renewals),
            commits: get(&self.commits),
            fsynced_commits: get(&self.fsynced_commits),
            answers_written: get(&self.answers_written),
            writer_busy_us: get(&self.writer_busy_us),
            early_prunings: get(&self.early_prunings),
        }
    }
}

/// An accepted answer waiting to be written.
struct PendingAnswer {
    /// `pseudonym ++ request id`.
    key: Vec<u8>,
    pseudonym: Pseudonym,
    /// The window the charge was counted in.
    window_start_ms: u64,
    record: RequestRecord,
}

/// A lease commit's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LeaseGrant {
    /// The durable window the block belongs to.
    window_start_ms: u64,
    /// Units added to the durable spent (0 when refused).
    granted: u64,
    /// The durable spent after the grant.
    durable_spent: u64,
}

/// Work for the writer thread.
enum Command {
    /// Reserve a block: grant `min(headroom, desired)` if the headroom is at least `need`.
    Lease {
        pseudonym: Pseudonym,
        params: ChargeParams,
        need: u64,
        desired: u64,
        /// A charge waits for it (else it is a renewal asked for ahead of need, which may
        /// ride the next fsync).
        urgent: bool,
        reply: SyncSender<Result<LeaseGrant, StateError>>,
    },
    /// A full batch of answers is waiting (no reply).
    Wake,
    /// Give back the unused rest of a lease (the user left memory or the ledger closes).
    Return {
        pseudonym: Pseudonym,
        window_start_ms: u64,
        amount: u64,
    },
    Prune {
        cutoff_ms: u64,
        /// Answers the writer pruned from the answer log before the transaction.
        from_log: u64,
        reply: SyncSender<Result<u64, StateError>>,
    },
    Flush {
        reply: SyncSender<Result<(), StateError>>,
    },
    /// Tests only: stop at once, writing nothing more (what a crash leaves behind).
    #[cfg(test)]
    Abandon,
}

/// One user's state in memory.
struct UserLease {
    /// Dropped from the map: whoever finds it must look the user up again.
    retired: bool,
    /// The committed record was read once.
    loaded: bool,
    /// What released answers used, in the window of the latest accepted charge.
    record: Option<UserRecord>,
    /// The window the lease belongs to.
    lease_window_start_ms: Option<u64>,
    /// Unused units of the lease (already in the durable spent).
    available: u64,
    /// The durable headroom ran out in the lease's window: do not renew ahead.
    exhausted: bool,
    /// A block requested ahead of time, not yet absorbed.
    renewal: Option<Receiver<Result<LeaseGrant, StateError>>>,
    last_used: Instant,
}

impl UserLease {
    fn new() -> Self {
        Self {
            retired: false,
            loaded: false,
            record: None,
            lease_window_start_ms: None,
            available: 0,
            exhausted: false,
            renewal: None,
            last_used: Instant::now(),
        }
    }

    /// The unused lease usable in window `window_start_ms`.
    fn available_in(&self, window_start_ms: u64) -> u64 {
        if self.lease_window_start_ms == Some(window_start_ms) {
            self.available
        } else {
            0
        }
    }

    /// Adds a block granted for window `grant.window_start_ms`; a block of another window
    /// replaces the lease (the old window's rest is worthless).
    fn add_block(&mut self, grant: &LeaseGrant) {
        if self.lease_window_start_ms == Some(grant.window_start_ms) {
            self.available = self.available.saturating_add(grant.granted);
        } else {
            self.lease_window_start_ms = Some(grant.window_start_ms);
            self.available = grant.granted;
            self.exhausted = false;
        }
    }

    /// Takes in a block requested ahead of time; waits for it when `wait`. A failed or lost
    /// renewal is dropped (the next charge that needs budget asks again and sees the error).
    fn absorb_renewal(&mut self, wait: bool) {
        let Some(receiver) = self.renewal.take() else {
            return;
        };
        let received = if wait {
            receiver.recv().ok()
        } else {
            match receiver.try_recv() {
                Ok(result) => Some(result),
                Err(TryRecvError::Empty) => {
                    self.renewal = Some(receiver);
                    return;
                }
                Err(TryRecvError::Disconnected) => None,
            }
        };
        if let Some(Ok(grant)) = received {
            // A block for a window the lease has left is wasted (never refunded).
            if self.lease_window_start_ms == Some(grant.window_start_ms) {
                self.available = self.available.saturating_add(grant.granted);
                if grant.granted == 0 {
                    self.exhausted = true;
                }
            } else if self.lease_window_start_ms.is_none() {
                self.add_block(&grant);
            }
        }
    }
}

type UserShard = Mutex<HashMap<Pseudonym, Arc<Mutex<UserLease>>>>;
type AnswerShard = Mutex<HashMap<Vec<u8>, Arc<PendingAnswer>>>;

/// Accepted answers waiting for the writer, oldest first.
#[derive(Default)]
struct AnswerQueue {
    answers: VecDeque<Arc<PendingAnswer>>,
    /// When the oldest waiting answer was queued (about).
    since: Option<Instant>,
    /// Nano-rho of every charge accepted since the ledger opened (saturating), counted as
    /// its answer is queued, under this lock (which the charge holds anyway).
    accepted_rho: u64,
}

/// State shared by callers and the writer thread.
struct Shared {
    database: StateDatabase,
    /// Accepted answers not yet written, by `pseudonym ++ request id` (for lookups).
    pending: Vec<AnswerShard>,
    /// The same answers in arrival order (for the writer). Kept apart from the command
    /// channel so that leases never wait behind a backlog of answers.
    queue: Mutex<AnswerQueue>,
    /// Signalled when the writer takes answers from the queue or stops.
    drained: Condvar,
    /// False once the writer thread has stopped.
    writer_running: AtomicBool,
    /// Where charges waited and what the writer did.
    stats: StatCounters,
    /// The written answers: segment files and their index in memory.
    log: AnswerLog,
    /// The file's charged-rho counter when the ledger opened (nano-rho).
    rho_at_open: u64,
}

impl Shared {
    fn answer_shard(&self, pseudonym: &Pseudonym) -> &AnswerShard {
        &self.pending[usize::from(pseudonym.as_bytes()[0]) % SHARDS]
    }

    /// An accepted answer not yet written.
    fn pending_answer(&self, pseudonym: &Pseudonym, key: &[u8]) -> Option<RequestRecord> {
        let shard = self.answer_shard(pseudonym).lock().ok()?;
        shard.get(key).map(|pending| pending.record.clone())
    }

    /// The stored answer: in memory first, then in the answer log. The writer removes an
    /// answer from memory only after the log's index has it, so a miss in memory is found in
    /// the log. A key the log's index does not know (every new request id) costs no read.
    fn stored_answer(
        &self,
        pseudonym: &Pseudonym,
        key: &[u8],
    ) -> Result<Option<RequestRecord>, StateError> {
        if let Some(record) = self.pending_answer(pseudonym, key) {
            return Ok(Some(record));
        }
        if !self.log.may_contain(key_hash(key)) {
            return Ok(None);
        }
        let started = Instant::now();
        let read = match self.log.lookup(key) {
            Ok(Lookup::Found(record)) => Ok(Some(record)),
            Ok(Lookup::Absent) => Ok(None),
            Ok(Lookup::InDatabase) => read_answer_at(&self.database, key),
            Err(error) => Err(error),
        };
        count_wait(
            &self.stats.answer_reads,
            &self.stats.answer_read_us,
            started,
        );
        read
    }
}

/// The leased, durable budget ledger: budget is reserved durably in blocks (leases), charges
/// inside a lease are answered from memory, and per-request answers are written in the
/// background. Create it with [`StateDatabase::leased_ledger`].
///
/// # Why
///
/// [`DurableLedger`](crate::DurableLedger) fsyncs before every `Charged` (one commit per
/// batch of charges); on a disk whose fsync takes 0.3-3 ms that alone is several times the
/// cost of a Rank. A lease moves the fsync off the per-request path: one durable commit
/// reserves budget for many charges.
///
/// # Leases
///
/// For each user the ledger keeps, in memory, what released answers used (`spent`) and the
/// unused rest of the user's lease (`leased_unused`). A charge of `rho`:
///
/// 1. is a *replay* if its request id is stored (in memory first, then in the database);
/// 2. is refused (`Exceeded`) if `spent + rho > cap`, exactly as in the other ledgers;
/// 3. is accepted from memory at once if the lease covers it;
/// 4. otherwise waits for a new lease: one durable commit (group-committed with the other
///    users' leases) that adds `max(rho * lease_charges, cap * lease_cap_fraction)` to the
///    user's durable spent, never beyond the cap (a smaller block near the cap; refused when
///    not even `rho` fits).
///
/// When a lease runs below [`LeaseOptions::renew_below`] of a block, the next block is
/// requested ahead of time, so under steady load charges do not wait for any fsync.
///
/// # What is durable
///
/// The durable record of a user holds `spent + leased_unused`: every block is committed
/// *before* any answer uses it. So **the durable spent is always at least the sum of every
/// answer released**, whatever happens. A crash (kill -9, power loss) wastes the unused rest
/// of the live leases (after a restart it counts as spent); it never refunds anything. A
/// clean [`close`](BudgetLedger::close) (or drop) returns the unused rest, and so does
/// dropping an idle user from memory ([`LeaseOptions::idle_eviction`]).
///
/// # Stored answers (idempotency)
///
/// The answer of each accepted charge is kept in memory and appended by the writer thread in
/// batches (at most [`LeaseOptions::answer_interval`] later) to the *answer log*, a directory
/// of append-only segment files next to the database (`state.redb.answers/`; format,
/// recovery rule and retention in `answer_log.rs`), fsynced on the cadence the database is:
/// these replay records are **not on the release path**; a charge inside its lease returns
/// at once. (They used to be rows of a database table keyed by pseudonym and request id; a
/// row per answer cost a copy-on-write of a random B-tree leaf. Rows left there by older
/// versions, or by the per-charge ledger, are indexed at open and read in place.) A retry
/// with the same request id finds the answer in memory or through the log's index (in
/// memory, rebuilt by scanning the log at open) and gets the same answer with no new charge.
/// A request id the index does not know is certainly new: no read; one it knows (a retry,
/// or a rare 64-bit hash collision, told apart by the key stored in the record) is read
/// from its segment. What opening the log repaired (a torn tail cut after a crash, a
/// corrupt record skipped) is in [`LeasedLedger::recovery`].
///
/// Why the replay records may be group-committed off the release path: what must survive a
/// crash is the *charge*, and it does: the block that covers it was fsynced before the
/// charge was accepted, so the durable spent is at least the sum of every answer released,
/// with or without its record. **After a crash (kill -9, power loss), a retry whose record
/// had not reached the disk (answers of the last `2 * answer_interval`, 100 ms by default)
/// is treated as a new request**: it is charged again, from a new lease, and draws new
/// noise. Both releases are then paid for in the durable spent (two releases, two charges:
/// the accounting by composition holds), and nothing is refunded; the cost is the user's
/// budget and the idempotency of that one retry (it may get a different answer). Every other
/// retry, including any retry while the process lives, replays. Deployments that need the
/// same answer even for a retry right after a crash use [`DurableLedger`](crate::DurableLedger)
/// (`[ledger] commit = "per-charge"`), which stores the record in the charge's own fsynced
/// commit. [`flush`](BudgetLedger::flush) waits until every answer accepted so far is written.
///
/// # Per-request differences from the durable ledger (by design)
///
/// - `UserSpend::leased_unused` reports the reservation; `spent` is only what answers used.
/// - `UserSpend::charges` of a user not in memory counts the *written* answers of the window
///   whose count reached the database: counts are written with the user's next lease or
///   returned lease, or with all others within about a second ([`BudgetLedger::flush`] and
///   a clean close write them all).
/// - After a crash, `spent` includes the wasted rest of the leases that were live.
///
/// Only one process may use a database (redb holds a file lock), so leases never race with
/// another writer.
///
/// # Cost
///
/// A charge inside a lease costs a few map look-ups, a hash of its request id (no read for a
/// new request id; a retry reads its answer once) and queueing its answer: no fsync, and no
/// wait on any commit except a lease's ([`LeasedLedger::stats`] counts the waits). Measured in
/// `benches/benches/state.rs` on a shared 2-core VM whose fdatasync takes 0.3-3 ms, at the
/// target load of 5,000 charges/s from 16 threads: 11 us mean per charge (p50 9 us, p99
/// 43 us in a separate run) against 3.5 us for the in-memory ledger and 3-6 ms for
/// [`DurableLedger`](crate::DurableLedger), that is under 4% of a 0.3 ms Rank. The limit is
/// the writer storing answers: above its rate charges wait for it
/// ([`LeaseOptions::max_unwritten_answers`]). Appending an answer to the answer log costs
/// the writer about 4 000 instructions; with its share of the lease commits the writer
/// spends about 27 000 per answer, where one redb row per answer made it about 72 000 (see
/// `BENCHMARKS.md`, "Privacy").
pub struct LeasedLedger {
    shared: Arc<Shared>,
    options: LeaseOptions,
    users: Vec<UserShard>,
    /// `None` once closed. Charges hold the read lock throughout, so `close` (write lock)
    /// waits for them.
    sender: RwLock<Option<Sender<Command>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    charges: AtomicU64,
    /// What opening the answer log found and repaired.
    recovery: LogRecovery,
}

impl fmt::Debug for LeasedLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeasedLedger")
            .field("database", &self.shared.database)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl StateDatabase {
    /// The leased budget ledger in this database; starts its writer thread. Use either this
    /// or [`StateDatabase::ledger`] on one database, not both at once.
    ///
    /// Opens the answer log next to the database file (`state.redb.answers/`; see
    /// [`LogRecovery`] for what the scan repairs) and indexes the answers stored in the
    /// database table by older versions or by the per-charge ledger (read from there on a
    /// retry; the table is left as it is, so either ledger can be used on the file later).
    pub fn leased_ledger(&self, options: LeaseOptions) -> Result<LeasedLedger, StateError> {
        options.validate()?;
        let (log, mut recovery) = AnswerLog::open(&log_dir(self.path()))?;
        recovery.database_answers = index_database_answers(self, &log)?;
        let rho_at_open = read_totals(self)?.rho_charged.as_nano();
        log.limit_segment_records(
            usize::try_from(options.max_stored_answers / 8).unwrap_or(usize::MAX),
        )?;
        let shared = Arc::new(Shared {
            database: self.clone(),
            pending: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            queue: Mutex::new(AnswerQueue::default()),
            drained: Condvar::new(),
            writer_running: AtomicBool::new(true),
            stats: StatCounters::default(),
            log,
            rho_at_open,
        });
        let (sender, receiver) = mpsc::channel();
        let writer_shared = Arc::clone(&shared);
        let writer_options = options.clone();
        let writer = std::thread::Builder::new()
            .name("fairrank-lease-writer".to_string())
            .spawn(move || {
                run_writer(&writer_shared, &receiver, &writer_options);
                writer_shared.writer_running.store(false, Ordering::Release);
                writer_shared.drained.notify_all();
            })
            .map_err(|error| self.storage("start the lease writer thread", error))?;
        Ok(LeasedLedger {
            shared,
            options,
            users: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            sender: RwLock::new(Some(sender)),
            writer: Mutex::new(Some(writer)),
            charges: AtomicU64::new(0),
            recovery,
        })
    }
}

/// Indexes the answers in the database table `ledger_answers` (written by older versions, or
/// by the per-charge ledger) in the answer log's index, so that a lookup knows without a read
/// whether a key may be stored there. Returns how many there are.
fn index_database_answers(database: &StateDatabase, log: &AnswerLog) -> Result<u64, StateError> {
    use redb::ReadableTable;
    let operation = "index the answers stored in the database";
    let storage = |error: redb::StorageError| database.storage(operation, error);
    let transaction = database.begin_read(operation)?;
    let answers = transaction
        .open_table(LEDGER_ANSWERS)
        .map_err(|error| database.storage(operation, error))?;
    let mut count = 0_u64;
    for entry in answers.iter().map_err(storage)? {
        let (key, value) = entry.map_err(storage)?;
        // The charge time leads the record; a record too short for it is indexed as charged
        // at 0 (a retry reads it and reports it corrupt).
        let charged_at_ms = value
            .value()
            .get(..8)
            .and_then(|bytes| bytes.try_into().ok())
            .map_or(0, u64::from_le_bytes);
        log.index_in_database(key.value(), charged_at_ms)?;
        count += 1;
    }
    Ok(count)
}

/// Locks a mutex; a poisoned one (a panic while holding it) means the store stopped.
fn lock<T>(mutex: &Mutex<T>) -> Result<MutexGuard<'_, T>, StateError> {
    mutex.lock().map_err(|_| StateError::WriterStopped)
}

impl LeasedLedger {
    /// The database this ledger writes to.
    pub fn database(&self) -> &StateDatabase {
        &self.shared.database
    }

    /// The options it runs with.
    pub fn options(&self) -> &LeaseOptions {
        &self.options
    }

    /// Where charges waited and what the writer did since the ledger opened.
    pub fn stats(&self) -> LeaseStats {
        self.shared.stats.snapshot()
    }

    /// What opening the answer log found: segments scanned, answers indexed, torn or corrupt
    /// records cut or skipped, answers moved from the database (for the server's log).
    pub fn recovery(&self) -> &LogRecovery {
        &self.recovery
    }

    fn user_shard(&self, pseudonym: &Pseudonym) -> &UserShard {
        &self.users[usize::from(pseudonym.as_bytes()[1]) % SHARDS]
    }

    /// The user's entry, created (not yet loaded) if absent.
    fn user_entry(&self, pseudonym: &Pseudonym) -> Result<Arc<Mutex<UserLease>>, StateError> {
        let mut shard = lock(self.user_shard(pseudonym))?;
        Ok(Arc::clone(
            shard
                .entry(*pseudonym)
                .or_insert_with(|| Arc::new(Mutex::new(UserLease::new()))),
        ))
    }

    /// Charges with the user's entry locked.
    fn charge_locked(
        &self,
        user: &mut UserLease,
        request: &ChargeRequest,
        params: &ChargeParams,
        sender: &Sender<Command>,
    ) -> Result<ChargeOutcome, StateError> {
        let shared = &self.shared;
        if !user.loaded {
            user.record = read_user(&shared.database, &request.pseudonym)?;
            user.loaded = true;
        }
        user.last_used = Instant::now();
        user.absorb_renewal(false);
        let key = answer_key(&request.pseudonym, &request.request_id);
        // A new request id is answered from memory (the log's index): no read.
        if let Some(stored) = shared.stored_answer(&request.pseudonym, &key)? {
            return Ok(replay(user.record.as_ref(), params, stored));
        }
        loop {
            let current = current_window(user.record.as_ref(), params);
            if current
                .spent
                .checked_add(params.rho)
                .is_none_or(|spent| spent > params.cap)
            {
                return Ok(exceeded(current.spent, params.cap));
            }
            let available = user.available_in(current.window_start_ms);
            if available >= params.rho {
                return self.accept(user, request, params, key, current, sender);
            }
            if user.renewal.is_some() {
                // A block is on its way: wait for it rather than ask for another.
                let started = Instant::now();
                user.absorb_renewal(true);
                let stats = &shared.stats;
                count_wait(&stats.renewal_waits, &stats.renewal_wait_us, started);
                continue;
            }
            let need = params.rho - available;
            let desired = self.options.block(params.rho, params.cap).max(need);
            let (reply, receiver) = mpsc::sync_channel(1);
            sender
                .send(Command::Lease {
                    pseudonym: request.pseudonym,
                    params: *params,
                    need,
                    desired,
                    urgent: true,
                    reply,
                })
                .map_err(|_| StateError::WriterStopped)?;
            let started = Instant::now();
            let grant = receiver.recv().map_err(|_| StateError::WriterStopped)?;
            let stats = &shared.stats;
            let waited = count_wait(&stats.lease_waits, &stats.lease_wait_us, started);
            stats.lease_wait_max_us.fetch_max(waited, Ordering::Relaxed);
            let grant = grant?;
            if grant.window_start_ms != current.window_start_ms {
                // The durable window differs from the one in memory (a block requested ahead
                // of time was lost with an evicted entry, or the clock moved): adopt the
                // durable one, counting everything reserved there but this block as spent.
                user.record = Some(UserRecord {
                    window_start_ms: grant.window_start_ms,
                    window_ms: params.window_ms,
                    cap: params.cap,
                    spent: grant.durable_spent - grant.granted,
                    charges: 0,
                });
                user.lease_window_start_ms = None;
                user.add_block(&grant);
                continue;
            }
            user.add_block(&grant);
            if grant.granted < desired {
                user.exhausted = true;
            }
            if grant.granted < need {
                // Refused: not even this charge fits under the cap durably. Budget reserved
                // durably but not in this lease counts as spent.
                let spent = current
                    .spent
                    .max(grant.durable_spent.saturating_sub(user.available));
                if let Some(record) = user.record.as_mut()
                    && record.window_start_ms == current.window_start_ms
                {
                    record.spent = spent;
                }
                return Ok(exceeded(spent, params.cap));
            }
        }
    }

    /// Accepts a charge covered by the lease: queues its answer, updates memory, and asks
    /// for the next block ahead of time if the lease runs low.
    fn accept(
        &self,
        user: &mut UserLease,
        request: &ChargeRequest,
        params: &ChargeParams,
        key: Vec<u8>,
        current: UserRecord,
        sender: &Sender<Command>,
    ) -> Result<ChargeOutcome, StateError> {
        // The caller checked `current.spent + rho <= cap`.
        let spent_after = current.spent.saturating_add(params.rho);
        let pending = Arc::new(PendingAnswer {
            key,
            pseudonym: request.pseudonym,
            window_start_ms: current.window_start_ms,
            record: RequestRecord {
                charged_at_ms: params.now_ms,
                rho: params.rho,
                answer: request.answer.clone(),
            },
        });
        let shared = &self.shared;
        if !shared.writer_running.load(Ordering::Acquire) {
            return Err(StateError::WriterStopped);
        }
        lock(shared.answer_shard(&request.pseudonym))?
            .insert(pending.key.clone(), Arc::clone(&pending));
        {
            let mut queue = lock(&shared.queue)?;
            if queue.answers.is_empty() {
                queue.since = Some(Instant::now());
            }
            queue.answers.push_back(pending);
            queue.accepted_rho = queue.accepted_rho.saturating_add(params.rho);
            if queue.answers.len() == self.options.answer_batch {
                // If the writer is gone, the wait below ends and the next lease reports it.
                let _ = sender.send(Command::Wake);
            }
            // Backpressure: wait for the writer when answers outrun the disk. The budget is
            // already covered by the lease; only this caller waits.
            let started =
                (queue.answers.len() > self.options.max_unwritten_answers).then(Instant::now);
            while queue.answers.len() > self.options.max_unwritten_answers
                && shared.writer_running.load(Ordering::Acquire)
            {
                queue = shared
                    .drained
                    .wait_timeout(queue, Duration::from_millis(100))
                    .map_err(|_| StateError::WriterStopped)?
                    .0;
            }
            if let Some(started) = started {
                let stats = &shared.stats;
                count_wait(
                    &stats.backpressure_waits,
                    &stats.backpressure_wait_us,
                    started,
                );
            }
        }
        if user.lease_window_start_ms != Some(current.window_start_ms) {
            // Only a zero charge gets here without a lease of this window.
            user.lease_window_start_ms = Some(current.window_start_ms);
            user.available = 0;
            user.exhausted = false;
        }
        user.available -= params.rho;
        user.record = Some(UserRecord {
            spent: spent_after,
            charges: current.charges.saturating_add(1),
            ..current
        });
        let block = self.options.block(params.rho, params.cap);
        if !user.exhausted
            && user.renewal.is_none()
            && block > 0
            && user.available < self.options.renew_threshold(block)
        {
            let (reply, receiver) = mpsc::sync_channel(1);
            let renewal = Command::Lease {
                pseudonym: request.pseudonym,
                params: *params,
                need: 1,
                desired: block,
                urgent: false,
                reply,
            };
            // If the writer stopped, the next charge that needs budget reports it.
            if sender.send(renewal).is_ok() {
                user.renewal = Some(receiver);
                shared.stats.renewals.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(ChargeOutcome::Charged {
            spent: Rho::from_nano(spent_after),
            remaining: Rho::from_nano(params.cap - spent_after),
        })
    }

    /// Drops idle users and users whose window is over from one shard of memory, returning
    /// the unused rest of their leases. Entries in use are skipped.
    fn sweep(&self, shard_index: usize, now_ms: u64, sender: &Sender<Command>) {
        let Ok(mut shard) = self.users[shard_index % SHARDS].lock() else {
            return;
        };
        shard.retain(|pseudonym, entry| {
            let Ok(mut user) = entry.try_lock() else {
                return true;
            };
            let idle = user.last_used.elapsed() >= self.options.idle_eviction;
            let expired = user
                .record
                .is_none_or(|record| record.expired(now_ms, record.window_ms));
            if user.renewal.is_some() || !(idle || expired) {
                return true;
            }
            retire(&mut user, pseudonym, sender);
            false
        });
    }
}

/// Marks an entry retired and returns the unused rest of its lease (the writer applies it
/// only while the lease's window is the stored one).
fn retire(user: &mut UserLease, pseudonym: &Pseudonym, sender: &Sender<Command>) {
    user.retired = true;
    if let Some(lease_window) = user.lease_window_start_ms
        && user.available > 0
    {
        // If the writer is gone the rest is wasted, which is safe.
        let _ = sender.send(Command::Return {
            pseudonym: *pseudonym,
            window_start_ms: lease_window,
            amount: user.available,
        });
    }
    user.available = 0;
}

/// The `Exceeded` outcome for `spent` under `cap`.
fn exceeded(spent: u64, cap: u64) -> ChargeOutcome {
    ChargeOutcome::Exceeded {
        spent: Rho::from_nano(spent),
        remaining: Rho::from_nano(cap.saturating_sub(spent)),
    }
}

impl BudgetLedger for LeasedLedger {
    fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, StateError> {
        let params = request.params()?;
        let guard = self.sender.read().map_err(|_| StateError::WriterStopped)?;
        let sender = guard.as_ref().ok_or(StateError::Closed)?;
        let outcome = loop {
            let entry = self.user_entry(&request.pseudonym)?;
            let mut user = lock(&entry)?;
            if user.retired {
                continue;
            }
            break self.charge_locked(&mut user, request, &params, sender)?;
        };
        self.shared.stats.charges.fetch_add(1, Ordering::Relaxed);
        let count = self.charges.fetch_add(1, Ordering::Relaxed);
        if count % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep((count / SWEEP_EVERY) as usize, params.now_ms, sender);
        }
        Ok(outcome)
    }

    fn lookup(
        &self,
        pseudonym: &Pseudonym,
        request_id: &str,
    ) -> Result<Option<StoredAnswer>, StateError> {
        let guard = self.sender.read().map_err(|_| StateError::WriterStopped)?;
        guard.as_ref().ok_or(StateError::Closed)?;
        let key = answer_key(pseudonym, request_id);
        Ok(self
            .shared
            .stored_answer(pseudonym, &key)?
            .map(RequestRecord::into_stored))
    }

    fn spend(&self, pseudonym: &Pseudonym, now: SystemTime) -> Result<UserSpend, StateError> {
        let now_ms = unix_millis(now, "now")?;
        let guard = self.sender.read().map_err(|_| StateError::WriterStopped)?;
        guard.as_ref().ok_or(StateError::Closed)?;
        let entry = lock(self.user_shard(pseudonym))?.get(pseudonym).cloned();
        if let Some(entry) = entry {
            let mut user = lock(&entry)?;
            if user.loaded && !user.retired {
                user.absorb_renewal(false);
                let mut spend = UserRecord::spend_at(user.record.as_ref(), now_ms);
                if let Some(record) = user.record
                    && spend.window_start.is_some()
                {
                    spend.leased_unused = Rho::from_nano(user.available_in(record.window_start_ms));
                }
                return Ok(spend);
            }
        }
        let record = read_user(&self.shared.database, pseudonym)?;
        Ok(UserRecord::spend_at(record.as_ref(), now_ms))
    }

    fn prune(&self, older_than: SystemTime) -> Result<u64, StateError> {
        let cutoff_ms = unix_millis(older_than, "older_than")?;
        let guard = self.sender.read().map_err(|_| StateError::WriterStopped)?;
        let sender = guard.as_ref().ok_or(StateError::Closed)?;
        let (reply, receiver) = mpsc::sync_channel(1);
        sender
            .send(Command::Prune {
                cutoff_ms,
                from_log: 0,
                reply,
            })
            .map_err(|_| StateError::WriterStopped)?;
        drop(guard);
        receiver.recv().map_err(|_| StateError::WriterStopped)?
    }

    fn flush(&self) -> Result<(), StateError> {
        let guard = self.sender.read().map_err(|_| StateError::WriterStopped)?;
        let sender = guard.as_ref().ok_or(StateError::Closed)?;
        let (reply, receiver) = mpsc::sync_channel(1);
        sender
            .send(Command::Flush { reply })
            .map_err(|_| StateError::WriterStopped)?;
        drop(guard);
        receiver.recv().map_err(|_| StateError::WriterStopped)?
    }

    /// `subjects` counts the user records in the database (a read transaction; a user's
    /// record is written by the lease commit that comes before its first accepted charge, so
    /// an accepted charge's user is always counted; a user whose only charges were of zero
    /// rho took no lease and has none). `rho_charged` is the file's counter as it was when
    /// the ledger opened plus every charge accepted since, from memory: charges whose answers
    /// are not yet written are included, unused lease blocks are not.
    ///
    /// The counter in the file follows the writer: a batch that takes answers from the queue
    /// adds their rho in its database transaction (a batch of answers alone, which has none,
    /// passes it on to the next, due within `answer_interval`). A clean close or
    /// [`flush`](BudgetLedger::flush) leaves it equal to the figure reported here. **After a
    /// crash** it misses exactly the accepted charges whose answers no fsynced writer commit
    /// had taken yet: the answers still waiting in memory (whose replay records the crash
    /// loses too) and those appended to the log since the last fsynced database commit; in
    /// either case charges of about the last `2 * answer_interval` (100 ms by default). It
    /// never counts a charge twice or a lease block that no answer used; a crash thus
    /// lowers it below the sum of the durable spends (which include the wasted leases).
    fn totals(&self) -> Result<LedgerTotals, StateError> {
        let guard = self.sender.read().map_err(|_| StateError::WriterStopped)?;
        guard.as_ref().ok_or(StateError::Closed)?;
        let accepted = lock(&self.shared.queue)?.accepted_rho;
        let stored = read_totals(&self.shared.database)?;
        Ok(LedgerTotals {
            subjects: stored.subjects,
            rho_charged: Rho::from_nano(self.shared.rho_at_open.saturating_add(accepted)),
        })
    }

    /// Returns the unused rest of every lease, writes every stored answer, and stops.
    fn close(&self) -> Result<(), StateError> {
        // Waits for charges in flight (they hold the read lock).
        let sender = self
            .sender
            .write()
            .map_err(|_| StateError::WriterStopped)?
            .take();
        let Some(sender) = sender else {
            return Ok(());
        };
        for shard in &self.users {
            let mut shard = lock(shard)?;
            for (pseudonym, entry) in shard.drain() {
                let mut user = lock(&entry)?;
                user.absorb_renewal(true);
                retire(&mut user, &pseudonym, &sender);
            }
        }
        let (reply, receiver) = mpsc::sync_channel(1);
        let flushed = sender
            .send(Command::Flush { reply })
            .map_err(|_| StateError::WriterStopped)
            .and_then(|()| receiver.recv().map_err(|_| StateError::WriterStopped)?);
        drop(sender);
        let joined = match lock(&self.writer)?.take() {
            Some(handle) => handle.join().map_err(|_| StateError::WriterStopped),
            None => Ok(()),
        };
        flushed.and(joined)
    }
}

#[cfg(test)]
impl LeasedLedger {
    /// Stops like a crash: the writer exits without writing the answers still waiting and
    /// no lease is returned. The database stays consistent (what a kill -9 leaves).
    pub(crate) fn abandon(&self) {
        if let Ok(mut guard) = self.sender.write()
            && let Some(sender) = guard.take()
        {
            let _ = sender.send(Command::Abandon);
        }
        if let Ok(mut writer) = self.writer.lock()
            && let Some(handle) = writer.take()
        {
            let _ = handle.join();
        }
        for shard in &self.users {
            if let Ok(mut shard) = shard.lock() {
                shard.clear();
            }
        }
    }
}

impl Drop for LeasedLedger {
    fn drop(&mut self) {
        // Returns leases and writes the waiting answers; a failure here only wastes budget
        // or loses answers for retries (both safe), and there is no caller to tell.
        let _ = self.close();
    }
}

/// A command's result waiting for the batch to commit.
enum Pending {
    Lease(Result<LeaseGrant, StateError>),
    Prune(u64),
    Done,
}

impl WriterCommand for Command {
    type Applied = Pending;

    fn apply(
        &self,
        database: &StateDatabase,
        tables: &mut LedgerTables<'_>,
    ) -> Result<Pending, StateError> {
        Ok(match self {
            Command::Lease {
                pseudonym,
                params,
                need,
                desired,
                ..
            } => Pending::Lease(apply_lease(
                database, tables, pseudonym, params, *need, *desired,
            )?),
            Command::Return {
                pseudonym,
                window_start_ms,
                amount,
            } => {
                apply_return(database, tables, pseudonym, *window_start_ms, *amount)?;
                Pending::Done
            }
            Command::Prune {
                cutoff_ms,
                from_log,
                ..
            } => {
                Pending::Prune(from_log + prune_answers(database, tables, *cutoff_ms, usize::MAX)?)
            }
            _ => Pending::Done,
        })
    }

    fn reply(self, outcome: Result<Pending, StateError>) {
        match (self, outcome) {
            (Command::Lease { reply, .. }, Ok(Pending::Lease(result))) => {
                let _ = reply.send(result);
            }
            // Fail closed: no lease was granted.
            (Command::Lease { reply, .. }, Err(error)) => {
                let _ = reply.send(Err(error));
            }
            (Command::Prune { reply, .. }, Ok(Pending::Prune(pruned))) => {
                let _ = reply.send(Ok(pruned));
            }
            (Command::Prune { reply, .. }, Err(error)) => {
                let _ = reply.send(Err(error));
            }
            (Command::Flush { reply }, outcome) => {
                let _ = reply.send(outcome.map(|_| ()));
            }
            // Returns need no reply; an unpaired command's reply channel is dropped, which
            // its caller sees as WriterStopped (fail closed).
            _ => {}
        }
    }
}

impl Command {
    /// Whether a caller waits for this command's commit (renewals asked for ahead of need
    /// and returned leases do not).
    fn is_urgent(&self) -> bool {
        !matches!(
            self,
            Command::Lease { urgent: false, .. } | Command::Return { .. }
        )
    }
}

/// Keeps a command for the next commit; `false` means stop now (the tests' abandon).
fn take(command: Command, commands: &mut Vec<Command>) -> bool {
    match command {
        Command::Wake => {}
        #[cfg(test)]
        Command::Abandon => return false,
        other => commands.push(other),
    }
    true
}

/// How often the writer compares the stored answers with [`LeaseOptions::max_stored_answers`].
const SIZE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The writer thread. Each commit takes every waiting command (leases first of all) and up
/// to `answer_batch` waiting answers (at most [`ANSWERS_WITH_LEASES`] when a caller waits
/// for it, all of them for a flush or prune). Renewals asked for ahead of need wait up to
/// [`MAX_RENEWAL_DELAY`] for an fsync that is due anyway. Commits with a
/// command are fsynced; commits of answers alone are fsynced only if the last fsync is older
/// than `answer_interval`, and an fsync follows within that interval in any case.
fn run_writer(shared: &Shared, receiver: &Receiver<Command>, options: &LeaseOptions) {
    let interval = options.answer_interval;
    let renewal_delay = interval.min(MAX_RENEWAL_DELAY);
    // Commands waiting for the next commit (renewals held back until their delay is over).
    let mut commands: Vec<Command> = Vec::new();
    // Answers taken from the queue whose commit failed; retried first.
    let mut retry: Vec<Arc<PendingAnswer>> = Vec::new();
    let mut auto_prune = AutoPrune::new();
    let mut last_size_check = Instant::now();
    let mut counts = Counts::default();
    let mut last_fsync = Instant::now();
    // Some commit since the last fsync was not fsynced.
    let mut unsynced = false;
    let mut disconnected = false;
    loop {
        if !disconnected {
            let queued_since = shared.queue.lock().ok().and_then(|queue| queue.since);
            let mut wait =
                queued_since.map_or(interval, |since| interval.saturating_sub(since.elapsed()));
            if unsynced || !retry.is_empty() {
                wait = wait.min(interval.saturating_sub(last_fsync.elapsed()));
            }
            if !commands.is_empty() {
                // Held renewals: commit them when their delay is over.
                wait = wait.min(renewal_delay.saturating_sub(last_fsync.elapsed()));
            }
            match receiver.recv_timeout(wait) {
                Ok(command) => {
                    if !take(command, &mut commands) {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => disconnected = true,
            }
        }
        while !disconnected && commands.len() < options.store.max_batch {
            match receiver.try_recv() {
                Ok(command) => {
                    if !take(command, &mut commands) {
                        return;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => disconnected = true,
            }
        }
        let take_all = disconnected
            || commands
                .iter()
                .any(|command| matches!(command, Command::Flush { .. } | Command::Prune { .. }));
        // Renewals asked for ahead of need (and returned leases) ride the next fsync that is
        // due anyway, at most `renewal_delay` after the last one, instead of forcing one each:
        // their users still hold half a block. A command a caller waits for commits at once.
        let urgent = commands.iter().any(Command::is_urgent);
        let held = if !urgent && !disconnected && last_fsync.elapsed() < renewal_delay {
            std::mem::take(&mut commands)
        } else {
            Vec::new()
        };
        let mut answers = std::mem::take(&mut retry);
        if let Ok(mut queue) = shared.queue.lock() {
            let due = !commands.is_empty()
                || take_all
                || !answers.is_empty()
                || queue.answers.len() >= options.answer_batch
                || queue.since.is_some_and(|since| since.elapsed() >= interval);
            if due {
                // A commit that a charge waits for carries few answers.
                let batch = if urgent {
                    options.answer_batch.min(ANSWERS_WITH_LEASES)
                } else {
                    options.answer_batch
                };
                let count = if take_all {
                    queue.answers.len()
                } else {
                    queue.answers.len().min(batch.saturating_sub(answers.len()))
                };
                for answer in queue.answers.drain(..count) {
                    // Counted once, when taken (a failed write retries it from `retry`).
                    counts.rho = counts.rho.saturating_add(answer.record.rho);
                    answers.push(answer);
                }
                queue.since = if queue.answers.is_empty() {
                    None
                } else {
                    Some(Instant::now())
                };
            }
        }
        shared.drained.notify_all();
        let fsync_due = unsynced && last_fsync.elapsed() >= interval;
        if commands.is_empty() && answers.is_empty() && !fsync_due {
            commands = held;
            if disconnected {
                break;
            }
            continue;
        }
        let immediate = !commands.is_empty()
            || disconnected
            || last_fsync.elapsed() >= interval
            || answers.is_empty();
        let mut prune = auto_prune.due(&options.store);
        if last_size_check.elapsed() >= SIZE_CHECK_INTERVAL {
            last_size_check = Instant::now();
            if let Ok(Some(cutoff_ms)) = shared.log.cutoff_to_keep(options.max_stored_answers) {
                // The later cutoff of the two: retention's and the bound's.
                let retention_cutoff = prune.map_or(0, |(cutoff, _)| cutoff);
                if cutoff_ms > retention_cutoff {
                    prune = Some((cutoff_ms, options.store.prune_limit));
                    shared.stats.early_prunings.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let committed = commit_batch(
            shared,
            &answers,
            &mut commands,
            &mut counts,
            prune,
            immediate,
        );
        // `commit_batch` replied to and emptied `commands`; the held ones wait on.
        commands = held;
        if committed {
            if immediate {
                last_fsync = Instant::now();
                unsynced = false;
            } else {
                unsynced = true;
            }
        } else {
            // Retry the answers (they stay readable in memory meanwhile); back off one
            // interval so that a failing disk is not hammered.
            retry = answers;
            last_fsync = Instant::now();
            if disconnected {
                break;
            }
        }
        let queue_empty = shared
            .queue
            .lock()
            .map_or(true, |queue| queue.answers.is_empty());
        if disconnected && queue_empty && retry.is_empty() {
            break;
        }
    }
}

/// Answers written per user and window whose count is not yet in the database, and when the
/// oldest of them was counted; and the rho of the answers taken from the queue that is not
/// yet in the database's charged-rho counter.
#[derive(Default)]
struct Counts {
    pending: HashMap<(Pseudonym, u64), u64>,
    since: Option<Instant>,
    /// Nano-rho (saturating), added to the counter by the next database transaction.
    rho: u64,
}

/// How long a written answer's count may wait for its user's next lease or return before
/// all waiting counts are written (a user's record is written with its leases anyway; this
/// bounds how stale `UserSpend::charges` of a user not in memory can be).
const COUNT_INTERVAL: Duration = Duration::from_secs(1);

/// Appends `answers` to the answer log (fsynced when `immediate`), removes them from memory,
/// then applies `commands` and the answers' counts in one transaction and commits it; replies
/// and empties `commands`. Returns whether the answers were written (if not, they stay
/// readable in memory for a retry). Counts whose commit failed wait in `counts`.
fn commit_batch(
    shared: &Shared,
    answers: &[Arc<PendingAnswer>],
    commands: &mut Vec<Command>,
    counts: &mut Counts,
    auto_prune: Option<(u64, usize)>,
    immediate: bool,
) -> bool {
    let database = &shared.database;
    let log = &shared.log;
    let started = Instant::now();
    let mut written = log.append(
        answers
            .iter()
            .map(|answer| (answer.key.as_slice(), &answer.record)),
    );
    if immediate && written.is_ok() {
        written = log.sync();
    }
    let written = written.is_ok();
    if written {
        for answer in answers {
            *counts
                .pending
                .entry((answer.pseudonym, answer.window_start_ms))
                .or_default() += 1;
        }
        if !answers.is_empty() && counts.since.is_none() {
            counts.since = Some(Instant::now());
        }
        // Written: memory may now forget the answers (lookups find them in the log).
        for answer in answers {
            if let Ok(mut shard) = shared.answer_shard(&answer.pseudonym).lock()
                && shard
                    .get(&answer.key)
                    .is_some_and(|held| Arc::ptr_eq(held, answer))
            {
                shard.remove(&answer.key);
            }
        }
    }
    for command in commands.iter_mut() {
        if let Command::Prune {
            cutoff_ms,
            from_log,
            ..
        } = command
        {
            // A failure only keeps answers longer (the next pruning tries again).
            *from_log = log.prune(*cutoff_ms, usize::MAX).unwrap_or(0);
        }
    }
    if let Some((cutoff_ms, limit)) = auto_prune {
        let _ = log.prune(cutoff_ms, limit);
    }
    let stats = &shared.stats;
    if commands.is_empty() && !immediate && auto_prune.is_none() {
        // Answers alone: no database transaction. Their counts ride the next commit (a
        // command's, or the fsync due within `answer_interval`).
        count_wait(&stats.commits, &stats.writer_busy_us, started);
        if written {
            stats
                .answers_written
                .fetch_add(answers.len() as u64, Ordering::Relaxed);
        }
        return written;
    }
    // Counts go with their users' leases and returns in this batch; all of them when a
    // caller waits for everything (flush, prune, close) or the oldest waited long enough.
    let all = commands
        .iter()
        .any(|command| matches!(command, Command::Flush { .. } | Command::Prune { .. }))
        || counts
            .since
            .is_some_and(|since| since.elapsed() >= COUNT_INTERVAL);
    let mut due: Vec<((Pseudonym, u64), u64)> = if all {
        counts.pending.drain().collect()
    } else {
        let touched: HashSet<Pseudonym> = commands
            .iter()
            .filter_map(|command| match command {
                Command::Lease { pseudonym, .. } | Command::Return { pseudonym, .. } => {
                    Some(*pseudonym)
                }
                _ => None,
            })
            .collect();
        if touched.is_empty() {
            Vec::new()
        } else {
            counts
                .pending
                .extract_if(|(user, _), _| touched.contains(user))
                .collect()
        }
    };
    if counts.pending.is_empty() {
        counts.since = None;
    }
    let rho_due = counts.rho;
    let outcome = apply_batch(
        database,
        "commit leases and answer counts",
        immediate,
        commands,
        auto_prune,
        |tables| {
            tables.rho_charged = rho_due;
            count_answers(database, tables, &due)
        },
    );
    if outcome.is_ok() {
        counts.rho = counts.rho.saturating_sub(rho_due);
    } else {
        // Retried with a later commit.
        for (key, count) in due.drain(..) {
            *counts.pending.entry(key).or_default() += count;
        }
        if !counts.pending.is_empty() && counts.since.is_none() {
            counts.since = Some(Instant::now());
        }
    }
    count_wait(&stats.commits, &stats.writer_busy_us, started);
    if outcome.is_ok() && immediate {
        stats.fsynced_commits.fetch_add(1, Ordering::Relaxed);
    }
    if written {
        stats
            .answers_written
            .fetch_add(answers.len() as u64, Ordering::Relaxed);
    }
    reply_all(commands, outcome);
    written
}

/// The user's committed record inside the transaction; `Ok(Err(..))` for a corrupt record.
fn user_in(
    database: &StateDatabase,
    tables: &LedgerTables<'_>,
    pseudonym: &Pseudonym,
) -> Result<Result<Option<UserRecord>, StateError>, StateError> {
    use redb::ReadableTable;
    let guard = tables
        .users
        .get(pseudonym.as_bytes().as_slice())
        .map_err(|error| database.storage("read a user's spend", error))?;
    Ok(match guard {
        Some(guard) => decode_user(database, guard.value()).map(Some),
        None => Ok(None),
    })
}

fn write_user(
    database: &StateDatabase,
    tables: &mut LedgerTables<'_>,
    pseudonym: &Pseudonym,
    record: &UserRecord,
) -> Result<(), StateError> {
    tables
        .users
        .insert(pseudonym.as_bytes().as_slice(), record.encode().as_slice())
        .map_err(|error| database.storage("write a user's spend", error))?;
    Ok(())
}

/// Reserves a block in the user's open window (a new window if the stored one is over).
fn apply_lease(
    database: &StateDatabase,
    tables: &mut LedgerTables<'_>,
    pseudonym: &Pseudonym,
    params: &ChargeParams,
    need: u64,
    desired: u64,
) -> Result<Result<LeaseGrant, StateError>, StateError> {
    let existing = match user_in(database, tables, pseudonym)? {
        Ok(existing) => existing,
        Err(error) => return Ok(Err(error)),
    };
    let mut record = current_window(existing.as_ref(), params);
    let headroom = params.cap.saturating_sub(record.spent);
    let granted = if headroom < need {
        0
    } else {
        headroom.min(desired)
    };
    if granted > 0 {
        record.spent += granted;
        write_user(database, tables, pseudonym, &record)?;
    }
    Ok(Ok(LeaseGrant {
        window_start_ms: record.window_start_ms,
        granted,
        durable_spent: record.spent,
    }))
}

/// Gives back an unused block if its window is still the stored one.
fn apply_return(
    database: &StateDatabase,
    tables: &mut LedgerTables<'_>,
    pseudonym: &Pseudonym,
    window_start_ms: u64,
    amount: u64,
) -> Result<(), StateError> {
    if let Ok(Some(mut record)) = user_in(database, tables, pseudonym)?
        && record.window_start_ms == window_start_ms
    {
        record.spent = record.spent.saturating_sub(amount);
        write_user(database, tables, pseudonym, &record)?;
    }
    Ok(())
}

/// Counts written answers in their users' stored windows (one user record update per user
/// and window).
fn count_answers(
    database: &StateDatabase,
    tables: &mut LedgerTables<'_>,
    counts: &[((Pseudonym, u64), u64)],
) -> Result<(), StateError> {
    for &((pseudonym, window_start_ms), count) in counts {
        // A corrupt user record is reported by the next lease; the answers are still stored.
        if let Ok(Some(mut record)) = user_in(database, tables, &pseudonym)?
            && record.window_start_ms == window_start_ms
        {
            record.charges = record.charges.saturating_add(count);
            write_user(database, tables, &pseudonym, &record)?;
        }
    }
    Ok(())
}

#[cfg(test)]
impl LeasedLedger {
    /// Sweeps every shard now.
    pub(crate) fn sweep_all(&self, now: SystemTime) {
        let Ok(now_ms) = unix_millis(now, "now") else {
            return;
        };
        if let Ok(guard) = self.sender.read()
            && let Some(sender) = guard.as_ref()
        {
            for shard in 0..SHARDS {
                self.sweep(shard, now_ms, sender);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable_ledger::read_answer;
    use crate::ledger_contract::{at, request, user};

    /// The spent stored durably for `who` (leases included).
    fn durable_spent(database: &StateDatabase, who: &str) -> u64 {
        read_user(database, &user(who))
            .unwrap()
            .map_or(0, |record| record.spent)
    }

    fn charged(outcome: ChargeOutcome) -> u64 {
        match outcome {
            ChargeOutcome::Charged { spent, .. } => spent.as_nano(),
            other => panic!("{other:?}"),
        }
    }

    /// Blocks of `lease_charges` charges (the cap fraction is small), no renewing ahead.
    fn options(lease_charges: u64) -> LeaseOptions {
        LeaseOptions {
            lease_charges,
            lease_cap_fraction: 0.05,
            renew_below: 0.0,
            answer_interval: Duration::from_secs(3600),
            answer_batch: usize::MAX,
            max_unwritten_answers: usize::MAX,
            ..LeaseOptions::default()
        }
    }

    #[test]
    fn blocks_are_reserved_durably_before_charges_use_them() {
        let dir = tempfile::tempdir().unwrap();
        let database = StateDatabase::open(dir.path().join("state.redb")).unwrap();
        let ledger = database.leased_ledger(options(8)).unwrap();
        // Block = max(10 * 8, 1000 * 0.05) = 80.
        assert_eq!(
            charged(ledger.charge(&request("a", "0", 10, 1000, 0)).unwrap()),
            10
        );
        assert_eq!(durable_spent(&database, "a"), 80);
        let spend = ledger.spend(&user("a"), at(1)).unwrap();
        assert_eq!(
            (spend.spent, spend.leased_unused, spend.charges),
            (Rho::from_nano(10), Rho::from_nano(70), 1)
        );
        for index in 1..8 {
            ledger
                .charge(&request("a", &index.to_string(), 10, 1000, index))
                .unwrap();
            assert_eq!(durable_spent(&database, "a"), 80);
        }
        // The ninth charge needs a second block.
        assert_eq!(
            charged(ledger.charge(&request("a", "8", 10, 1000, 9)).unwrap()),
            90
        );
        assert_eq!(durable_spent(&database, "a"), 160);
        // A charge the rest of the block (70) covers needs no new block ...
        assert_eq!(
            charged(ledger.charge(&request("a", "9", 40, 1000, 10)).unwrap()),
            130
        );
        assert_eq!(durable_spent(&database, "a"), 160);
        // ... a larger one asks for a block of its own size (80 * 8 = 640).
        assert_eq!(
            charged(ledger.charge(&request("a", "10", 80, 1000, 11)).unwrap()),
            210
        );
        assert_eq!(durable_spent(&database, "a"), 160 + 640);
        ledger.close().unwrap();
        // Close returned the unused rest: the durable spent is what answers used.
        assert_eq!(durable_spent(&database, "a"), 210);
    }

    #[test]
    fn blocks_stop_at_the_cap_and_refusals_match_the_accounting_rule() {
        let dir = tempfile::tempdir().unwrap();
        let database = StateDatabase::open(dir.path().join("state.redb")).unwrap();
        let ledger = database.leased_ledger(options(8)).unwrap();
        for (index, spent) in [30, 60, 90].into_iter().enumerate() {
            let id = index.to_string();
            assert_eq!(
                charged(ledger.charge(&request("c", &id, 30, 100, 0)).unwrap()),
                spent
            );
            assert_eq!(durable_spent(&database, "c"), 100);
        }
        assert_eq!(
            ledger.charge(&request("c", "3", 30, 100, 1)).unwrap(),
            ChargeOutcome::Exceeded {
                spent: Rho::from_nano(90),
                remaining: Rho::from_nano(10),
            }
        );
        // The rest of the block still serves a charge that fits.
        assert_eq!(
            charged(ledger.charge(&request("c", "4", 10, 100, 2)).unwrap()),
            100
        );
        assert_eq!(durable_spent(&database, "c"), 100);
    }

    #[test]
    fn a_new_window_takes_a_new_block_and_the_old_rest_is_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let database = StateDatabase::open(dir.path().join("state.redb")).unwrap();
        let ledger = database.leased_ledger(options(1)).unwrap();
        // Block = max(60, 100 * 0.05) = 60, then 50.
        assert_eq!(
            charged(ledger.charge(&request("w", "1", 60, 100, 0)).unwrap()),
            60
        );
        assert_eq!(
            charged(ledger.charge(&request("w", "2", 1, 100, 1)).unwrap()),
            61
        );
        assert_eq!(
            charged(ledger.charge(&request("w", "3", 50, 100, 3600)).unwrap()),
            50
        );
        let stored = read_user(&database, &user("w")).unwrap().unwrap();
        assert_eq!(
            stored.window_start_ms,
            unix_millis(at(3600), "now").unwrap()
        );
        assert_eq!(stored.spent, 50);
        let spend = ledger.spend(&user("w"), at(3601)).unwrap();
        assert_eq!(
            (spend.spent, spend.leased_unused),
            (Rho::from_nano(50), Rho::ZERO)
        );
    }

    #[test]
    fn new_request_ids_need_no_read_and_replays_are_found_in_memory_in_the_log_and_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let database = StateDatabase::open(dir.path().join("state.redb")).unwrap();
        {
            let ledger = database.leased_ledger(options(10)).unwrap();
            ledger.charge(&request("n", "old", 10, 1000, 0)).unwrap();
            ledger.close().unwrap();
        }
        let replayed = |outcome: ChargeOutcome| matches!(outcome, ChargeOutcome::Replayed { .. });
        for round in 0..2_u64 {
            let ledger = database.leased_ledger(options(10)).unwrap();
            assert_eq!(ledger.recovery().answers, 1 + 50 * round);
            let t = 10 * round;
            // An answer written by an earlier run replays (one read of the log).
            assert!(replayed(
                ledger.charge(&request("n", "old", 10, 1000, t)).unwrap()
            ));
            assert_eq!(ledger.stats().answer_reads, 1);
            let fresh = format!("fresh-{round}");
            for index in 0..50 {
                ledger
                    .charge(&request("n", &format!("{fresh}-{index}"), 1, 1000, t + 1))
                    .unwrap();
            }
            assert_eq!(
                ledger.stats().answer_reads,
                1,
                "a new request id was read from the log"
            );
            // Replays of an answer in memory, then of the same answer once written.
            let id = format!("{fresh}-7");
            assert!(replayed(
                ledger.charge(&request("n", &id, 1, 1000, t + 2)).unwrap()
            ));
            ledger.flush().unwrap();
            assert!(
                ledger
                    .shared
                    .pending_answer(&user("n"), &answer_key(&user("n"), &id))
                    .is_none()
            );
            let before = ledger.stats().answer_reads;
            assert!(replayed(
                ledger.charge(&request("n", &id, 1, 1000, t + 3)).unwrap()
            ));
            assert_eq!(ledger.stats().answer_reads, before + 1);
            assert_eq!(
                ledger.lookup(&user("n"), &id).unwrap().unwrap().answer,
                format!("answer to {id}").into_bytes()
            );
            ledger.close().unwrap();
        }
        // After a restart, every answer of both rounds replays from the log.
        let ledger = database.leased_ledger(options(10)).unwrap();
        assert_eq!(ledger.recovery().answers, 101);
        assert!(replayed(
            ledger
                .charge(&request("n", "fresh-1-49", 1, 1000, 30))
                .unwrap()
        ));
    }

    #[test]
    fn a_crash_wastes_the_unused_lease_and_forgets_unwritten_answers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let database = StateDatabase::open(&path).unwrap();
            let ledger = database.leased_ledger(options(10)).unwrap();
            ledger
                .charge(&request("k", "written", 10, 1000, 0))
                .unwrap();
            ledger.flush().unwrap();
            ledger
                .charge(&request("k", "unwritten", 10, 1000, 1))
                .unwrap();
            // Both answers replay while the process lives.
            assert!(ledger.lookup(&user("k"), "unwritten").unwrap().is_some());
            ledger.abandon();
        }
        let database = StateDatabase::open_existing(&path).unwrap();
        // The block (10 * 10) was durable before the first answer: nothing was lost.
        assert_eq!(durable_spent(&database, "k"), 100);
        let ledger = database.leased_ledger(options(10)).unwrap();
        let spend = ledger.spend(&user("k"), at(2)).unwrap();
        assert_eq!(
            (spend.spent, spend.leased_unused),
            (Rho::from_nano(100), Rho::ZERO)
        );
        // A written answer replays; an unwritten one is charged again with a new answer.
        assert!(matches!(
            ledger
                .charge(&request("k", "written", 10, 1000, 3))
                .unwrap(),
            ChargeOutcome::Replayed { .. }
        ));
        let mut retry = request("k", "unwritten", 10, 1000, 4);
        retry.answer = b"new answer".to_vec();
        assert_eq!(charged(ledger.charge(&retry).unwrap()), 110);
        assert_eq!(
            ledger
                .lookup(&user("k"), "unwritten")
                .unwrap()
                .unwrap()
                .answer,
            b"new answer"
        );
        assert_eq!(durable_spent(&database, "k"), 200);
    }

    #[test]
    fn a_crash_loses_from_the_totals_only_charges_no_commit_had_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let database = StateDatabase::open(&path).unwrap();
            let ledger = database.leased_ledger(options(10)).unwrap();
            ledger.charge(&request("t", "written", 7, 1000, 0)).unwrap();
            ledger.charge(&request("u", "written", 3, 1000, 0)).unwrap();
            ledger.flush().unwrap();
            ledger
                .charge(&request("t", "unwritten", 5, 1000, 1))
                .unwrap();
            // In memory: every accepted charge, none of the leases' unused rest.
            let expected = LedgerTotals {
                subjects: 2,
                rho_charged: Rho::from_nano(15),
            };
            assert_eq!(ledger.totals().unwrap(), expected);
            ledger.abandon();
        }
        let database = StateDatabase::open_existing(&path).unwrap();
        // The leases (70 and 50) were durable; the counter holds the flushed charges only.
        assert_eq!(durable_spent(&database, "t"), 70);
        let ledger = database.leased_ledger(options(10)).unwrap();
        let expected = LedgerTotals {
            subjects: 2,
            rho_charged: Rho::from_nano(10),
        };
        assert_eq!(ledger.totals().unwrap(), expected);
        // The lost answer's retry is a new charge, counted again.
        ledger
            .charge(&request("t", "unwritten", 5, 1000, 2))
            .unwrap();
        ledger.close().unwrap();
        let ledger = database.leased_ledger(options(10)).unwrap();
        assert_eq!(ledger.totals().unwrap().rho_charged, Rho::from_nano(15));
    }

    #[test]
    fn idle_users_leave_memory_and_return_their_lease() {
        let dir = tempfile::tempdir().unwrap();
        let database = StateDatabase::open(dir.path().join("state.redb")).unwrap();
        let ledger = database
            .leased_ledger(LeaseOptions {
                idle_eviction: Duration::ZERO,
                ..options(10)
            })
            .unwrap();
        ledger.charge(&request("i", "1", 10, 1000, 0)).unwrap();
        assert_eq!(durable_spent(&database, "i"), 100);
        ledger.sweep_all(at(1));
        ledger.flush().unwrap();
        assert_eq!(durable_spent(&database, "i"), 10);
        let spend = ledger.spend(&user("i"), at(2)).unwrap();
        assert_eq!(
            (spend.spent, spend.leased_unused, spend.charges),
            (Rho::from_nano(10), Rho::ZERO, 1)
        );
        // The user comes back: loaded from the file, a new block.
        assert_eq!(
            charged(ledger.charge(&request("i", "2", 10, 1000, 3)).unwrap()),
            20
        );
        assert_eq!(durable_spent(&database, "i"), 110);
        assert!(matches!(
            ledger.charge(&request("i", "1", 10, 1000, 4)).unwrap(),
            ChargeOutcome::Replayed { .. }
        ));
    }

    #[test]
    fn concurrent_charges_with_renewals_ahead_stay_covered() {
        let dir = tempfile::tempdir().unwrap();
        let database = StateDatabase::open(dir.path().join("state.redb")).unwrap();
        let ledger = Arc::new(
            database
                .leased_ledger(LeaseOptions {
                    lease_charges: 4,
                    lease_cap_fraction: 0.0,
                    renew_below: 0.75,
                    answer_batch: 16,
                    answer_interval: Duration::from_millis(1),
                    ..LeaseOptions::default()
                })
                .unwrap(),
        );
        let names = ["u0", "u1", "u2"];
        let accepted: Vec<AtomicU64> = names.iter().map(|_| AtomicU64::new(0)).collect();
        std::thread::scope(|scope| {
            for thread in 0..6 {
                let (ledger, accepted) = (&ledger, &accepted);
                scope.spawn(move || {
                    for index in 0..60_usize {
                        let slot = (index + thread) % names.len();
                        let id = format!("{thread}-{index}");
                        // Cap 1000: at most 142 charges of 7 per user fit; 120 are tried.
                        let cap = if slot == 0 { 300 } else { 1000 };
                        let outcome = ledger
                            .charge(&request(names[slot], &id, 7, cap, 0))
                            .unwrap();
                        if let ChargeOutcome::Charged { spent, .. } = outcome {
                            assert!(spent.as_nano() <= cap);
                            accepted[slot].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        ledger.flush().unwrap();
        for (slot, name) in names.iter().enumerate() {
            let count = accepted[slot].load(Ordering::Relaxed);
            let expected = if slot == 0 { 300 / 7 } else { 120 };
            assert_eq!(count, expected, "{name}");
            let spend = ledger.spend(&user(name), at(1)).unwrap();
            assert_eq!(spend.spent.as_nano(), 7 * count, "{name}");
            assert_eq!(spend.charges, count, "{name}");
            // The durable record covers every answer and the lease (and maybe a renewal in
            // flight).
            assert!(
                durable_spent(&database, name)
                    >= spend.spent.as_nano() + spend.leased_unused.as_nano(),
                "{name}"
            );
        }
        ledger.close().unwrap();
        for (slot, name) in names.iter().enumerate() {
            let count = accepted[slot].load(Ordering::Relaxed);
            assert_eq!(durable_spent(&database, name), 7 * count, "{name}");
            let record = read_user(&database, &user(name)).unwrap().unwrap();
            assert_eq!(record.charges, count, "{name}");
        }
    }

    #[test]
    fn answers_outrunning_the_writer_wait_and_are_all_written() {
        let dir = tempfile::tempdir().unwrap();
        let database = StateDatabase::open(dir.path().join("state.redb")).unwrap();
        let ledger = database
            .leased_ledger(LeaseOptions {
                answer_batch: 4,
                max_unwritten_answers: 4,
                answer_interval: Duration::from_millis(1),
                ..options(64)
            })
            .unwrap();
        for index in 0..100 {
            ledger
                .charge(&request("q", &index.to_string(), 1, 1000, index))
                .unwrap();
            let queued = ledger.shared.queue.lock().unwrap().answers.len();
            assert!(queued <= 4, "{queued} answers waiting");
        }
        ledger.flush().unwrap();
        for index in 0..100 {
            let key = answer_key(&user("q"), &index.to_string());
            assert!(ledger.shared.pending_answer(&user("q"), &key).is_none());
            let stored = ledger.shared.log.get(&key).unwrap();
            assert_eq!(
                stored.unwrap().answer,
                format!("answer to {index}").into_bytes()
            );
        }
        assert_eq!(
            read_user(&database, &user("q")).unwrap().unwrap().charges,
            100
        );
    }

    #[test]
    fn answers_in_the_database_table_replay_and_either_ledger_replays_the_others_answers() {
        let dir = tempfile::tempdir().unwrap();
        let database = StateDatabase::open(dir.path().join("state.redb")).unwrap();
        let replayed = |outcome: ChargeOutcome| matches!(outcome, ChargeOutcome::Replayed { .. });
        // What an older version (or the per-charge ledger) left: answers in the
        // `ledger_answers` table.
        {
            let durable = database.ledger(LedgerOptions::default()).unwrap();
            for index in 0..3 {
                durable
                    .charge(&request("m", &format!("r{index}"), 10, 1000, index))
                    .unwrap();
            }
            durable.close().unwrap();
        }
        {
            let ledger = database.leased_ledger(options(10)).unwrap();
            assert_eq!(ledger.recovery().database_answers, 3);
            match ledger.charge(&request("m", "r1", 10, 1000, 5)).unwrap() {
                ChargeOutcome::Replayed { answer, spent, .. } => {
                    assert_eq!(answer, b"answer to r1");
                    assert_eq!(spent, Rho::from_nano(30));
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(ledger.stats().answer_reads, 1);
            // A new request id is known to be new without a read.
            assert_eq!(
                charged(ledger.charge(&request("m", "leased", 10, 1000, 6)).unwrap()),
                40
            );
            assert_eq!(ledger.stats().answer_reads, 1);
            ledger.close().unwrap();
        }
        // The table is left as it was: the per-charge ledger replays its own answers and
        // the leased ledger's (from the log).
        assert!(read_answer(&database, &user("m"), "r1").unwrap().is_some());
        {
            let durable = database.ledger(LedgerOptions::default()).unwrap();
            assert!(replayed(
                durable.charge(&request("m", "r0", 10, 1000, 7)).unwrap()
            ));
            assert!(replayed(
                durable
                    .charge(&request("m", "leased", 10, 1000, 7))
                    .unwrap()
            ));
            assert!(durable.lookup(&user("m"), "leased").unwrap().is_some());
            durable.close().unwrap();
        }
        let ledger = database.leased_ledger(options(10)).unwrap();
        assert_eq!(
            (
                ledger.recovery().database_answers,
                ledger.recovery().answers
            ),
            (3, 1)
        );
        assert!(ledger.lookup(&user("m"), "r2").unwrap().is_some());
        // Pruning counts each answer once, wherever it is (charged at 0, 1, 2 and 6 s).
        assert_eq!(ledger.prune(at(2)).unwrap(), 2);
        assert_eq!(ledger.lookup(&user("m"), "r0").unwrap(), None);
        assert_eq!(read_answer(&database, &user("m"), "r0").unwrap(), None);
        assert!(ledger.lookup(&user("m"), "r2").unwrap().is_some());
        assert_eq!(ledger.prune(at(7)).unwrap(), 2);
        assert_eq!(ledger.lookup(&user("m"), "leased").unwrap(), None);
    }

    #[test]
    fn a_torn_answer_log_tail_is_cut_and_its_retry_is_charged_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let segment = {
            let database = StateDatabase::open(&path).unwrap();
            let ledger = database.leased_ledger(options(10)).unwrap();
            ledger.charge(&request("t", "whole", 10, 1000, 0)).unwrap();
            ledger.flush().unwrap();
            ledger.charge(&request("t", "torn", 10, 1000, 1)).unwrap();
            ledger.flush().unwrap();
            let segment = ledger.shared.log.active_segment_path();
            ledger.abandon();
            segment
        };
        // The crash interrupted the last write: its last bytes never reached the disk.
        let length = std::fs::metadata(&segment).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap()
            .set_len(length - 3)
            .unwrap();
        let database = StateDatabase::open_existing(&path).unwrap();
        let ledger = database.leased_ledger(options(10)).unwrap();
        let recovery = ledger.recovery().clone();
        assert_eq!(recovery.answers, 1, "{recovery:?}");
        assert!(recovery.truncated_bytes > 0, "{recovery:?}");
        assert_eq!(recovery.messages.len(), 1, "{recovery:?}");
        assert!(matches!(
            ledger.charge(&request("t", "whole", 10, 1000, 2)).unwrap(),
            ChargeOutcome::Replayed { .. }
        ));
        // Both charges were covered by the block fsynced before them (100); the retry of
        // the lost answer is a new charge (never a refund).
        assert_eq!(durable_spent(&database, "t"), 100);
        assert_eq!(
            charged(ledger.charge(&request("t", "torn", 10, 1000, 3)).unwrap()),
            110
        );
    }

    #[test]
    fn retention_drops_old_answers_and_whole_segments() {
        let dir = tempfile::tempdir().unwrap();
        let database = StateDatabase::open(dir.path().join("state.redb")).unwrap();
        let ledger = database.leased_ledger(options(64)).unwrap();
        for index in 0..4 {
            ledger
                .charge(&request("r", &format!("old{index}"), 1, 1000, index))
                .unwrap();
        }
        ledger.flush().unwrap();
        ledger.shared.log.seal().unwrap();
        ledger.charge(&request("r", "new", 1, 1000, 100)).unwrap();
        ledger.flush().unwrap();
        assert_eq!(ledger.shared.log.segment_count(), 2);
        assert_eq!(ledger.prune(at(50)).unwrap(), 4);
        assert_eq!(ledger.shared.log.segment_count(), 1);
        assert_eq!(ledger.lookup(&user("r"), "old0").unwrap(), None);
        assert!(ledger.lookup(&user("r"), "new").unwrap().is_some());
        // A retry of a pruned answer is a new charge.
        assert_eq!(
            charged(ledger.charge(&request("r", "old0", 1, 1000, 101)).unwrap()),
            6
        );
    }

    #[test]
    fn beyond_max_stored_answers_the_oldest_are_pruned_early() {
        let dir = tempfile::tempdir().unwrap();
        let database = StateDatabase::open(dir.path().join("state.redb")).unwrap();
        // At most 8 answers: segments are sealed at 1 record, so pruning is exact here.
        let ledger = database
            .leased_ledger(LeaseOptions {
                max_stored_answers: 8,
                ..options(64)
            })
            .unwrap();
        for index in 0..20 {
            ledger
                .charge(&request("m", &format!("a{index}"), 1, 1000, index))
                .unwrap();
            ledger.flush().unwrap();
        }
        assert_eq!(ledger.shared.log.indexed().unwrap(), 20);
        // The writer compares at most once a second, on its next batch.
        std::thread::sleep(SIZE_CHECK_INTERVAL + Duration::from_millis(100));
        ledger.charge(&request("m", "a20", 1, 1000, 20)).unwrap();
        ledger.flush().unwrap();
        ledger.flush().unwrap();
        assert!(ledger.stats().early_prunings >= 1);
        assert!(ledger.shared.log.indexed().unwrap() <= 8 + 1);
        assert_eq!(ledger.lookup(&user("m"), "a0").unwrap(), None);
        assert!(ledger.lookup(&user("m"), "a20").unwrap().is_some());
        assert!(ledger.lookup(&user("m"), "a19").unwrap().is_some());
        // A retry of an answer pruned early is charged again (never a refund).
        assert_eq!(
            charged(ledger.charge(&request("m", "a0", 1, 1000, 21)).unwrap()),
            22
        );
    }

    #[test]
    fn options_out_of_range_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let database = StateDatabase::open(dir.path().join("state.redb")).unwrap();
        let refused = |options: LeaseOptions| match database.leased_ledger(options) {
            Err(StateError::InvalidArgument { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            refused(LeaseOptions {
                lease_cap_fraction: 1.5,
                ..LeaseOptions::default()
            }),
            "lease_cap_fraction"
        );
        assert_eq!(
            refused(LeaseOptions {
                renew_below: f64::NAN,
                ..LeaseOptions::default()
            }),
            "renew_below"
        );
        assert_eq!(
            refused(LeaseOptions {
                lease_charges: 0,
                ..LeaseOptions::default()
            }),
            "lease_charges"
        );
        assert_eq!(
            refused(LeaseOptions {
                max_stored_answers: 0,
                ..LeaseOptions::default()
            }),
            "max_stored_answers"
        );
        assert_eq!(
            refused(LeaseOptions {
                answer_batch: 0,
                ..LeaseOptions::default()
            }),
            "answer_batch"
        );
        assert_eq!(
            refused(LeaseOptions {
                answer_batch: 100,
                max_unwritten_answers: 99,
                ..LeaseOptions::default()
            }),
            "max_unwritten_answers"
        );
    }

    #[test]
    fn block_sizes_follow_the_options() {
        let options = LeaseOptions {
            lease_charges: 32,
            lease_cap_fraction: 0.05,
            renew_below: 0.0,
            ..LeaseOptions::default()
        };
        assert_eq!(options.block(10, 1000), 320);
        assert_eq!(options.block(1, 1_000_000), 50_000);
        assert_eq!(options.block(u64::MAX, 10), u64::MAX);
        assert_eq!(options.block(0, 0), 0);
        assert_eq!(options.renew_threshold(320), 0);
        let renewing = LeaseOptions {
            renew_below: 0.5,
            ..options
        };
        assert_eq!(renewing.renew_threshold(320), 160);
    }
}
