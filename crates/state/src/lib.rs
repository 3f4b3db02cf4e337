//! Durable server state: the per-user privacy budget ledger and the amortized fairness state.
//!
//! # Overview
//!
//! - [`BudgetLedger`]: a per-user zCDP budget ledger keyed by [`Pseudonym`] (a keyed hash of
//!   the user id under a server secret, [`PseudonymKey`]). A charge is accepted, replayed
//!   (same request id: the stored answer comes back, nothing is charged) or refused when it
//!   would exceed the cap. Amounts are fixed-point [`Rho`] (nano-rho), charges rounded up.
//!   Implementations: [`DurableLedger`] (group-committed into an embedded database; an
//!   accepted charge is fsynced before `charge` returns), [`LeasedLedger`] (budget reserved
//!   durably in blocks, charges inside a block answered from memory: the durable spent always
//!   covers every released answer, a crash wastes the unused rest of a block) and
//!   [`InMemoryLedger`]. [`BudgetLedger::totals`] reports [`LedgerTotals`]: subjects with a
//!   ledger entry and the total rho of accepted charges, kept in the database file by the
//!   durable ledgers (a counter updated in the transactions that record the charges).
//! - [`AmortizedStore`]: cumulative exposure and relevance per group and exposure scope for
//!   FairCo. Implementations: [`DurableAmortizedStore`] (periodic batched writes) and
//!   [`InMemoryAmortizedStore`].
//! - [`StateDatabase`]: the one database file (redb) both durable stores live in.
//!
//! # Example
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use state::{BudgetLedger, ChargeOutcome, ChargeRequest, LedgerOptions, PseudonymKey, Rho,
//!             StateDatabase};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let database = StateDatabase::open(dir.path().join("state.redb"))?;
//! let ledger = database.ledger(LedgerOptions::default())?;
//! let key = PseudonymKey::new(&[42; 32])?;
//! let request = ChargeRequest {
//!     pseudonym: key.pseudonym("user-17"),
//!     request_id: "req-1".to_string(),
//!     rho: Rho::from_f64_ceil(0.25)?,
//!     cap: Rho::from_f64_floor(1.0)?,
//!     window: Duration::from_secs(86_400),
//!     now: SystemTime::now(),
//!     answer: b"[3, 1, 2]".to_vec(),
//! };
//! assert!(matches!(ledger.charge(&request)?, ChargeOutcome::Charged { .. }));
//! // A retry replays the stored answer and charges nothing.
//! match ledger.charge(&request)? {
//!     ChargeOutcome::Replayed { answer, spent, .. } => {
//!         assert_eq!(answer, b"[3, 1, 2]");
//!         assert_eq!(spent, Rho::from_f64_ceil(0.25)?);
//!     }
//!     other => panic!("{other:?}"),
//! }
//! ledger.close()?;
//! # Ok(())
//! # }
//! ```

mod amortized;
mod answer_log;
mod database;
mod durable_amortized;
mod durable_ledger;
mod error;
mod leased_ledger;
mod ledger;
mod ledger_writer;
mod memory_ledger;
mod pseudonym;
mod rho;

#[cfg(test)]
mod ledger_contract;

pub use amortized::{AmortizedStore, InMemoryAmortizedStore, MAX_SCOPE_BYTES, delta_between};
pub use answer_log::LogRecovery;
pub use database::{SCHEMA_VERSION, StateDatabase};
pub use durable_amortized::{AmortizedOptions, DurableAmortizedStore};
pub use durable_ledger::{DurableLedger, LedgerOptions};
pub use error::StateError;
pub use fairness::AmortizedState;
pub use leased_ledger::{LeaseOptions, LeaseStats, LeasedLedger};
pub use ledger::{
    BudgetLedger, ChargeOutcome, ChargeRequest, LedgerTotals, MAX_ANSWER_BYTES,
    MAX_REQUEST_ID_BYTES, StoredAnswer, UserSpend,
};
pub use memory_ledger::InMemoryLedger;
pub use pseudonym::{MIN_SECRET_BYTES, Pseudonym, PseudonymKey};
pub use rho::Rho;
