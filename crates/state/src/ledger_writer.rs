//! The commit skeleton both durable ledgers' writer threads share: one write transaction per
//! batch of commands, optional pruning of expired answers inside it, one commit, then one
//! reply per command (the committed result, or the batch's error to every caller: fail
//! closed).
//!
//! What differs between the ledgers stays with them: how a batch is gathered (the
//! per-charge ledger takes whatever is queued; the leased one also drains its answer queue
//! and may skip the fsync), and what a command does inside the transaction.

use std::time::{Instant, SystemTime};

use crate::database::{StateDatabase, add_rho_charged};
use crate::durable_ledger::{LedgerOptions, LedgerTables, prune_answers};
use crate::error::StateError;
use crate::ledger::unix_millis;

/// A command of a ledger writer thread.
pub(crate) trait WriterCommand {
    /// What applying the command produced, sent to its caller once the batch committed.
    type Applied;

    /// Applies the command inside the batch's transaction. An error aborts the whole batch
    /// (nothing is committed and every caller gets the error).
    fn apply(
        &self,
        database: &StateDatabase,
        tables: &mut LedgerTables<'_>,
    ) -> Result<Self::Applied, StateError>;

    /// Sends the outcome to the caller, if it waits for one. A caller that gave up waiting
    /// has nothing to receive: its closed channel is ignored.
    fn reply(self, outcome: Result<Self::Applied, StateError>);
}

/// When automatic pruning of expired stored answers is due.
pub(crate) struct AutoPrune {
    last: Instant,
}

impl AutoPrune {
    /// Nothing pruned yet; the first pruning comes one interval after start.
    pub(crate) fn new() -> Self {
        Self {
            last: Instant::now(),
        }
    }

    /// `(cutoff in ms, most answers to delete)` if retention is on and an interval passed
    /// since the last pruning (which this call then counts as done).
    pub(crate) fn due(&mut self, options: &LedgerOptions) -> Option<(u64, usize)> {
        let retention = options.retention?;
        if self.last.elapsed() < options.prune_interval {
            return None;
        }
        self.last = Instant::now();
        SystemTime::now()
            .checked_sub(retention)
            .and_then(|cutoff| unix_millis(cutoff, "retention").ok())
            .map(|cutoff_ms| (cutoff_ms, options.prune_limit))
    }
}

/// Runs one batch in one write transaction: `before` (for example writing queued answers),
/// then every command in order (later commands see earlier ones), then the automatic
/// pruning, then the rho that `before` and the commands counted
/// ([`LedgerTables::rho_charged`]) is added to the file's charged-rho counter, then the
/// commit (fsynced when `immediate`). Returns the commands' results. The counter is thus
/// committed with the charges it counts, or not at all.
pub(crate) fn apply_batch<C: WriterCommand>(
    database: &StateDatabase,
    operation: &'static str,
    immediate: bool,
    commands: &[C],
    auto_prune: Option<(u64, usize)>,
    before: impl FnOnce(&mut LedgerTables<'_>) -> Result<(), StateError>,
) -> Result<Vec<C::Applied>, StateError> {
    let transaction = database.begin_write_with(operation, immediate)?;
    let mut results = Vec::with_capacity(commands.len());
    let rho_charged = {
        let mut tables = LedgerTables::open(database, &transaction, operation)?;
        before(&mut tables)?;
        for command in commands {
            results.push(command.apply(database, &mut tables)?);
        }
        if let Some((cutoff_ms, limit)) = auto_prune {
            prune_answers(database, &mut tables, cutoff_ms, limit)?;
        }
        tables.rho_charged
    };
    if rho_charged > 0 {
        add_rho_charged(database, &transaction, rho_charged)?;
    }
    transaction
        .commit()
        .map_err(|error| database.storage(operation, error))?;
    Ok(results)
}

/// Replies to every command of a batch with its result, or with the batch's error; empties
/// `commands`.
pub(crate) fn reply_all<C: WriterCommand>(
    commands: &mut Vec<C>,
    outcome: Result<Vec<C::Applied>, StateError>,
) {
    match outcome {
        Ok(results) => {
            for (command, result) in commands.drain(..).zip(results) {
                command.reply(Ok(result));
            }
        }
        Err(error) => {
            for command in commands.drain(..) {
                command.reply(Err(error.clone()));
            }
        }
    }
}
