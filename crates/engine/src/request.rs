//! Engine-native request types: who to rank for, what, how many, and under which policies.
//!
//! These mirror `fairrank.v1.RankRequest` field for field (without gRPC types), so the
//! server's conversion is mechanical and error field paths (`pool_size`,
//! `inline_user.embedding`, ...) are the proto's.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::candidate_ids::CandidateIds;

/// One ranking request.
#[derive(Debug, Clone, PartialEq)]
pub struct RankRequest {
    /// Idempotency key: 1 to 128 bytes of ASCII letters, digits and `-_.:`.
    pub request_id: String,
    /// The user to rank for.
    pub user: UserRef,
    /// Answer an unknown `user_id` without personalization (ranked by item prior) instead
    /// of returning `NotFound`.
    pub fallback_for_unknown_user: bool,
    /// Item ids to rank; empty means the whole catalog.
    pub candidate_ids: CandidateIds,
    /// Skip candidate ids that are not in the item table (listed in the response) instead
    /// of returning `NotFound`.
    pub skip_unknown_candidates: bool,
    /// Number of items to return, 1 to the configured `max_k`.
    pub k: usize,
    /// Size of the pool the fairness re-ranker chooses from; `None`: the configured
    /// default raised to `k`.
    pub pool_size: Option<usize>,
    /// Fairness policy.
    pub fairness: FairnessPolicy,
    /// Privacy policy.
    pub privacy: PrivacyPolicy,
    /// The user's consent decisions.
    pub consent: Consent,
    /// Explanations to attach.
    pub explain: ExplainOptions,
    /// When the caller stops waiting. Checked before and after scoring; a request whose
    /// deadline passes while it waits for the batched scan is dropped from the batch.
    pub deadline: Option<Instant>,
}

impl RankRequest {
    /// A request for the top `k` of the whole catalog for `user`, with default policies.
    pub fn new(request_id: impl Into<String>, user: UserRef, k: usize) -> RankRequest {
        RankRequest {
            request_id: request_id.into(),
            user,
            fallback_for_unknown_user: false,
            candidate_ids: CandidateIds::new(),
            skip_unknown_candidates: false,
            k,
            pool_size: None,
            fairness: FairnessPolicy::default(),
            privacy: PrivacyPolicy::default(),
            consent: Consent::default(),
            explain: ExplainOptions::default(),
            deadline: None,
        }
    }
}

/// Who the ranking is for.
#[derive(Debug, Clone, PartialEq)]
pub enum UserRef {
    /// A row of the user table, by id (1 to 256 bytes).
    Id(String),
    /// An embedding given inline.
    Inline {
        /// Exactly as many finite values as the item table's dimension.
        embedding: Vec<f32>,
        /// Pseudonymous id of the person (privacy subject and audit key), at most 256
        /// bytes; may be empty while differential privacy is off.
        subject_id: String,
    },
}

impl UserRef {
    /// A user by id.
    pub fn id(id: impl Into<String>) -> UserRef {
        UserRef::Id(id.into())
    }

    /// An inline embedding without a subject id.
    pub fn embedding(embedding: Vec<f32>) -> UserRef {
        UserRef::Inline {
            embedding,
            subject_id: String::new(),
        }
    }
}

/// A constraint parameter value (the shape of `google.protobuf.Value`, and of a JSON or
/// TOML value in the server's configuration).
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// No value.
    Null,
    /// A boolean.
    Bool(bool),
    /// A number.
    Number(f64),
    /// A string.
    String(String),
    /// A list of values.
    List(Vec<ParamValue>),
    /// A map from string keys to values.
    Map(BTreeMap<String, ParamValue>),
}

/// What to do when a fairness constraint cannot be met on the pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InfeasibleAction {
    /// The server's configured default.
    #[default]
    Unspecified,
    /// Return the closest ranking the algorithm can build, and say so in the report.
    BestEffort,
    /// Return the unconstrained top-k.
    Unconstrained,
    /// Refuse the request.
    Reject,
}

