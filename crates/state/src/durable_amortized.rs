//! The durable [`AmortizedStore`]: state lives in memory and a background thread writes the
//! changed scopes to the state database in one transaction every flush interval.
//!
//! # Durability
//!
//! Updates are applied in memory at once and written in batches, so a crash (kill -9, power
//! loss) loses at most the updates of the last flush interval (50 ms by default) plus the
//! write in progress. That is acceptable for amortized fairness: the controller sees slightly
//! less past exposure and corrects on the next rankings. [`AmortizedStore::flush`] and
//! [`AmortizedStore::close`] write synchronously. A failed background write keeps the scopes
//! pending, is retried on the next interval, and is reported by the next `flush` or `close`.
//!
//! All scopes ever touched stay in memory: scopes are meant to be few (one per catalog,
//! surface or query class), not one per user.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use fairness::AmortizedState;

use crate::amortized::{
    AmortizedStore, add_delta, check_delta, check_scope, decode_state, encode_state,
};
use crate::database::{AMORTIZED, StateDatabase};
use crate::error::StateError;

/// Tuning of the durable amortized store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmortizedOptions {
    /// How often changed scopes are written (the most a crash can lose).
    pub flush_interval: Duration,
}

impl Default for AmortizedOptions {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_millis(50),
        }
    }
}

/// One scope in memory.
#[derive(Debug, Default)]
struct ScopeEntry {
    state: AmortizedState,
    dirty: bool,
}

/// Everything behind the store's lock.
#[derive(Debug, Default)]
struct Scopes {
    entries: HashMap<String, ScopeEntry>,
    closed: bool,
    stop: bool,
    last_error: Option<StateError>,
}

/// State shared with the flusher thread.
struct Shared {
    database: StateDatabase,
    scopes: Mutex<Scopes>,
    /// Wakes the flusher early (on close).
    wake: Condvar,
    /// Serializes snapshot-and-commit, so an older snapshot never overwrites a newer one.
    writing: Mutex<()>,
}

/// The durable amortized store. Create it with [`StateDatabase::amortized_store`].
pub struct DurableAmortizedStore {
    shared: Arc<Shared>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for DurableAmortizedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableAmortizedStore")
            .field("database", &self.shared.database)
            .finish_non_exhaustive()
    }
}

impl StateDatabase {
    /// The durable amortized fairness store in this database; starts its flusher thread.
    pub fn amortized_store(
        &self,
        options: AmortizedOptions,
    ) -> Result<DurableAmortizedStore, StateError> {
        if options.flush_interval.is_zero() {
            return Err(StateError::InvalidArgument {
                field: "flush_interval",
                reason: "must be positive".to_string(),
            });
        }
        let shared = Arc::new(Shared {
            database: self.clone(),
            scopes: Mutex::new(Scopes::default()),
            wake: Condvar::new(),
            writing: Mutex::new(()),
        });
        let flusher_shared = Arc::clone(&shared);
        let flusher = std::thread::Builder::new()
            .name("fairrank-amortized-flusher".to_string())
            .spawn(move || run_flusher(&flusher_shared, options.flush_interval))
            .map_err(|error| self.storage("start the amortized-state flusher thread", error))?;
        Ok(DurableAmortizedStore {
            shared,
            flusher: Mutex::new(Some(flusher)),
        })
    }
}

