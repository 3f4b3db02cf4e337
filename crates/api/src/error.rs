//! The error type of the `api` crate: failures converting policy parameters between
//! `google.protobuf.Struct` and JSON.

/// Why a parameter object could not be converted. `path` names the offending value, with
/// object keys joined by `.` and list positions in brackets (for example `targets.0` or
/// `weights[2]`); the empty path is the top level.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// A protobuf `Value` has no kind set, which neither protobuf's JSON mapping nor JSON
    /// can represent.
    #[error("parameter `{path}` has no value kind")]
    MissingValueKind {
        /// Path of the value.
        path: String,
    },
    /// A number is NaN or infinite; JSON has no such numbers.
    #[error("parameter `{path}` is not a finite number")]
    NonFiniteNumber {
        /// Path of the value.
        path: String,
    },
    /// A JSON integer is too large to be represented exactly as a protobuf number (a
    /// 64-bit float holds integers exactly only up to 2^53 in magnitude).
    #[error("parameter `{path}` = {value} cannot be represented exactly (|integer| > 2^53)")]
    InexactInteger {
        /// Path of the value.
        path: String,
        /// The integer as written.
        value: String,
    },
    /// The parameters nest deeper than [`crate::params::MAX_PARAMS_DEPTH`].
    #[error("parameter `{path}` nests deeper than {limit} levels")]
    TooDeep {
        /// Path of the value at which the limit was reached.
        path: String,
        /// The depth limit.
        limit: usize,
    },
}
