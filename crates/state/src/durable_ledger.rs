//! The durable [`BudgetLedger`]: charges are group-committed to the state database by one
//! writer thread, and each caller returns only after its batch's commit is fsynced.
//!
//! # Group commit
//!
//! Callers hand their charge to the writer thread over a channel and block on a reply. The
//! writer takes every charge waiting in the channel (up to [`LedgerOptions::max_batch`]),
//! applies them in order inside one write transaction (later charges see earlier ones, so
//! concurrent charges for one user can never exceed the cap), commits with an fsync, and
//! only then replies to each caller. While one batch is being fsynced the next one queues,
//! so under load the fsync cost is shared by many requests, and at low load a charge costs
//! one transaction. If the transaction or the commit fails, every caller in the batch gets
//! the error (fail closed: nothing in the batch may be released).
//!
//! # Cost
//!
//! A charge costs one commit's fsync at low load and a share of one under load: the added
//! latency is between one and two fsyncs of the disk holding the file (the batch in flight,
//! then the caller's own). Throughput is about `concurrent callers / fsync time`, so it grows
//! with load. Measured in `benches/benches/state.rs` on a shared, heavily loaded 2-core VM
//! (raw fdatasync 0.3-3 ms): 6.5 ms per charge from one thread, about 1,400 charges/s from 16
//! closed-loop threads (bounded by 16 / commit time), versus 4.5 us for
//! [`InMemoryLedger`](crate::InMemoryLedger).
//! On such a disk the 10%-of-Rank-latency target needs a faster disk (NVMe fsync is ~50 us)
//! or leased budget blocks: [`LeasedLedger`](crate::LeasedLedger) takes one fsync per block
//! of charges and meets the target on the same disk.

use std::fmt;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use redb::{ReadableTable, Table};

use crate::answer_log::{AnswerLog, log_dir};
use crate::database::{
    LEDGER_ANSWER_TIMES, LEDGER_ANSWERS, LEDGER_USERS, StateDatabase, read_totals,
};
use crate::error::StateError;
use crate::ledger::{
    BudgetLedger, ChargeOutcome, ChargeParams, ChargeRequest, Decision, LedgerTotals,
    RequestRecord, StoredAnswer, UserRecord, UserSpend, decide, replay, unix_millis,
};
use crate::ledger_writer::{AutoPrune, WriterCommand, apply_batch, reply_all};
use crate::pseudonym::Pseudonym;

/// Tuning of the durable ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerOptions {
    /// The most charges committed together (at least 1).
    pub max_batch: usize,
    /// Stored answers older than this (by the server clock) are deleted automatically by the
    /// writer; `None` keeps them until [`BudgetLedger::prune`] is called. Set it to at least
    /// the budget window: a retry whose answer was pruned is charged again. (The server sets
    /// `max(budget window, 1 hour)`: one day by default.) This is the replay window of both
    /// ledgers: a pruned answer is no longer found at once. In the leased ledger's answer
    /// log, disk space is given back by whole segments, each sealed after 64 MiB or one hour,
    /// so a segment file may hold pruned answers (not found) until its newest answer expires.
    pub retention: Option<Duration>,
    /// How often automatic pruning runs (it shares a batch's transaction).
    pub prune_interval: Duration,
    /// The most answers one automatic pruning step deletes (bounds a batch's latency).
    pub prune_limit: usize,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        Self {
            max_batch: 1024,
            retention: None,
            prune_interval: Duration::from_secs(10),
            prune_limit: 4096,
        }
    }
}

/// A charge handed to the writer thread.
struct QueuedCharge {
    pseudonym: Pseudonym,
    request_id: String,
    params: ChargeParams,
    answer: Vec<u8>,
}

/// Work for the writer thread; each carries the channel its result goes back on.
enum Command {
    Charge {
        charge: QueuedCharge,
        reply: SyncSender<Result<ChargeOutcome, StateError>>,
    },
    Prune {
        cutoff_ms: u64,
        reply: SyncSender<Result<u64, StateError>>,
    },
    Flush {
        reply: SyncSender<Result<(), StateError>>,
    },
}

