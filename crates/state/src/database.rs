//! The embedded database file (redb) that holds the ledger and the amortized fairness state.
//!
//! One file, opened once per process (redb takes an exclusive file lock). Every commit that
//! must survive a crash uses redb's `Durability::Immediate`: the commit slot is checksummed
//! and fsynced before `commit` returns, so after a crash (even `kill -9` or power loss, on
//! disks that honour fsync) the file reopens at the last completed commit. The file's
//! integrity is checked on every open, so a damaged file is refused with
//! [`StateError::Corrupt`] instead of being trusted.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::error::StateError;
use crate::ledger::LedgerTotals;
use crate::rho::Rho;

/// Schema version stored in the file; bump on any incompatible change of a table layout.
///
/// Adding a key to the `meta` table is not such a change: the ledger's charged-rho counter
/// ([`RHO_CHARGED_KEY`]) came without a bump, older builds ignore it, and a file without it
/// counts from 0 (see [`read_totals`]).
pub const SCHEMA_VERSION: u64 = 1;

/// `"schema_version"` -> [`SCHEMA_VERSION`]; [`RHO_CHARGED_KEY`] -> the ledgers' counter.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Pseudonym (32 bytes) -> encoded `UserRecord`.
pub(crate) const LEDGER_USERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("ledger_users");
/// Pseudonym (32 bytes) ++ request id -> encoded `RequestRecord`.
pub(crate) const LEDGER_ANSWERS: TableDefinition<&[u8], &[u8]> =
    TableDefinition::new("ledger_answers");
/// Charge time (8 bytes big-endian ms) ++ pseudonym ++ request id -> (), for pruning in time
/// order.
pub(crate) const LEDGER_ANSWER_TIMES: TableDefinition<&[u8], ()> =
    TableDefinition::new("ledger_answer_times");
/// Exposure scope -> encoded `AmortizedState`.
pub(crate) const AMORTIZED: TableDefinition<&str, &[u8]> = TableDefinition::new("amortized");

const SCHEMA_KEY: &str = "schema_version";

/// The `meta` key of the total rho (nano-rho) of every accepted charge the ledgers of this
/// file committed, added in the same write transaction as the charges (or, for the leased
/// ledger, as the batch that writes their answers). Absent in a file last written before the
/// counter existed: it then reads 0 and counts from the first charge committed by a build
/// that has it. (The records cannot tell the earlier total: stored answers are pruned after
/// the retention, a user's spend covers only its open window and, for the leased ledger,
/// includes wasted lease blocks; a figure rebuilt from them would be neither the total nor
/// a stated lower bound, so none is guessed.)
pub(crate) const RHO_CHARGED_KEY: &str = "rho_charged_nano";

/// A handle on the open state database file; cheap to clone (shared).
///
/// Get the durable stores from it: [`StateDatabase::ledger`] and
/// [`StateDatabase::amortized_store`]. The file closes when the last handle and the last
/// store using it are dropped or closed.
#[derive(Clone)]
pub struct StateDatabase {
    inner: Arc<DatabaseInner>,
}

struct DatabaseInner {
    database: Database,
    path: PathBuf,
}

