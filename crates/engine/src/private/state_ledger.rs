//! The engine's ledger seam implemented by a `state` budget ledger (durable redb with group
//! commit, or in memory): subjects become keyed pseudonyms, rho becomes fixed point.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use state::{BudgetLedger, ChargeOutcome, ChargeRequest, PseudonymKey, Rho, UserSpend};

use super::ledger::{LedgerCharge, LedgerFailure, LedgerOutcome, PrivacyLedger, Spend};

/// The window passed to the state ledger for lifetime budgets (it needs a finite one):
/// a thousand years.
const LIFETIME: Duration = Duration::from_secs(1000 * 365 * 86_400);

/// A [`PrivacyLedger`] over a [`state::BudgetLedger`]. Raw subject ids never reach the
/// store: they are keyed into pseudonyms (HMAC-SHA256 with the server secret) first.
#[derive(Debug, Clone)]
pub struct StateLedger {
    ledger: Arc<dyn BudgetLedger>,
    key: PseudonymKey,
}

impl StateLedger {
    /// Wraps `ledger`, keying subjects with `key`.
    pub fn new(ledger: Arc<dyn BudgetLedger>, key: PseudonymKey) -> StateLedger {
        StateLedger { ledger, key }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn BudgetLedger> {
        &self.ledger
    }

    /// `subject`'s spend as of `now`.
    pub fn spend(&self, subject: &str, now: SystemTime) -> Result<UserSpend, LedgerFailure> {
        self.ledger
            .spend(&self.key.pseudonym(subject), now)
            .map_err(failure)
    }
}

fn failure(error: state::StateError) -> LedgerFailure {
    LedgerFailure {
        message: error.to_string(),
    }
}

impl PrivacyLedger for StateLedger {
    fn charge(&self, charge: &LedgerCharge<'_>) -> Result<LedgerOutcome, LedgerFailure> {
        let pseudonym = self.key.pseudonym(charge.subject);
        let window = charge.window.unwrap_or(LIFETIME);
        let request = ChargeRequest {
            pseudonym,
            request_id: charge.request_id.to_owned(),
            rho: Rho::from_f64_ceil(charge.rho).map_err(failure)?,
            cap: Rho::from_f64_floor(charge.cap).map_err(failure)?,
            window,
            now: charge.now,
            answer: charge.answer.to_vec(),
        };
        let outcome = self.ledger.charge(&request).map_err(failure)?;
        let spend = |spent: Rho| -> Spend {
            // When the window ends: read back its start (a cheap read transaction). An end
            // `SystemTime` cannot represent never comes (`None`, like a lifetime budget).
            let resets_at = charge.window.and_then(|window| {
                self.ledger
                    .spend(&pseudonym, charge.now)
                    .ok()
                    .and_then(|user| user.window_start)
                    .and_then(|start| start.checked_add(window))
            });
            Spend {
                spent: spent.to_f64(),
                cap: charge.cap,
                resets_at,
            }
        };
        Ok(match outcome {
            ChargeOutcome::Charged { spent, .. } => LedgerOutcome::Charged(spend(spent)),
            ChargeOutcome::Replayed { answer, .. } => LedgerOutcome::Replayed { answer },
            ChargeOutcome::Exceeded { spent, .. } => LedgerOutcome::Exceeded(spend(spent)),
        })
    }

    fn stored_answer(
        &self,
        subject: &str,
        request_id: &str,
    ) -> Result<Option<Vec<u8>>, LedgerFailure> {
        let stored = self
            .ledger
            .lookup(&self.key.pseudonym(subject), request_id)
            .map_err(failure)?;
        Ok(stored.map(|stored| stored.answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_pseudonymize_replay_and_refuse_like_the_engine_expects() {
        let key = PseudonymKey::new(&[7_u8; 32]).expect("key");
        let ledger = StateLedger::new(Arc::new(state::InMemoryLedger::new()), key);
        let now = SystemTime::now();
        let charge = |request_id: &'static str, rho: f64| LedgerCharge {
            subject: "alice",
            request_id,
            rho,
            cap: 1.0,
            window: Some(Duration::from_secs(60)),
            now,
            answer: request_id.as_bytes(),
        };
        let LedgerOutcome::Charged(spend) = ledger.charge(&charge("a", 0.6)).expect("charges")
        else {
            panic!("expected a charge");
        };
        assert!((spend.spent - 0.6).abs() < 1e-9);
        assert!(spend.resets_at.is_some());
        assert_eq!(
            ledger.charge(&charge("a", 0.6)).expect("answers"),
            LedgerOutcome::Replayed {
                answer: b"a".to_vec()
            }
        );
        let LedgerOutcome::Exceeded(spend) = ledger.charge(&charge("b", 0.6)).expect("answers")
        else {
            panic!("expected a refusal");
        };
        assert!((spend.remaining() - 0.4).abs() < 1e-9);
        let user = ledger.spend("alice", now).expect("reads");
        assert_eq!(user.charges, 1);
        // The stored answer, read without a charge (by the subject's pseudonym).
        assert_eq!(ledger.stored_answer("alice", "a"), Ok(Some(b"a".to_vec())));
        assert_eq!(ledger.stored_answer("alice", "b"), Ok(None));
        assert_eq!(ledger.stored_answer("bob", "a"), Ok(None));
        assert_eq!(ledger.spend("alice", now).expect("reads").charges, 1);
    }

    /// A window whose end `SystemTime` cannot hold (`budget_window_secs` near `u64::MAX`
    /// used to panic in `start + window`) reports no reset time instead.
    #[test]
    fn a_window_too_long_for_system_time_reports_no_reset() {
        let key = PseudonymKey::new(&[7_u8; 32]).expect("key");
        let ledger = StateLedger::new(Arc::new(state::InMemoryLedger::new()), key);
        let charge = LedgerCharge {
            subject: "bob",
            request_id: "a",
            rho: 0.5,
            cap: 1.0,
            window: Some(Duration::from_secs(u64::MAX)),
            now: SystemTime::now(),
            answer: b"a",
        };
        let LedgerOutcome::Charged(spend) = ledger.charge(&charge).expect("charges") else {
            panic!("expected a charge");
        };
        assert_eq!(spend.resets_at, None);
        assert!((spend.spent - 0.5).abs() < 1e-9);
    }
}
