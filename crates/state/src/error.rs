//! The error type of the `state` crate: every refusal names what was refused and why.

use std::path::PathBuf;

/// Everything that can go wrong in the state crate.
///
/// Errors are `Clone` so that one failed group commit can be reported to every caller whose
/// charge was in the batch. Callers must treat any error from a ledger as "not charged" and
/// refuse to release the answer (fail closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The database file does not exist (and the caller asked not to create it).
    #[error("state database {path} does not exist")]
    Missing {
        /// The file that was looked for.
        path: PathBuf,
    },
    /// The file exists but is not a valid state database (or it was damaged).
    #[error("state database {path} is corrupt or not a state database: {reason}")]
    Corrupt {
        /// The offending file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// Another process (or another handle in this process) holds the database open.
    #[error("state database {path} is already open by another process or handle")]
    Locked {
        /// The locked file.
        path: PathBuf,
    },
    /// The database was written by an incompatible version of this crate.
    #[error(
        "state database {path} has schema version {found}, this build reads version {expected}"
    )]
    SchemaVersion {
        /// The file.
        path: PathBuf,
        /// The version stored in the file.
        found: u64,
        /// The version this build understands.
        expected: u64,
    },
    /// An I/O or storage failure while reading or writing the database.
    #[error("state database {path}: {operation} failed: {reason}")]
    Storage {
        /// The file.
        path: PathBuf,
        /// What was being done (for example "commit a batch of charges").
        operation: &'static str,
        /// The underlying error.
        reason: String,
    },
    /// A stored record could not be decoded (damage that the page checksums did not catch, or
    /// a foreign writer).
    #[error("state database {path}: corrupt {record} record: {reason}")]
    CorruptRecord {
        /// The file.
        path: PathBuf,
        /// Which kind of record ("ledger user", "ledger request", "amortized state").
        record: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A caller-supplied value is out of range.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field or parameter name.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// The pseudonym secret could not be created, read or parsed.
    #[error("pseudonym key {path}: {reason}")]
    PseudonymKey {
        /// The key file, or an empty path for an in-memory key.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The store was closed; nothing more can be charged or read through this handle.
    #[error("the state store is closed")]
    Closed,
    /// The background writer thread stopped unexpectedly; nothing more can be charged.
    #[error("the state store's writer thread stopped unexpectedly")]
    WriterStopped,
}
