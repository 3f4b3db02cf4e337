//! The privacy budget ledger: its object-safe interface, the request and outcome types, and
//! the accounting rule shared by every implementation.
//!
//! # Accounting rule
//!
//! Each user (by [`Pseudonym`]) has one open window of fixed length. A window starts at the
//! first charge after the previous window ended (`now >= window_start + window`); a new
//! window starts with nothing spent. A charge of `rho` is accepted when
//! `spent + rho <= cap`, and then `spent` grows by `rho` and the answer is stored under the
//! request id. A request id already stored for the user is a *replay*: no new charge, the
//! stored answer comes back. If the clock goes backwards (`now < window_start`), the current
//! window stays open (it never resets early).
//!
//! The cap and window length come with every request (they are configuration); the ledger
//! stores the latest ones only to report them in [`UserSpend`].

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::StateError;
use crate::pseudonym::Pseudonym;
use crate::rho::Rho;

/// The longest accepted request id, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

/// The largest stored answer, in bytes.
pub const MAX_ANSWER_BYTES: usize = 16 << 20;

/// One charge: "user `pseudonym` wants `answer` released for request `request_id` at a cost
/// of `rho`, under cap `cap` per window of length `window`".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    /// Whose budget.
    pub pseudonym: Pseudonym,
    /// Idempotency key chosen by the client (non-empty, at most [`MAX_REQUEST_ID_BYTES`]).
    pub request_id: String,
    /// The privacy cost of releasing `answer` (already rounded up to fixed point).
    pub rho: Rho,
    /// The user's budget per window.
    pub cap: Rho,
    /// The window length (at least one millisecond).
    pub window: Duration,
    /// The current time (the server's clock).
    pub now: SystemTime,
    /// The serialized answer to release; stored so a retry gets the same bytes back.
    pub answer: Vec<u8>,
}

/// What a charge did.
#[derive(Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// The budget was charged and the answer stored; release it. Durable before returned.
    Charged {
        /// Spent in the current window, including this charge.
        spent: Rho,
        /// `cap - spent`.
        remaining: Rho,
    },
    /// The request id was seen before for this user: release `answer` (not the new one).
    /// Nothing was charged.
    Replayed {
        /// The answer stored by the first charge of this request id.
        answer: Vec<u8>,
        /// Spent in the current window.
        spent: Rho,
        /// `cap - spent`.
        remaining: Rho,
    },
    /// The charge would exceed the cap: nothing was written; do not release the answer.
    Exceeded {
        /// Spent in the current window.
        spent: Rho,
        /// `cap - spent` (less than the requested charge).
        remaining: Rho,
    },
}

impl fmt::Debug for ChargeOutcome {
    /// Shows the answer's length only (answers are personal data).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChargeOutcome::Charged { spent, remaining } => f
                .debug_struct("Charged")
                .field("spent", spent)
                .field("remaining", remaining)
                .finish(),
            ChargeOutcome::Replayed {
                answer,
                spent,
                remaining,
            } => f
                .debug_struct("Replayed")
                .field("answer_bytes", &answer.len())
                .field("spent", spent)
                .field("remaining", remaining)
                .finish(),
            ChargeOutcome::Exceeded { spent, remaining } => f
                .debug_struct("Exceeded")
                .field("spent", spent)
                .field("remaining", remaining)
                .finish(),
        }
    }
}

impl ChargeOutcome {
    /// Spent in the current window after this outcome.
    pub fn spent(&self) -> Rho {
        match self {
            ChargeOutcome::Charged { spent, .. }
            | ChargeOutcome::Replayed { spent, .. }
            | ChargeOutcome::Exceeded { spent, .. } => *spent,
        }
    }

    /// Budget left in the current window after this outcome.
    pub fn remaining(&self) -> Rho {
        match self {
            ChargeOutcome::Charged { remaining, .. }
            | ChargeOutcome::Replayed { remaining, .. }
            | ChargeOutcome::Exceeded { remaining, .. } => *remaining,
        }
    }
}

