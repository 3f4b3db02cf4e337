//! The [`Engine`]: request entry points (completion callbacks, blocking, batches), table
//! reloads and rollbacks, the personalization switch and status.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Instant, SystemTime};

use rayon::prelude::*;
use store::Table;

use crate::batcher::{Batcher, BatcherStatus, CatalogJob, ScanResult, scan_catalog};
use crate::config::EngineConfig;
use crate::error::{DeadlineStage, EngineError};
use crate::exposure_state::scope_key;
use crate::pipeline::{Prepared, Snapshot, finish, prepare, score_inline};
use crate::private::{PrivacySetup, PrivateWorkers};
use crate::request::RankRequest;
use crate::rerank::{FairnessRuntime, FairnessSetup};
use crate::response::{BatchResponse, RankResponse, StageTimings, micros};
use crate::tables::{
    ReloadOutcome, ReloadRequest, TableChanges, TableKind, TableSlot, TableStatus, check_role,
    compatible_with, pair_problem,
};

/// A callback that receives an answer or an error, exactly once.
pub type Callback<T> = Box<dyn FnOnce(Result<T, EngineError>) + Send + 'static>;

/// The callback that receives a request's answer.
pub type RankCallback = Callback<RankResponse>;

/// The callback that receives a batch's answer.
pub type BatchCallback = Callback<BatchResponse>;

/// The ranking engine: owns the serving tables, the micro-batcher and the request path.
///
/// `Engine` is `Send + Sync` and cheap to clone (clones share everything); the server
/// keeps one and calls it from its async handlers. Heavy work never runs on the caller's
/// thread: [`Engine::submit`] returns at once and answers from a rayon worker.
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: EngineConfig,
    items: TableSlot,
    users: TableSlot,
    /// Shared by both slots: tells [`Inner::snapshot`] whether its pair was checked together.
    table_changes: Arc<TableChanges>,
    paused: AtomicBool,
    paused_since: Mutex<SystemTime>,
    in_flight: Arc<AtomicUsize>,
    batcher: Batcher,
    fairness: Arc<FairnessRuntime>,
    privacy: PrivacySetup,
    /// Threads for DP requests, started on the first one.
    private_workers: OnceLock<Result<PrivateWorkers, EngineError>>,
}

/// The result of [`Engine::set_personalization_paused`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PauseChange {
    /// Whether personalization is paused now.
    pub paused: bool,
    /// Whether the call changed the state.
    pub changed: bool,
    /// Since when the current state holds.
    pub since: SystemTime,
}

/// What [`Engine::status`] reports.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineStatus {
    /// The serving item table.
    pub items: TableStatus,
    /// The serving user table, if one is loaded.
    pub users: Option<TableStatus>,
    /// Requests submitted and not yet answered (batch entries count one each).
    pub in_flight: usize,
    /// Whether personalization is paused.
    pub personalization_paused: bool,
    /// Since when the pause state holds.
    pub paused_since: SystemTime,
    /// The micro-batcher's counters.
    pub batcher: BatcherStatus,
    /// The configuration in force.
    pub config: EngineConfig,
}

/// One in-flight count per request, released on drop.
struct InFlight {
    counter: Arc<AtomicUsize>,
    requests: usize,
}

impl InFlight {
    fn new(counter: &Arc<AtomicUsize>, requests: usize) -> InFlight {
        counter.fetch_add(requests, Ordering::AcqRel);
        InFlight {
            counter: Arc::clone(counter),
            requests,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.requests, Ordering::AcqRel);
    }
}

/// Calls a callback exactly once: with the answer, or, if dropped unanswered (a panic, a
/// lost job), with an internal error. Holds the in-flight count of the requests it answers
/// and releases it just before calling back.
struct Completion<T> {
    done: Option<Callback<T>>,
    in_flight: Option<InFlight>,
}

impl<T> Completion<T> {
    fn new(done: Callback<T>, in_flight: InFlight) -> Completion<T> {
        Completion {
            done: Some(done),
            in_flight: Some(in_flight),
        }
    }

    fn complete(mut self, result: Result<T, EngineError>) {
        self.deliver(result);
    }