/// A command's result waiting for the batch to commit.
enum Pending {
    Charge(Result<ChargeOutcome, StateError>),
    Prune(u64),
    Flush,
}

impl WriterCommand for Command {
    type Applied = Pending;

    fn apply(
        &self,
        database: &StateDatabase,
        tables: &mut LedgerTables<'_>,
    ) -> Result<Pending, StateError> {
        Ok(match self {
            Command::Charge { charge, .. } => {
                Pending::Charge(apply_charge(database, tables, charge)?)
            }
            Command::Prune { cutoff_ms, .. } => {
                Pending::Prune(prune_answers(database, tables, *cutoff_ms, usize::MAX)?)
            }
            Command::Flush { .. } => Pending::Flush,
        })
    }

    fn reply(self, outcome: Result<Pending, StateError>) {
        match (self, outcome) {
            (Command::Charge { reply, .. }, Ok(Pending::Charge(result))) => {
                let _ = reply.send(result);
            }
            (Command::Charge { reply, .. }, Err(error)) => {
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
            // `apply` gives each command a result of its own kind; an unpaired command's
            // reply channel is dropped, which its caller sees as WriterStopped (fail closed).
            _ => {}
        }
    }
}

/// The durable, group-committing ledger. Create it with [`StateDatabase::ledger`].
pub struct DurableLedger {
    database: StateDatabase,
    /// Answers the leased ledger stored (on an earlier run): still replayed.
    log: Arc<AnswerLog>,
    sender: RwLock<Option<Sender<Command>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for DurableLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableLedger")
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl StateDatabase {
    /// The durable budget ledger in this database; starts its writer thread.
    pub fn ledger(&self, options: LedgerOptions) -> Result<DurableLedger, StateError> {
        if options.max_batch == 0 {
            return Err(StateError::InvalidArgument {
                field: "max_batch",
                reason: "must be at least 1".to_string(),
            });
        }
        // Answers stored by the leased ledger on an earlier run are in its log: they replay
        // here too (this ledger stores its own in the database table).
        let (log, _) = AnswerLog::open(&log_dir(self.path()))?;
        let log = Arc::new(log);
        let (sender, receiver) = mpsc::channel();
        let database = self.clone();
        let writer_log = Arc::clone(&log);
        let writer = std::thread::Builder::new()
            .name("fairrank-ledger-writer".to_string())
            .spawn(move || run_writer(&database, &writer_log, &receiver, &options))
            .map_err(|error| self.storage("start the ledger writer thread", error))?;
        Ok(DurableLedger {
            database: self.clone(),
            log,
            sender: RwLock::new(Some(sender)),
            writer: Mutex::new(Some(writer)),
        })
    }
}

impl DurableLedger {
    /// The database this ledger writes to.
    pub fn database(&self) -> &StateDatabase {
        &self.database
    }

    /// Sends `command` to the writer and waits for the reply received by `reply`.
    fn call<T>(
        &self,
        command: Command,
        reply: &Receiver<Result<T, StateError>>,
    ) -> Result<T, StateError> {
        {
            let guard = self.sender.read().map_err(|_| StateError::WriterStopped)?;
            let sender = guard.as_ref().ok_or(StateError::Closed)?;
            sender
                .send(command)
                .map_err(|_| StateError::WriterStopped)?;
        }
        reply.recv().map_err(|_| StateError::WriterStopped)?
    }

    /// Fails if the ledger was closed.
    fn ensure_open(&self) -> Result<(), StateError> {
        let guard = self.sender.read().map_err(|_| StateError::WriterStopped)?;
        guard.as_ref().map(|_| ()).ok_or(StateError::Closed)
    }

