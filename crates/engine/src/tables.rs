//! Serving tables and hot swap: open, validate, warm, swap atomically, keep one for rollback.
//!
//! A [`TableSlot`] holds the serving table behind an [`ArcSwapOption`]: a request takes one
//! `Arc` snapshot at its start and uses it to the end, so a reload or rollback never changes
//! the table under a running request (the old table is unmapped when its last request
//! finishes). Changes of one slot are serialized; a second concurrent change is refused
//! with `Aborted` rather than queued, so an operator sees the race.

use std::fmt;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwapOption;
use kernels::{QuantizedRows, RowMatrix, ScoredItem, sort_ranked};
use store::{StoreError, Table, TableRole};

use crate::error::{AbortReason, EngineError, PreconditionReason, ReloadProblem};
use crate::response::{TableVersion, micros};

/// Which table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableKind {
    /// The item (catalog) table.
    Items,
    /// The user table.
    Users,
}

impl TableKind {
    /// The table role a file must be marked with (or be unmarked) to serve in this slot.
    pub fn role(self) -> TableRole {
        match self {
            TableKind::Items => TableRole::Items,
            TableKind::Users => TableRole::Users,
        }
    }
}

impl fmt::Display for TableKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TableKind::Items => "item",
            TableKind::Users => "user",
        })
    }
}

/// An opened, validated table with what the engine precomputes for it.
#[derive(Debug)]
pub(crate) struct LoadedTable {
    pub table: Table,
    /// Non-personalized order: the best `min(max_pool, len)` rows by prior (descending,
    /// ties by row ascending), or the first rows in row order when there is no prior.
    /// Empty for user tables.
    pub prior_order: Vec<ScoredItem>,
    /// The int8 copy of the rows that candidate scoring prunes with, once built (item
    /// tables with `quantized_candidates` only; built in the background after the table
    /// starts serving, see [`LoadedTable::quantize_in_background`]).
    pub quantized: OnceLock<QuantizedRows>,
}

impl LoadedTable {
    pub fn new(table: Table, kind: TableKind, max_pool: usize) -> LoadedTable {
        let prior_order = match kind {
            TableKind::Items => prior_top(&table, max_pool),
            TableKind::Users => Vec::new(),
        };
        LoadedTable {
            table,
            prior_order,
            quantized: OnceLock::new(),
        }
    }

    /// Builds the int8 copy of the rows on a thread of its own (its large-table work runs
    /// on the rayon pool), so that opening and swapping a table never waits for it: 100 000
    /// x 64 rows took 18 ms, 1 000 000 x 128 0.38 s on two busy cores (BENCHMARKS.md).
    /// Requests use the exact kernel until it is set. If the thread cannot start, the
    /// copy is built on the calling thread instead.
    pub fn quantize_in_background(self: &Arc<LoadedTable>) {
        if self.quantized.get().is_some() {
            return;
        }
        let data = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("fairrank-quantize".to_owned())
            .spawn(move || data.quantize_now());
        if spawned.is_err() {
            self.quantize_now();
        }
    }

    /// Builds the int8 copy of the rows on this thread (if not built yet).
    fn quantize_now(&self) {
        if let Ok(matrix) = self.matrix() {
            self.quantized.get_or_init(|| QuantizedRows::build(matrix));
        }
    }

    /// The rows as a kernel matrix.
    pub fn matrix(&self) -> Result<RowMatrix<'_>, EngineError> {
        let table = &self.table;
        Ok(RowMatrix::new(
            table.rows(),
            table.len(),
            table.dim(),
            table.row_stride(),
        )?)
    }
}

/// The best `count` rows by prior (ties by row index), or the first `count` rows with score
/// 0 when the table has no prior.
fn prior_top(table: &Table, count: usize) -> Vec<ScoredItem> {
    let count = count.min(table.len());
    match table.prior() {
        Some(prior) => {
            let mut all: Vec<ScoredItem> = prior
                .iter()
                .enumerate()
                .map(|(row, &value)| ScoredItem::new(row as u32, value))
                .collect();
            top_ranked(&mut all, count);
            all
        }
        None => (0..count as u32)
            .map(|row| ScoredItem::new(row, 0.0))
            .collect(),
    }
}