    fn deliver(&mut self, result: Result<T, EngineError>) {
        drop(self.in_flight.take());
        if let Some(done) = self.done.take() {
            done(result);
        }
    }
}

impl<T> Drop for Completion<T> {
    fn drop(&mut self) {
        if self.done.is_some() {
            self.deliver(Err(EngineError::internal(
                "the request was dropped without an answer",
            )));
        }
    }
}

/// Runs `task` on the rayon pool, containing panics (rayon aborts the process on a panic
/// in a spawned task); the task's completion guards answer the caller.
fn spawn_contained(task: impl FnOnce() + Send + 'static) {
    rayon::spawn(move || {
        let _ = catch_unwind(AssertUnwindSafe(task));
    });
}

impl Engine {
    /// An engine serving `items` and, optionally, `users` (both as generation 1), with the
    /// built-in fairness constraints and amortized state in memory.
    ///
    /// Fails on an invalid configuration (including a default fairness policy the registry
    /// refuses), a user table that cannot serve beside the item table (another dimension,
    /// or row norms whose scores could overflow), or when the batcher thread cannot start.
    pub fn new(
        config: EngineConfig,
        items: Table,
        users: Option<Table>,
    ) -> Result<Engine, EngineError> {
        let fairness = FairnessSetup::in_memory(&config);
        Engine::with_setup(config, items, users, fairness, PrivacySetup::default())
    }

    /// [`Engine::new`] with a chosen fairness registry (research constraints) and amortized
    /// state store (a durable one survives restarts); privacy as in [`Engine::new`].
    pub fn with_fairness(
        config: EngineConfig,
        items: Table,
        users: Option<Table>,
        fairness: FairnessSetup,
    ) -> Result<Engine, EngineError> {
        Engine::with_setup(config, items, users, fairness, PrivacySetup::default())
    }

    /// An engine with a privacy configuration and budget ledger ([`Engine::new`] uses the
    /// default configuration, DP off unless requests ask, with an in-memory ledger);
    /// fairness as in [`Engine::new`].
    pub fn with_privacy(
        config: EngineConfig,
        privacy: PrivacySetup,
        items: Table,
        users: Option<Table>,
    ) -> Result<Engine, EngineError> {
        let fairness = FairnessSetup::in_memory(&config);
        Engine::with_setup(config, items, users, fairness, privacy)
    }

