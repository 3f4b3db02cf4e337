//! Engine limits and defaults: request limits, the micro-batcher's policy, consent defaults,
//! the default fairness policy.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::request::InfeasibleAction;

/// Name of the constraint that keeps the unconstrained order.
pub const CONSTRAINT_NONE: &str = "none";

/// Configuration of an [`Engine`](crate::Engine). `Default` gives the documented defaults;
/// deserializing fills missing keys with them and rejects unknown keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Largest `k` a request may ask for (default 1000).
    pub max_k: usize,
    /// Largest re-ranking pool a request may ask for (default 10 000). At least `max_k`.
    pub max_pool: usize,
    /// Pool size when a request does not set one (default 100), raised to `k` if smaller.
    pub default_pool: usize,
    /// Most candidate ids one request may list (default 100 000).
    pub max_candidates: usize,
    /// Longest candidate list that [`Engine::submit_small_inline`](crate::Engine::submit_small_inline)
    /// ranks on the calling thread instead of a rayon worker (default 2048; 0: never).
    pub inline_max_candidates: usize,
    /// Most entries of one [`Engine::rank_batch`](crate::Engine::rank_batch) call
    /// (default 1024).
    pub max_batch_requests: usize,
    /// Most candidate ids of one batch call, all entries together (default 1 000 000): a
    /// batch's decoded ids take memory in proportion, whatever each entry's own limit.
    pub max_batch_candidates: usize,
    /// Longest a whole-catalog request waits for company in the micro-batcher (default
    /// 1 ms). The batcher waits only while it is busy; see [`crate::batcher`].
    #[serde(rename = "batch_max_wait_us", with = "micros")]
    pub batch_max_wait: Duration,
    /// Most whole-catalog queries scored together by one batched scan (default 64).
    pub batch_max_queries: usize,
    /// Whole-catalog requests that may wait in the batch queue; beyond that requests are
    /// refused with `ResourceExhausted` (default 4096).
    pub batch_queue_capacity: usize,
    /// Fairness constraint of requests that name none (default `none`): a name of the
    /// fairness registry, exact and case-sensitive, checked at start-up.
    pub default_fairness_constraint: String,
    /// Parameters of the default constraint, keyed as in the fairness registry (default
    /// none), for example `{ p = 0.5, alpha = 0.1, protected = 1 }` for `fa*ir`.
    pub default_fairness_params: BTreeMap<String, serde_json::Value>,
    /// What to do when a constraint cannot be met on the pool and the request does not
    /// say: `best_effort` (default), `unconstrained` or `reject`.
    pub default_on_infeasible: InfeasibleAction,
    /// Re-rankers kept built, by canonical policy (default 256); 0 rebuilds every time.
    pub reranker_cache_capacity: usize,
    /// Most amortized exposure scopes held by the in-memory state store (default
    /// 100 000); requests opening more are refused with `ResourceExhausted`.
    pub max_exposure_scopes: usize,
    /// Group attribute of requests that name none (default `provider_group`). Unlike an
    /// attribute a request names explicitly, a default the item table lacks is not an
    /// error for constraint `none`: the fairness report then has no groups.
    pub default_group_attribute: String,
    /// Whether personalization needs an explicit `Granted` consent (default false:
    /// an unspecified decision counts as granted).
    pub require_explicit_consent: bool,
    /// Whether table loads check the whole-file checksum: at start, and reloads before
    /// swapping (default true).
    pub verify_checksum_on_reload: bool,
    /// Whether candidate lists are pruned on an int8 copy of the item rows before exact
    /// scoring (default true; see [`kernels::quantized_candidates_topk`]). Answers are the
    /// same bit for bit either way; the copy costs the dimension (rounded up to 16, 32, 64
    /// or a multiple of 64) plus 4 bytes per item row, and is built in the background after
    /// each item table swap (the exact path serves until it is ready).
    pub quantized_candidates: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_k: 1000,
            max_pool: 10_000,
            default_pool: 100,
            max_candidates: 100_000,
            inline_max_candidates: 2048,
            max_batch_requests: 1024,
            max_batch_candidates: 1_000_000,
            batch_max_wait: Duration::from_millis(1),
            batch_max_queries: 64,
            batch_queue_capacity: 4096,
            default_fairness_constraint: CONSTRAINT_NONE.to_owned(),
            default_fairness_params: BTreeMap::new(),
            default_on_infeasible: InfeasibleAction::BestEffort,
            reranker_cache_capacity: 256,
            max_exposure_scopes: crate::exposure_state::DEFAULT_MAX_EXPOSURE_SCOPES,
            default_group_attribute: "provider_group".to_owned(),
            require_explicit_consent: false,
            verify_checksum_on_reload: true,
            quantized_candidates: true,
        }
    }
}

