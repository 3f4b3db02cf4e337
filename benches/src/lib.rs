//! Shared helpers for fairrank benchmarks and the gRPC load generator.
