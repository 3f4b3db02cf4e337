#!/usr/bin/env bash
# Crash test of the privacy budget ledger: starts `fairrank serve` with DP on, loads it
# with DP requests from 8 clients, kills it with SIGKILL mid-load, checks with
# `fairrank privacy ledger show` that every answer a client received is charged in the
# ledger, restarts it and checks that the released request ids replay their stored answers.
# See crates/server/tests/grpc_privacy_crash.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test -p server --test grpc_privacy_crash -- --nocapture "$@"
