//! The error type of the `benches` library: everything the load generator refuses or fails at.

use thiserror::Error;

/// Why a load-generator operation failed.
#[derive(Debug, Error)]
pub enum LoadgenError {
    /// A command-line value (mix, duration, list, address...) is malformed or out of range.
    #[error("invalid {what} `{value}`: {reason}")]
    InvalidArgument {
        /// Which setting, e.g. `--mix`.
        what: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The address is not a loopback address (the load generator only targets this machine).
    #[error(
        "refusing to send load to `{0}`: only loopback addresses (127.0.0.0/8, ::1, localhost) are allowed"
    )]
    NotLoopback(String),
    /// Connecting to a server failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address that was dialled.
        addr: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The probe call that checks a request kind and measures its response failed.
    #[error("probe {kind} against {addr} failed: {code:?}: {message}")]
    Probe {
        /// The request kind being probed, e.g. `candidates1000`.
        kind: String,
        /// The server address.
        addr: String,
        /// gRPC status code of the failure.
        code: tonic::Code,
        /// Status message of the failure.
        message: String,
    },
    /// Starting the in-process Echo server failed.
    #[error("cannot start the in-process Echo server: {0}")]
    EchoServer(#[source] std::io::Error),
    /// A worker task panicked or was cancelled.
    #[error("load worker failed: {0}")]
    Worker(String),
}

impl LoadgenError {
    /// Shorthand for [`LoadgenError::InvalidArgument`].
    pub fn invalid(
        what: &'static str,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self::InvalidArgument {
            what,
            value: value.into(),
            reason: reason.into(),
        }
    }
}