impl EngineConfig {
    /// Checks that the limits are consistent.
    pub fn validate(&self) -> Result<(), EngineError> {
        let refuse = |field, message: String| Err(EngineError::InvalidConfig { field, message });
        let positive = [
            ("max_k", self.max_k),
            ("max_pool", self.max_pool),
            ("default_pool", self.default_pool),
            ("max_candidates", self.max_candidates),
            ("max_batch_requests", self.max_batch_requests),
            ("max_batch_candidates", self.max_batch_candidates),
            ("batch_max_queries", self.batch_max_queries),
            ("batch_queue_capacity", self.batch_queue_capacity),
        ];
        for (field, value) in positive {
            if value == 0 {
                return refuse(field, "must be at least 1".to_owned());
            }
        }
        if self.max_k > u32::MAX as usize {
            return refuse("max_k", format!("{} exceeds {}", self.max_k, u32::MAX));
        }
        if self.max_pool < self.max_k {
            return refuse(
                "max_pool",
                format!("{} is smaller than max_k ({})", self.max_pool, self.max_k),
            );
        }
        if self.default_pool > self.max_pool {
            return refuse(
                "default_pool",
                format!("{} exceeds max_pool ({})", self.default_pool, self.max_pool),
            );
        }
        if self.default_fairness_constraint.trim().is_empty() {
            return refuse(
                "default_fairness_constraint",
                format!("must name a constraint (for example `{CONSTRAINT_NONE}`)"),
            );
        }
        if self.default_on_infeasible == InfeasibleAction::Unspecified {
            return refuse(
                "default_on_infeasible",
                "must be best_effort, unconstrained or reject".to_owned(),
            );
        }
        if self.max_exposure_scopes == 0 {
            return refuse("max_exposure_scopes", "must be at least 1".to_owned());
        }
        if self.default_group_attribute.is_empty() {
            return refuse("default_group_attribute", "must not be empty".to_owned());
        }
        Ok(())
    }
}

/// (De)serializes a [`Duration`] as whole microseconds.
mod micros {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(u64::try_from(value.as_micros()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_micros)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(EngineConfig::default().validate(), Ok(()));
    }

    #[test]
    fn deserializes_with_defaults_and_microseconds() {
        let config: EngineConfig =
            serde_json::from_str(r#"{"max_k": 50, "batch_max_wait_us": 250}"#).expect("parses");
        assert_eq!(config.max_k, 50);
        assert_eq!(config.batch_max_wait, Duration::from_micros(250));
        assert_eq!(config.max_pool, EngineConfig::default().max_pool);
        let round_trip = serde_json::to_string(&config).expect("serializes");
        assert!(
            round_trip.contains(r#""batch_max_wait_us":250"#),
            "{round_trip}"
        );
        assert!(serde_json::from_str::<EngineConfig>(r#"{"max_kk": 5}"#).is_err());
    }

    #[test]
    fn inconsistent_limits_are_refused_by_name() {
        type Change = fn(&mut EngineConfig);
        let cases: [(&str, Change); 5] = [
            ("max_k", |c| c.max_k = 0),
            ("max_pool", |c| c.max_pool = c.max_k - 1),
            ("default_pool", |c| c.default_pool = c.max_pool + 1),
            ("batch_max_queries", |c| c.batch_max_queries = 0),
            ("default_fairness_constraint", |c| {
                c.default_fairness_constraint = " ".into()
            }),
        ];
        for (field, change) in cases {
            let mut config = EngineConfig::default();
            change(&mut config);
            match config.validate() {
                Err(EngineError::InvalidConfig { field: found, .. }) => assert_eq!(found, field),
                other => panic!("{field}: expected InvalidConfig, got {other:?}"),
            }
        }
    }
}
