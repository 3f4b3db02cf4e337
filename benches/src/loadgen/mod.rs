//! The gRPC load generator behind `fairrank-loadgen`: a closed loop against
//! `fairrank.v1.Ranker/Rank` at given concurrencies and request mixes, next to a bare
//! `fairrank.bench.v1.Echo` baseline with the same message sizes, so every result reads as
//! a ratio to the transport floor.
//!
//! # Overview
//!
//! - [`mix`]: request kinds (`candidates<N>`, `catalog`) and weighted mixes.
//! - [`requests`]: pre-built Rank templates and size-matched Echo requests.
//! - [`codec`]: sends pre-encoded messages (plus a fresh request id) and measures responses
//!   without decoding them, so the client's per-call work is one copy.
//! - [`closed_loop`]: the callers, warm-up and measured window of one step.
//! - [`cpu`]: CPU time per call of the load generator and the server.
//! - [`echo`]: the in-process Echo server.
//! - [`stats`]: exact nearest-rank percentiles and error tallies.
//! - [`report`]: step reports as a table or JSON lines.
//! - [`run`]: a whole run (probe, baseline, steps).
//! - [`parse`]: durations, concurrency lists, loopback-only addresses.
//!
//! # Example
//!
//! Measure an Echo server in a closed loop for a moment:
//!
//! ```
//! use std::time::Duration;
//! use benches::loadgen::closed_loop::{connect, run_step, StepConfig, StopRule, Workload, ECHO_PATH};
//! use benches::loadgen::echo::EchoServerHandle;
//! use benches::loadgen::mix::{Mix, RequestKind};
//! use prost::Message;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! let server = EchoServerHandle::start(1)?;
//! let channels = connect(&server.uri(), 1, Duration::from_secs(5)).await?;
//! let request = benches::loadgen::requests::echo_template(1_000, 200)?;
//! let workload = Workload {
//!     path: tonic::codegen::http::uri::PathAndQuery::from_static(ECHO_PATH),
//!     fresh_request_ids: false,
//!     timings_field: None,
//!     mix: Mix::single(RequestKind::Catalog),
//!     bodies: vec![vec![request.encode_to_vec().into()]],
//! };
//! let config = StepConfig {
//!     concurrency: 2,
//!     warmup: Duration::from_millis(20),
//!     stop: StopRule::Requests(100),
//!     seed: 1,
//!     cpu_meter: None,
//! };
//! let result = run_step(&channels, workload, &config).await?;
//! assert_eq!(result.overall.requests_ok, 100);
//! assert_eq!(result.overall.mean_response_bytes, 200.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod closed_loop;
pub mod codec;
pub mod cpu;
pub mod echo;
pub mod mix;
pub mod parse;
pub mod report;
pub mod requests;
pub mod run;
pub mod stats;
