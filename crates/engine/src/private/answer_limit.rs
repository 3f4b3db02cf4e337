//! The largest answer the caller can deliver, asked before a DP charge, so that budget is
//! never spent on an answer the caller would refuse to send.

use std::fmt;

use crate::error::EngineError;
use crate::response::RankResponse;

/// What the caller can deliver of an answer (the server: `server.max_message_bytes` of
/// encoded `fairrank.v1.RankResponse`).
///
/// A DP answer that would be charged is built whole (items, explanations, reports) and
/// measured by [`AnswerLimit::size_bound`] before the ledger is charged; above
/// [`AnswerLimit::max_bytes`] it is refused with [`EngineError::AnswerTooLarge`] and nothing
/// is charged, stored or released, so its request id stays free. (If the ledger already
/// holds an answer for the request id, that stored answer is replayed instead, as the charge
/// would have: see [`PrivacyLedger::stored_answer`](crate::PrivacyLedger::stored_answer).)
///
/// The answer handed to `size_bound` carries the noisy release not yet paid for: an
/// implementation measures it and keeps nothing of it.
pub trait AnswerLimit: Send + Sync + fmt::Debug {
    /// An upper bound of the bytes `answer` takes when delivered, whatever the values of
    /// what is set after the charge: the timings, the privacy report's `rho_remaining`,
    /// `rho_budget` and `budget_resets_at`, and the replay flags (a retry with the same
    /// request id delivers the same answer as a replay, which must fit too). In `answer`
    /// these are as in a fresh answer before the charge: `None` and `false`.
    fn size_bound(&self, answer: &RankResponse) -> usize;

    /// The most bytes a delivered answer may take.
    fn max_bytes(&self) -> usize;
}

/// `Ok` if `limit` (none: no limit) can deliver `answer`, else the refusal that names `k`.
pub(crate) fn check(
    limit: Option<&dyn AnswerLimit>,
    answer: &RankResponse,
) -> Result<(), EngineError> {
    let Some(limit) = limit else {
        return Ok(());
    };
    let (bytes, max) = (limit.size_bound(answer), limit.max_bytes());
    if bytes > max {
        return Err(EngineError::AnswerTooLarge {
            field: "k".to_owned(),
            bytes,
            limit: max,
        });
    }
    Ok(())
}