    /// Stops the writer after it has drained the queue.
    fn stop_writer(&self) -> Result<(), StateError> {
        let sender = self
            .sender
            .write()
            .map_err(|_| StateError::WriterStopped)?
            .take();
        drop(sender);
        let writer = self
            .writer
            .lock()
            .map_err(|_| StateError::WriterStopped)?
            .take();
        match writer {
            Some(handle) => handle.join().map_err(|_| StateError::WriterStopped),
            None => Ok(()),
        }
    }
}

impl BudgetLedger for DurableLedger {
    fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, StateError> {
        let params = request.params()?;
        // The log is not written while this ledger runs: a replay found there needs no
        // transaction.
        if let Some(stored) = self
            .log
            .get(&answer_key(&request.pseudonym, &request.request_id))?
        {
            self.ensure_open()?;
            let record = read_user(&self.database, &request.pseudonym)?;
            return Ok(replay(record.as_ref(), &params, stored));
        }
        let (reply, receiver) = mpsc::sync_channel(1);
        let command = Command::Charge {
            charge: QueuedCharge {
                pseudonym: request.pseudonym,
                request_id: request.request_id.clone(),
                params,
                answer: request.answer.clone(),
            },
            reply,
        };
        self.call(command, &receiver)
    }

    fn lookup(
        &self,
        pseudonym: &Pseudonym,
        request_id: &str,
    ) -> Result<Option<StoredAnswer>, StateError> {
        self.ensure_open()?;
        let stored = match read_answer(&self.database, pseudonym, request_id)? {
            Some(stored) => Some(stored),
            None => self.log.get(&answer_key(pseudonym, request_id))?,
        };
        Ok(stored.map(RequestRecord::into_stored))
    }

    fn spend(&self, pseudonym: &Pseudonym, now: SystemTime) -> Result<UserSpend, StateError> {
        let now_ms = unix_millis(now, "now")?;
        self.ensure_open()?;
        let record = read_user(&self.database, pseudonym)?;
        Ok(UserRecord::spend_at(record.as_ref(), now_ms))
    }

    fn prune(&self, older_than: SystemTime) -> Result<u64, StateError> {
        let cutoff_ms = unix_millis(older_than, "older_than")?;
        let (reply, receiver) = mpsc::sync_channel(1);
        let pruned = self.call(Command::Prune { cutoff_ms, reply }, &receiver)?;
        Ok(pruned + self.log.prune(cutoff_ms, usize::MAX)?)
    }

    fn flush(&self) -> Result<(), StateError> {
        let (reply, receiver) = mpsc::sync_channel(1);
        self.call(Command::Flush { reply }, &receiver)
    }

    /// The committed totals, read in one read transaction: the user records in the file and
    /// its charged-rho counter, which each batch updates in the transaction that records its
    /// charges. Every `Charged` returned so far is counted (it was committed first), and the
    /// figure survives any crash exactly. A file last written by a build without the counter
    /// counts from 0 at its first charge by this one (see `database.rs`).
    fn totals(&self) -> Result<LedgerTotals, StateError> {
        self.ensure_open()?;
        read_totals(&self.database)
    }

