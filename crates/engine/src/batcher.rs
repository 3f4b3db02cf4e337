//! The whole-catalog micro-batcher: concurrent catalog scans are queued and scored together.
//!
//! One query over the whole catalog is memory-bandwidth bound; many queries scored together
//! by one matrix product ([`kernels::batch_topk`]) read the table once for all of them. A
//! dedicated thread (`fairrank-batcher`) takes jobs from a bounded queue and runs them:
//!
//! # Batching policy
//!
//! 1. **Idle: no waiting.** When the batcher is idle it blocks on the queue; the request
//!    that wakes it is batched only with what is *already* queued at that instant (usually
//!    nothing), so a lone request starts its scan at once ([`kernels::par_scan_topk`], all
//!    cores) and pays no batching delay.
//! 2. **Busy: wait a little for company.** When the batcher finishes a batch and finds a
//!    request already queued, the system is under load: it drains the queue and then waits
//!    up to `batch_max_wait` (default 1 ms) for more, until `batch_max_queries` (default
//!    64) are collected. The wait never extends past the earliest deadline in the batch.
//!    Under sustained load, batches fill while the previous batch computes, so the wait
//!    rarely matters; it helps when arrivals are spread thinly over a busy period.
//! 3. Jobs whose deadline passed while queued are dropped from the batch and answered with
//!    `DeadlineExceeded`. Jobs are grouped by item table (a reload may land between two
//!    jobs); each group is one kernel call. A group of one uses the parallel scan.
//!
//! The batcher thread only blocks while a kernel runs on the rayon pool; each job's
//! continuation (the rest of the request) is spawned onto rayon. Every job's continuation
//! runs exactly once: a job dropped unanswered (queue full or closed, kernel panic) answers
//! itself with an error.
//!
//! Batched scores come from a GEMM and may differ from the single-query scan's in the last
//! bits (summation order); the order rule (score descending, ties by row index) is the same.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, Instant};

use kernels::{RowMatrix, ScoredItem, batch_topk, par_scan_topk};

use crate::config::EngineConfig;
use crate::error::{DeadlineStage, EngineError};
use crate::pipeline::Query;
use crate::tables::{LoadedTable, Served};

/// The result handed to a job's continuation.
#[derive(Debug)]
pub(crate) struct ScanResult {
    /// The top `pool` items, best first, or why not.
    pub outcome: Result<Vec<ScoredItem>, EngineError>,
    /// Time spent in the batch queue.
    pub queue_wait: Duration,
    /// Wall time of the (shared) scan.
    pub scan_time: Duration,
}

/// A continuation: the rest of a request after its scan.
pub(crate) type Continuation = Box<dyn FnOnce(ScanResult) + Send + 'static>;

/// One whole-catalog scan to run.
pub(crate) struct CatalogJob {
    items: Arc<Served>,
    query: Query,
    pool: usize,
    deadline: Option<Instant>,
    enqueued: Instant,
    then: Option<Continuation>,
}

impl std::fmt::Debug for CatalogJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogJob")
            .field("generation", &self.items.generation)
            .field("pool", &self.pool)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl CatalogJob {
    /// A scan of `items` for `query`, keeping the top `pool`; `then` receives the result.
    pub fn new(
        items: Arc<Served>,
        query: Query,
        pool: usize,
        deadline: Option<Instant>,
        then: Continuation,
    ) -> CatalogJob {
        CatalogJob {
            items,
            query,
            pool,
            deadline,
            enqueued: Instant::now(),
            then: Some(then),
        }
    }

    /// Runs the continuation on the calling thread.
    fn respond(mut self, result: ScanResult) {
        if let Some(then) = self.then.take() {
            then(result);
        }
    }

    /// Runs the continuation on the rayon pool.
    fn respond_on_pool(self, result: ScanResult) {
        rayon::spawn(move || {
            // A panic in the continuation must not abort the process (rayon's default for
            // spawned tasks); the continuation's own drop guards answer the request.
            let _ = catch_unwind(AssertUnwindSafe(move || self.respond(result)));
        });
    }

    fn fail(self, error: EngineError) {
        let queue_wait = self.enqueued.elapsed();
        self.respond(ScanResult {
            outcome: Err(error),
            queue_wait,
            scan_time: Duration::ZERO,
        });
    }
}

