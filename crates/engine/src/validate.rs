//! Request validation: one check per field, each refusal naming the field's proto path.

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;

use kernels::QuantizedRows;
use store::Table;

use crate::candidate_ids::CandidateIds;

use crate::config::{CONSTRAINT_NONE, EngineConfig};
use crate::error::{EngineError, InvalidReason, NotFoundReason, PreconditionReason};
use crate::exposure_state::scope_key;
use crate::request::{
    Consent, ExplainOptions, FairnessPolicy, InfeasibleAction, PrivacyBudget, PrivacyPolicy,
    UserRef,
};
use crate::rerank::{FairnessRuntime, PolicyRun};

/// Longest request id, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// Longest user id or inline subject id, in bytes.
pub const MAX_USER_ID_BYTES: usize = 256;
/// Longest consent reference, in bytes.
pub const MAX_CONSENT_REFERENCE_BYTES: usize = 256;
/// Longest amortized exposure scope, in bytes.
pub const MAX_EXPOSURE_SCOPE_BYTES: usize = 128;
/// Most contributing dimensions per explained item.
pub const MAX_EXPLAIN_DIMENSIONS: usize = 32;
/// Contributing dimensions per explained item when the request says 0.
pub const DEFAULT_EXPLAIN_DIMENSIONS: usize = 3;
/// Ids listed by name in an unknown- or duplicate-candidate error.
const LISTED_IDS: usize = 5;

/// `request_id`: 1 to 128 bytes of ASCII letters, digits and `-_.:`.
pub(crate) fn request_id(id: &str) -> Result<(), EngineError> {
    const FIELD: &str = "request_id";
    if id.is_empty() {
        return Err(EngineError::invalid(
            FIELD,
            "is required and must not be empty",
        ));
    }
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Err(EngineError::limit(
            FIELD,
            format!(
                "is {} bytes long; at most {MAX_REQUEST_ID_BYTES} are allowed",
                id.len()
            ),
        ));
    }
    if let Some((position, character)) = id
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || "-_.:".contains(c)))
    {
        return Err(EngineError::invalid(
            FIELD,
            format!(
                "byte {position} is {character:?}; only ASCII letters, digits and `-_.:` are allowed"
            ),
        ));
    }
    Ok(())
}