    /// An engine with both a fairness setup ([`Engine::with_fairness`]) and a privacy setup
    /// ([`Engine::with_privacy`]): what the server builds from its configuration.
    pub fn with_setup(
        config: EngineConfig,
        items: Table,
        users: Option<Table>,
        fairness: FairnessSetup,
        privacy: PrivacySetup,
    ) -> Result<Engine, EngineError> {
        config.validate()?;
        privacy.config.validate()?;
        let fairness = Arc::new(FairnessRuntime::new(&config, fairness)?);
        check_role(TableKind::Items, &items)?;
        if let Some(users) = &users {
            check_role(TableKind::Users, users)?;
        }
        if let Some(users) = &users
            && let Err(message) = pair_problem(users, &items, TableKind::Items)
        {
            return Err(EngineError::Reload {
                table: TableKind::Users,
                path: users.path().to_path_buf(),
                problem: crate::error::ReloadProblem::IncompatibleTables,
                message,
            });
        }
        let table_changes = Arc::new(TableChanges::default());
        let batcher = Batcher::start(&config)?;
        let inner = Inner {
            items: TableSlot::new(
                TableKind::Items,
                Some(items),
                config.max_pool,
                config.quantized_candidates,
                Arc::clone(&table_changes),
            ),
            users: TableSlot::new(
                TableKind::Users,
                users,
                config.max_pool,
                false,
                Arc::clone(&table_changes),
            ),
            table_changes,
            paused: AtomicBool::new(false),
            paused_since: Mutex::new(SystemTime::now()),
            in_flight: Arc::new(AtomicUsize::new(0)),
            batcher,
            config,
            fairness,
            privacy,
            private_workers: OnceLock::new(),
        };
        Ok(Engine {
            inner: Arc::new(inner),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The privacy configuration and ledger in force.
    pub fn privacy(&self) -> &PrivacySetup {
        &self.inner.privacy
    }

    /// Ranks asynchronously: returns at once; `done` is called exactly once, from a rayon
    /// worker or the batcher, with the answer or the error.
    ///
    /// Candidate lists and non-personalized answers are computed on a rayon worker;
    /// personalized whole-catalog requests go through the micro-batcher (see
    /// [`crate::batcher`]).
    pub fn submit(&self, request: RankRequest, done: RankCallback) {
        let received = Instant::now();
        let completion = Completion::new(done, InFlight::new(&self.inner.in_flight, 1));
        let inner = Arc::clone(&self.inner);
        spawn_contained(move || inner.run(request, completion, received));
    }

    /// [`Engine::submit`], except that a small request runs on the calling thread before
    /// this returns: one that lists at most
    /// [`inline_max_candidates`](EngineConfig::inline_max_candidates) candidate ids, or a
    /// whole-catalog request, whose scan still goes to the micro-batcher (only validation
    /// and the hand-off run here; a non-personalized answer copies the prior order).
    ///
    /// A small candidate list costs tens of microseconds on the caller's thread, less than
    /// handing it to a rayon worker and back (two cross-thread wake-ups), so an async
    /// server may call this from its worker threads; longer lists go to rayon as with
    /// `submit`. `done` is still called exactly once (on this thread for an inline request),
    /// and a panic inside is contained the same way.
    pub fn submit_small_inline(&self, request: RankRequest, done: RankCallback) {
        let limit = self.inner.config.inline_max_candidates;
        if limit == 0 || request.candidate_ids.len() > limit {
            return self.submit(request, done);
        }
        let received = Instant::now();
        let completion = Completion::new(done, InFlight::new(&self.inner.in_flight, 1));
        let inner = Arc::clone(&self.inner);
        let _ = catch_unwind(AssertUnwindSafe(move || {
            inner.run(request, completion, received);
        }));
    }

    /// Ranks and waits for the answer (for tests, the CLI and benchmarks).
    ///
    /// Called from a rayon worker thread, it runs the whole request inline on that thread
    /// (no micro-batching) instead of blocking a worker the request itself needs.
    pub fn rank_blocking(&self, request: RankRequest) -> Result<RankResponse, EngineError> {
        let received = Instant::now();
        if rayon::current_thread_index().is_some() {
            let _in_flight = InFlight::new(&self.inner.in_flight, 1);
            let snapshot = self.inner.snapshot()?;
            let prepared = prepare(
                &self.inner.config,
                &self.inner.privacy,
                snapshot,
                request,
                StageTimings::default(),
                received,
            )?;
            prepared.check_deadline(DeadlineStage::BeforeScoring)?;
            return score_and_finish(prepared);
        }
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        self.submit(
            request,
            Box::new(move |result| {
                // The receiver waits below; it is gone only if this thread panicked.
                let _ = sender.send(result);
            }),
        );
        receiver.recv().unwrap_or_else(|_| {
            Err(EngineError::internal(
                "the engine lost a request without answering it",
            ))
        })
    }

    /// Ranks many requests at once (the RankBatch RPC), asynchronously; `done` is called
    /// exactly once.
    ///
    /// All entries use one snapshot of the tables. Every personalized whole-catalog entry
    /// is scored by ONE batched kernel call; candidate-list and non-personalized entries are
    /// scored in parallel. Each entry is validated and answered independently (its error
    /// names the field inside the entry); the call itself fails only for batch-level
    /// problems: no entries, more than `max_batch_requests` entries or
    /// `max_batch_candidates` candidate ids in all, or duplicate request ids (field
    /// `requests[i].request_id`).
    pub fn submit_batch(&self, requests: Vec<RankRequest>, done: BatchCallback) {
        let received = Instant::now();
        let completion =
            Completion::new(done, InFlight::new(&self.inner.in_flight, requests.len()));
        let inner = Arc::clone(&self.inner);
        spawn_contained(move || inner.run_batch(requests, received, completion, true));
    }

    /// [`Engine::submit_batch`], waiting for the answer. Called from a rayon worker it runs
    /// inline.
    pub fn rank_batch(&self, requests: Vec<RankRequest>) -> Result<BatchResponse, EngineError> {
        let received = Instant::now();
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        let done: BatchCallback = Box::new(move |result| {
            let _ = sender.send(result);
        });
        if rayon::current_thread_index().is_some() {
            // Inline, DP entries too: this worker must not wait on work that may need the
            // pool it occupies (a whole-catalog DP entry selects its pool on rayon).
            let completion =
                Completion::new(done, InFlight::new(&self.inner.in_flight, requests.len()));
            self.inner.run_batch(requests, received, completion, false);
        } else {
            self.submit_batch(requests, done);
        }
        receiver.recv().unwrap_or_else(|_| {
            Err(EngineError::internal(
                "the engine lost a batch without answering it",
            ))
        })
    }

    /// Reloads the item table from `path` (`None`: its current path, re-opened). See
    /// [`Engine::reload`].
    pub fn reload_items(&self, path: Option<&Path>) -> Result<ReloadOutcome, EngineError> {
        self.reload(
            TableKind::Items,
            &ReloadRequest {
                path: path.map(Path::to_path_buf),
                ..ReloadRequest::default()
            },
        )
    }

    /// Reloads (or first loads) the user table. See [`Engine::reload`].
    pub fn reload_users(&self, path: Option<&Path>) -> Result<ReloadOutcome, EngineError> {
        self.reload(
            TableKind::Users,
            &ReloadRequest {
                path: path.map(Path::to_path_buf),
                ..ReloadRequest::default()
            },
        )
    }

    /// Opens, validates (checksum too, unless disabled), checks the dimension against the
    /// other table, warms, and atomically swaps in a table; the replaced table becomes the
    /// rollback target. Requests already running finish on the table they started with.
    /// On any failure the serving table is untouched and the error says why
    /// ([`EngineError::Reload`], or `Aborted` for a concurrent change or a generation
    /// mismatch).
    pub fn reload(
        &self,
        kind: TableKind,
        request: &ReloadRequest,
    ) -> Result<ReloadOutcome, EngineError> {
        let inner = &self.inner;
        let verify = inner.config.verify_checksum_on_reload;
        match kind {
            TableKind::Items => inner
                .items
                .reload(request, verify, compatible_with(&inner.users)),
            TableKind::Users => inner
                .users
                .reload(request, verify, compatible_with(&inner.items)),
        }
    }

    /// Swaps the previous item table back in. See [`Engine::rollback`].
    pub fn rollback_items(&self) -> Result<ReloadOutcome, EngineError> {
        self.rollback(TableKind::Items, None)
    }

    /// Swaps the previous table of `kind` back in, under a new generation; the table it
    /// replaces becomes the rollback target (a second rollback undoes the first).
    /// `FailedPrecondition` when no previous table is retained.
    pub fn rollback(
        &self,
        kind: TableKind,
        if_generation: Option<u64>,
    ) -> Result<ReloadOutcome, EngineError> {
        let inner = &self.inner;
        match kind {
            TableKind::Items => inner
                .items
                .rollback(if_generation, compatible_with(&inner.users)),
            TableKind::Users => inner
                .users
                .rollback(if_generation, compatible_with(&inner.items)),
        }
    }

    /// Pauses or resumes personalization engine-wide (the operator switch). While paused,
    /// every answer is non-personalized and no user embedding is read. Idempotent.
    pub fn set_personalization_paused(&self, paused: bool) -> PauseChange {
        let mut since = self
            .inner
            .paused_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let changed = self.inner.paused.swap(paused, Ordering::AcqRel) != paused;
        if changed {
            *since = SystemTime::now();
        }
        PauseChange {
            paused,
            changed,
            since: *since,
        }
    }

    /// Whether personalization is paused.
    pub fn personalization_paused(&self) -> bool {
        self.inner.paused.load(Ordering::Acquire)
    }

    /// The registered fairness constraints with their parameters, by name (valid
    /// `FairnessPolicy::constraint` values).
    pub fn fairness_constraints(&self) -> Vec<fairness::ConstraintInfo> {
        self.inner.fairness.constraints()
    }

    /// The amortized fairness state of `exposure_scope` under `group_attribute`, if an
    /// amortized constraint has ranked in it.
    pub fn exposure_state(
        &self,
        group_attribute: &str,
        exposure_scope: &str,
    ) -> Result<Option<fairness::AmortizedState>, EngineError> {
        self.inner
            .fairness
            .store()
            .load(&scope_key(group_attribute, exposure_scope))
    }

    /// Requests submitted and not yet answered (for the server's load shedding).
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Acquire)
    }

    /// Tables, in-flight count, pause state and batcher counters.
    pub fn status(&self) -> Result<EngineStatus, EngineError> {
        let inner = &self.inner;
        let items = inner
            .items
            .status()
            .ok_or_else(|| EngineError::internal("no item table is serving"))?;
        let paused_since = *inner
            .paused_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(EngineStatus {
            items,
            users: inner.users.status(),
            in_flight: self.in_flight(),
            personalization_paused: self.personalization_paused(),
            paused_since,
            batcher: inner.batcher.status(),
            config: inner.config.clone(),
        })
    }
}

/// What `load` returns once the swap count (`swaps`) grew by at most one around it: a pair
/// of tables some change checked together (see [`TableChanges::swaps`]).
pub(crate) fn checked_pair<T>(swaps: impl Fn() -> u64, mut load: impl FnMut() -> T) -> T {
    loop {
        let before = swaps();
        let pair = load();
        if swaps() <= before + 1 {
            return pair;
        }
    }
}

impl Inner {
    /// The tables and the pause switch, as one request sees them.
    ///
    /// The two slots are loaded one after the other: should two changes land in between (say
    /// items to another dimension, then users matching them), the pair would be one no
    /// change checked together; [`TableChanges::swaps`] tells, and both are taken again.
    fn snapshot(&self) -> Result<Snapshot<'_>, EngineError> {
        let (items, users) = checked_pair(
            || self.table_changes.swaps(),
            || (self.items.snapshot(), self.users.snapshot()),
        );
        Ok(Snapshot {
            items: items.ok_or_else(|| EngineError::internal("no item table is serving"))?,
            users,
            paused: self.paused.load(Ordering::Acquire),
            fairness: &self.fairness,
        })
    }