/// Keeps the best `count` items of `items`, sorted best first (score descending, ties by
/// index ascending), in `O(n + count log count)`.
pub(crate) fn top_ranked(items: &mut Vec<ScoredItem>, count: usize) {
    if count == 0 {
        items.clear();
        return;
    }
    if count < items.len() {
        items.select_nth_unstable_by(count - 1, ScoredItem::rank_cmp);
        items.truncate(count);
    }
    sort_ranked(items);
}

/// One generation of a table in service.
#[derive(Debug)]
pub(crate) struct Served {
    pub generation: u64,
    pub since: SystemTime,
    pub data: Arc<LoadedTable>,
}

impl Served {
    pub fn version(&self) -> TableVersion {
        TableVersion {
            generation: self.generation,
            checksum: self.data.table.header().data_checksum,
        }
    }

    fn status(&self, kind: TableKind, rollback_target: Option<TableVersion>) -> TableStatus {
        let table = &self.data.table;
        TableStatus {
            kind,
            version: self.version(),
            path: table.path().to_path_buf(),
            rows: table.len(),
            dim: table.dim(),
            file_bytes: table.header().file_size,
            loaded_at: self.since,
            group_attributes: table.group_attribute_names().to_vec(),
            has_prior: table.prior().is_some(),
            has_dim_names: table.dim_names().is_some(),
            marked_role: table.role().map(|role| match role {
                TableRole::Items => TableKind::Items,
                TableRole::Users => TableKind::Users,
            }),
            max_row_norm: table.max_row_norm(),
            quantized_copy_bytes: self
                .data
                .quantized
                .get()
                .map(|copy| copy.heap_bytes() as u64),
            rollback_target,
        }
    }
}

/// A loaded table as the status reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct TableStatus {
    /// Which table.
    pub kind: TableKind,
    /// Generation and content checksum.
    pub version: TableVersion,
    /// File the table was loaded from.
    pub path: PathBuf,
    /// Number of rows.
    pub rows: usize,
    /// Embedding dimension.
    pub dim: usize,
    /// Size of the file in bytes.
    pub file_bytes: u64,
    /// When this generation started serving.
    pub loaded_at: SystemTime,
    /// Names of the group attributes, in table order.
    pub group_attributes: Vec<String>,
    /// Whether the table has a prior.
    pub has_prior: bool,
    /// Whether the table names its dimensions.
    pub has_dim_names: bool,
    /// The role the file's header marks it with; `None` for an unmarked file (which
    /// serves in either slot).
    pub marked_role: Option<TableKind>,
    /// Largest row norm.
    pub max_row_norm: f32,
    /// Heap bytes of the int8 copy of the rows that candidate scoring prunes with (`None`
    /// for user tables, with `quantized_candidates = false`, or while it is being built).
    pub quantized_copy_bytes: Option<u64>,
    /// The retained previous table (the one a rollback would swap back in) as it served:
    /// its generation then and its checksum.
    pub rollback_target: Option<TableVersion>,
}

/// Options of a reload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadRequest {
    /// File to load; `None`: the serving table's path, re-opened (picks up a file
    /// republished by rename).
    pub path: Option<PathBuf>,
    /// Reload only if the serving generation equals this (`Aborted` otherwise).
    pub if_generation: Option<u64>,
    /// Check the whole-file checksum before swapping; `None`: the configured default.
    pub verify_checksum: Option<bool>,
}

/// The outcome of a successful reload or rollback.
#[derive(Debug, Clone, PartialEq)]
pub struct ReloadOutcome {
    /// The table now serving.
    pub table: TableStatus,
    /// Version of the table it replaced (now the rollback target), if there was one.
    pub previous: Option<TableVersion>,
    /// Time to open, validate and warm the new table, in microseconds (0 for rollbacks).
    pub load_us: u64,
}

/// What the item and user slots share: the lock every table change holds, and the count of
/// swaps made under it, by which a reader that loads both slots tells whether the pair it
/// took was checked together ([`TableChanges::swaps`]).
#[derive(Debug, Default)]
pub(crate) struct TableChanges {
    lock: Mutex<()>,
    swaps: AtomicU64,
}

