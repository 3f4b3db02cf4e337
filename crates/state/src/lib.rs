//! Durable server state: the per-user privacy budget ledger and the amortized fairness state.