    /// One request, on a rayon worker.
    fn run(
        self: Arc<Self>,
        request: RankRequest,
        completion: Completion<RankResponse>,
        received: Instant,
    ) {
        let timings = StageTimings {
            queue_us: micros(received.elapsed()),
            ..StageTimings::default()
        };
        let prepared = self
            .snapshot()
            .and_then(|snapshot| {
                prepare(
                    &self.config,
                    &self.privacy,
                    snapshot,
                    request,
                    timings,
                    received,
                )
            })
            .and_then(|prepared| {
                prepared.check_deadline(DeadlineStage::BeforeScoring)?;
                Ok(prepared)
            });
        let prepared = match prepared {
            Ok(prepared) => prepared,
            Err(error) => return completion.complete(Err(error)),
        };
        if let Some(query) = prepared.catalog_query() {
            let job = CatalogJob::new(
                Arc::clone(&prepared.items),
                query.clone(),
                prepared.pool,
                prepared.deadline,
                Box::new(move |scan: ScanResult| {
                    let mut prepared = prepared;
                    prepared.timings.queue_us += micros(scan.queue_wait);
                    prepared.timings.score_us = micros(scan.scan_time);
                    completion.complete(scan.outcome.and_then(|scored| finish(prepared, scored)));
                }),
            );
            self.batcher.submit(job);
            return;
        }
        if prepared.private.is_some() {
            // DP requests block on the durable ledger: run them on the DP workers.
            let workers = self
                .private_workers
                .get_or_init(|| PrivateWorkers::start(self.privacy.config.workers));
            match workers {
                Ok(workers) => {
                    workers.submit(move || completion.complete(score_and_finish(prepared)));
                }
                Err(error) => completion.complete(Err(error.clone())),
            }
            return;
        }
        completion.complete(score_and_finish(prepared));
    }