impl TableChanges {
    /// Swaps made so far (either slot). Each change checks its table against the other slot's
    /// as it is, then swaps and counts, under the lock: a reader that loads one slot then the
    /// other and sees this count grow by at most one in between holds a pair that some change
    /// checked (or that served together from the start); by two or more, it may hold a pair
    /// no change checked, and takes both again.
    pub fn swaps(&self) -> u64 {
        self.swaps.load(Ordering::Acquire)
    }
}

/// The serving table of one kind, the retained previous one, and the change lock.
#[derive(Debug)]
pub(crate) struct TableSlot {
    kind: TableKind,
    current: ArcSwapOption<Served>,
    /// The table the last change replaced, as it served (its generation then).
    previous: Mutex<Option<Arc<Served>>>,
    /// Held through a change; shared by the item and user slots, so a change checks the
    /// other table as it is, not as it was before a concurrent change of it.
    change: Arc<TableChanges>,
    last_generation: AtomicU64,
    max_pool: usize,
    /// Whether every table swapped in gets an int8 copy built in the background.
    quantize: bool,
}

impl TableSlot {
    /// A slot serving `table` as generation 1 (or empty). With `quantize`, every table it
    /// serves gets an int8 copy of its rows, built in the background after it starts
    /// serving. `change` is the lock every change of this slot holds (one for both slots).
    pub fn new(
        kind: TableKind,
        table: Option<Table>,
        max_pool: usize,
        quantize: bool,
        change: Arc<TableChanges>,
    ) -> TableSlot {
        let current = table.map(|table| {
            Arc::new(Served {
                generation: 1,
                since: SystemTime::now(),
                data: Arc::new(LoadedTable::new(table, kind, max_pool)),
            })
        });
        if let (true, Some(current)) = (quantize, &current) {
            current.data.quantize_in_background();
        }
        let last_generation = u64::from(current.is_some());
        TableSlot {
            kind,
            current: ArcSwapOption::new(current),
            previous: Mutex::new(None),
            change,
            last_generation: AtomicU64::new(last_generation),
            max_pool,
            quantize,
        }
    }

    /// The serving table, if any (a snapshot: later swaps do not affect it).
    pub fn snapshot(&self) -> Option<Arc<Served>> {
        self.current.load_full()
    }

    /// The serving table's status.
    pub fn status(&self) -> Option<TableStatus> {
        let current = self.snapshot()?;
        let rollback = self.rollback_target_version();
        Some(current.status(self.kind, rollback))
    }

    fn rollback_target_version(&self) -> Option<TableVersion> {
        // The generation it served under: what the change that replaced it answered as
        // `previous` (a rollback swaps it in under a new generation).
        let previous = self.previous.lock().unwrap_or_else(PoisonError::into_inner);
        previous.as_ref().map(|served| served.version())
    }

    /// Opens, validates (and optionally verifies) and warms a table file, checks it with
    /// `check` (against the other table: [`compatible_with`]), then swaps it in. On any failure
    /// the serving table is untouched.
    pub fn reload(
        &self,
        request: &ReloadRequest,
        default_verify: bool,
        check: impl FnOnce(&Table) -> Result<(), String>,
    ) -> Result<ReloadOutcome, EngineError> {
        let _change = self.lock_change()?;
        let current = self.snapshot();
        self.check_generation(current.as_deref(), request.if_generation)?;
        let path = match (&request.path, &current) {
            (Some(path), _) => path.clone(),
            (None, Some(current)) => current.data.table.path().to_path_buf(),
            (None, None) => {
                return Err(EngineError::FailedPrecondition {
                    field: Some("path".to_owned()),
                    reason: PreconditionReason::TableNotLoaded,
                    message: format!(
                        "no {} table is loaded, so a reload must name a file",
                        self.kind
                    ),
                });
            }
        };
        let started = Instant::now();
        let refuse = |problem, message| EngineError::Reload {
            table: self.kind,
            path: path.clone(),
            problem,
            message,
        };
        let table = Table::open(&path).map_err(|e| refuse(store_problem(&e), e.to_string()))?;
        role_problem(self.kind, &table)
            .map_err(|message| refuse(ReloadProblem::WrongRole, message))?;
        if request.verify_checksum.unwrap_or(default_verify) {
            table
                .verify()
                .map_err(|e| refuse(ReloadProblem::InvalidFile, e.to_string()))?;
        }
        check(&table).map_err(|message| refuse(ReloadProblem::IncompatibleTables, message))?;
        warm(&table);
        let loaded = Arc::new(LoadedTable::new(table, self.kind, self.max_pool));
        let load_us = micros(started.elapsed());
        let previous = self.swap_in(loaded, current);
        Ok(ReloadOutcome {
            table: self.status_or_internal()?,
            previous,
            load_us,
        })
    }

