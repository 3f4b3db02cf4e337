//! The ranking request path: validate, resolve user, score, select, re-rank, explain, report.
//!
//! # Overview
//!
//! An [`Engine`] serves one item table (and optionally a user table) and answers
//! [`RankRequest`]s with [`RankResponse`]s. It is a synchronous library with completion
//! callbacks: no gRPC types and no async runtime. The server converts `fairrank.v1`
//! messages to these types (field for field; error field paths are the proto's) and maps
//! [`EngineError`] to gRPC status codes in one place.
//!
//! A request goes through these stages (each timed in [`StageTimings`]):
//!
//! 1. **validate**: every field, with errors naming it (`k`, `pool_size`, `candidate_ids`,
//!    `inline_user.embedding`, ...); candidate ids are resolved to rows here.
//! 2. **resolve user**: an operator pause or a denied consent makes the answer
//!    non-personalized (ranked by the item table's prior, or in row order without one) and
//!    the user embedding is not read; otherwise the user table row or the inline embedding.
//! 3. **score**: a candidate list is scored inline ([`kernels::quantized_candidates_topk`]
//!    on the item table's int8 copy once built, same answers as [`kernels::candidates_topk`],
//!    which serves until then, with `quantized_candidates = false`, and under DP); a
//!    whole-catalog request goes to the micro-batcher ([`batcher`]), which scores concurrent
//!    requests together ([`kernels::batch_topk`]) and a lone one at once
//!    ([`kernels::par_scan_topk`]).
//! 4. **select pool / re-rank**: the top `pool_size` items, re-ranked to `k` by the fairness
//!    policy: any constraint of the `fairness` registry (`none`, `fa*ir`, `det-*`,
//!    `min-exposure`, `fairco`, `plackett-luce`), built once per policy and cached;
//!    amortized constraints keep their state per exposure scope in an
//!    [`ExposureStateStore`] (see [`FairnessSetup`]).
//! 5. **report**: exposure share by group (DCG discount `1/log2(1+rank)`), NDCG against the
//!    unconstrained order, whether the constraint held and any fallback
//!    (`fairness::answer_report`); privacy outcome.
//! 6. **explain**: layered reasons (code, sentence, top contributing dimensions).
//!
//! With differential privacy (`PrivacyMechanism::GumbelTopK`, or the configured default)
//! the user embedding is clipped, every candidate is scored, the pool is chosen by one-shot
//! Gumbel top-k and only its order is released; the subject's budget ledger
//! ([`PrivacyLedger`]) is charged durably before release, and retries with the same
//! request id get the stored answer. An answer the caller could not deliver (its
//! [`AnswerLimit`]) is refused before the charge, so it costs no budget. DP requests run on dedicated worker threads so ledger
//! commits never block the compute pool. See `private/mod.rs`.
//!
//! Tables are hot-swapped: [`Engine::reload_items`] opens, validates, warms and swaps a new
//! table atomically; requests already running finish on the table they started with;
//! [`Engine::rollback_items`] swaps the previous one back.
//!
//! Heavy work runs on the global rayon pool (and the batcher thread), never on the thread
//! that calls [`Engine::submit`].
//!
//! # Example
//!
//! ```
//! use engine::{Engine, EngineConfig, RankRequest, UserRef};
//! use store::{GroupAttribute, Table, TableData, write_table};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("items.frt");
//! write_table(&path, &TableData {
//!     dim: 2,
//!     rows: vec![1.0, 0.0, 0.0, 1.0, 0.7, 0.7],
//!     ids: vec!["a".into(), "b".into(), "c".into()],
//!     groups: vec![GroupAttribute { name: "provider_group".into(), labels: vec![0, 1, 1] }],
//!     prior: Some(vec![0.5, 0.2, 0.3]),
//!     dim_names: None,
//! })?;
//! let engine = Engine::new(EngineConfig::default(), Table::open(&path)?, None)?;
//!
//! let request = RankRequest::new("req-1", UserRef::embedding(vec![0.0, 1.0]), 2);
//! let response = engine.rank_blocking(request)?;
//! let ids: Vec<&str> = response.items.iter().map(|item| item.id.as_str()).collect();
//! assert_eq!(ids, ["b", "c"]);
//! assert!(response.personalized);
//! assert_eq!(response.fairness.ndcg_vs_unconstrained, 1.0);
//! # Ok(())
//! # }
//! ```

pub mod batcher;
mod candidate_ids;
mod config;
mod engine;
mod error;
mod explain;
mod exposure_state;
mod pipeline;
mod private;
mod request;
mod rerank;
mod response;
mod tables;
mod validate;
mod warm;

#[cfg(test)]
mod tests;

pub use batcher::BatcherStatus;
pub use candidate_ids::{CandidateIds, Iter as CandidateIdsIter};
pub use config::{CONSTRAINT_NONE, EngineConfig};
pub use engine::{BatchCallback, Callback, Engine, EngineStatus, PauseChange, RankCallback};
pub use error::{
    AbortReason, DeadlineStage, EngineError, InvalidReason, NotFoundReason, PreconditionReason,
    ReloadProblem,
};
pub use exposure_state::{
    AmortizedStoreAdapter, DEFAULT_MAX_EXPOSURE_SCOPES, ExposureStateStore, InMemoryExposureStore,
    StateUpdate, scope_key,
};
pub use private::{
    AnswerLimit, DefaultMechanism, ExhaustedPolicy, LedgerCharge, LedgerFailure, LedgerOutcome,
    MAX_BUDGET_WINDOW_SECS, MemoryLedger, PrivacyConfig, PrivacyLedger, PrivacySetup, Spend,
    StateLedger, round_up_rho,
};
pub use request::{
    BudgetExhaustedAction, Consent, ConsentDecision, ExplainLevel, ExplainOptions, FairnessPolicy,
    InfeasibleAction, ParamValue, PrivacyBudget, PrivacyMechanism, PrivacyPolicy, RankRequest,
    UserRef,
};
pub use rerank::FairnessSetup;
pub use response::{
    AmortizedGroupExposure, BatchResponse, DimensionContribution, Explanation, FairnessFallback,
    FairnessOptimality, FairnessReport, FairnessViolation, GroupExposure, NonPersonalizedReason,
    PrivacyReport, RankResponse, RankedItem, Reason, ReasonCode, ScoreKind, StageTimings,
    TableVersion, ViolationKind,
};
pub use tables::{ReloadOutcome, ReloadRequest, TableKind, TableStatus, open_table, role_problem};
pub use validate::{
    DEFAULT_EXPLAIN_DIMENSIONS, MAX_CONSENT_REFERENCE_BYTES, MAX_CONSTRAINT_NAME_BYTES,
    MAX_EXPLAIN_DIMENSIONS, MAX_EXPOSURE_SCOPE_BYTES, MAX_GROUP_ATTRIBUTE_BYTES,
    MAX_REQUEST_ID_BYTES, MAX_USER_ID_BYTES, QUOTED_BYTES, quote_clipped,
};