    /// A batch of requests; see [`Engine::submit_batch`].
    fn run_batch(
        &self,
        requests: Vec<RankRequest>,
        received: Instant,
        completion: Completion<BatchResponse>,
        dp_on_workers: bool,
    ) {
        let queue_us = micros(received.elapsed());
        let snapshot = match check_batch(&requests, &self.config).and_then(|()| self.snapshot()) {
            Ok(snapshot) => snapshot,
            Err(error) => return completion.complete(Err(error)),
        };
        let validate_started = Instant::now();
        let timings = StageTimings {
            queue_us,
            ..StageTimings::default()
        };
        let entries: Vec<Result<Prepared, EngineError>> = requests
            .into_par_iter()
            .map(|request| {
                let prepared = prepare(
                    &self.config,
                    &self.privacy,
                    snapshot.clone(),
                    request,
                    timings,
                    received,
                )?;
                prepared.check_deadline(DeadlineStage::BeforeScoring)?;
                Ok(prepared)
            })
            .collect();
        let validate_us = micros(validate_started.elapsed());

        // All personalized whole-catalog entries: one kernel call.
        let score_started = Instant::now();
        let catalog: Vec<usize> = entries
            .iter()
            .enumerate()
            .filter(
                |(_, entry)| matches!(entry, Ok(prepared) if prepared.catalog_query().is_some()),
            )
            .map(|(position, _)| position)
            .collect();
        let mut catalog_results = {
            let queries: Vec<(&[f32], usize)> = catalog
                .iter()
                .filter_map(|&position| match &entries[position] {
                    Ok(prepared) => prepared
                        .catalog_query()
                        .map(|query| (query.as_slice(), prepared.pool)),
                    Err(_) => None,
                })
                .collect();
            scan_catalog(&snapshot.items.data, &queries, &mut Vec::new())
        };
        let catalog_us = micros(score_started.elapsed());

        // Finish every entry in parallel.
        let mut scored: Vec<Option<Result<Vec<kernels::ScoredItem>, EngineError>>> =
            (0..entries.len()).map(|_| None).collect();
        match &mut catalog_results {
            Ok(results) => {
                for (&position, result) in catalog.iter().zip(results.drain(..)) {
                    scored[position] = Some(Ok(result));
                }
            }
            Err(error) => {
                for &position in &catalog {
                    scored[position] = Some(Err(error.clone()));
                }
            }
        }
        // DP entries block on the durable ledger: with `dp_on_workers` they go to the DP
        // workers (as single DP requests do), not to the compute pool; the rest finish here
        // in parallel.
        let mut private = Vec::new();
        let mut work = Vec::with_capacity(entries.len());
        for (position, (entry, scored)) in entries.into_iter().zip(scored).enumerate() {
            match entry {
                Ok(prepared) if dp_on_workers && scored.is_none() && prepared.private.is_some() => {
                    private.push((position, prepared));
                }
                entry => work.push((position, entry, scored)),
            }
        }
        let mut results: Vec<Option<Result<RankResponse, EngineError>>> =
            (0..work.len() + private.len()).map(|_| None).collect();
        let finished: Vec<(usize, Result<RankResponse, EngineError>)> = work
            .into_par_iter()
            .map(|(position, entry, scored)| {
                let result = entry.and_then(|prepared| match scored {
                    Some(result) => {
                        let mut prepared = prepared;
                        prepared.timings.score_us = catalog_us;
                        finish(prepared, result?)
                    }
                    None => score_and_finish(prepared),
                });
                (position, result)
            })
            .collect();
        for (position, result) in finished {
            results[position] = Some(result);
        }
        let batch = PendingBatch {
            results,
            received,
            score_started,
            timings: StageTimings {
                queue_us,
                validate_us,
                ..StageTimings::default()
            },
        };
        if private.is_empty() {
            return completion.complete(Ok(batch.into_response()));
        }
        let workers = match self
            .private_workers
            .get_or_init(|| PrivateWorkers::start(self.privacy.config.workers))
        {
            Ok(workers) => workers,
            Err(error) => {
                let mut batch = batch;
                for (position, _) in private {
                    batch.results[position] = Some(Err(error.clone()));
                }
                return completion.complete(Ok(batch.into_response()));
            }
        };
        let shared = Arc::new(SharedBatch {
            state: Mutex::new(Some(WaitingBatch {
                batch,
                completion,
                remaining: private.len(),
            })),
        });
        for (position, prepared) in private {
            let shared = Arc::clone(&shared);
            workers.submit(move || {
                // One entry's panic fails that entry, not the batch.
                let result = catch_unwind(AssertUnwindSafe(|| score_and_finish(prepared)))
                    .unwrap_or_else(|_| Err(EngineError::internal("a batch entry panicked")));
                shared.finish_one(position, result);
            });
        }
    }
}