    /// Swaps the retained previous table back in (under a new generation); the table it
    /// replaces becomes the new rollback target, so a second rollback undoes the first.
    pub fn rollback(
        &self,
        if_generation: Option<u64>,
        check: impl FnOnce(&Table) -> Result<(), String>,
    ) -> Result<ReloadOutcome, EngineError> {
        let _change = self.lock_change()?;
        let current = self.snapshot();
        self.check_generation(current.as_deref(), if_generation)?;
        let target = self
            .previous
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(target) = target else {
            return Err(EngineError::FailedPrecondition {
                field: None,
                reason: PreconditionReason::NoRollbackTarget,
                message: format!("no previous {} table is retained", self.kind),
            });
        };
        let target = Arc::clone(&target.data);
        check(&target.table).map_err(|message| EngineError::Reload {
            table: self.kind,
            path: target.table.path().to_path_buf(),
            problem: ReloadProblem::IncompatibleTables,
            message,
        })?;
        let previous = self.swap_in(target, current);
        Ok(ReloadOutcome {
            table: self.status_or_internal()?,
            previous,
            load_us: 0,
        })
    }

    /// Installs `data` as the next generation and retains `current` for rollback, then (with
    /// `quantize`) starts building its int8 copy. Called with the change lock held.
    fn swap_in(
        &self,
        data: Arc<LoadedTable>,
        current: Option<Arc<Served>>,
    ) -> Option<TableVersion> {
        let generation = self.last_generation.load(Ordering::Acquire) + 1;
        let served = Arc::new(Served {
            generation,
            since: SystemTime::now(),
            data: Arc::clone(&data),
        });
        let mut previous = self.previous.lock().unwrap_or_else(PoisonError::into_inner);
        *previous = current.clone();
        self.last_generation.store(generation, Ordering::Release);
        self.current.store(Some(served));
        self.change.swaps.fetch_add(1, Ordering::AcqRel);
        if self.quantize {
            // After the swap, so that it never delays one; a no-op for a rolled-back table
            // whose copy was built while it served.
            data.quantize_in_background();
        }
        current.map(|current| current.version())
    }

    fn status_or_internal(&self) -> Result<TableStatus, EngineError> {
        self.status()
            .ok_or_else(|| EngineError::internal("table slot empty right after a swap"))
    }

    /// Holds the change lock (tests: a change in progress).
    #[cfg(test)]
    pub(crate) fn hold_change_for_test(&self) -> std::sync::MutexGuard<'_, ()> {
        self.change
            .lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_change(&self) -> Result<std::sync::MutexGuard<'_, ()>, EngineError> {
        match self.change.lock.try_lock() {
            Ok(guard) => Ok(guard),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => Err(EngineError::Aborted {
                reason: AbortReason::TableChangeInProgress,
                message: format!(
                    "another table change is in progress (the {} table cannot change now)",
                    self.kind
                ),
            }),
        }
    }

    fn check_generation(
        &self,
        current: Option<&Served>,
        expected: Option<u64>,
    ) -> Result<(), EngineError> {
        let Some(expected) = expected else {
            return Ok(());
        };
        let serving = current.map_or(0, |current| current.generation);
        if serving != expected {
            return Err(EngineError::Aborted {
                reason: AbortReason::GenerationMismatch,
                message: format!(
                    "the {} table serves generation {serving}, not {expected}",
                    self.kind
                ),
            });
        }
        Ok(())
    }
}