impl Shared {
    fn lock(&self) -> Result<MutexGuard<'_, Scopes>, StateError> {
        self.scopes.lock().map_err(|_| StateError::WriterStopped)
    }

    /// Reads a scope's stored state (empty if absent).
    fn read_stored(&self, scope: &str) -> Result<AmortizedState, StateError> {
        let operation = "read amortized state";
        let transaction = self.database.begin_read(operation)?;
        let table = transaction
            .open_table(AMORTIZED)
            .map_err(|error| self.database.storage(operation, error))?;
        match table
            .get(scope)
            .map_err(|error| self.database.storage(operation, error))?
        {
            Some(guard) => decode_state(guard.value()).map_err(|reason| {
                self.database
                    .corrupt_record("amortized state", format!("scope {scope:?}: {reason}"))
            }),
            None => Ok(AmortizedState::default()),
        }
    }

    /// Runs `action` on the scope's entry, loading it from the database first if needed.
    fn with_entry<T>(
        &self,
        scope: &str,
        action: impl FnOnce(&mut ScopeEntry) -> T,
    ) -> Result<T, StateError> {
        {
            let mut scopes = self.lock()?;
            if scopes.closed {
                return Err(StateError::Closed);
            }
            if let Some(entry) = scopes.entries.get_mut(scope) {
                return Ok(action(entry));
            }
        }
        // Read outside the lock; if another thread loaded it meanwhile, keep theirs.
        let stored = self.read_stored(scope)?;
        let mut scopes = self.lock()?;
        if scopes.closed {
            return Err(StateError::Closed);
        }
        let entry = scopes
            .entries
            .entry(scope.to_string())
            .or_insert_with(|| ScopeEntry {
                state: stored,
                dirty: false,
            });
        Ok(action(entry))
    }

    /// Writes every changed scope in one transaction (fsynced). On failure the scopes stay
    /// pending and the error is kept for the next `flush` or `close`.
    fn write_dirty(&self) -> Result<(), StateError> {
        let _writing = self.writing.lock().map_err(|_| StateError::WriterStopped)?;
        let mut snapshot = Vec::new();
        {
            let mut scopes = self.lock()?;
            for (scope, entry) in &mut scopes.entries {
                if entry.dirty {
                    let mut bytes = Vec::new();
                    encode_state(&entry.state, &mut bytes);
                    snapshot.push((scope.clone(), bytes));
                    entry.dirty = false;
                }
            }
        }
        if snapshot.is_empty() {
            return self.lock()?.last_error.take().map_or(Ok(()), Err);
        }
        let result = self.commit(&snapshot);
        let mut scopes = self.lock()?;
        match result {
            Ok(()) => {
                scopes.last_error = None;
                Ok(())
            }
            Err(error) => {
                for (scope, _) in &snapshot {
                    if let Some(entry) = scopes.entries.get_mut(scope) {
                        entry.dirty = true;
                    }
                }
                scopes.last_error = Some(error.clone());
                Err(error)
            }
        }
    }

    fn commit(&self, snapshot: &[(String, Vec<u8>)]) -> Result<(), StateError> {
        let operation = "write amortized state";
        let transaction = self.database.begin_write(operation)?;
        {
            let mut table = transaction
                .open_table(AMORTIZED)
                .map_err(|error| self.database.storage(operation, error))?;
            for (scope, bytes) in snapshot {
                table
                    .insert(scope.as_str(), bytes.as_slice())
                    .map_err(|error| self.database.storage(operation, error))?;
            }
        }
        transaction
            .commit()
            .map_err(|error| self.database.storage(operation, error))
    }
}

/// The flusher thread: writes changed scopes every interval until asked to stop.
fn run_flusher(shared: &Shared, interval: Duration) {
    loop {
        {
            let Ok(scopes) = shared.lock() else { return };
            if scopes.stop {
                return;
            }
            let Ok((scopes, _)) = shared.wake.wait_timeout(scopes, interval) else {
                return;
            };
            if scopes.stop {
                return;
            }
        }
        // Errors are kept in `last_error` and reported by flush / close.
        let _ = shared.write_dirty();
    }
}

impl DurableAmortizedStore {
    /// The database this store writes to.
    pub fn database(&self) -> &StateDatabase {
        &self.shared.database
    }

    /// Stops the flusher, writes what is pending, and marks the store closed.
    fn shut_down(&self) -> Result<(), StateError> {
        {
            let mut scopes = self.shared.lock()?;
            if scopes.closed {
                return Ok(());
            }
            scopes.stop = true;
        }
        self.shared.wake.notify_all();
        let flusher = self
            .flusher
            .lock()
            .map_err(|_| StateError::WriterStopped)?
            .take();
        if let Some(handle) = flusher {
            handle.join().map_err(|_| StateError::WriterStopped)?;
        }
        let result = self.shared.write_dirty();
        self.shared.lock()?.closed = true;
        result
    }
}

impl AmortizedStore for DurableAmortizedStore {
    fn load_into(&self, scope: &str, out: &mut AmortizedState) -> Result<(), StateError> {
        check_scope(scope)?;
        self.shared
            .with_entry(scope, |entry| out.clone_from(&entry.state))
    }

    fn update(&self, scope: &str, delta: &AmortizedState) -> Result<(), StateError> {
        check_scope(scope)?;
        check_delta(delta)?;
        self.shared.with_entry(scope, |entry| {
            add_delta(&mut entry.state, delta);
            entry.dirty = true;
        })
    }

    fn flush(&self) -> Result<(), StateError> {
        if self.shared.lock()?.closed {
            return Err(StateError::Closed);
        }
        self.shared.write_dirty()
    }

    fn close(&self) -> Result<(), StateError> {
        self.shut_down()
    }
}

impl Drop for DurableAmortizedStore {
    fn drop(&mut self) {
        // Best effort: a caller that needs to know calls `close` first.
        let _ = self.shut_down();
    }
}
