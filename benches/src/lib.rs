//! Shared helpers for fairrank benchmarks and the gRPC load generator.
//!
//! The criterion benchmarks live in `benches/`; the load generator (binary
//! `fairrank-loadgen`) is built from [`loadgen`]. See `BENCHMARKS.md` at the repository root
//! for what was measured, how, and against which targets.

pub mod error;
pub mod loadgen;
pub mod synthetic;
pub mod thread_cpu;

pub use error::LoadgenError;