/// A user's budget as of some time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpend {
    /// Spent in the window open at that time (zero when none is open).
    pub spent: Rho,
    /// The cap of the latest charge attempt, `None` for a user never charged.
    pub cap: Option<Rho>,
    /// Start of the open window, `None` when no window is open at that time.
    pub window_start: Option<SystemTime>,
    /// The window length of the latest charge, `None` for a user never charged.
    pub window: Option<Duration>,
    /// Charges accepted in the open window.
    pub charges: u64,
    /// Budget reserved durably for this user but not yet used by any answer (a lease of
    /// [`LeasedLedger`](crate::LeasedLedger); always zero for the other ledgers). It is *not*
    /// part of `spent`: `spent` is what released answers used. The durable record holds
    /// `spent + leased_unused`; a crash turns `leased_unused` into spent (wasted, never
    /// refunded), a clean close returns it.
    pub leased_unused: Rho,
}

impl UserSpend {
    /// `cap - spent`, or `None` for a user never charged.
    pub fn remaining(&self) -> Option<Rho> {
        self.cap.map(|cap| cap.saturating_sub(self.spent))
    }
}

/// An answer stored by an accepted charge.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    /// The bytes to release again.
    pub answer: Vec<u8>,
    /// What the first charge cost.
    pub rho: Rho,
    /// When it was charged.
    pub charged_at: SystemTime,
}

impl fmt::Debug for StoredAnswer {
    /// Shows the answer's length only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredAnswer")
            .field("answer_bytes", &self.answer.len())
            .field("rho", &self.rho)
            .field("charged_at", &self.charged_at)
            .finish()
    }
}

/// What a ledger has counted over all users ([`BudgetLedger::totals`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerTotals {
    /// Subjects (pseudonyms) that currently have a ledger entry: a user record, written by
    /// the subject's first accepted charge (a subject whose charges were all refused has
    /// none). Records are never deleted today ([`BudgetLedger::prune`] deletes stored answers,
    /// not users), so the figure only grows; should a later version prune user records, it
    /// falls with them: it counts entries, not everyone ever charged.
    pub subjects: u64,
    /// Total rho of the accepted charges (`Charged` outcomes) since the ledger (for a
    /// durable ledger, the database file) was created: replays and refusals add nothing,
    /// and budget reserved but not used by an answer (a lease) is not charged. It saturates
    /// at [`Rho::MAX`] instead of wrapping. What a crash or an older database file leaves
    /// uncounted depends on the implementation (see each ledger's `totals`).
    pub rho_charged: Rho,
}

/// A per-user privacy budget ledger.
///
/// Object-safe and shareable (`Arc<dyn BudgetLedger>`), so that a store shared by many
/// replicas can implement it later. Contract for implementations:
/// - [`charge`](BudgetLedger::charge) is atomic per user: concurrent charges never push
///   `spent` above the cap, and a request id is charged at most once per user;
/// - an outcome `Charged` is durable when returned (a crash right after must not lose it);
///   a crash may waste budget, never refund it;
/// - any error means "not charged, do not release" (fail closed).
pub trait BudgetLedger: Send + Sync + fmt::Debug {
    /// Charges `request.rho` to the user, or replays, or refuses (see [`ChargeOutcome`]).
    fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, StateError>;

    /// The answer stored for this user's request id, if any (committed state; use it to skip
    /// computing an answer that a retry would replay anyway).
    fn lookup(
        &self,
        pseudonym: &Pseudonym,
        request_id: &str,
    ) -> Result<Option<StoredAnswer>, StateError>;

    /// The user's budget as of `now`.
    fn spend(&self, pseudonym: &Pseudonym, now: SystemTime) -> Result<UserSpend, StateError>;

    /// Deletes stored answers charged before `older_than` and returns how many. Keep at least
    /// one window of answers: a retry whose answer was pruned is charged again.
    fn prune(&self, older_than: SystemTime) -> Result<u64, StateError>;

    /// Waits until everything accepted so far is durable.
    fn flush(&self) -> Result<(), StateError>;

    /// The ledger's totals over all users (see [`LedgerTotals`]): cheap (no scan over users
    /// or answers), for status reports.
    fn totals(&self) -> Result<LedgerTotals, StateError>;