impl Drop for CatalogJob {
    fn drop(&mut self) {
        if let Some(then) = self.then.take() {
            then(ScanResult {
                outcome: Err(EngineError::internal(
                    "the batched catalog scan was abandoned before it answered",
                )),
                queue_wait: self.enqueued.elapsed(),
                scan_time: Duration::ZERO,
            });
        }
    }
}

/// Counters of the batcher, for status and benchmarks.
#[derive(Debug, Default)]
pub(crate) struct BatcherCounters {
    batches: AtomicU64,
    queries: AtomicU64,
    largest: AtomicU64,
    expired: AtomicU64,
    queued: AtomicUsize,
}

/// A snapshot of the batcher's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatcherStatus {
    /// Kernel calls made (a batch of one counts as one).
    pub batches: u64,
    /// Queries scored by those calls.
    pub queries: u64,
    /// Most queries scored by one call.
    pub largest_batch: u64,
    /// Requests dropped from a batch because their deadline passed while queued.
    pub expired: u64,
    /// Requests waiting in the queue right now.
    pub queued: usize,
}

impl BatcherCounters {
    fn snapshot(&self) -> BatcherStatus {
        BatcherStatus {
            batches: self.batches.load(Ordering::Relaxed),
            queries: self.queries.load(Ordering::Relaxed),
            largest_batch: self.largest.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
        }
    }

    fn record(&self, queries: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.queries.fetch_add(queries as u64, Ordering::Relaxed);
        self.largest.fetch_max(queries as u64, Ordering::Relaxed);
    }
}

/// When to stop collecting a batch.
#[derive(Debug, Clone, Copy)]
struct Policy {
    max_queries: usize,
    max_wait: Duration,
}

/// The handle to the batcher thread. Dropping it closes the queue; the thread finishes the
/// jobs already queued and exits.
#[derive(Debug)]
pub(crate) struct Batcher {
    sender: SyncSender<CatalogJob>,
    counters: Arc<BatcherCounters>,
}

impl Batcher {
    /// Starts the batcher thread.
    pub fn start(config: &EngineConfig) -> Result<Batcher, EngineError> {
        let (sender, receiver) = std::sync::mpsc::sync_channel(config.batch_queue_capacity);
        let counters = Arc::new(BatcherCounters::default());
        let policy = Policy {
            max_queries: config.batch_max_queries,
            max_wait: config.batch_max_wait,
        };
        let thread_counters = Arc::clone(&counters);
        std::thread::Builder::new()
            .name("fairrank-batcher".to_owned())
            .spawn(move || run(&receiver, policy, &thread_counters))
            .map_err(|e| EngineError::Unavailable {
                message: format!("cannot start the batcher thread: {e}"),
            })?;
        Ok(Batcher { sender, counters })
    }

    /// Queues `job`; if the queue is full or closed the job is answered with
    /// `ResourceExhausted` or `Unavailable` on the calling thread.
    pub fn submit(&self, job: CatalogJob) {
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        match self.sender.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => {
                self.counters.queued.fetch_sub(1, Ordering::Relaxed);
                job.fail(EngineError::ResourceExhausted {
                    message: "the whole-catalog scan queue is full".to_owned(),
                });
            }
            Err(TrySendError::Disconnected(job)) => {
                self.counters.queued.fetch_sub(1, Ordering::Relaxed);
                job.fail(EngineError::Unavailable {
                    message: "the batcher thread has stopped".to_owned(),
                });
            }
        }
    }

    /// The counters.
    pub fn status(&self) -> BatcherStatus {
        self.counters.snapshot()
    }
}

/// The batcher thread's loop.
fn run(receiver: &Receiver<CatalogJob>, policy: Policy, counters: &BatcherCounters) {
    let mut queries = Vec::new();
    while let Some(batch) = next_batch(receiver, policy) {
        counters.queued.fetch_sub(batch.len(), Ordering::Relaxed);
        // Kernels do not panic on validated input; if one does, the jobs of the failed
        // group answer with an internal error (their drop guard) and the thread goes on.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            execute(batch, &mut queries, counters);
        }));
    }
}

/// Collects the next batch (see the module documentation); `None` when the queue is
/// closed and empty.
fn next_batch(receiver: &Receiver<CatalogJob>, policy: Policy) -> Option<Vec<CatalogJob>> {
    let (first, busy) = match receiver.try_recv() {
        Ok(job) => (job, true),
        Err(TryRecvError::Empty) => (receiver.recv().ok()?, false),
        Err(TryRecvError::Disconnected) => return None,
    };
    Some(collect(receiver, first, busy, policy))
}

