//! The one error type of the `fairness` crate.

use thiserror::Error;

/// Everything that can go wrong when building or running a re-ranker or computing a metric.
///
/// Every variant names the offending constraint, parameter or input so that the gRPC layer,
/// the config loader and the CLI can show it to a person unchanged. Map it to
/// `INVALID_ARGUMENT` except [`FairnessError::KTooLarge`] (`OUT_OF_RANGE`).
#[derive(Debug, Clone, PartialEq, Error)]
pub enum FairnessError {
    /// The requested constraint name is not registered. Names are matched exactly
    /// (case-sensitive, no trimming).
    #[error(
        "unknown fairness constraint `{name}`{hint} (registered names, exact and case-sensitive: {known})"
    )]
    UnknownConstraint {
        /// The name that was asked for.
        name: String,
        /// Comma-separated registered names.
        known: String,
        /// Empty, or a remark such as "; did you mean `fa*ir`?" when a registered name
        /// differs from `name` only in letter case or surrounding whitespace.
        hint: String,
    },
    /// The constraint specification is not an object with a string `name`.
    #[error("invalid fairness specification: {reason}")]
    InvalidSpec {
        /// What is wrong with the specification.
        reason: String,
    },
    /// A required parameter is absent.
    #[error("constraint `{constraint}`: missing required parameter `{parameter}`")]
    MissingParameter {
        /// The constraint being built.
        constraint: String,
        /// The parameter that is missing.
        parameter: String,
    },
    /// A parameter has the wrong type or an out-of-range value.
    #[error("constraint `{constraint}`: invalid parameter `{parameter}`: {reason}")]
    InvalidParameter {
        /// The constraint being built.
        constraint: String,
        /// The offending parameter.
        parameter: String,
        /// Why the value was refused.
        reason: String,
    },
    /// A parameter the constraint does not take (often a typo).
    #[error(
        "constraint `{constraint}`: unknown parameter `{parameter}` (expected one of: {expected})"
    )]
    UnknownParameter {
        /// The constraint being built.
        constraint: String,
        /// The parameter that is not understood.
        parameter: String,
        /// Comma-separated accepted parameter names.
        expected: String,
    },
    /// `Registry::register` was called twice with the same name.
    #[error("fairness constraint `{name}` is already registered")]
    DuplicateConstraint {
        /// The name registered twice.
        name: String,
    },
    /// The candidate pool breaks the input contract (finite scores in non-increasing order).
    #[error("invalid candidate pool at position {position}: {reason}")]
    InvalidPool {
        /// Zero-based pool position of the first offending candidate.
        position: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The requested list length is larger than the constraint supports.
    #[error("constraint `{constraint}`: k = {k} exceeds the supported maximum {max}")]
    KTooLarge {
        /// The constraint being run.
        constraint: String,
        /// The requested output length.
        k: usize,
        /// The largest supported output length.
        max: usize,
    },
    /// The amortized state holds negative or non-finite totals.
    #[error("invalid amortized state: {reason}")]
    InvalidState {
        /// What is wrong with the state.
        reason: String,
    },
    /// A metric or helper function received inconsistent input.
    #[error("{function}: {reason}")]
    InvalidInput {
        /// The function that refused its input.
        function: &'static str,
        /// What is wrong with the input.
        reason: String,
    },
}

impl FairnessError {
    /// Shorthand for [`FairnessError::InvalidInput`].
    pub(crate) fn input(function: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidInput {
            function,
            reason: reason.into(),
        }
    }
}
