//! The one error type of the engine: every way a request, a reload or a configuration fails.
//!
//! The server maps [`EngineError`] to gRPC status codes in exactly one place; each variant
//! corresponds to one status code and carries the machine-readable reason and, where one
//! field is at fault, that field's path in the `fairrank.v1` request (`k`, `user_id`,
//! `inline_user.embedding`, `fairness.params.alpha`, ...). Messages may name the ids the
//! caller sent (they are the caller's own data); the engine itself never logs them.

use std::path::PathBuf;

use crate::tables::TableKind;

/// Why an argument is invalid (the reasons of `INVALID_ARGUMENT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidReason {
    /// A field is malformed, out of range or missing.
    InvalidField,
    /// A server limit was exceeded (k, pool size, candidates, batch size, id length).
    LimitExceeded,
    /// The inline embedding's dimension differs from the item table's.
    DimensionMismatch,
    /// The fairness constraint's parameters are wrong for the constraint.
    InvalidConstraintParams,
    /// The fairness constraint is not registered.
    UnknownConstraint,
}

/// What was not found (the reasons of `NOT_FOUND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotFoundReason {
    /// The user id is not in the user table.
    User,
    /// One or more candidate item ids are not in the item table.
    Item,
}

/// Which precondition failed (the reasons of `FAILED_PRECONDITION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreconditionReason {
    /// The request needs a table that is not loaded (a `user_id` without a user table).
    TableNotLoaded,
    /// The item table has no group attribute of the requested name.
    GroupAttributeNotFound,
    /// A rollback was asked for, but no previous table is retained.
    NoRollbackTarget,
    /// The fairness constraint cannot be met on the pool and the policy says to refuse.
    FairnessInfeasible,
    /// The privacy policy is weaker than the server requires, or costs more than the
    /// per-request maximum, or differential privacy cannot be honoured on the serving item
    /// table (its certified row norm is 0, subnormal or not finite, or its dimension is
    /// beyond the score sensitivity bound's).
    PrivacyPolicyNotAllowed,
    /// The request id was already used (and charged) for a request with other content.
    RequestIdReused,
}

/// Why a table change was aborted (the reasons of `ABORTED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
    /// Another reload or rollback of the same table is in progress.
    TableChangeInProgress,
    /// The serving generation differs from the caller's `if_generation` precondition.
    GenerationMismatch,
}

/// Why a reload was refused. On every refusal the old table keeps serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadProblem {
    /// The file does not exist.
    FileNotFound,
    /// The file exists but was refused (I/O error, bad format, bad checksum).
    InvalidFile,
    /// The file is valid but cannot serve beside the other table: a different dimension, or
    /// row norms whose scores could overflow (`tables::pair_problem`).
    IncompatibleTables,
    /// The file is valid but its header marks it with the other role: a user table offered
    /// as the item table, or the reverse (`tables::role_problem`).
    WrongRole,
}

/// Where a request's deadline was found to have passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadlineStage {
    /// Before scoring started (including a deadline that had passed on arrival).
    BeforeScoring,
    /// While waiting in the whole-catalog batch queue (the request was dropped from its batch).
    Queued,
    /// After scoring, before the answer was built.
    AfterScoring,
}

impl DeadlineStage {
    /// A short description for messages.
    pub fn describe(self) -> &'static str {
        match self {
            DeadlineStage::BeforeScoring => "before scoring",
            DeadlineStage::Queued => "while queued for the batched catalog scan",
            DeadlineStage::AfterScoring => "after scoring",
        }
    }
}

