//! An in-memory [`BudgetLedger`]: for tests and for servers configured without a ledger path.
//!
//! It follows the same accounting rule as the durable ledger, but everything is lost when the
//! process exits, so budgets reset on restart: do not use it where budgets must hold.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use crate::error::StateError;
use crate::ledger::{
    BudgetLedger, ChargeOutcome, ChargeRequest, Decision, LedgerTotals, RequestRecord,
    StoredAnswer, UserRecord, UserSpend, decide, replay, unix_millis,
};
use crate::pseudonym::Pseudonym;
use crate::rho::Rho;

/// One user's state in memory.
#[derive(Debug, Default)]
struct MemoryUser {
    record: Option<UserRecord>,
    answers: HashMap<String, RequestRecord>,
}

/// The ledger's contents.
#[derive(Debug, Default)]
struct MemoryContents {
    users: HashMap<Pseudonym, MemoryUser>,
    /// Users whose `record` is set (entries also exist for users only refused or looked up).
    subjects: u64,
    /// Nano-rho of every accepted charge (saturating).
    rho_charged: u64,
}

/// A [`BudgetLedger`] held in process memory behind one mutex.
#[derive(Debug)]
pub struct InMemoryLedger {
    contents: Mutex<Option<MemoryContents>>,
}

impl InMemoryLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self {
            contents: Mutex::new(Some(MemoryContents::default())),
        }
    }

    /// Runs `action` on the contents, or fails if closed. A poisoned lock (a panic while
    /// holding it) is treated as a stopped store.
    fn with_contents<T>(
        &self,
        action: impl FnOnce(&mut MemoryContents) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let mut guard: MutexGuard<'_, Option<MemoryContents>> = self
            .contents
            .lock()
            .map_err(|_| StateError::WriterStopped)?;
        let contents = guard.as_mut().ok_or(StateError::Closed)?;
        action(contents)
    }
}

impl BudgetLedger for InMemoryLedger {
    fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, StateError> {
        let params = request.params()?;
        self.with_contents(|contents| {
            let MemoryContents {
                users,
                subjects,
                rho_charged,
            } = contents;
            let user = users.entry(request.pseudonym).or_default();
            if let Some(stored) = user.answers.get(&request.request_id) {
                return Ok(replay(user.record.as_ref(), &params, stored.clone()));
            }
            match decide(user.record.as_ref(), &params) {
                Decision::Accept { record, outcome } => {
                    if user.record.replace(record).is_none() {
                        *subjects += 1;
                    }
                    *rho_charged = rho_charged.saturating_add(params.rho);
                    user.answers.insert(
                        request.request_id.clone(),
                        RequestRecord {
                            charged_at_ms: params.now_ms,
                            rho: params.rho,
                            answer: request.answer.clone(),
                        },
                    );
                    Ok(outcome)
                }
                Decision::Refuse { outcome } => Ok(outcome),
            }
        })
    }

    fn lookup(
        &self,
        pseudonym: &Pseudonym,
        request_id: &str,
    ) -> Result<Option<StoredAnswer>, StateError> {
        self.with_contents(|contents| {
            Ok(contents
                .users
                .get(pseudonym)
                .and_then(|user| user.answers.get(request_id))
                .map(|stored| stored.clone().into_stored()))
        })
    }

    fn spend(&self, pseudonym: &Pseudonym, now: SystemTime) -> Result<UserSpend, StateError> {
        let now_ms = unix_millis(now, "now")?;
        self.with_contents(|contents| {
            let record = contents
                .users
                .get(pseudonym)
                .and_then(|user| user.record.as_ref());
            Ok(UserRecord::spend_at(record, now_ms))
        })
    }

    fn prune(&self, older_than: SystemTime) -> Result<u64, StateError> {
        let cutoff_ms = unix_millis(older_than, "older_than")?;
        self.with_contents(|contents| {
            let mut removed = 0_u64;
            for user in contents.users.values_mut() {
                let before = user.answers.len();
                user.answers
                    .retain(|_, stored| stored.charged_at_ms >= cutoff_ms);
                removed += (before - user.answers.len()) as u64;
            }
            Ok(removed)
        })
    }

    fn flush(&self) -> Result<(), StateError> {
        self.with_contents(|_| Ok(()))
    }

    /// Counted in memory under the ledger's lock as charges are accepted; lost with the
    /// process, like everything else here (a new ledger starts from zero).
    fn totals(&self) -> Result<LedgerTotals, StateError> {
        self.with_contents(|contents| {
            Ok(LedgerTotals {
                subjects: contents.subjects,
                rho_charged: Rho::from_nano(contents.rho_charged),
            })
        })
    }

    fn close(&self) -> Result<(), StateError> {
        let mut guard = self
            .contents
            .lock()
            .map_err(|_| StateError::WriterStopped)?;
        guard.take();
        Ok(())
    }
}

impl Default for InMemoryLedger {
    fn default() -> Self {
        Self::new()
    }
}