/// Why `table` cannot serve as the `kind` table: its header marks it with the other role
/// (for example "`/x/users.frt` is marked as a user table; the item table slot needs an
/// item table"). Unmarked files serve in either slot.
pub fn role_problem(kind: TableKind, table: &Table) -> Result<(), String> {
    match table.role() {
        Some(role) if role != kind.role() => Err(format!(
            "`{}` is marked as {}; the {kind} table slot needs {}",
            table.path().display(),
            a_table_of(role),
            a_table_of(kind.role()),
        )),
        _ => Ok(()),
    }
}

/// "an item table" or "a user table".
fn a_table_of(role: TableRole) -> &'static str {
    match role {
        TableRole::Items => "an item table",
        TableRole::Users => "a user table",
    }
}

/// [`role_problem`] as the engine's refusal of a table for the `kind` slot.
pub(crate) fn check_role(kind: TableKind, table: &Table) -> Result<(), EngineError> {
    role_problem(kind, table).map_err(|message| EngineError::Reload {
        table: kind,
        path: table.path().to_path_buf(),
        problem: ReloadProblem::WrongRole,
        message,
    })
}

/// Classifies a store refusal.
fn store_problem(error: &StoreError) -> ReloadProblem {
    match error {
        StoreError::Io { source, .. } if source.kind() == ErrorKind::NotFound => {
            ReloadProblem::FileNotFound
        }
        _ => ReloadProblem::InvalidFile,
    }
}

/// Touches every page of the row block so the first requests do not fault them in. Opening
/// already maps with populate and scans every row; this keeps the pages hot right before
/// the swap regardless of how the store maps.
fn warm(table: &Table) {
    const FLOATS_PER_PAGE: usize = 4096 / std::mem::size_of::<f32>();
    let rows = table.rows();
    let touched = rows
        .iter()
        .step_by(FLOATS_PER_PAGE)
        .fold(0u32, |bits, value| bits ^ value.to_bits());
    std::hint::black_box(touched);
}

/// The check between a new item or user table and the other slot's table, read when the
/// check runs (under the shared change lock): see [`pair_problem`].
pub(crate) fn compatible_with(other: &TableSlot) -> impl FnOnce(&Table) -> Result<(), String> {
    move |table: &Table| match other.snapshot() {
        Some(served) => pair_problem(table, &served.data.table, other.kind),
        None => Ok(()),
    }
}

/// Why `table` cannot serve beside `other` (of kind `other_kind`): different dimensions, or
/// row norms whose product exceeds the engine's score bound (a user's scores against the
/// largest item row could overflow `f32`).
pub(crate) fn pair_problem(
    table: &Table,
    other: &Table,
    other_kind: TableKind,
) -> Result<(), String> {
    if table.dim() != other.dim() {
        return Err(format!(
            "its dimension {} differs from the {other_kind} table's {}",
            table.dim(),
            other.dim()
        ));
    }
    let product = f64::from(table.max_row_norm()) * f64::from(other.max_row_norm());
    if product > crate::validate::MAX_SCORE_BOUND {
        return Err(format!(
            "its largest row norm {:e} times the {other_kind} table's {:e} exceeds {:e}: \
             scores could overflow",
            table.max_row_norm(),
            other.max_row_norm(),
            crate::validate::MAX_SCORE_BOUND
        ));
    }
    Ok(())
}

/// Opens a table for [`Engine::new`](crate::Engine::new) callers that start from paths,
/// with the checks of a reload: the format and every row at open, the role (a file marked
/// with the other role is refused, [`role_problem`]; an unmarked one is accepted), and with
/// `verify` the whole-file checksum too (what `verify_checksum_on_reload` asks of a reload).
pub fn open_table(kind: TableKind, path: &Path, verify: bool) -> Result<Table, EngineError> {
    let refuse = |e: StoreError| EngineError::Reload {
        table: kind,
        path: path.to_path_buf(),
        problem: store_problem(&e),
        message: e.to_string(),
    };
    let table = Table::open(path).map_err(refuse)?;
    check_role(kind, &table)?;
    if verify {
        table.verify().map_err(refuse)?;
    }
    Ok(table)
}