impl fmt::Debug for StateDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateDatabase")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl StateDatabase {
    /// Opens the database at `path`, creating an empty one if the file does not exist.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StateError> {
        Self::open_with(path.as_ref(), true)
    }

    /// Opens an existing database; fails with [`StateError::Missing`] if there is none
    /// (for tools that only read, such as `fairrank privacy ledger show`).
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Self, StateError> {
        Self::open_with(path.as_ref(), false)
    }

    fn open_with(path: &Path, create: bool) -> Result<Self, StateError> {
        let path_buf = path.to_path_buf();
        if !create && !path.exists() {
            return Err(StateError::Missing { path: path_buf });
        }
        let mut builder = Database::builder();
        builder.set_check_integrity_on_open(true);
        let opened = if create {
            builder.create(path)
        } else {
            builder.open(path)
        };
        let database = opened.map_err(|error| open_error(&path_buf, error))?;
        let handle = Self {
            inner: Arc::new(DatabaseInner {
                database,
                path: path_buf,
            }),
        };
        handle.prepare_schema()?;
        Ok(handle)
    }

    /// Creates the tables of a new file, or checks the schema version of an existing one.
    fn prepare_schema(&self) -> Result<(), StateError> {
        let operation = "prepare the schema";
        let transaction = self.begin_write(operation)?;
        {
            let mut meta = transaction
                .open_table(META)
                .map_err(|error| self.storage(operation, error))?;
            let found = meta
                .get(SCHEMA_KEY)
                .map_err(|error| self.storage(operation, error))?
                .map(|guard| guard.value());
            match found {
                Some(found) if found != SCHEMA_VERSION => {
                    return Err(StateError::SchemaVersion {
                        path: self.inner.path.clone(),
                        found,
                        expected: SCHEMA_VERSION,
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert(SCHEMA_KEY, SCHEMA_VERSION)
                        .map_err(|error| self.storage(operation, error))?;
                }
            }
            transaction
                .open_table(LEDGER_USERS)
                .map_err(|error| self.storage(operation, error))?;
            transaction
                .open_table(LEDGER_ANSWERS)
                .map_err(|error| self.storage(operation, error))?;
            transaction
                .open_table(LEDGER_ANSWER_TIMES)
                .map_err(|error| self.storage(operation, error))?;
            transaction
                .open_table(AMORTIZED)
                .map_err(|error| self.storage(operation, error))?;
        }
        transaction
            .commit()
            .map_err(|error| self.storage(operation, error))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A storage error for this file.
    pub(crate) fn storage(&self, operation: &'static str, error: impl fmt::Display) -> StateError {
        StateError::Storage {
            path: self.inner.path.clone(),
            operation,
            reason: error.to_string(),
        }
    }

    /// A corrupt-record error for this file.
    pub(crate) fn corrupt_record(&self, record: &'static str, reason: String) -> StateError {
        StateError::CorruptRecord {
            path: self.inner.path.clone(),
            record,
            reason,
        }
    }

    /// A write transaction with immediate durability (fsync on commit).
    pub(crate) fn begin_write(
        &self,
        operation: &'static str,
    ) -> Result<redb::WriteTransaction, StateError> {
        self.begin_write_with(operation, true)
    }

    /// A write transaction; without `immediate` its commit is visible at once but reaches the
    /// disk only with the next immediate commit (a crash before that drops it, and the file
    /// reopens at the last immediate commit).
    pub(crate) fn begin_write_with(
        &self,
        operation: &'static str,
        immediate: bool,
    ) -> Result<redb::WriteTransaction, StateError> {
        let mut transaction = self
            .inner
            .database
            .begin_write()
            .map_err(|error| self.storage(operation, error))?;
        let durability = if immediate {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        };
        transaction
            .set_durability(durability)
            .map_err(|error| self.storage(operation, error))?;
        Ok(transaction)
    }

    /// A read transaction over the last committed state.
    pub(crate) fn begin_read(
        &self,
        operation: &'static str,
    ) -> Result<redb::ReadTransaction, StateError> {
        self.inner
            .database
            .begin_read()
            .map_err(|error| self.storage(operation, error))
    }
}

/// The committed ledger totals: the number of user records (redb keeps a table's length, so
/// no scan) and the charged-rho counter (0 when the file has none yet).
pub(crate) fn read_totals(database: &StateDatabase) -> Result<LedgerTotals, StateError> {
    let operation = "read the ledger totals";
    let storage = |error: redb::StorageError| database.storage(operation, error);
    let transaction = database.begin_read(operation)?;
    let users = transaction
        .open_table(LEDGER_USERS)
        .map_err(|error| database.storage(operation, error))?;
    let meta = transaction
        .open_table(META)
        .map_err(|error| database.storage(operation, error))?;
    let rho_charged = meta
        .get(RHO_CHARGED_KEY)
        .map_err(storage)?
        .map_or(0, |guard| guard.value());
    Ok(LedgerTotals {
        subjects: users.len().map_err(storage)?,
        rho_charged: Rho::from_nano(rho_charged),
    })
}

/// Adds `rho` (nano-rho) to the charged-rho counter inside `transaction`, saturating.
pub(crate) fn add_rho_charged(
    database: &StateDatabase,
    transaction: &redb::WriteTransaction,
    rho: u64,
) -> Result<(), StateError> {
    let operation = "count the charged rho";
    let storage = |error: redb::StorageError| database.storage(operation, error);
    let mut meta = transaction
        .open_table(META)
        .map_err(|error| database.storage(operation, error))?;
    let counted = meta
        .get(RHO_CHARGED_KEY)
        .map_err(storage)?
        .map_or(0, |guard| guard.value());
    meta.insert(RHO_CHARGED_KEY, counted.saturating_add(rho))
        .map_err(storage)?;
    Ok(())
}

/// Maps an open failure to the most specific error, always naming the file.
fn open_error(path: &Path, error: redb::DatabaseError) -> StateError {
    let path = path.to_path_buf();
    match error {
        redb::DatabaseError::DatabaseAlreadyOpen | redb::DatabaseError::LockProtocolMismatch => {
            StateError::Locked { path }
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::NotFound =>
        {
            StateError::Missing { path }
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::InvalidData =>
        {
            StateError::Corrupt {
                path,
                reason: io.to_string(),
            }
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => StateError::Storage {
            path,
            operation: "open",
            reason: io.to_string(),
        },
        other => StateError::Corrupt {
            path,
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_reopens_and_refuses_a_second_handle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let first = StateDatabase::open(&path).unwrap();
        assert_eq!(first.path(), path);
        let error = StateDatabase::open(&path).unwrap_err();
        assert_eq!(error, StateError::Locked { path: path.clone() });
        drop(first);
        let again = StateDatabase::open_existing(&path).unwrap();
        assert_eq!(again.path(), path);
    }

    #[test]
    fn a_missing_file_is_named_when_it_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.redb");
        let error = StateDatabase::open_existing(&path).unwrap_err();
        assert_eq!(error, StateError::Missing { path: path.clone() });
        assert!(error.to_string().contains("absent.redb"));
        assert!(!path.exists());
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("garbage.redb");
        std::fs::write(&path, vec![0x5a_u8; 8192]).unwrap();
        for error in [
            StateDatabase::open(&path).unwrap_err(),
            StateDatabase::open_existing(&path).unwrap_err(),
        ] {
            assert!(
                matches!(&error, StateError::Corrupt { path: named, .. } if *named == path),
                "{error}"
            );
            assert!(error.to_string().contains("garbage.redb"));
        }
    }

    #[test]
    fn a_database_with_damaged_pages_is_refused_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("damaged.redb");
        {
            let database = StateDatabase::open(&path).unwrap();
            let transaction = database.begin_write("test").unwrap();
            {
                let mut table = transaction.open_table(AMORTIZED).unwrap();
                for index in 0..200 {
                    let scope = format!("scope-{index}");
                    table
                        .insert(scope.as_str(), [7_u8; 300].as_slice())
                        .unwrap();
                }
            }
            transaction.commit().unwrap();
        }
        // Flip bytes inside one stored value (a run of 300 sevens), in a committed leaf page.
        let mut bytes = std::fs::read(&path).unwrap();
        let start = bytes
            .windows(300)
            .position(|window| window.iter().all(|&byte| byte == 7))
            .expect("the values are stored uncompressed");
        for byte in &mut bytes[start + 100..start + 110] {
            *byte ^= 0xff;
        }
        std::fs::write(&path, &bytes).unwrap();
        let error = StateDatabase::open(&path).unwrap_err();
        assert!(
            matches!(&error, StateError::Corrupt { path: named, .. } if *named == path),
            "{error}"
        );
    }

    #[test]
    fn an_unknown_schema_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("future.redb");
        {
            let database = StateDatabase::open(&path).unwrap();
            let transaction = database.begin_write("test").unwrap();
            {
                let mut meta = transaction.open_table(META).unwrap();
                meta.insert(SCHEMA_KEY, SCHEMA_VERSION + 1).unwrap();
            }
            transaction.commit().unwrap();
        }
        let error = StateDatabase::open(&path).unwrap_err();
        assert_eq!(
            error,
            StateError::SchemaVersion {
                path,
                found: SCHEMA_VERSION + 1,
                expected: SCHEMA_VERSION
            }
        );
    }
}
