//! What the engine needs from a privacy budget ledger: one atomic "charge before release"
//! call, keyed by subject and request id, that also stores the released answer for replays.
//!
//! The durable implementation lives in the `state` crate (SQLite/redb, group commit); this
//! module defines the engine's seam and an in-memory ledger for tests and for servers that
//! explicitly run without a durable ledger.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

/// One charge: spend `rho` of `subject`'s budget for `request_id`, storing `answer`.
#[derive(Debug, Clone, Copy)]
pub struct LedgerCharge<'a> {
    /// The privacy subject (user id or inline subject id). Ledgers must not store it in
    /// the clear: they key by a pseudonym (keyed hash with a server secret).
    pub subject: &'a str,
    /// The request's idempotency key.
    pub request_id: &'a str,
    /// zCDP rho to spend, finite and > 0.
    pub rho: f64,
    /// The subject's total budget per window.
    pub cap: f64,
    /// Length of a budget window; `None`: a lifetime budget that never resets.
    pub window: Option<Duration>,
    /// The current time (windows are aligned to the subject's first charge in a window).
    pub now: SystemTime,
    /// The encoded released answer, returned by later charges with the same request id.
    pub answer: &'a [u8],
}

/// The subject's spend after a charge (or at a refusal).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spend {
    /// rho spent in the current window, this charge included (rounded up).
    pub spent: f64,
    /// The cap per window.
    pub cap: f64,
    /// When the current window ends; `None` for lifetime budgets (and for a window whose
    /// end `SystemTime` cannot represent: it never comes).
    pub resets_at: Option<SystemTime>,
}

impl Spend {
    /// Budget left in the window, never negative.
    pub fn remaining(&self) -> f64 {
        (self.cap - self.spent).max(0.0)
    }
}

/// The outcome of a charge.
#[derive(Debug, Clone, PartialEq)]
pub enum LedgerOutcome {
    /// The charge was made durable; the answer may be released.
    Charged(Spend),
    /// The request id was charged before: this is its stored answer (no new charge).
    Replayed {
        /// The answer stored by the first charge.
        answer: Vec<u8>,
    },
    /// The charge would exceed the cap; nothing was charged or stored.
    Exceeded(Spend),
}

/// The ledger cannot answer (storage failure, unreachable): the engine fails closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("privacy ledger failure: {message}")]
pub struct LedgerFailure {
    /// What went wrong.
    pub message: String,
}

/// A per-subject privacy budget ledger.
///
/// Implementations must make [`PrivacyLedger::charge`] atomic and durable before
/// returning [`LedgerOutcome::Charged`] (a crash may waste budget, never refund it), and
/// idempotent by `(subject, request_id)`.
pub trait PrivacyLedger: Send + Sync + fmt::Debug {
    /// Charges `charge.rho` to the subject's budget unless that would exceed the cap, and
    /// stores the answer; or returns the answer stored for the same request id.
    fn charge(&self, charge: &LedgerCharge<'_>) -> Result<LedgerOutcome, LedgerFailure>;

    /// The answer stored for `subject`'s `request_id`, if the ledger holds one: what
    /// [`PrivacyLedger::charge`] would replay, read without charging. The engine asks only
    /// before refusing a fresh answer it cannot deliver (too large), so that a retry of a
    /// charged request still gets its stored answer. The default finds none: a ledger that
    /// cannot look answers up refuses such a retry as it refuses the fresh answer.
    fn stored_answer(
        &self,
        subject: &str,
        request_id: &str,
    ) -> Result<Option<Vec<u8>>, LedgerFailure> {
        let _ = (subject, request_id);
        Ok(None)
    }
}

/// Rounds a rho up to the ledger's fixed-point unit (`2^-40`), so sums never under-count.
pub fn round_up_rho(rho: f64) -> f64 {
    const UNIT: f64 = 1.0 / (1u64 << 40) as f64;
    (rho / UNIT).ceil() * UNIT
}

#[derive(Debug, Default)]
struct Account {
    window_start: Option<SystemTime>,
    spent: f64,
    answers: HashMap<String, Vec<u8>>,
}

/// A ledger in memory: correct and atomic, but lost on restart. For tests and for servers
/// explicitly configured without a durable ledger.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    accounts: Mutex<HashMap<String, Account>>,
}

impl MemoryLedger {
    /// An empty ledger.
    pub fn new() -> MemoryLedger {
        MemoryLedger::default()
    }

    /// rho spent by `subject` in its current window (0 for unknown subjects).
    pub fn spent(&self, subject: &str) -> f64 {
        let accounts = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        accounts.get(subject).map_or(0.0, |account| account.spent)
    }
}