/// A batch's results as its entries finish, and its timings.
struct PendingBatch {
    results: Vec<Option<Result<RankResponse, EngineError>>>,
    received: Instant,
    /// When scoring began: `score_us` runs to the last entry's end, DP entries included.
    score_started: Instant,
    timings: StageTimings,
}

impl PendingBatch {
    /// The answer: every entry's result (an entry never finished is an internal error), the
    /// scoring and total times up to now.
    fn into_response(self) -> BatchResponse {
        BatchResponse {
            results: self
                .results
                .into_iter()
                .map(|result| {
                    result.unwrap_or_else(|| {
                        Err(EngineError::internal("a batch entry received no answer"))
                    })
                })
                .collect(),
            timings: StageTimings {
                score_us: micros(self.score_started.elapsed()),
                total_us: micros(self.received.elapsed()),
                ..self.timings
            },
        }
    }
}

/// A batch waiting for its DP entries on the DP workers: the last one to finish answers.
/// (A job dropped unrun drops its `Arc`; the last drop drops the completion, which then
/// answers with an internal error.)
struct SharedBatch {
    /// `None` once answered.
    state: Mutex<Option<WaitingBatch>>,
}

/// What [`SharedBatch`] holds until its last DP entry finishes.
struct WaitingBatch {
    batch: PendingBatch,
    completion: Completion<BatchResponse>,
    /// DP entries still running.
    remaining: usize,
}