    /// Flushes and releases the store; later calls fail with [`StateError::Closed`]. Closing
    /// twice is not an error.
    fn close(&self) -> Result<(), StateError>;
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_millis(time: SystemTime, field: &'static str) -> Result<u64, StateError> {
    let since = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| StateError::InvalidArgument {
            field,
            reason: "is before the Unix epoch".to_string(),
        })?;
    u64::try_from(since.as_millis()).map_err(|_| StateError::InvalidArgument {
        field,
        reason: "is too far in the future".to_string(),
    })
}

/// The time `millis` after the Unix epoch.
pub(crate) fn from_unix_millis(millis: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis)
}

/// A checked charge request in storage units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChargeParams {
    pub(crate) rho: u64,
    pub(crate) cap: u64,
    pub(crate) window_ms: u64,
    pub(crate) now_ms: u64,
}

impl ChargeRequest {
    /// Checks the fields and converts them to storage units.
    pub(crate) fn params(&self) -> Result<ChargeParams, StateError> {
        if self.request_id.is_empty() || self.request_id.len() > MAX_REQUEST_ID_BYTES {
            return Err(StateError::InvalidArgument {
                field: "request_id",
                reason: format!(
                    "must have 1 to {MAX_REQUEST_ID_BYTES} bytes, has {}",
                    self.request_id.len()
                ),
            });
        }
        if self.answer.len() > MAX_ANSWER_BYTES {
            return Err(StateError::InvalidArgument {
                field: "answer",
                reason: format!(
                    "has {} bytes, at most {MAX_ANSWER_BYTES} can be stored",
                    self.answer.len()
                ),
            });
        }
        let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        if window_ms == 0 {
            return Err(StateError::InvalidArgument {
                field: "window",
                reason: "must be at least one millisecond".to_string(),
            });
        }
        Ok(ChargeParams {
            rho: self.rho.as_nano(),
            cap: self.cap.as_nano(),
            window_ms,
            now_ms: unix_millis(self.now, "now")?,
        })
    }
}

/// The stored state of one user's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UserRecord {
    pub(crate) window_start_ms: u64,
    pub(crate) window_ms: u64,
    pub(crate) cap: u64,
    pub(crate) spent: u64,
    pub(crate) charges: u64,
}

/// Encoded size of a [`UserRecord`].
pub(crate) const USER_RECORD_BYTES: usize = 40;

impl UserRecord {
    /// Whether the window is over at `now_ms` for a window length `window_ms`.
    pub(crate) fn expired(&self, now_ms: u64, window_ms: u64) -> bool {
        now_ms >= self.window_start_ms.saturating_add(window_ms)
    }

    /// Fixed little-endian layout: window start, window length, cap, spent, charges.
    pub(crate) fn encode(&self) -> [u8; USER_RECORD_BYTES] {
        let mut bytes = [0_u8; USER_RECORD_BYTES];
        let fields = [
            self.window_start_ms,
            self.window_ms,
            self.cap,
            self.spent,
            self.charges,
        ];
        for (chunk, field) in bytes.chunks_exact_mut(8).zip(fields) {
            chunk.copy_from_slice(&field.to_le_bytes());
        }
        bytes
    }

    /// The inverse of [`UserRecord::encode`]; `None` for a wrong length.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != USER_RECORD_BYTES {
            return None;
        }
        let mut fields = [0_u64; 5];
        for (field, chunk) in fields.iter_mut().zip(bytes.chunks_exact(8)) {
            *field = u64::from_le_bytes(chunk.try_into().ok()?);
        }
        let [window_start_ms, window_ms, cap, spent, charges] = fields;
        Some(Self {
            window_start_ms,
            window_ms,
            cap,
            spent,
            charges,
        })
    }

    /// The spend report as of `now_ms`, using the stored window length.
    pub(crate) fn spend_at(record: Option<&Self>, now_ms: u64) -> UserSpend {
        match record {
            None => UserSpend {
                spent: Rho::ZERO,
                cap: None,
                window_start: None,
                window: None,
                charges: 0,
                leased_unused: Rho::ZERO,
            },
            Some(record) => {
                let open = !record.expired(now_ms, record.window_ms);
                UserSpend {
                    spent: Rho::from_nano(if open { record.spent } else { 0 }),
                    cap: Some(Rho::from_nano(record.cap)),
                    window_start: open.then(|| from_unix_millis(record.window_start_ms)),
                    window: Some(Duration::from_millis(record.window_ms)),
                    charges: if open { record.charges } else { 0 },
                    leased_unused: Rho::ZERO,
                }
            }
        }
    }
}