impl PrivacyLedger for MemoryLedger {
    fn charge(&self, charge: &LedgerCharge<'_>) -> Result<LedgerOutcome, LedgerFailure> {
        if !(charge.rho.is_finite() && charge.rho > 0.0) {
            return Err(LedgerFailure {
                message: format!("refusing to charge rho {}", charge.rho),
            });
        }
        let mut accounts = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        let account = accounts.entry(charge.subject.to_owned()).or_default();
        if let Some(answer) = account.answers.get(charge.request_id) {
            return Ok(LedgerOutcome::Replayed {
                answer: answer.clone(),
            });
        }
        // A window end beyond what `SystemTime` can hold never comes: no reset.
        if let (Some(window), Some(start)) = (charge.window, account.window_start)
            && start
                .checked_add(window)
                .is_some_and(|end| charge.now >= end)
        {
            account.window_start = None;
            account.spent = 0.0;
        }
        let start = *account.window_start.get_or_insert(charge.now);
        let resets_at = charge.window.and_then(|window| start.checked_add(window));
        let spent = round_up_rho(account.spent + round_up_rho(charge.rho));
        if spent > charge.cap {
            return Ok(LedgerOutcome::Exceeded(Spend {
                spent: account.spent,
                cap: charge.cap,
                resets_at,
            }));
        }
        account.spent = spent;
        account
            .answers
            .insert(charge.request_id.to_owned(), charge.answer.to_vec());
        Ok(LedgerOutcome::Charged(Spend {
            spent,
            cap: charge.cap,
            resets_at,
        }))
    }

    fn stored_answer(
        &self,
        subject: &str,
        request_id: &str,
    ) -> Result<Option<Vec<u8>>, LedgerFailure> {
        let accounts = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(accounts
            .get(subject)
            .and_then(|account| account.answers.get(request_id))
            .cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge<'a>(request_id: &'a str, rho: f64, now: SystemTime) -> LedgerCharge<'a> {
        LedgerCharge {
            subject: "alice",
            request_id,
            rho,
            cap: 1.0,
            window: Some(Duration::from_secs(60)),
            now,
            answer: request_id.as_bytes(),
        }
    }

    #[test]
    fn charges_add_up_to_the_cap_then_refuse_and_reset_with_the_window() {
        let ledger = MemoryLedger::new();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let first = ledger.charge(&charge("a", 0.4, t0)).expect("charges");
        let LedgerOutcome::Charged(spend) = first else {
            panic!("expected a charge, got {first:?}");
        };
        assert!(spend.spent >= 0.4 && spend.spent < 0.4 + 1e-9);
        assert_eq!(spend.resets_at, Some(t0 + Duration::from_secs(60)));
        assert!(matches!(
            ledger.charge(&charge("b", 0.5, t0)),
            Ok(LedgerOutcome::Charged(_))
        ));
        let refused = ledger.charge(&charge("c", 0.2, t0)).expect("answers");
        let LedgerOutcome::Exceeded(spend) = refused else {
            panic!("expected a refusal, got {refused:?}");
        };
        assert!((spend.remaining() - 0.1).abs() < 1e-9);
        let later = t0 + Duration::from_secs(61);
        assert!(matches!(
            ledger.charge(&charge("c", 0.2, later)),
            Ok(LedgerOutcome::Charged(_))
        ));
        assert!((ledger.spent("alice") - 0.2).abs() < 1e-9);
    }

    /// A window whose end `SystemTime` cannot hold (`budget_window_secs` near `u64::MAX`
    /// used to panic in `start + window`) never resets and reports no reset time.
    #[test]
    fn a_window_too_long_for_system_time_never_resets() {
        let ledger = MemoryLedger::new();
        let endless = |request_id, now| LedgerCharge {
            window: Some(Duration::from_secs(u64::MAX)),
            ..charge(request_id, 0.4, now)
        };
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        for (request_id, now) in [("a", t0), ("b", t0 + Duration::from_secs(1 << 40))] {
            let LedgerOutcome::Charged(spend) =
                ledger.charge(&endless(request_id, now)).expect("charges")
            else {
                panic!("expected a charge");
            };
            assert_eq!(spend.resets_at, None);
        }
        assert!(
            (ledger.spent("alice") - 0.8).abs() < 1e-9,
            "no reset in between"
        );
    }

    #[test]
    fn a_repeated_request_id_replays_without_a_second_charge() {
        let ledger = MemoryLedger::new();
        let now = SystemTime::now();
        ledger.charge(&charge("a", 0.3, now)).expect("charges");
        let again = ledger.charge(&charge("a", 0.3, now)).expect("answers");
        assert_eq!(
            again,
            LedgerOutcome::Replayed {
                answer: b"a".to_vec()
            }
        );
        assert!((ledger.spent("alice") - 0.3).abs() < 1e-9);
        assert!(ledger.charge(&charge("z", f64::NAN, now)).is_err());
        // Looked up without a charge: the stored answer, none for other ids or subjects.
        assert_eq!(ledger.stored_answer("alice", "a"), Ok(Some(b"a".to_vec())));
        assert_eq!(ledger.stored_answer("alice", "z"), Ok(None));
        assert_eq!(ledger.stored_answer("bob", "a"), Ok(None));
        assert!((ledger.spent("alice") - 0.3).abs() < 1e-9);
    }
}
