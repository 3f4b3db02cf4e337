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
use crate::rerank::{AmortizedScope, FairnessRuntime, PolicyRun};

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
/// Longest fairness constraint name, in bytes (registered names are short; a longer one is
/// refused before it is compared with them).
pub const MAX_CONSTRAINT_NAME_BYTES: usize = 64;
/// Longest group attribute name, in bytes.
pub const MAX_GROUP_ATTRIBUTE_BYTES: usize = 128;
pub use fairness::{QUOTED_BYTES, quote_clipped};

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

/// Largest `|query| x |row|` (L2 norms) the engine accepts: every dot product and every
/// partial sum of one is then at most `2^100` in magnitude, so scores, their sums over an
/// answer and the fairness metrics built on them stay finite in `f32` with room to spare.
pub(crate) const MAX_SCORE_BOUND: f64 = 1_267_650_600_228_229_401_496_703_205_376.0; // 2^100

/// The user reference's shape: id length, or the inline embedding's length and values, and
/// that its scores against rows of L2 norm up to `max_row_norm` (the item table's largest)
/// cannot overflow.
pub(crate) fn user(user: &UserRef, dim: usize, max_row_norm: f32) -> Result<(), EngineError> {
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
            let norm = embedding
                .iter()
                .map(|&value| f64::from(value) * f64::from(value))
                .sum::<f64>()
                .sqrt();
            if norm * f64::from(max_row_norm) > MAX_SCORE_BOUND {
                return Err(EngineError::invalid(
                    FIELD,
                    format!(
                        "its L2 norm {norm:e} times the item table's largest row norm \
                         {max_row_norm:e} exceeds {MAX_SCORE_BOUND:e}: scores could overflow"
                    ),
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
    for (field, text, most) in [
        (
            "fairness.constraint",
            &policy.constraint,
            MAX_CONSTRAINT_NAME_BYTES,
        ),
        (
            "fairness.group_attribute",
            &policy.group_attribute,
            MAX_GROUP_ATTRIBUTE_BYTES,
        ),
    ] {
        if text.len() > most {
            return Err(EngineError::limit(
                field,
                format!("is {} bytes long; at most {most} are allowed", text.len()),
            ));
        }
    }
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
    let amortized_scope = match &group_attribute {
        Some((name, _)) if built.reranker.is_amortized() => Some(AmortizedScope {
            key: scope_key(name, &policy.exposure_scope),
            store: Arc::clone(runtime.store()),
        }),
        _ => None,
    };
    Ok(ResolvedFairness {
        group_attribute,
        exposure_scope: policy.exposure_scope.clone(),
        run: PolicyRun {
            built,
            on_infeasible,
            seed: policy.seed,
            amortized_scope,
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

/// Reusable buffers of candidate resolution: the id lookups and the rows seen (a bitmap
/// over the table's rows, or a hash set for tables too large for one).
struct CandidateScratch {
    lookups: Vec<Option<u32>>,
    seen_bits: RowBitmap,
    seen: RowSet,
}

impl CandidateScratch {
    fn new() -> CandidateScratch {
        CandidateScratch {
            lookups: Vec::new(),
            seen_bits: RowBitmap::new(),
            seen: RowSet::new(),
        }
    }
}

/// Largest scratch (lookups, or row-set slots) a thread keeps between requests.
const MAX_KEPT_SCRATCH: usize = 1 << 20;

/// Largest item table whose duplicate rows are found with a per-thread [`RowBitmap`]
/// (4 MiB per thread at most); larger tables use the hash [`RowSet`].
const MAX_BITMAP_ROWS: usize = 1 << 25;

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
    // The rows found are scored next: the f32 rows start loading as each id's hash slot
    // names them; the int8 rows' code and scale lines once all the ids are looked up
    // (BENCHMARKS.md, sections `lookup2` and `dedup`). Row numbers from the table fit `u32`.
    // The ids are looked up at their spans (no iterator per id: section `lookup3`).
    match quantized.map(QuantizedRows::row_hints) {
        Some(hints) => items.index_of_many_spans_hinting_rows(
            ids.buffer(),
            ids.spans(),
            |row| hints.codes_and_scale(row as u32),
            lookups,
        ),
        None => items.index_of_many_prefetch_rows(ids.iter_bytes(), lookups),
    }
    let split = split_found(
        lookups,
        items.len(),
        &mut scratch.seen_bits,
        &mut scratch.seen,
    );
    if lookups.capacity() > MAX_KEPT_SCRATCH {
        *lookups = Vec::new();
    }
    let SplitLookups {
        rows,
        mut duplicates,
        unknown,
    } = split;

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

/// The lookups of one request split by position: the rows of known ids met first, in
/// request order, and the positions of repeated known ids and of unknown ids, ascending.
#[derive(Debug, Clone, Default, PartialEq)]
struct SplitLookups {
    rows: Vec<u32>,
    duplicates: Vec<usize>,
    unknown: Vec<usize>,
}

/// Splits the lookups of a table of `table_rows` rows with the scratch's row sets: the
/// bitmap, or the hash set for a table too large for one.
fn split_found(
    lookups: &[Option<u32>],
    table_rows: usize,
    seen_bits: &mut RowBitmap,
    seen: &mut RowSet,
) -> SplitLookups {
    // Each row has one id, so a repeated known id is a repeated row: one pass over the rows
    // seen, in request order, finds every occurrence after an id's first.
    if table_rows <= MAX_BITMAP_ROWS {
        seen_bits.reserve_rows(table_rows);
        let mut rows = Vec::with_capacity(lookups.len());
        let all_known_once = seen_bits.insert_all(lookups, &mut rows);
        // `rows` lists every row `insert_all` set (and perhaps others of the same words).
        seen_bits.clear_rows(&rows);
        if all_known_once {
            return SplitLookups {
                rows,
                duplicates: Vec::new(),
                unknown: Vec::new(),
            };
        }
        // An unknown or repeated id: again, one id at a time, on the emptied bitmap.
        let split = split_lookups(lookups, |row| seen_bits.insert(row));
        // Every row set is a first occurrence: clearing those leaves the bitmap empty.
        seen_bits.clear_rows(&split.rows);
        split
    } else {
        seen.clear_for(lookups.len());
        let split = split_lookups(lookups, |row| seen.insert(row));
        seen.shrink_if_above(MAX_KEPT_SCRATCH);
        split
    }
}

/// Splits `lookups` with `insert_row` (true if the row was not seen before in this request;
/// called once per known id, in request order).
fn split_lookups(lookups: &[Option<u32>], mut insert_row: impl FnMut(u32) -> bool) -> SplitLookups {
    let mut rows = Vec::with_capacity(lookups.len());
    let mut duplicates = Vec::new();
    let mut unknown = Vec::new();
    for (position, lookup) in lookups.iter().enumerate() {
        match *lookup {
            Some(row) if insert_row(row) => rows.push(row),
            Some(_) => duplicates.push(position),
            None => unknown.push(position),
        }
    }
    SplitLookups {
        rows,
        duplicates,
        unknown,
    }
}

/// [`RowBitmap::clear_rows`] zeroes the whole bitmap when it has at most this many words per
/// row to clear.
const CLEAR_ALL_WORDS_PER_ROW: usize = 4;

/// A set of row indices for duplicate detection over a table of known size: one bit per
/// row, empty between requests. Inserting is one load and one store; the request clears
/// the bits it set by walking the rows it inserted, or the whole bitmap when that is at
/// most 4 words per row ([`RowBitmap::clear_rows`]), so neither a request's cost nor its
/// cache footprint grows with the table beyond a few words per row.
#[derive(Debug, Default)]
struct RowBitmap {
    words: Vec<u64>,
}

impl RowBitmap {
    fn new() -> RowBitmap {
        RowBitmap::default()
    }

    /// Makes room for rows below `rows` (zeroed words: the set stays empty).
    fn reserve_rows(&mut self, rows: usize) {
        let words = rows.div_ceil(64);
        if self.words.len() < words {
            self.words.resize(words, 0);
        }
    }

    /// Inserts `row`; false if it was already in the set. Grows for a row past the reserved
    /// ones (never for the rows of the table the set was reserved for).
    #[inline]
    fn insert(&mut self, row: u32) -> bool {
        let bit = 1u64 << (row % 64);
        match self.words.get_mut((row / 64) as usize) {
            Some(word) => {
                let fresh = *word & bit == 0;
                *word |= bit;
                fresh
            }
            None => self.insert_past_reserved(row),
        }
    }

    /// The usual request's fast path: inserts the row of every known id of `lookups`,
    /// appending one row per lookup to `rows` (0 for an unknown id, whose bit is set too),
    /// with no branch on the answers and no capacity check per id; true if every id was
    /// known and its row new. Otherwise `rows` is not the answer: the caller clears the bits
    /// (each was set by a row in `rows`) and splits again one id at a time. A row past the
    /// reserved words sets nothing and counts as not new.
    fn insert_all(&mut self, lookups: &[Option<u32>], rows: &mut Vec<u32>) -> bool {
        let words = self.words.as_mut_slice();
        let mut all_known_once = true;
        // `map` over a slice iterator: `extend` writes each row without a capacity check.
        rows.extend(lookups.iter().map(|lookup| {
            let (known, row) = match *lookup {
                Some(row) => (true, row),
                None => (false, 0),
            };
            let bit = 1u64 << (row % 64);
            let fresh = match words.get_mut((row / 64) as usize) {
                Some(word) => {
                    let before = *word;
                    *word = before | bit;
                    before & bit == 0
                }
                None => false,
            };
            all_known_once &= known & fresh;
            row
        }));
        all_known_once
    }

    /// [`RowBitmap::insert`] of a row past the words reserved: grows to hold it.
    #[cold]
    #[inline(never)]
    fn insert_past_reserved(&mut self, row: u32) -> bool {
        self.words.resize((row / 64) as usize + 1, 0);
        self.insert(row)
    }

    /// Empties the set, given every row inserted since it was last empty (in any order;
    /// other rows of the same words may be listed too): the words of those rows, or, when
    /// there are at most 4 words per row listed, every word (a `memset` of a few 32-byte
    /// stores per row instead of a load, a bounds check and a store per row; 1000 random rows
    /// of T1's 100 000 touch every cache line of its 12.5 KB bitmap anyway).
    fn clear_rows(&mut self, rows: &[u32]) {
        if self.words.len() <= rows.len().saturating_mul(CLEAR_ALL_WORDS_PER_ROW) {
            self.words.fill(0);
            return;
        }
        for &row in rows {
            if let Some(word) = self.words.get_mut((row / 64) as usize) {
                *word = 0;
            }
        }
    }

    /// Whether no row is in the set (tests).
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.words.iter().all(|&word| word == 0)
    }
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
                "{} at position {position}",
                quote_clipped(ids.get(position).unwrap_or_default())
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
    use proptest::prelude::*;

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
        let error = user(&UserRef::embedding(vec![1.0, f32::NAN, 0.0]), 3, 1.0).unwrap_err();
        assert_eq!(error.field(), Some("inline_user.embedding"));
        assert!(error.to_string().contains("index 1 is NaN"), "{error}");
        let error = user(
            &UserRef::embedding(vec![1.0, 0.0, f32::NEG_INFINITY]),
            3,
            1.0,
        )
        .unwrap_err();
        assert!(error.to_string().contains("index 2 is infinite"), "{error}");
        let error = user(&UserRef::embedding(vec![1.0; 2]), 3, 1.0).unwrap_err();
        assert!(matches!(
            error,
            EngineError::InvalidArgument {
                reason: InvalidReason::DimensionMismatch,
                ..
            }
        ));
    }

    #[test]
    fn inline_embeddings_whose_scores_could_overflow_are_refused() {
        // |q| = 2^50 against rows of norm up to 2^50: exactly at the bound, accepted.
        let at_bound = 2f32.powi(50);
        assert!(user(&UserRef::embedding(vec![at_bound, 0.0]), 2, at_bound).is_ok());
        // Finite values whose dot products would overflow f32 (3e38 x 3e38).
        let error = user(&UserRef::embedding(vec![3e38; 4]), 4, 1.0).unwrap_err();
        assert_eq!(error.field(), Some("inline_user.embedding"));
        assert!(error.to_string().contains("could overflow"), "{error}");
        // The same query against a table of small rows is fine; a larger table row is not.
        assert!(user(&UserRef::embedding(vec![1e20; 4]), 4, 1.0).is_ok());
        assert!(user(&UserRef::embedding(vec![1e20; 4]), 4, 1e12).is_err());
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
    fn the_row_bitmap_clears_by_rows_and_whole() {
        // Few rows on a large bitmap (cleared row by row) and many on a small one (cleared
        // whole), each with rows at the ends of the reserved words, then reused.
        for (reserved, rows) in [
            (1_000_000_usize, vec![0_u32, 63, 64, 999_999, 500_000]),
            (700, (0..700).step_by(3).collect::<Vec<u32>>()),
            (640, vec![0, 639, 1, 638, 64, 575]),
        ] {
            let mut bitmap = RowBitmap::new();
            for _ in 0..2 {
                bitmap.reserve_rows(reserved);
                assert!(bitmap.is_empty());
                for &row in &rows {
                    assert!(bitmap.insert(row), "row {row} of {reserved}");
                    assert!(!bitmap.insert(row), "row {row} of {reserved}");
                }
                bitmap.clear_rows(&rows);
                assert!(bitmap.is_empty(), "{reserved} rows");
            }
        }
    }

    /// Splits `lookups` the simple way: a row met before (in a `HashSet`) is a duplicate.
    fn split_oracle(lookups: &[Option<u32>]) -> SplitLookups {
        let mut seen = std::collections::HashSet::new();
        let mut split = SplitLookups::default();
        for (position, lookup) in lookups.iter().enumerate() {
            match lookup {
                Some(row) if seen.insert(*row) => split.rows.push(*row),
                Some(_) => split.duplicates.push(position),
                None => split.unknown.push(position),
            }
        }
        split
    }

    /// Lookups over `rows` rows: repeats at any positions, unknowns (`None`) among them; or,
    /// as most requests, distinct known rows only.
    fn lookups_strategy(rows: u32) -> impl Strategy<Value = Vec<Option<u32>>> {
        let mixed = prop::collection::vec(
            prop_oneof![
                4 => (0..rows).prop_map(Some),
                1 => Just(None),
            ],
            0..300,
        );
        let distinct = prop::collection::btree_set(0..rows, 0..300)
            .prop_map(|rows| rows.into_iter().map(Some).collect::<Vec<_>>())
            .prop_shuffle();
        prop_oneof![mixed, distinct]
    }

    proptest! {
        #[test]
        fn the_row_bitmap_is_a_set_that_clears_to_empty(
            // Several requests in a row on one bitmap; rows up to 3 words past the reserved
            // ones (the bitmap grows for them).
            requests in prop::collection::vec(
                (0..400_usize, prop::collection::vec(0..(400_u32 + 192), 0..200)),
                1..5,
            ),
        ) {
            let mut bitmap = RowBitmap::new();
            for (reserved, rows) in requests {
                bitmap.reserve_rows(reserved);
                let mut reference = std::collections::HashSet::new();
                let mut inserted = Vec::new();
                for row in rows {
                    let fresh = bitmap.insert(row);
                    prop_assert_eq!(fresh, reference.insert(row), "row {}", row);
                    if fresh {
                        inserted.push(row);
                    }
                }
                bitmap.clear_rows(&inserted);
                prop_assert!(bitmap.is_empty());
            }
        }

        #[test]
        fn lookups_split_like_the_oracle_with_either_row_set(
            requests in prop::collection::vec(lookups_strategy(700), 1..4),
        ) {
            // One bitmap and one hash set reused across requests, as the per-thread scratch,
            // through `split_found` as `resolve_candidates` calls it: a table of 700 rows
            // takes the bitmap, one past `MAX_BITMAP_ROWS` the hash set.
            let mut bitmap = RowBitmap::new();
            let mut hashed = RowSet::new();
            for lookups in requests {
                let expected = split_oracle(&lookups);
                for table_rows in [700, MAX_BITMAP_ROWS + 1] {
                    let split = split_found(&lookups, table_rows, &mut bitmap, &mut hashed);
                    prop_assert_eq!(&split, &expected, "table of {} rows", table_rows);
                    prop_assert!(bitmap.is_empty());
                }
                // Rows past the reserved ones (a bitmap reserved for 100 rows; it grows).
                let mut small = RowBitmap::new();
                let split = split_found(&lookups, 100, &mut small, &mut hashed);
                prop_assert_eq!(&split, &expected, "rows past the reserved words");
                prop_assert!(small.is_empty());
            }
        }
    }

    /// Resolution of candidate ids, the simple way: positions by id string (first
    /// occurrence known or not), the messages spelled out.
    fn resolve_oracle(
        ids: &[String],
        skip_unknown: bool,
        rows_of: &std::collections::HashMap<String, u32>,
    ) -> Result<Candidates, EngineError> {
        let listed = |positions: &[usize]| {
            let mut parts: Vec<String> = positions
                .iter()
                .take(5)
                .map(|&position| format!("{:?} at position {position}", ids[position]))
                .collect();
            if positions.len() > 5 {
                parts.push(format!("and {} more", positions.len() - 5));
            }
            parts.join(", ")
        };
        let mut first_seen = std::collections::HashSet::new();
        let (mut rows, mut duplicates, mut unknown) = (Vec::new(), Vec::new(), Vec::new());
        for (position, id) in ids.iter().enumerate() {
            let first = first_seen.insert(id.as_str());
            match rows_of.get(id) {
                None => unknown.push(position),
                Some(&row) if first => rows.push(row),
                Some(_) => {}
            }
            if !first {
                duplicates.push(position);
            }
        }
        if !duplicates.is_empty() {
            let count = duplicates.len();
            return Err(EngineError::invalid(
                "candidate_ids",
                format!(
                    "{count} duplicate {} ({}); each id may appear once",
                    if count == 1 { "entry" } else { "entries" },
                    listed(&duplicates)
                ),
            ));
        }
        if !unknown.is_empty() && !skip_unknown {
            let count = unknown.len();
            return Err(EngineError::NotFound {
                field: "candidate_ids".to_owned(),
                reason: NotFoundReason::Item,
                message: format!(
                    "{count} {} not in the item table: {}",
                    if count == 1 { "id is" } else { "ids are" },
                    listed(&unknown)
                ),
            });
        }
        Ok(Candidates {
            rows,
            skipped: unknown
                .iter()
                .map(|&position| ids[position].clone())
                .collect(),
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn candidates_resolve_like_the_oracle(
            // Known ids (`item-000`..`item-239`) and unknown ones (`ghost-0`..`ghost-9`),
            // repeated at any positions; the tables's rows in a scrambled order.
            // Or, as most requests, distinct known ids only.
            picks in prop_oneof![
                prop::collection::vec(
                    prop_oneof![
                        6 => (0..240_usize).prop_map(|row| format!("item-{row:03}")),
                        1 => (0..10_usize).prop_map(|n| format!("ghost-{n}")),
                    ],
                    0..120,
                ),
                prop::collection::btree_set(0..240_usize, 0..120)
                    .prop_map(|rows| rows.iter().map(|row| format!("item-{row:03}")).collect())
                    .prop_shuffle(),
            ],
            skip_unknown in any::<bool>(),
        ) {
            let (items, quantized, rows_of) = candidate_table();
            let ids: CandidateIds = picks.iter().collect();
            let expected = resolve_oracle(&picks, skip_unknown, rows_of);
            prop_assert_eq!(candidates(&ids, skip_unknown, items, None, 10_000), expected.clone());
            // Again on the same thread: the scratch left by the first call is clean; and
            // with the int8 copy (its rows hinted instead of the f32 ones), the same answer.
            prop_assert_eq!(candidates(&ids, skip_unknown, items, None, 10_000), expected.clone());
            prop_assert_eq!(
                candidates(&ids, skip_unknown, items, Some(quantized), 10_000),
                expected
            );
        }
    }

    /// A 240-row item table (ids `item-000`.., stored in a scrambled row order), its int8
    /// copy and its rows by id, built once per test binary.
    fn candidate_table() -> (
        &'static Table,
        &'static QuantizedRows,
        &'static std::collections::HashMap<String, u32>,
    ) {
        use std::sync::OnceLock;
        static TABLE: OnceLock<(
            Table,
            QuantizedRows,
            std::collections::HashMap<String, u32>,
            tempfile::TempDir,
        )> = OnceLock::new();
        let (table, quantized, rows_of, _dir) = TABLE.get_or_init(|| {
            let mut data = crate::tests::util::items_data(3, 240, false);
            data.ids = (0..240)
                .map(|row| format!("item-{:03}", row * 7 % 240))
                .collect();
            let dir = tempfile::tempdir().expect("temporary directory");
            let path = crate::tests::util::write(dir.path(), "items.frt", &data);
            let table = Table::open(&path).expect("table opens");
            let rows_of = data
                .ids
                .iter()
                .enumerate()
                .map(|(row, id)| (id.clone(), row as u32))
                .collect();
            let matrix =
                kernels::RowMatrix::new(table.rows(), table.len(), table.dim(), table.row_stride())
                    .expect("table rows are a matrix");
            let quantized = QuantizedRows::build(matrix);
            (table, quantized, rows_of, dir)
        });
        (table, quantized, rows_of)
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