impl SharedBatch {
    fn finish_one(&self, position: usize, result: Result<RankResponse, EngineError>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(waiting) = state.as_mut() else {
            return;
        };
        if let Some(slot) = waiting.batch.results.get_mut(position) {
            *slot = Some(result);
        }
        waiting.remaining = waiting.remaining.saturating_sub(1);
        if waiting.remaining == 0
            && let Some(WaitingBatch {
                batch, completion, ..
            }) = state.take()
        {
            drop(state);
            completion.complete(Ok(batch.into_response()));
        }
    }
}

/// Scores a prepared request on this thread and finishes it.
fn score_and_finish(mut prepared: Prepared) -> Result<RankResponse, EngineError> {
    let started = Instant::now();
    let scored = score_inline(&prepared)?;
    prepared.timings.score_us = micros(started.elapsed());
    finish(prepared, scored)
}

/// Batch-level checks: entry count, candidate ids in all, and unique request ids.
fn check_batch(requests: &[RankRequest], config: &EngineConfig) -> Result<(), EngineError> {
    let max = config.max_batch_requests;
    if requests.is_empty() {
        return Err(EngineError::invalid(
            "requests",
            "a batch needs at least one request",
        ));
    }
    if requests.len() > max {
        return Err(EngineError::limit(
            "requests",
            format!(
                "{} requests exceed the batch limit of {max}",
                requests.len()
            ),
        ));
    }
    let candidates: usize = requests
        .iter()
        .map(|request| request.candidate_ids.len())
        .sum();
    if candidates > config.max_batch_candidates {
        return Err(EngineError::limit(
            "requests",
            format!(
                "{candidates} candidate ids in all exceed the batch limit of {}",
                config.max_batch_candidates
            ),
        ));
    }
    let mut ids: Vec<(&str, usize)> = requests
        .iter()
        .enumerate()
        .map(|(position, request)| (request.request_id.as_str(), position))
        .collect();
    ids.sort_unstable();
    if let Some(pair) = ids
        .windows(2)
        .find(|pair| pair[0].0 == pair[1].0 && !pair[0].0.is_empty())
    {
        return Err(EngineError::invalid(
            format!("requests[{}].request_id", pair[1].1),
            format!(
                "{} repeats the request id of requests[{}]",
                crate::validate::quote_clipped(pair[1].0),
                pair[0].1
            ),
        ));
    }
    Ok(())
}