/// A stored answer in storage units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestRecord {
    pub(crate) charged_at_ms: u64,
    pub(crate) rho: u64,
    pub(crate) answer: Vec<u8>,
}

/// Bytes before the answer in an encoded [`RequestRecord`].
const REQUEST_HEADER_BYTES: usize = 16;

impl RequestRecord {
    /// Little-endian charge time and charge, then the answer bytes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(REQUEST_HEADER_BYTES + self.answer.len());
        bytes.extend_from_slice(&self.charged_at_ms.to_le_bytes());
        bytes.extend_from_slice(&self.rho.to_le_bytes());
        bytes.extend_from_slice(&self.answer);
        bytes
    }

    /// The inverse of [`RequestRecord::encode`]; `None` when too short.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let (header, answer) = bytes.split_at_checked(REQUEST_HEADER_BYTES)?;
        let (time, rho) = header.split_at(8);
        Some(Self {
            charged_at_ms: u64::from_le_bytes(time.try_into().ok()?),
            rho: u64::from_le_bytes(rho.try_into().ok()?),
            answer: answer.to_vec(),
        })
    }

    /// The public form.
    pub(crate) fn into_stored(self) -> StoredAnswer {
        StoredAnswer {
            answer: self.answer,
            rho: Rho::from_nano(self.rho),
            charged_at: from_unix_millis(self.charged_at_ms),
        }
    }
}

/// What to do with a (non-replayed) charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Write `record` for the user, store the answer, report `outcome`.
    Accept {
        record: UserRecord,
        outcome: ChargeOutcome,
    },
    /// Write nothing, report `outcome`.
    Refuse { outcome: ChargeOutcome },
}

/// The user's window as the request sees it: the stored one if still open, else a new one.
pub(crate) fn current_window(existing: Option<&UserRecord>, params: &ChargeParams) -> UserRecord {
    match existing {
        Some(record) if !record.expired(params.now_ms, params.window_ms) => UserRecord {
            window_ms: params.window_ms,
            cap: params.cap,
            ..*record
        },
        _ => UserRecord {
            window_start_ms: params.now_ms,
            window_ms: params.window_ms,
            cap: params.cap,
            spent: 0,
            charges: 0,
        },
    }
}

/// The accounting rule for a charge whose request id is new.
pub(crate) fn decide(existing: Option<&UserRecord>, params: &ChargeParams) -> Decision {
    let mut record = current_window(existing, params);
    match record.spent.checked_add(params.rho) {
        Some(spent) if spent <= params.cap => {
            record.spent = spent;
            record.charges = record.charges.saturating_add(1);
            Decision::Accept {
                record,
                outcome: ChargeOutcome::Charged {
                    spent: Rho::from_nano(spent),
                    remaining: Rho::from_nano(params.cap - spent),
                },
            }
        }
        _ => Decision::Refuse {
            outcome: ChargeOutcome::Exceeded {
                spent: Rho::from_nano(record.spent),
                remaining: Rho::from_nano(params.cap.saturating_sub(record.spent)),
            },
        },
    }
}