/// Every failure of the engine. One variant per gRPC status code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A request field is malformed or out of range (`INVALID_ARGUMENT`).
    #[error("invalid `{field}`: {message}")]
    InvalidArgument {
        /// Path of the offending field, for example `k` or `inline_user.embedding`.
        field: String,
        /// Machine-readable reason.
        reason: InvalidReason,
        /// What is wrong, in English.
        message: String,
    },
    /// The user or a candidate item does not exist (`NOT_FOUND`).
    #[error("not found (`{field}`): {message}")]
    NotFound {
        /// Path of the field that named the missing entity (`user_id` or `candidate_ids`).
        field: String,
        /// Machine-readable reason.
        reason: NotFoundReason,
        /// Which ids are missing.
        message: String,
    },
    /// The request or operation cannot run in the current state (`FAILED_PRECONDITION`).
    #[error("failed precondition{}: {message}", field_suffix(field))]
    FailedPrecondition {
        /// Path of the field at fault, if one is.
        field: Option<String>,
        /// Machine-readable reason.
        reason: PreconditionReason,
        /// What is missing.
        message: String,
    },
    /// The request asks for something this engine version does not implement yet
    /// (for example a fairness constraint other than `none`).
    #[error("`{field}` is not supported: {message}")]
    Unsupported {
        /// Path of the field that asks for it.
        field: String,
        /// What is not supported.
        message: String,
    },
    /// The engine is out of a resource, for example its batch queue is full
    /// (`RESOURCE_EXHAUSTED`). Retryable with backoff.
    #[error("resource exhausted: {message}")]
    ResourceExhausted {
        /// Which resource.
        message: String,
    },
    /// The subject's privacy budget cannot cover this answer and the policy says refuse
    /// (`RESOURCE_EXHAUSTED`, reason privacy budget exhausted). Nothing was charged.
    #[error("privacy budget exhausted: {message}")]
    PrivacyBudgetExhausted {
        /// The subject's remaining zCDP budget.
        rho_remaining: f64,
        /// The charge, the remaining budget and when it resets.
        message: String,
    },
    /// A DP answer larger than its caller can deliver ([`AnswerLimit`](crate::AnswerLimit)),
    /// refused before the ledger was charged: nothing was charged, stored or released, and
    /// the request id may be sent again (`RESOURCE_EXHAUSTED`, reason limit exceeded).
    #[error(
        "the answer would take up to {bytes} bytes, above the limit of {limit}; ask for a smaller \
         k or lighter explanations (nothing was charged to the privacy budget)"
    )]
    AnswerTooLarge {
        /// The request field to change: `k`.
        field: String,
        /// The answer's size bound ([`AnswerLimit::size_bound`](crate::AnswerLimit::size_bound)).
        bytes: usize,
        /// The caller's limit ([`AnswerLimit::max_bytes`](crate::AnswerLimit::max_bytes)).
        limit: usize,
    },
    /// The privacy ledger cannot be charged; the request failed closed with nothing
    /// released (`UNAVAILABLE`, reason ledger unavailable).
    #[error("privacy ledger unavailable: {message}")]
    LedgerUnavailable {
        /// What failed.
        message: String,
    },
    /// The request's deadline passed (`DEADLINE_EXCEEDED`).
    #[error("deadline exceeded {}", stage.describe())]
    DeadlineExceeded {
        /// Where it was noticed.
        stage: DeadlineStage,
    },
    /// A table change lost a race or a precondition (`ABORTED`).
    #[error("aborted: {message}")]
    Aborted {
        /// Machine-readable reason.
        reason: AbortReason,
        /// What happened.
        message: String,
    },
    /// The engine cannot serve right now, for example its scoring thread is gone
    /// (`UNAVAILABLE`).
    #[error("unavailable: {message}")]
    Unavailable {
        /// Why.
        message: String,
    },
    /// A bug: an invariant of the engine did not hold (`INTERNAL`).
    #[error("internal error: {message}")]
    Internal {
        /// What went wrong.
        message: String,
    },
    /// A table file could not be loaded; the old table keeps serving.
    #[error("cannot load the {table} table from {}: {message}", path.display())]
    Reload {
        /// Which table.
        table: TableKind,
        /// The file.
        path: PathBuf,
        /// Machine-readable problem.
        problem: ReloadProblem,
        /// The failed check, in English (from the table store).
        message: String,
    },
    /// The engine configuration is invalid (at start-up).
    #[error("invalid engine configuration `{field}`: {message}")]
    InvalidConfig {
        /// The configuration key.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn field_suffix(field: &Option<String>) -> String {
    match field {
        Some(field) => format!(" (`{field}`)"),
        None => String::new(),
    }
}

impl EngineError {
    /// The request field at fault, if exactly one is (for the `fairrank-error-field`
    /// metadata).
    pub fn field(&self) -> Option<&str> {
        match self {
            EngineError::InvalidArgument { field, .. }
            | EngineError::NotFound { field, .. }
            | EngineError::Unsupported { field, .. }
            | EngineError::AnswerTooLarge { field, .. } => Some(field),
            EngineError::FailedPrecondition { field, .. } => field.as_deref(),
            EngineError::InvalidConfig { field, .. } => Some(field),
            _ => None,
        }
    }

    /// A copy of this error whose field path is prefixed with `prefix` (for batch entries:
    /// `requests[3].` + `k`).
    pub fn with_field_prefix(mut self, prefix: &str) -> EngineError {
        match &mut self {
            EngineError::InvalidArgument { field, .. }
            | EngineError::NotFound { field, .. }
            | EngineError::Unsupported { field, .. }
            | EngineError::AnswerTooLarge { field, .. } => field.insert_str(0, prefix),
            EngineError::FailedPrecondition {
                field: Some(field), ..
            } => field.insert_str(0, prefix),
            _ => {}
        }
        self
    }

    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> EngineError {
        EngineError::InvalidArgument {
            field: field.into(),
            reason: InvalidReason::InvalidField,
            message: message.into(),
        }
    }

    pub(crate) fn limit(field: impl Into<String>, message: impl Into<String>) -> EngineError {
        EngineError::InvalidArgument {
            field: field.into(),
            reason: InvalidReason::LimitExceeded,
            message: message.into(),
        }
    }

    pub(crate) fn internal(message: impl Into<String>) -> EngineError {
        EngineError::Internal {
            message: message.into(),
        }
    }
}

impl From<kernels::KernelError> for EngineError {
    /// Requests are validated before they reach a kernel, so a kernel refusal is a bug.
    fn from(error: kernels::KernelError) -> EngineError {
        EngineError::internal(format!("scoring kernel refused validated input: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_prefix_applies_to_field_errors_only() {
        let error = EngineError::limit("k", "too big").with_field_prefix("requests[2].");
        assert_eq!(error.field(), Some("requests[2].k"));
        let deadline = EngineError::DeadlineExceeded {
            stage: DeadlineStage::Queued,
        }
        .with_field_prefix("requests[0].");
        assert_eq!(deadline.field(), None);
    }

    #[test]
    fn messages_name_the_field() {
        let error = EngineError::invalid("request_id", "must not be empty");
        assert_eq!(error.to_string(), "invalid `request_id`: must not be empty");
        let error = EngineError::FailedPrecondition {
            field: Some("user_id".into()),
            reason: PreconditionReason::TableNotLoaded,
            message: "no user table".into(),
        };
        assert_eq!(
            error.to_string(),
            "failed precondition (`user_id`): no user table"
        );
    }
}