/// A fairness constraint by registry name, with its parameters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FairnessPolicy {
    /// Registry name of the constraint (for example `fa*ir`); empty: the configured
    /// default. An unregistered name is `InvalidArgument` for `fairness.constraint`.
    pub constraint: String,
    /// Constraint parameters keyed as in the configuration file and the fairness
    /// registry. Unknown keys are rejected (`none` takes none). With an empty
    /// `constraint`, non-empty parameters apply to the configured default constraint
    /// instead of its configured parameters.
    pub params: BTreeMap<String, ParamValue>,
    /// Item group attribute the constraint and the report use; empty: the configured
    /// default (`provider_group`).
    pub group_attribute: String,
    /// Key of the amortized-exposure ledger (for constraints acting across requests), at
    /// most 128 bytes; empty: the server-wide scope.
    pub exposure_scope: String,
    /// Behaviour when the constraint cannot be met.
    pub on_infeasible: InfeasibleAction,
    /// Seed of the random generator of stochastic constraints (`plackett-luce`): the same
    /// seed on the same pool gives the same answer. `None`: drawn by the server (and
    /// reported).
    pub seed: Option<u64>,
}

impl FairnessPolicy {
    /// The policy with constraint `none`.
    pub fn none() -> FairnessPolicy {
        FairnessPolicy {
            constraint: crate::config::CONSTRAINT_NONE.to_owned(),
            ..FairnessPolicy::default()
        }
    }
}

/// The randomized mechanism protecting an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PrivacyMechanism {
    /// The server's configured default (`PrivacyConfig::default_mechanism`).
    #[default]
    Unspecified,
    /// No differential privacy: exact scores and exact top-pool selection.
    None,
    /// One-shot Gumbel top-k pool selection (Durfee and Rogers, NeurIPS 2019) over every
    /// scored item; releases the pool order only.
    GumbelTopK,
}

impl PrivacyMechanism {
    /// Name for messages and reports.
    pub fn name(self) -> &'static str {
        match self {
            PrivacyMechanism::Unspecified => "unspecified",
            PrivacyMechanism::None => "none",
            PrivacyMechanism::GumbelTopK => "gumbel-top-k",
        }
    }
}

/// A per-request privacy budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PrivacyBudget {
    /// zCDP rho, finite and > 0.
    Rho(f64),
    /// Pure epsilon, finite and > 0.
    Epsilon(f64),
    /// Epsilon of each exponential-mechanism pick, finite and > 0: a pool of `m` items
    /// costs `m * epsilon^2 / 8` zCDP.
    EpsilonPerPick(f64),
}

/// What to do when the subject's privacy budget is exhausted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BudgetExhaustedAction {
    /// The server's configured default.
    #[default]
    Unspecified,
    /// Refuse with `ResourceExhausted`.
    Reject,
    /// Answer without personalization.
    NonPersonalized,
}

/// The privacy protection a request asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrivacyPolicy {
    /// Mechanism.
    pub mechanism: PrivacyMechanism,
    /// Budget of this answer (validated, ignored with mechanism `None`).
    pub budget: Option<PrivacyBudget>,
    /// Delta for reporting an (epsilon, delta) equivalent, in (0, 1) (validated).
    pub delta: Option<f64>,
    /// Also release noisy scores (meaningful only under DP).
    pub release_noisy_scores: bool,
    /// Behaviour when the budget is exhausted.
    pub on_budget_exhausted: BudgetExhaustedAction,
}

/// A consent decision for one purpose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConsentDecision {
    /// No decision sent: granted unless the engine requires explicit consent.
    #[default]
    Unspecified,
    /// The user allows the purpose.
    Granted,
    /// The user refuses the purpose.
    Denied,
}

/// The user's consent decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Consent {
    /// Use of the user's embedding to personalize the ranking. `Denied`: the embedding is
    /// not read and the answer is ranked by item prior.
    pub personalization: ConsentDecision,
    /// Opaque reference to the caller's consent record, at most 256 bytes (for the audit
    /// record; never interpreted).
    pub reference: String,
}

impl Consent {
    /// Consent with the given personalization decision.
    pub fn personalization(decision: ConsentDecision) -> Consent {
        Consent {
            personalization: decision,
            reference: String::new(),
        }
    }
}

/// How much explanation to attach to each item. Levels are cumulative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum ExplainLevel {
    /// No explanation.
    #[default]
    None,
    /// Reason codes only.
    Reasons,
    /// Reason codes with a human-readable sentence.
    Text,
    /// Reasons, text and the embedding dimensions that contributed most to the score
    /// (personalized answers only; others are explained at `Text`).
    Dimensions,
}

/// Explanation options of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExplainOptions {
    /// Requested level.
    pub level: ExplainLevel,
    /// Contributing dimensions per item at level `Dimensions`, 1 to 32; 0 means 3.
    pub max_dimensions: usize,
}

impl ExplainOptions {
    /// The fullest explanation: reasons, text and the top three dimensions.
    pub fn full() -> ExplainOptions {
        ExplainOptions {
            level: ExplainLevel::Dimensions,
            max_dimensions: 0,
        }
    }
}
