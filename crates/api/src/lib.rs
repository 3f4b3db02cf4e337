//! Rust code generated from `proto/`: the versioned gRPC API of fairrank (messages, server
//! and client stubs), its descriptor set for server reflection, and the small helpers that
//! both sides of the wire share.
//!
//! # Overview
//!
//! The `.proto` files under `proto/` at the repository root are the API documentation:
//! every message, field, enum value and method is documented there (units, defaults,
//! limits, error codes), and the generated Rust items carry the same text.
//!
//! - [`fairrank::v1`] (package `fairrank.v1`, stable): the `Ranker` service (`Rank`,
//!   `RankBatch`), the `Admin` service (`ReloadTable`, `RollbackTable`,
//!   `SetPersonalization`, `GetStatus`), fairness and privacy policies and reports, consent,
//!   explanations and the [`ErrorReason`](fairrank::v1::ErrorReason) vocabulary.
//! - [`fairrank::bench::v1`] (package `fairrank.bench.v1`, not part of the stable API): the
//!   `Echo` service, the transport-floor baseline for the load generator.
//! - [`FILE_DESCRIPTOR_SET`]: every file above plus its `google/protobuf` imports, with
//!   comments, for `tonic-reflection`.
//! - [`status`]: the error contract (reason and field in response metadata).
//! - [`params`]: `google.protobuf.Struct` constraint parameters to and from JSON.
//!
//! Health checking (`grpc.health.v1`) comes from `tonic-health` and is not duplicated here.
//!
//! # Example
//!
//! ```
//! use api::fairrank::v1::{rank_request::User, FairnessPolicy, RankRequest};
//! use prost::Message;
//!
//! let config = serde_json::json!({"p": 0.5, "alpha": 0.1, "protected": 1});
//! let params = config.as_object().map(api::params::json_to_struct).transpose()?;
//! let request = RankRequest {
//!     request_id: "0b6c1c1e-6f3a-4c1e-9d55-3f1f8a0e7c21".into(),
//!     user: Some(User::UserId("user-42".into())),
//!     k: 10,
//!     pool_size: Some(100),
//!     fairness: Some(FairnessPolicy {
//!         constraint: "fa*ir".into(),
//!         params,
//!         ..Default::default()
//!     }),
//!     ..Default::default()
//! };
//! let wire = request.encode_to_vec();
//! assert_eq!(RankRequest::decode(wire.as_slice())?, request);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod error;
pub mod params;
pub mod status;

pub use error::ApiError;
pub use status::{ERROR_FIELD_METADATA_KEY, ERROR_REASON_METADATA_KEY};

/// Generated code, one module per protobuf package.
pub mod fairrank {
    /// Package `fairrank.v1`: the stable ranking and admin API.
    pub mod v1 {
        // `rank_batch_result::Outcome` holds a whole `RankResponse` beside a small
        // `EntryError`; boxing it would cost an allocation per batch entry for nothing.
        #![allow(clippy::large_enum_variant)]
        tonic::include_proto!("fairrank.v1");
    }

    /// Benchmark-only packages.
    pub mod bench {
        /// Package `fairrank.bench.v1`: the `Echo` transport-floor baseline.
        pub mod v1 {
            tonic::include_proto!("fairrank.bench.v1");
        }
    }
}

/// Encoded `google.protobuf.FileDescriptorSet` of every file in `proto/` and its imports,
/// with source comments, for `tonic_reflection::server::Builder::register_encoded_file_descriptor_set`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fairrank_descriptor");

/// Fully qualified names of the services defined here, for health reporting and
/// reflection checks: `fairrank.v1.Ranker`, `fairrank.v1.Admin`, `fairrank.bench.v1.Echo`.
pub const SERVICE_NAMES: [&str; 3] = [
    fairrank::v1::ranker_server::SERVICE_NAME,
    fairrank::v1::admin_server::SERVICE_NAME,
    fairrank::bench::v1::echo_server::SERVICE_NAME,
];

#[cfg(test)]
mod tests;