/// Builds a batch around `first`: everything already queued, then, if the batcher was
/// `busy` (found `first` waiting), whatever arrives within the bounded wait.
fn collect(
    receiver: &Receiver<CatalogJob>,
    first: CatalogJob,
    busy: bool,
    policy: Policy,
) -> Vec<CatalogJob> {
    let mut batch = Vec::with_capacity(policy.max_queries.min(64));
    batch.push(first);
    drain(receiver, &mut batch, policy.max_queries);
    if busy && batch.len() < policy.max_queries && !policy.max_wait.is_zero() {
        let mut until = Instant::now() + policy.max_wait;
        if let Some(earliest) = batch.iter().filter_map(|job| job.deadline).min() {
            until = until.min(earliest);
        }
        while batch.len() < policy.max_queries {
            let Some(left) = until.checked_duration_since(Instant::now()) else {
                break;
            };
            match receiver.recv_timeout(left) {
                Ok(job) => {
                    batch.push(job);
                    drain(receiver, &mut batch, policy.max_queries);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
    }
    batch
}

/// Moves already-queued jobs into `batch` until it holds `max` jobs.
fn drain(receiver: &Receiver<CatalogJob>, batch: &mut Vec<CatalogJob>, max: usize) {
    while batch.len() < max {
        match receiver.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
}

/// Runs one batch: drops expired jobs, groups the rest by item table, scans each group and
/// hands every job its result on the rayon pool.
fn execute(batch: Vec<CatalogJob>, queries: &mut Vec<f32>, counters: &BatcherCounters) {
    let now = Instant::now();
    let (mut live, expired): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .partition(|job| job.deadline.is_none_or(|deadline| deadline > now));
    for job in expired {
        counters.expired.fetch_add(1, Ordering::Relaxed);
        let queue_wait = now.saturating_duration_since(job.enqueued);
        job.respond_on_pool(ScanResult {
            outcome: Err(EngineError::DeadlineExceeded {
                stage: DeadlineStage::Queued,
            }),
            queue_wait,
            scan_time: Duration::ZERO,
        });
    }
    while let Some(first) = live.first() {
        let table = Arc::clone(&first.items.data);
        let (group, rest): (Vec<_>, Vec<_>) = live
            .into_iter()
            .partition(|job| Arc::ptr_eq(&job.items.data, &table));
        live = rest;
        let started = Instant::now();
        let requests: Vec<(&[f32], usize)> = group
            .iter()
            .map(|job| (job.query.as_slice(), job.pool))
            .collect();
        let outcome = scan_catalog(&table, &requests, queries);
        drop(requests);
        let scan_time = started.elapsed();
        counters.record(group.len());
        match outcome {
            Ok(results) => {
                for (job, items) in group.into_iter().zip(results) {
                    let queue_wait = started.saturating_duration_since(job.enqueued);
                    job.respond_on_pool(ScanResult {
                        outcome: Ok(items),
                        queue_wait,
                        scan_time,
                    });
                }
            }
            Err(error) => {
                for job in group {
                    let queue_wait = started.saturating_duration_since(job.enqueued);
                    job.respond_on_pool(ScanResult {
                        outcome: Err(error.clone()),
                        queue_wait,
                        scan_time,
                    });
                }
            }
        }
    }
}

/// The top `pool` rows of `table` for each `(query, pool)`, best first: one parallel scan
/// for a single query, one batched matrix-product scan for several. `queries` is reusable
/// scratch for the packed query matrix.
pub(crate) fn scan_catalog(
    table: &LoadedTable,
    requests: &[(&[f32], usize)],
    queries: &mut Vec<f32>,
) -> Result<Vec<Vec<ScoredItem>>, EngineError> {
    let matrix = table.matrix()?;
    match requests {
        [] => Ok(Vec::new()),
        _ if matrix.rows() == 0 => Ok(vec![Vec::new(); requests.len()]),
        [(query, pool)] => {
            let mut out = Vec::with_capacity(*pool);
            par_scan_topk(matrix, query, *pool, &mut out)?;
            Ok(vec![out])
        }
        _ => {
            let dim = matrix.dim();
            queries.clear();
            for (query, _) in requests {
                if query.len() != dim {
                    return Err(EngineError::internal(format!(
                        "a query of dimension {} reached the batched scan of dimension {dim}",
                        query.len()
                    )));
                }
                queries.extend_from_slice(query);
            }
            let query_matrix = RowMatrix::new(queries, requests.len(), dim, dim)?;
            let largest = requests.iter().map(|&(_, pool)| pool).max().unwrap_or(1);
            let mut results = Vec::with_capacity(requests.len());
            batch_topk(matrix, query_matrix, largest, &mut results)?;
            for (result, &(_, pool)) in results.iter_mut().zip(requests) {
                result.truncate(pool);
            }
            Ok(results)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{Receiver, Sender, channel, sync_channel};

    use store::Table;

    use super::*;
    use crate::tables::TableKind;
    use crate::tests::util::{self, DIM, ITEMS, brute_force};

    /// An item table in a temporary directory, served as `generation`.
    fn served(seed: u64, generation: u64) -> (tempfile::TempDir, store::TableData, Arc<Served>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = util::items_data(seed, ITEMS, true);
        let path = util::write(dir.path(), "items.frt", &data);
        let table = Table::open(&path).expect("opens");
        let served = Arc::new(Served {
            generation,
            since: std::time::SystemTime::now(),
            data: Arc::new(LoadedTable::new(table, TableKind::Items, 1000)),
        });
        (dir, data, served)
    }

    /// A job whose result goes to `results` tagged with `tag`.
    fn job(
        items: &Arc<Served>,
        query: &[f32],
        pool: usize,
        deadline: Option<Instant>,
        tag: usize,
        results: &Sender<(usize, ScanResult)>,
    ) -> CatalogJob {
        let results = results.clone();
        CatalogJob::new(
            Arc::clone(items),
            Query::Inline(query.into()),
            pool,
            deadline,
            Box::new(move |result| {
                let _ = results.send((tag, result));
            }),
        )
    }

    fn collect_all(
        receiver: &Receiver<(usize, ScanResult)>,
        count: usize,
    ) -> Vec<(usize, ScanResult)> {
        let mut all: Vec<_> = (0..count)
            .map(|_| receiver.recv().expect("answered"))
            .collect();
        all.sort_by_key(|(tag, _)| *tag);
        all
    }

    fn pairs(data: &store::TableData, items: &[ScoredItem]) -> Vec<(String, f32)> {
        items
            .iter()
            .map(|item| (data.ids[item.index as usize].clone(), item.score))
            .collect()
    }

    #[test]
    fn batched_scans_equal_brute_force() {
        let (_dir, data, served) = served(3, 1);
        let queries: Vec<Vec<f32>> = (0..7).map(|q| util::integer_values(100 + q, DIM)).collect();
        let pools = [1, 5, 17, 100, ITEMS, 2 * ITEMS, 3];
        let requests: Vec<(&[f32], usize)> = queries
            .iter()
            .zip(pools)
            .map(|(q, p)| (q.as_slice(), p))
            .collect();
        let mut scratch = Vec::new();
        for count in [1, 2, requests.len()] {
            let results =
                scan_catalog(&served.data, &requests[..count], &mut scratch).expect("scans");
            assert_eq!(results.len(), count);
            for ((query, pool), result) in requests.iter().zip(&results) {
                assert_eq!(
                    pairs(&data, result),
                    brute_force(&data, query, 0..ITEMS, *pool)
                );
            }
        }
    }

    #[test]
    fn a_busy_batcher_drains_the_queue_up_to_the_limit() {
        let (_dir, _data, served) = served(4, 1);
        let (results, _answers) = channel();
        let (sender, receiver) = sync_channel(16);
        let query = vec![1.0; DIM];
        for tag in 0..5 {
            sender
                .try_send(job(&served, &query, 3, None, tag, &results))
                .expect("queued");
        }
        let policy = Policy {
            max_queries: 3,
            max_wait: Duration::from_millis(1),
        };
        let first = next_batch(&receiver, policy).expect("a batch");
        assert_eq!(first.len(), 3);
        let second = next_batch(&receiver, policy).expect("a batch");
        assert_eq!(second.len(), 2);
        drop(sender);
        assert!(next_batch(&receiver, policy).is_none());
        // Unanswered jobs answer themselves when dropped.
        drop((first, second));
    }

    #[test]
    fn an_idle_batcher_does_not_wait_for_company() {
        let (_dir, _data, served) = served(5, 1);
        let (results, _answers) = channel();
        let (sender, receiver) = sync_channel(16);
        let query = vec![1.0; DIM];
        sender
            .try_send(job(&served, &query, 3, None, 1, &results))
            .expect("queued");
        // A wait of an hour would hang this test if the idle path waited.
        let policy = Policy {
            max_queries: 8,
            max_wait: Duration::from_secs(3600),
        };
        let lone = job(&served, &query, 3, None, 0, &results);
        let batch = collect(&receiver, lone, false, policy);
        assert_eq!(batch.len(), 2, "takes what is already queued, then goes");
        // A busy batcher's wait ends at the earliest deadline in the batch.
        let deadline = Some(Instant::now() + Duration::from_millis(5));
        let urgent = job(&served, &query, 3, deadline, 2, &results);
        let batch = collect(&receiver, urgent, true, policy);
        assert_eq!(batch.len(), 1);
        drop(sender);
    }

    #[test]
    fn execute_answers_every_job_and_drops_expired_ones() {
        let (_dir_a, data_a, table_a) = served(6, 1);
        let (_dir_b, data_b, table_b) = served(7, 2);
        let (results, answers) = channel();
        let queries: Vec<Vec<f32>> = (0..5).map(|q| util::integer_values(200 + q, DIM)).collect();
        let past = Some(Instant::now());
        let batch = vec![
            job(&table_a, &queries[0], 4, None, 0, &results),
            job(&table_b, &queries[1], 6, None, 1, &results),
            job(&table_a, &queries[2], 9, past, 2, &results),
            job(&table_a, &queries[3], 2, None, 3, &results),
            job(&table_b, &queries[4], 1, None, 4, &results),
        ];
        let counters = BatcherCounters::default();
        execute(batch, &mut Vec::new(), &counters);
        let answers = collect_all(&answers, 5);
        let expected = [
            (0, &data_a, 4),
            (1, &data_b, 6),
            (3, &data_a, 2),
            (4, &data_b, 1),
        ];
        for (tag, data, pool) in expected {
            let items = answers[tag].1.outcome.as_ref().expect("scored");
            assert_eq!(
                pairs(data, items),
                brute_force(data, &queries[tag], 0..ITEMS, pool),
                "job {tag}"
            );
        }
        assert!(matches!(
            answers[2].1.outcome,
            Err(EngineError::DeadlineExceeded {
                stage: DeadlineStage::Queued
            })
        ));
        let status = counters.snapshot();
        assert_eq!(
            (
                status.batches,
                status.queries,
                status.largest_batch,
                status.expired
            ),
            (2, 4, 2, 1)
        );
    }

    #[test]
    fn dropped_and_refused_jobs_still_answer() {
        let (_dir, _data, served) = served(8, 1);
        let (results, answers) = channel();
        let query = vec![1.0; DIM];
        drop(job(&served, &query, 3, None, 0, &results));
        let (tag, dropped) = answers.recv().expect("answered on drop");
        assert_eq!(tag, 0);
        assert!(matches!(dropped.outcome, Err(EngineError::Internal { .. })));

        // A full queue refuses with ResourceExhausted; a closed one with Unavailable.
        let (sender, receiver) = sync_channel(1);
        let batcher = Batcher {
            sender,
            counters: Arc::new(BatcherCounters::default()),
        };
        batcher.submit(job(&served, &query, 3, None, 1, &results));
        batcher.submit(job(&served, &query, 3, None, 2, &results));
        let (tag, full) = answers.recv().expect("refused at once");
        assert_eq!(tag, 2);
        assert!(matches!(
            full.outcome,
            Err(EngineError::ResourceExhausted { .. })
        ));
        assert_eq!(batcher.status().queued, 1);
        // Closing the queue drops the queued job (tag 1), which answers itself.
        drop(receiver);
        batcher.submit(job(&served, &query, 3, None, 3, &results));
        let answers = collect_all(&answers, 2);
        assert_eq!(answers[0].0, 1);
        assert!(matches!(
            answers[0].1.outcome,
            Err(EngineError::Internal { .. })
        ));
        assert_eq!(answers[1].0, 3);
        assert!(matches!(
            answers[1].1.outcome,
            Err(EngineError::Unavailable { .. })
        ));
    }
}
