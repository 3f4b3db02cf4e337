//! Fairness-aware re-ranking for fairrank: the re-ranker plug-in trait, a registry of
//! published constraints by name, and fairness metrics.
//!
//! The request path hands a re-ranker the pool in score order (see [`Candidate`] and
//! [`validate_pool`]), the requested length `k`, an optional amortized state and an injected
//! RNG; it gets back the final order plus a [`RerankReport`] saying whether the constraint
//! holds, where it failed and whether it had to fall back. [`answer_report`] summarizes an
//! answer (exposure share per group, NDCG against the unconstrained order).
//!
//! Built-in constraints (see [`Registry::with_builtins`]):
//!
//! | name | algorithm |
//! |---|---|
//! | `none` | score order |
//! | `fa*ir` | FA*IR (Zehlike et al. 2017) with the exact failure probability and adjusted alpha |
//! | `det-greedy`, `det-cons`, `det-relaxed` | Geyik et al. 2019, Algorithm 1, with a feasibility guard |
//! | `det-const-sort` | Geyik et al. 2019, DetConstSort, keeping every item within its max index |
//! | `min-exposure` | minimum exposure share per group, Lagrangian bound or exact for small k |
//! | `fairco` | FairCo amortized exposure controller (Morik et al. 2020); gain `lambda` from 0 to 1e6 |
//! | `plackett-luce` | Plackett-Luce sampling for expected exposure (Diaz et al. 2020) |
//!
//! ```
//! use fairness::{Candidate, Registry, RerankOutput};
//! use rand::SeedableRng;
//!
//! let registry = Registry::with_builtins();
//! let spec = serde_json::json!({"name": "fa*ir", "p": 0.5, "alpha": 0.1, "protected": 1});
//! let reranker = registry.build(&spec)?;
//! // Pool in score order; the protected group 1 sits at the bottom.
//! let pool: Vec<Candidate> =
//!     (0..20).map(|i| Candidate::new(i, 1.0 - i as f32 / 20.0, u32::from(i >= 10))).collect();
//! let mut out = RerankOutput::new();
//! let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
//! reranker.rerank(&pool, 10, None, &mut rng, &mut out)?;
//! assert!(out.report.satisfied);
//! assert!(out.order.iter().any(|&position| pool[position].group == 1));
//! # Ok::<(), fairness::FairnessError>(())
//! ```
//!
//! Architecture invariant: this crate is pure (no I/O, no clock, randomness only through the
//! injected RNG) and depends on no other fairrank crate.

mod candidate;
pub mod constraints;
mod error;
mod groups;
pub mod metrics;
mod params;
mod registry;
mod report;
mod reranker;
mod summary;
mod text;

pub use candidate::{
    Candidate, ceil_share, dcg_weight, floor_share, share_deadline, validate_pool,
};
pub use constraints::det::{DetConstSort, DetRanker, DetVariant, check_min_counts};
pub use constraints::fair::{FaStarIr, check_mtable};
pub use constraints::fairco::{FairCo, amortized_disparity};
pub use constraints::min_exposure::{MinExposure, check_min_exposure};
pub use constraints::mtable::{
    MAX_MTABLE_K, MTable, MTableCache, adjusted_alpha, failure_probability, mtable,
};
pub use constraints::none::ScoreOrder;
pub use constraints::plackett_luce::PlackettLuce;
pub use error::FairnessError;
pub use groups::{GroupShares, MAX_LISTED_GROUPS};
pub use params::{Params, value_from_string};
pub use registry::{ConstraintInfo, Factory, ParamInfo, Registry};
pub use report::{AnswerReport, GroupShare, answer_report};
pub use reranker::{
    AmortizedState, Measure, Optimality, RerankOutput, RerankReport, Reranker, Violation,
};
pub use summary::PoolSummary;
pub use text::{QUOTED_BYTES, quote_clipped, quote_clipped_to};

#[cfg(test)]
pub(crate) mod test_support {
    //! Helpers shared by the unit tests.
    use rand::SeedableRng;

    use crate::Candidate;

    /// A pool with strictly decreasing scores and the given group labels.
    pub(crate) fn pool_from(groups: &[u32]) -> Vec<Candidate> {
        groups
            .iter()
            .enumerate()
            .map(|(i, &group)| Candidate::new(i as u32, 1000.0 - i as f32, group))
            .collect()
    }

    /// A seeded generator.
    pub(crate) fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(seed)
    }
}