    fn close(&self) -> Result<(), StateError> {
        self.stop_writer()
    }
}

impl Drop for DurableLedger {
    fn drop(&mut self) {
        // Every accepted charge was committed before its caller returned; a failure here can
        // only concern work no caller is waiting for.
        let _ = self.stop_writer();
    }
}

/// The writer thread: batches commands until every sender is gone.
fn run_writer(
    database: &StateDatabase,
    log: &AnswerLog,
    receiver: &Receiver<Command>,
    options: &LedgerOptions,
) {
    let mut batch = Vec::with_capacity(options.max_batch.min(4096));
    let mut auto_prune = AutoPrune::new();
    while let Ok(first) = receiver.recv() {
        batch.push(first);
        while batch.len() < options.max_batch {
            match receiver.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        let prune = auto_prune.due(options);
        if let Some((cutoff_ms, limit)) = prune {
            // A failure only keeps old answers longer (the next pruning tries again).
            let _ = log.prune(cutoff_ms, limit);
        }
        let outcome = apply_batch(
            database,
            "commit a batch of charges",
            true,
            &batch,
            prune,
            |_| Ok(()),
        );
        reply_all(&mut batch, outcome);
    }
}

/// The three ledger tables inside one write transaction, and the rho charged in it.
pub(crate) struct LedgerTables<'txn> {
    pub(crate) users: Table<'txn, &'static [u8], &'static [u8]>,
    pub(crate) answers: Table<'txn, &'static [u8], &'static [u8]>,
    pub(crate) times: Table<'txn, &'static [u8], ()>,
    /// Nano-rho of the accepted charges this transaction counts (saturating); added to the
    /// file's charged-rho counter once per transaction, before its commit
    /// ([`apply_batch`](crate::ledger_writer::apply_batch)).
    pub(crate) rho_charged: u64,
}

impl<'txn> LedgerTables<'txn> {
    /// Opens the three tables in `transaction`.
    pub(crate) fn open(
        database: &StateDatabase,
        transaction: &'txn redb::WriteTransaction,
        operation: &'static str,
    ) -> Result<Self, StateError> {
        let storage = |error: redb::TableError| database.storage(operation, error);
        Ok(Self {
            users: transaction.open_table(LEDGER_USERS).map_err(storage)?,
            answers: transaction.open_table(LEDGER_ANSWERS).map_err(storage)?,
            times: transaction
                .open_table(LEDGER_ANSWER_TIMES)
                .map_err(storage)?,
            rho_charged: 0,
        })
    }