/// Holds the item slot's change lock, as a running item reload does.
#[cfg(test)]
pub(crate) fn hold_items_change_for_test(engine: &Engine) -> std::sync::MutexGuard<'_, ()> {
    engine.inner.items.hold_change_for_test()
}

/// Table swaps made so far, both slots.
#[cfg(test)]
pub(crate) fn table_swaps_for_test(engine: &Engine) -> u64 {
    engine.inner.table_changes.swaps()
}

/// Validates and resolves `request` against the serving tables, as a request does before
/// scoring (tests hold the result across a reload).
#[cfg(test)]
pub(crate) fn prepare_for_test(
    engine: &Engine,
    request: RankRequest,
) -> Result<Prepared, EngineError> {
    let snapshot = engine.inner.snapshot()?;
    prepare(
        &engine.inner.config,
        &engine.inner.privacy,
        snapshot,
        request,
        StageTimings::default(),
        Instant::now(),
    )
}

/// Scores and finishes a prepared request on this thread.
#[cfg(test)]
pub(crate) fn score_and_finish_for_test(prepared: Prepared) -> Result<RankResponse, EngineError> {
    score_and_finish(prepared)
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use super::*;

    #[test]
    fn a_dropped_completion_answers_with_an_internal_error_and_releases_in_flight() {
        let counter = Arc::new(AtomicUsize::new(0));
        let (sender, receiver) = channel();
        let completion: Completion<()> = Completion::new(
            Box::new(move |result| {
                let _ = sender.send(result);
            }),
            InFlight::new(&counter, 3),
        );
        assert_eq!(counter.load(Ordering::SeqCst), 3);
        drop(completion);
        assert!(matches!(
            receiver.recv(),
            Ok(Err(EngineError::Internal { .. }))
        ));
        assert_eq!(counter.load(Ordering::SeqCst), 0);
        assert!(receiver.recv().is_err(), "called once only");
    }

    #[test]
    fn batch_ids_must_be_unique() {
        let request = |id: &str| RankRequest::new(id, crate::UserRef::id("u"), 1);
        let config = EngineConfig::default();
        assert!(check_batch(&[request("a"), request("b")], &config).is_ok());
        let error = check_batch(&[request("a"), request("b"), request("a")], &config).unwrap_err();
        assert_eq!(error.field(), Some("requests[2].request_id"));
        assert!(error.to_string().contains("requests[0]"), "{error}");
    }

    #[test]
    fn batches_are_limited_in_entries_and_in_candidate_ids_in_all() {
        let config = EngineConfig {
            max_batch_requests: 3,
            max_batch_candidates: 5,
            ..EngineConfig::default()
        };
        let request = |id: &str, candidates: usize| {
            let mut request = RankRequest::new(id, crate::UserRef::id("u"), 1);
            request.candidate_ids = (0..candidates)
                .map(|candidate| format!("c{candidate}"))
                .collect::<Vec<_>>()
                .into();
            request
        };
        assert!(check_batch(&[request("a", 3), request("b", 2)], &config).is_ok());
        let error = check_batch(&[request("a", 3), request("b", 3)], &config).unwrap_err();
        assert_eq!(error.field(), Some("requests"));
        assert!(error.to_string().contains("6 candidate ids"), "{error}");
        let four: Vec<RankRequest> = ["a", "b", "c", "d"]
            .iter()
            .map(|id| request(id, 0))
            .collect();
        assert_eq!(
            check_batch(&four, &config).unwrap_err().field(),
            Some("requests")
        );
    }
}