/// The outcome for a replayed request id.
pub(crate) fn replay(
    existing: Option<&UserRecord>,
    params: &ChargeParams,
    stored: RequestRecord,
) -> ChargeOutcome {
    let record = current_window(existing, params);
    ChargeOutcome::Replayed {
        answer: stored.answer,
        spent: Rho::from_nano(record.spent),
        remaining: Rho::from_nano(params.cap.saturating_sub(record.spent)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(rho: u64, cap: u64, window_ms: u64, now_ms: u64) -> ChargeParams {
        ChargeParams {
            rho,
            cap,
            window_ms,
            now_ms,
        }
    }

    fn accepted(decision: Decision) -> UserRecord {
        match decision {
            Decision::Accept { record, .. } => record,
            Decision::Refuse { outcome } => panic!("refused: {outcome:?}"),
        }
    }

    #[test]
    fn charges_accumulate_up_to_the_cap_inclusive() {
        let first = accepted(decide(None, &params(4, 10, 100, 1000)));
        assert_eq!(
            (first.spent, first.charges, first.window_start_ms),
            (4, 1, 1000)
        );
        let second = accepted(decide(Some(&first), &params(6, 10, 100, 1050)));
        assert_eq!((second.spent, second.charges), (10, 2));
        match decide(Some(&second), &params(1, 10, 100, 1060)) {
            Decision::Refuse {
                outcome: ChargeOutcome::Exceeded { spent, remaining },
            } => assert_eq!((spent.as_nano(), remaining.as_nano()), (10, 0)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_new_window_resets_spend_and_a_backwards_clock_does_not() {
        let full = accepted(decide(None, &params(10, 10, 100, 1000)));
        // 1099 is still inside [1000, 1100).
        assert!(matches!(
            decide(Some(&full), &params(1, 10, 100, 1099)),
            Decision::Refuse { .. }
        ));
        // Clock went backwards: the window stays open.
        assert!(matches!(
            decide(Some(&full), &params(1, 10, 100, 500)),
            Decision::Refuse { .. }
        ));
        let fresh = accepted(decide(Some(&full), &params(1, 10, 100, 1100)));
        assert_eq!(
            (fresh.spent, fresh.charges, fresh.window_start_ms),
            (1, 1, 1100)
        );
    }

    #[test]
    fn overflowing_sums_are_refused() {
        let record = accepted(decide(None, &params(u64::MAX - 1, u64::MAX, 100, 0)));
        assert!(matches!(
            decide(Some(&record), &params(2, u64::MAX, 100, 1)),
            Decision::Refuse { .. }
        ));
    }

    #[test]
    fn records_round_trip_and_bad_lengths_are_rejected() {
        let record = UserRecord {
            window_start_ms: 1,
            window_ms: 2,
            cap: 3,
            spent: 4,
            charges: 5,
        };
        assert_eq!(UserRecord::decode(&record.encode()), Some(record));
        assert_eq!(UserRecord::decode(&[0; 39]), None);
        let request = RequestRecord {
            charged_at_ms: 9,
            rho: 8,
            answer: b"xyz".to_vec(),
        };
        assert_eq!(RequestRecord::decode(&request.encode()), Some(request));
        assert_eq!(RequestRecord::decode(&[0; 15]), None);
    }

    #[test]
    fn spend_reports_an_expired_window_as_empty() {
        let record = accepted(decide(None, &params(3, 10, 100, 1000)));
        let open = UserRecord::spend_at(Some(&record), 1050);
        assert_eq!(open.spent, Rho::from_nano(3));
        assert_eq!(open.remaining(), Some(Rho::from_nano(7)));
        assert_eq!(open.window_start, Some(from_unix_millis(1000)));
        let closed = UserRecord::spend_at(Some(&record), 1100);
        assert_eq!(
            (closed.spent, closed.charges, closed.window_start),
            (Rho::ZERO, 0, None)
        );
        assert_eq!(UserRecord::spend_at(None, 5).cap, None);
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let request = ChargeRequest {
            pseudonym: Pseudonym::from_bytes([0; 32]),
            request_id: String::new(),
            rho: Rho::ZERO,
            cap: Rho::ZERO,
            window: Duration::from_secs(1),
            now: SystemTime::now(),
            answer: Vec::new(),
        };
        let field = |request: &ChargeRequest| match request.params() {
            Err(StateError::InvalidArgument { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(&request), "request_id");
        let long_id = ChargeRequest {
            request_id: "x".repeat(MAX_REQUEST_ID_BYTES + 1),
            ..request.clone()
        };
        assert_eq!(field(&long_id), "request_id");
        let no_window = ChargeRequest {
            request_id: "r".into(),
            window: Duration::from_micros(999),
            ..request.clone()
        };
        assert_eq!(field(&no_window), "window");
        let ancient = ChargeRequest {
            request_id: "r".into(),
            now: UNIX_EPOCH - Duration::from_secs(1),
            ..request
        };
        assert_eq!(field(&ancient), "now");
    }
}