    /// Stores `record` under `key` (`pseudonym ++ request id`) and indexes it by time.
    pub(crate) fn insert_answer(
        &mut self,
        database: &StateDatabase,
        key: &[u8],
        record: &RequestRecord,
    ) -> Result<(), StateError> {
        let storage = |error: redb::StorageError| database.storage("store an answer", error);
        self.answers
            .insert(key, record.encode().as_slice())
            .map_err(storage)?;
        let mut time_key = Vec::with_capacity(8 + key.len());
        time_key.extend_from_slice(&record.charged_at_ms.to_be_bytes());
        time_key.extend_from_slice(key);
        self.times
            .insert(time_key.as_slice(), ())
            .map_err(storage)?;
        Ok(())
    }
}

/// The committed record of a user's budget, if any.
pub(crate) fn read_user(
    database: &StateDatabase,
    pseudonym: &Pseudonym,
) -> Result<Option<UserRecord>, StateError> {
    let operation = "read a user's spend";
    let transaction = database.begin_read(operation)?;
    let users = transaction
        .open_table(LEDGER_USERS)
        .map_err(|error| database.storage(operation, error))?;
    match users
        .get(pseudonym.as_bytes().as_slice())
        .map_err(|error| database.storage(operation, error))?
    {
        Some(guard) => Ok(Some(decode_user(database, guard.value())?)),
        None => Ok(None),
    }
}

/// The committed answer stored for a user's request id, if any.
pub(crate) fn read_answer(
    database: &StateDatabase,
    pseudonym: &Pseudonym,
    request_id: &str,
) -> Result<Option<RequestRecord>, StateError> {
    read_answer_at(database, &answer_key(pseudonym, request_id))
}

/// The committed answer stored under `key` (`pseudonym ++ request id`), if any.
pub(crate) fn read_answer_at(
    database: &StateDatabase,
    key: &[u8],
) -> Result<Option<RequestRecord>, StateError> {
    let operation = "look up a stored answer";
    let transaction = database.begin_read(operation)?;
    let answers = transaction
        .open_table(LEDGER_ANSWERS)
        .map_err(|error| database.storage(operation, error))?;
    match answers
        .get(key)
        .map_err(|error| database.storage(operation, error))?
    {
        Some(guard) => Ok(Some(decode_answer(database, guard.value())?)),
        None => Ok(None),
    }
}

/// `pseudonym ++ request_id`.
pub(crate) fn answer_key(pseudonym: &Pseudonym, request_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(32 + request_id.len());
    key.extend_from_slice(pseudonym.as_bytes());
    key.extend_from_slice(request_id.as_bytes());
    key
}

pub(crate) fn decode_user(
    database: &StateDatabase,
    bytes: &[u8],
) -> Result<UserRecord, StateError> {
    UserRecord::decode(bytes).ok_or_else(|| {
        database.corrupt_record("ledger user", format!("{} bytes, expected 40", bytes.len()))
    })
}

pub(crate) fn decode_answer(
    database: &StateDatabase,
    bytes: &[u8],
) -> Result<RequestRecord, StateError> {
    RequestRecord::decode(bytes).ok_or_else(|| {
        database.corrupt_record(
            "ledger answer",
            format!("{} bytes, expected >= 16", bytes.len()),
        )
    })
}

/// One charge inside the batch transaction. The outer error aborts the batch (storage
/// failure); the inner one fails this charge only (a corrupt record; nothing was written).
fn apply_charge(
    database: &StateDatabase,
    tables: &mut LedgerTables<'_>,
    charge: &QueuedCharge,
) -> Result<Result<ChargeOutcome, StateError>, StateError> {
    let operation = "apply a charge";
    let storage = |error: redb::StorageError| database.storage(operation, error);
    let user_key = charge.pseudonym.as_bytes().as_slice();
    let existing = match tables.users.get(user_key).map_err(storage)? {
        Some(guard) => match decode_user(database, guard.value()) {
            Ok(record) => Some(record),
            Err(error) => return Ok(Err(error)),
        },
        None => None,
    };
    let key = answer_key(&charge.pseudonym, &charge.request_id);
    let stored = match tables.answers.get(key.as_slice()).map_err(storage)? {
        Some(guard) => match decode_answer(database, guard.value()) {
            Ok(record) => Some(record),
            Err(error) => return Ok(Err(error)),
        },
        None => None,
    };
    if let Some(stored) = stored {
        return Ok(Ok(replay(existing.as_ref(), &charge.params, stored)));
    }
    match decide(existing.as_ref(), &charge.params) {
        Decision::Accept { record, outcome } => {
            tables
                .users
                .insert(user_key, record.encode().as_slice())
                .map_err(storage)?;
            let stored = RequestRecord {
                charged_at_ms: charge.params.now_ms,
                rho: charge.params.rho,
                answer: charge.answer.clone(),
            };
            tables.insert_answer(database, &key, &stored)?;
            tables.rho_charged = tables.rho_charged.saturating_add(charge.params.rho);
            Ok(Ok(outcome))
        }
        Decision::Refuse { outcome } => Ok(Ok(outcome)),
    }
}

/// Deletes up to `limit` stored answers charged before `cutoff_ms`, oldest first.
pub(crate) fn prune_answers(
    database: &StateDatabase,
    tables: &mut LedgerTables<'_>,
    cutoff_ms: u64,
    limit: usize,
) -> Result<u64, StateError> {
    let operation = "prune stored answers";
    let storage = |error: redb::StorageError| database.storage(operation, error);
    let upper = cutoff_ms.to_be_bytes();
    let mut expired = Vec::new();
    for entry in tables
        .times
        .range::<&[u8]>(..upper.as_slice())
        .map_err(storage)?
    {
        if expired.len() >= limit {
            break;
        }
        let (key, _) = entry.map_err(storage)?;
        expired.push(key.value().to_vec());
    }
    for time_key in &expired {
        tables.times.remove(time_key.as_slice()).map_err(storage)?;
        if let Some(answer_key) = time_key.get(8..) {
            tables.answers.remove(answer_key).map_err(storage)?;
        }
    }
    Ok(expired.len() as u64)
}