/// The user reference's shape: id length, or the inline embedding's length and values.
pub(crate) fn user(user: &UserRef, dim: usize) -> Result<(), EngineError> {
    match user {
        UserRef::Id(id) => {
            if id.is_empty() {
                return Err(EngineError::invalid("user_id", "must not be empty"));
            }
            if id.len() > MAX_USER_ID_BYTES {
                return Err(EngineError::limit(
                    "user_id",
                    format!(
                        "is {} bytes long; at most {MAX_USER_ID_BYTES} are allowed",
                        id.len()
                    ),
                ));
            }
        }
        UserRef::Inline {
            embedding,
            subject_id,
        } => {
            const FIELD: &str = "inline_user.embedding";
            if embedding.len() != dim {
                return Err(EngineError::InvalidArgument {
                    field: FIELD.to_owned(),
                    reason: InvalidReason::DimensionMismatch,
                    message: format!(
                        "has {} values; the item table's dimension is {dim}",
                        embedding.len()
                    ),
                });
            }
            if let Some(index) = embedding.iter().position(|value| !value.is_finite()) {
                let kind = if embedding[index].is_nan() {
                    "NaN"
                } else {
                    "infinite"
                };
                return Err(EngineError::invalid(
                    FIELD,
                    format!("value at index {index} is {kind}; all values must be finite"),
                ));
            }
            if subject_id.len() > MAX_USER_ID_BYTES {
                return Err(EngineError::limit(
                    "inline_user.subject_id",
                    format!(
                        "is {} bytes long; at most {MAX_USER_ID_BYTES} are allowed",
                        subject_id.len()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `k` and `pool_size`; returns the pool size to use.
pub(crate) fn k_and_pool(
    k: usize,
    pool_size: Option<usize>,
    config: &EngineConfig,
) -> Result<usize, EngineError> {
    if k == 0 {
        return Err(EngineError::invalid("k", "must be at least 1"));
    }
    if k > config.max_k {
        return Err(EngineError::limit(
            "k",
            format!("{k} exceeds the limit of {}", config.max_k),
        ));
    }
    match pool_size {
        None => Ok(config.default_pool.max(k)),
        Some(pool) if pool < k => Err(EngineError::invalid(
            "pool_size",
            format!("{pool} is smaller than k ({k})"),
        )),
        Some(pool) if pool > config.max_pool => Err(EngineError::limit(
            "pool_size",
            format!("{pool} exceeds the limit of {}", config.max_pool),
        )),
        Some(pool) => Ok(pool),
    }
}

/// The fairness policy with defaults resolved.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedFairness {
    /// The group attribute (name and index in the item table), if the table has it.
    pub group_attribute: Option<(String, usize)>,
    /// Amortized scope (used by amortized constraints only).
    pub exposure_scope: String,
    /// The re-ranker and how to run it.
    pub run: PolicyRun,
}

/// The fairness policy: the constraint and its parameters through the registry (cached),
/// the scope's length, the group attribute (required by every constraint but `none`;
/// an explicitly named one must exist), the infeasibility action and the seed.
pub(crate) fn fairness(
    policy: &FairnessPolicy,
    config: &EngineConfig,
    items: &Table,
    runtime: &FairnessRuntime,
) -> Result<ResolvedFairness, EngineError> {
    let built = runtime.resolve(&policy.constraint, &policy.params)?;
    let constraint = built.name().to_owned();
    if policy.exposure_scope.len() > MAX_EXPOSURE_SCOPE_BYTES {
        return Err(EngineError::limit(
            "fairness.exposure_scope",
            format!(
                "is {} bytes long; at most {MAX_EXPOSURE_SCOPE_BYTES} are allowed",
                policy.exposure_scope.len()
            ),
        ));
    }
    let group_attribute = if policy.group_attribute.is_empty() {
        let name = &config.default_group_attribute;
        match items.group_attribute_index(name) {
            Some(index) => Some((name.clone(), index)),
            None if constraint == CONSTRAINT_NONE => None,
            None => {
                return Err(EngineError::FailedPrecondition {
                    field: Some("fairness.group_attribute".to_owned()),
                    reason: PreconditionReason::GroupAttributeNotFound,
                    message: format!(
                        "constraint `{constraint}` needs a group attribute; the item table has no default attribute {name:?} (it has {:?}); name one",
                        items.group_attribute_names()
                    ),
                });
            }
        }
    } else {
        let name = &policy.group_attribute;
        match items.group_attribute_index(name) {
            Some(index) => Some((name.clone(), index)),
            None => {
                return Err(EngineError::FailedPrecondition {
                    field: Some("fairness.group_attribute".to_owned()),
                    reason: PreconditionReason::GroupAttributeNotFound,
                    message: format!(
                        "the item table has no group attribute {name:?} (it has {:?})",
                        items.group_attribute_names()
                    ),
                });
            }
        }
    };
    let on_infeasible = match policy.on_infeasible {
        InfeasibleAction::Unspecified => config.default_on_infeasible,
        action => action,
    };
    let scope_key = match &group_attribute {
        Some((name, _)) if built.reranker.is_amortized() => {
            Some(scope_key(name, &policy.exposure_scope))
        }
        _ => None,
    };
    Ok(ResolvedFairness {
        group_attribute,
        exposure_scope: policy.exposure_scope.clone(),
        run: PolicyRun {
            built,
            on_infeasible,
            seed: policy.seed,
            scope_key,
            store: Arc::clone(runtime.store()),
        },
    })
}

/// The privacy policy's shape: a well-formed budget and delta (the mechanism and the
/// budget's affordability are resolved by `private::plan`).
pub(crate) fn privacy(policy: &PrivacyPolicy) -> Result<(), EngineError> {
    match policy.budget {
        Some(PrivacyBudget::Rho(rho)) if !(rho.is_finite() && rho > 0.0) => {
            return Err(EngineError::invalid(
                "privacy.rho",
                format!("{rho} is not a finite number above 0"),
            ));
        }
        Some(PrivacyBudget::Epsilon(epsilon)) if !(epsilon.is_finite() && epsilon > 0.0) => {
            return Err(EngineError::invalid(
                "privacy.epsilon",
                format!("{epsilon} is not a finite number above 0"),
            ));
        }
        Some(PrivacyBudget::EpsilonPerPick(epsilon)) if !(epsilon.is_finite() && epsilon > 0.0) => {
            return Err(EngineError::invalid(
                "privacy.epsilon_per_pick",
                format!("{epsilon} is not a finite number above 0"),
            ));
        }
        _ => {}
    }
    if let Some(delta) = policy.delta
        && !(delta > 0.0 && delta < 1.0)
    {
        return Err(EngineError::invalid(
            "privacy.delta",
            format!("{delta} is not in the open interval (0, 1)"),
        ));
    }
    Ok(())
}

/// The consent record's reference length.
pub(crate) fn consent(consent: &Consent) -> Result<(), EngineError> {
    if consent.reference.len() > MAX_CONSENT_REFERENCE_BYTES {
        return Err(EngineError::limit(
            "consent.consent_reference",
            format!(
                "is {} bytes long; at most {MAX_CONSENT_REFERENCE_BYTES} are allowed",
                consent.reference.len()
            ),
        ));
    }
    Ok(())
}

/// Explanation options, with `max_dimensions` 0 resolved to the default.
pub(crate) fn explain(options: ExplainOptions) -> Result<ExplainOptions, EngineError> {
    match options.max_dimensions {
        0 => Ok(ExplainOptions {
            max_dimensions: DEFAULT_EXPLAIN_DIMENSIONS,
            ..options
        }),
        n if n > MAX_EXPLAIN_DIMENSIONS => Err(EngineError::limit(
            "explain.max_dimensions",
            format!("{n} exceeds the limit of {MAX_EXPLAIN_DIMENSIONS}"),
        )),
        _ => Ok(options),
    }
}

/// Resolved candidates: row indices in request order, and skipped unknown ids.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Candidates {
    pub rows: Vec<u32>,
    pub skipped: Vec<String>,
}

/// Resolves candidate ids to rows. Refuses too many ids, duplicates (naming up to five and
/// the total) and, unless `skip_unknown`, unknown ids (likewise). While the ids are looked
/// up, the rows found start loading into L2: from `quantized` when the rows will be scored
/// there first (one cache line per row at dimension 64), else the f32 rows.
pub(crate) fn candidates(
    ids: &CandidateIds,
    skip_unknown: bool,
    items: &Table,
    quantized: Option<&QuantizedRows>,
    max_candidates: usize,
) -> Result<Candidates, EngineError> {
    const FIELD: &str = "candidate_ids";
    if ids.len() > max_candidates {
        return Err(EngineError::limit(
            FIELD,
            format!("{} ids exceed the limit of {max_candidates}", ids.len()),
        ));
    }
    CANDIDATE_SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => resolve_candidates(ids, skip_unknown, items, quantized, &mut scratch),
        Err(_) => resolve_candidates(
            ids,
            skip_unknown,
            items,
            quantized,
            &mut CandidateScratch::new(),
        ),
    })
}

thread_local! {
    /// Per-thread scratch of [`candidates`], reused across requests.
    static CANDIDATE_SCRATCH: RefCell<CandidateScratch> = RefCell::new(CandidateScratch::new());
}

/// Reusable buffers of candidate resolution: the id lookups and the set of rows seen.
struct CandidateScratch {
    lookups: Vec<Option<u32>>,
    seen: RowSet,
}

impl CandidateScratch {
    fn new() -> CandidateScratch {
        CandidateScratch {
            lookups: Vec::new(),
            seen: RowSet::new(),
        }
    }
}

/// Largest scratch (lookups, or row-set slots) a thread keeps between requests.
const MAX_KEPT_SCRATCH: usize = 1 << 20;

fn resolve_candidates(
    ids: &CandidateIds,
    skip_unknown: bool,
    items: &Table,
    quantized: Option<&QuantizedRows>,
    scratch: &mut CandidateScratch,
) -> Result<Candidates, EngineError> {
    const FIELD: &str = "candidate_ids";
    let lookups = &mut scratch.lookups;
    lookups.clear();
    // The rows found are scored next: start loading them while the other ids are looked up.
    match quantized {
        Some(quantized) => items.index_of_many_hinting_rows(
            ids.iter_bytes(),
            |row| quantized.prefetch_row(row),
            lookups,
        ),
        None => items.index_of_many_prefetch_rows(ids.iter_bytes(), lookups),
    }
    // Each row has one id, so a repeated known id is a repeated row: one pass over a small
    // hash set of rows, in request order, finds every occurrence after an id's first.
    let seen = &mut scratch.seen;
    seen.clear_for(ids.len());
    let mut rows = Vec::with_capacity(ids.len());
    let mut duplicates = Vec::new();
    let mut unknown = Vec::new();
    for (position, lookup) in lookups.iter().enumerate() {
        match *lookup {
            Some(row) if seen.insert(row) => rows.push(row),
            Some(_) => duplicates.push(position),
            None => unknown.push(position),
        }
    }
    if lookups.capacity() > MAX_KEPT_SCRATCH {
        *lookups = Vec::new();
    }
    seen.shrink_if_above(MAX_KEPT_SCRATCH);

    if unknown.len() > 1 {
        let mut by_id = unknown.clone();
        by_id.sort_by(|&a, &b| ids.get(a).cmp(&ids.get(b)).then(a.cmp(&b)));
        for pair in by_id.windows(2) {
            if ids.get(pair[0]) == ids.get(pair[1]) {
                duplicates.push(pair[1]);
            }
        }
    }
    if !duplicates.is_empty() {
        duplicates.sort_unstable();
        return Err(EngineError::invalid(
            FIELD,
            format!(
                "{} duplicate {} ({}); each id may appear once",
                duplicates.len(),
                plural(duplicates.len(), "entry", "entries"),
                list_ids(ids, &duplicates),
            ),
        ));
    }
    if !unknown.is_empty() && !skip_unknown {
        return Err(EngineError::NotFound {
            field: FIELD.to_owned(),
            reason: NotFoundReason::Item,
            message: format!(
                "{} {} not in the item table: {}",
                unknown.len(),
                plural(unknown.len(), "id is", "ids are"),
                list_ids(ids, &unknown),
            ),
        });
    }
    let skipped = unknown
        .iter()
        .filter_map(|&position| ids.get(position).map(str::to_owned))
        .collect();
    Ok(Candidates { rows, skipped })
}

/// A set of row indices for duplicate detection: open addressing with linear probing over
/// at least twice as many slots as rows inserted, each slot `row + 1` (0: empty). The slot
/// of a row comes from a multiplicative hash of the row XOR a per-thread random key, so
/// request authors (who may know row numbers) cannot line rows up into one long probe chain.
struct RowSet {
    slots: Vec<u32>,
    /// `64 - log2(slots.len())`.
    shift: u32,
    key: u64,
}

impl RowSet {
    fn new() -> RowSet {
        RowSet {
            slots: Vec::new(),
            shift: 64,
            key: RandomState::new().hash_one(0x726f_7773_6574_u64),
        }
    }

    /// Empties the set and sizes it for `rows` insertions.
    fn clear_for(&mut self, rows: usize) {
        let capacity = rows.saturating_mul(2).next_power_of_two().max(16);
        self.slots.clear();
        self.slots.resize(capacity, 0);
        self.shift = 64 - capacity.trailing_zeros();
    }

    /// Inserts `row`; false if it was already in the set.
    fn insert(&mut self, row: u32) -> bool {
        let mask = self.slots.len().wrapping_sub(1);
        let mut position = (((u64::from(row) ^ self.key).wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .checked_shr(self.shift)
            .unwrap_or(0)) as usize;
        let stored = row.wrapping_add(1);
        // At most half the slots are ever full, so the probe ends at an empty slot.
        while let Some(slot) = self.slots.get_mut(position) {
            if *slot == 0 {
                *slot = stored;
                return true;
            }
            if *slot == stored {
                return false;
            }
            position = (position + 1) & mask;
        }
        // Unreachable for a set sized by `clear_for` (positions stay in range).
        true
    }

    fn shrink_if_above(&mut self, slots: usize) {
        if self.slots.capacity() > slots {
            self.slots = Vec::new();
            self.shift = 64;
        }
    }
}

fn plural<'a>(count: usize, one: &'a str, many: &'a str) -> &'a str {
    if count == 1 { one } else { many }
}

/// Up to [`LISTED_IDS`] ids at `positions`, quoted, with "and N more" for the rest.
fn list_ids(ids: &CandidateIds, positions: &[usize]) -> String {
    let mut listed: Vec<String> = positions
        .iter()
        .take(LISTED_IDS)
        .map(|&position| {
            format!(
                "{:?} at position {position}",
                ids.get(position).unwrap_or_default()
            )
        })
        .collect();
    if positions.len() > LISTED_IDS {
        listed.push(format!("and {} more", positions.len() - LISTED_IDS));
    }
    listed.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::ExplainLevel;

    #[test]
    fn request_ids_follow_the_proto_rules() {
        assert!(request_id("a-Z_0.9:x").is_ok());
        for bad in ["", "has space", "ümlaut", &"x".repeat(129)] {
            let error = request_id(bad).unwrap_err();
            assert_eq!(error.field(), Some("request_id"), "{bad:?}");
        }
    }

    #[test]
    fn inline_embedding_errors_say_which_index() {
        let error = user(&UserRef::embedding(vec![1.0, f32::NAN, 0.0]), 3).unwrap_err();
        assert_eq!(error.field(), Some("inline_user.embedding"));
        assert!(error.to_string().contains("index 1 is NaN"), "{error}");
        let error = user(&UserRef::embedding(vec![1.0, 0.0, f32::NEG_INFINITY]), 3).unwrap_err();
        assert!(error.to_string().contains("index 2 is infinite"), "{error}");
        let error = user(&UserRef::embedding(vec![1.0; 2]), 3).unwrap_err();
        assert!(matches!(
            error,
            EngineError::InvalidArgument {
                reason: InvalidReason::DimensionMismatch,
                ..
            }
        ));
    }

    #[test]
    fn pool_defaults_to_the_configured_pool_raised_to_k() {
        let config = EngineConfig::default();
        assert_eq!(k_and_pool(10, None, &config), Ok(config.default_pool));
        assert_eq!(k_and_pool(500, None, &config), Ok(500));
        assert_eq!(k_and_pool(10, Some(10), &config), Ok(10));
        assert_eq!(
            k_and_pool(10, Some(9), &config).unwrap_err().field(),
            Some("pool_size")
        );
        let too_big = k_and_pool(10, Some(config.max_pool + 1), &config).unwrap_err();
        assert!(matches!(
            too_big,
            EngineError::InvalidArgument {
                reason: InvalidReason::LimitExceeded,
                ..
            }
        ));
    }

    #[test]
    fn privacy_budget_and_delta_are_checked() {
        let policy = |budget, delta| PrivacyPolicy {
            budget,
            delta,
            ..PrivacyPolicy::default()
        };
        assert!(privacy(&policy(Some(PrivacyBudget::Rho(0.5)), Some(1e-6))).is_ok());
        let cases = [
            (policy(Some(PrivacyBudget::Rho(0.0)), None), "privacy.rho"),
            (
                policy(Some(PrivacyBudget::Epsilon(f64::NAN)), None),
                "privacy.epsilon",
            ),
            (policy(None, Some(1.0)), "privacy.delta"),
        ];
        for (policy, field) in cases {
            assert_eq!(privacy(&policy).unwrap_err().field(), Some(field));
        }
        let per_pick = policy(Some(PrivacyBudget::EpsilonPerPick(-0.5)), None);
        assert_eq!(
            privacy(&per_pick).unwrap_err().field(),
            Some("privacy.epsilon_per_pick")
        );
    }

    #[test]
    fn explain_dimensions_default_and_limit() {
        let options = |max_dimensions| ExplainOptions {
            level: ExplainLevel::Dimensions,
            max_dimensions,
        };
        assert_eq!(explain(options(0)).map(|o| o.max_dimensions), Ok(3));
        assert_eq!(explain(options(32)).map(|o| o.max_dimensions), Ok(32));
        assert_eq!(
            explain(options(33)).unwrap_err().field(),
            Some("explain.max_dimensions")
        );
    }

    #[test]
    fn the_row_set_reports_exactly_the_repeats() {
        let mut set = RowSet::new();
        let mut reference = std::collections::HashSet::new();
        for round in 0..3_u32 {
            set.clear_for(500);
            reference.clear();
            // Rows with many repeats and far apart values, in a scrambled order.
            for step in 0..500_u32 {
                let row = (step.wrapping_mul(7919) + round) % 331 * 1_000_003 % (1 << 31);
                assert_eq!(set.insert(row), reference.insert(row), "row {row}");
            }
        }
        // Reused with a smaller size, it starts empty.
        set.clear_for(2);
        assert!(set.insert(5) && set.insert(6) && !set.insert(5));
    }

    #[test]
    fn id_lists_are_capped_at_five() {
        let ids: CandidateIds = (0..8).map(|i| format!("id{i}")).collect();
        let positions: Vec<usize> = (0..8).collect();
        let listed = list_ids(&ids, &positions);
        assert!(listed.contains("\"id4\""));
        assert!(!listed.contains("\"id5\""));
        assert!(listed.ends_with("and 3 more"));
    }
}
