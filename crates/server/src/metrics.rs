//! Prometheus metrics of the server and the HTTP endpoint that serves them at `/metrics`.
//!
//! Names (OpenMetrics text, prefix `fairrank_`): `requests_total{method,code}`,
//! `request_duration_seconds{method}`, `stage_duration_seconds{stage}`,
//! `in_flight_requests`, `shed_requests_total`, `rank_requests_total`,
//! `rank_errors_total`, `rank_batch_calls_total`, `answers_total{personalized}`,
//! `replayed_answers_total`, `dp_answers_total`, `privacy_budget_exhausted_total`,
//! `table_generation{table}`, `table_rows{table}`,
//! `table_changes_total{table,operation,outcome}`, `personalization_paused`,
//! `batcher_batches_total`, `batcher_queries_total`, `batcher_expired_total`,
//! `batcher_queued`.

use std::net::SocketAddr;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use api::fairrank::v1 as pb;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-call counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// gRPC method, e.g. `Rank`.
    pub method: &'static str,
    /// gRPC status code name, e.g. `Ok` or `InvalidArgument`.
    pub code: String,
}

/// Labels of per-method latency.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// gRPC method.
    pub method: &'static str,
}

/// A stage of the request path.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values are the snake-case stage names
pub enum Stage {
    /// Waiting for a compute thread and in the whole-catalog batch queue.
    queue,
    /// Validation of the request fields.
    validate,
    /// User lookup, consent and pause checks.
    resolve_user,
    /// Scoring (dot products or the catalog scan).
    score,
    /// Selecting the re-ranking pool.
    select_pool,
    /// Fairness re-ranking.
    rerank,
    /// Building explanations.
    explain,
    /// Fairness and privacy reports.
    report,
    /// Converting the answer to its wire form and storing it for replay.
    respond,
}

impl Stage {
    /// Every stage, in declaration order (`Stage as usize` indexes it).
    const ALL: [Stage; 9] = [
        Stage::queue,
        Stage::validate,
        Stage::resolve_user,
        Stage::score,
        Stage::select_pool,
        Stage::rerank,
        Stage::explain,
        Stage::report,
        Stage::respond,
    ];
}

/// Labels of per-stage latency.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// Request-path stage.
    pub stage: Stage,
}

/// Labels of table metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    /// `items` or `users`.
    pub table: &'static str,
}

/// Labels of table changes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableChangeLabels {
    /// `items` or `users`.
    pub table: &'static str,
    /// `reload` or `rollback`.
    pub operation: &'static str,
    /// `ok` or `failed`.
    pub outcome: &'static str,
}

/// Labels of answers.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnswerLabels {
    /// `true` or `false`.
    pub personalized: &'static str,
}

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Calls by method and status code.
    pub requests: Family<CallLabels, Counter>,
    /// Server-side latency by method, in seconds.
    pub latency: Family<MethodLabels, Histogram>,
    /// Latency of each request-path stage, in seconds.
    pub stages: Family<StageLabels, Histogram>,
    /// Rank requests admitted and not yet answered by the engine (batch entries count one).
    pub in_flight: Gauge<i64, AtomicI64>,
    /// Rank requests shed by the concurrency limit (batch entries count one).
    pub shed: Counter,
    /// Rank requests received (Rank calls plus RankBatch entries).
    pub rank_requests: Counter,
    /// Rank requests answered with an error (any code).
    pub rank_errors: Counter,
    /// RankBatch calls received.
    pub rank_batch_calls: Counter,
    /// Answers by personalization.
    pub answers: Family<AnswerLabels, Counter>,
    /// Answers replayed from the idempotency store.
    pub replayed: Counter,
    /// Answers produced under differential privacy (replays of them included).
    pub dp_answers: Counter,
    /// Requests whose privacy budget could not cover their charge (refused, or answered
    /// without personalization).
    pub budget_exhausted: Counter,
    /// Generation of each served table.
    pub table_generation: Family<TableLabels, Gauge>,
    /// Rows of each served table.
    pub table_rows: Family<TableLabels, Gauge>,
    /// Table reloads and rollbacks by outcome.
    pub table_changes: Family<TableChangeLabels, Counter>,
    /// 1 while personalization is paused.
    pub personalization_paused: Gauge,
    /// Batched-scan kernel calls of the micro-batcher.
    pub batcher_batches: Counter,
    /// Queries scored by those calls.
    pub batcher_queries: Counter,
    /// Requests dropped from a batch because their deadline passed while queued.
    pub batcher_expired: Counter,
    /// Requests waiting for the micro-batcher.
    pub batcher_queued: Gauge,
    /// Rank calls ranked by a connection thread other than the one that read them.
    pub rankings_shared: Counter,
    /// The series of `stages`, by `Stage as usize`, looked up on first use and kept (each
    /// lookup in a family takes its lock and hashes the labels; a series still appears in
    /// `/metrics` only once something was recorded in it).
    stage_series: [OnceLock<Histogram>; Stage::ALL.len()],
    /// `requests{method="Rank",code="Ok"}` and `latency{method="Rank"}`, kept likewise.
    rank_ok_series: OnceLock<(Counter, Histogram)>,
    /// `answers{personalized="false"}` and `{personalized="true"}`, kept likewise.
    answer_series: [OnceLock<Counter>; 2],
}

fn latency_histogram() -> Histogram {
    // 10 us .. ~5 s in factor-2 steps.
    Histogram::new(exponential_buckets(1e-5, 2.0, 20))
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("fairrank");
        let requests = Family::<CallLabels, Counter>::default();
        registry.register(
            "requests",
            "gRPC calls by method and status code",
            requests.clone(),
        );
        let latency = Family::<MethodLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Server-side latency of gRPC calls by method",
            latency.clone(),
        );
        let stages = Family::<StageLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "stage_duration_seconds",
            "Latency of each request-path stage of successful Rank answers",
            stages.clone(),
        );
        let in_flight = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "in_flight_requests",
            "Rank requests admitted and not yet answered (batch entries count one)",
            in_flight.clone(),
        );
        let shed = Counter::default();
        registry.register(
            "shed_requests",
            "Rank requests refused by the concurrency limit (RESOURCE_EXHAUSTED)",
            shed.clone(),
        );
        let rank_requests = Counter::default();
        registry.register(
            "rank_requests",
            "Rank requests received (Rank calls plus RankBatch entries)",
            rank_requests.clone(),
        );
        let rank_errors = Counter::default();
        registry.register(
            "rank_errors",
            "Rank requests answered with an error",
            rank_errors.clone(),
        );
        let rank_batch_calls = Counter::default();
        registry.register(
            "rank_batch_calls",
            "RankBatch calls received",
            rank_batch_calls.clone(),
        );
        let answers = Family::<AnswerLabels, Counter>::default();
        registry.register(
            "answers",
            "Rank answers by personalization",
            answers.clone(),
        );
        let replayed = Counter::default();
        registry.register(
            "replayed_answers",
            "Answers replayed from the idempotency store",
            replayed.clone(),
        );
        let dp_answers = Counter::default();
        registry.register(
            "dp_answers",
            "Answers produced under differential privacy (replays of them included)",
            dp_answers.clone(),
        );
        let budget_exhausted = Counter::default();
        registry.register(
            "privacy_budget_exhausted",
            "Requests whose privacy budget could not cover their charge (refused, or answered without personalization; replays included)",
            budget_exhausted.clone(),
        );
        let table_generation = Family::<TableLabels, Gauge>::default();
        registry.register(
            "table_generation",
            "Generation of each served table",
            table_generation.clone(),
        );
        let table_rows = Family::<TableLabels, Gauge>::default();
        registry.register(
            "table_rows",
            "Rows of each served table",
            table_rows.clone(),
        );
        let table_changes = Family::<TableChangeLabels, Counter>::default();
        registry.register(
            "table_changes",
            "Table reloads and rollbacks by outcome (a failed one keeps the old table)",
            table_changes.clone(),
        );
        let personalization_paused = Gauge::default();
        registry.register(
            "personalization_paused",
            "1 while an operator has paused personalization",
            personalization_paused.clone(),
        );
        let batcher_batches = Counter::default();
        registry.register(
            "batcher_batches",
            "Kernel calls of the whole-catalog micro-batcher",
            batcher_batches.clone(),
        );
        let batcher_queries = Counter::default();
        registry.register(
            "batcher_queries",
            "Queries scored by the micro-batcher",
            batcher_queries.clone(),
        );
        let rankings_shared = Counter::default();
        registry.register(
            "rankings_shared",
            "Rank calls ranked by an idle connection thread other than the one that read them",
            rankings_shared.clone(),
        );
        let batcher_expired = Counter::default();
        registry.register(
            "batcher_expired",
            "Requests dropped by the micro-batcher because their deadline passed",
            batcher_expired.clone(),
        );
        let batcher_queued = Gauge::default();
        registry.register(
            "batcher_queued",
            "Requests waiting for the micro-batcher",
            batcher_queued.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            stages,
            in_flight,
            shed,
            rank_requests,
            rank_errors,
            rank_batch_calls,
            answers,
            replayed,
            dp_answers,
            budget_exhausted,
            table_generation,
            table_rows,
            table_changes,
            personalization_paused,
            batcher_batches,
            batcher_queries,
            batcher_expired,
            batcher_queued,
            rankings_shared,
            stage_series: Default::default(),
            rank_ok_series: OnceLock::new(),
            answer_series: Default::default(),
        }
    }

    /// Records one finished call.
    pub fn record_call(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        if method == "Rank" && code == tonic::Code::Ok {
            let (calls, latency) = self.rank_ok_series.get_or_init(|| {
                (
                    self.requests.get_or_create_owned(&CallLabels {
                        method,
                        code: format!("{code:?}"),
                    }),
                    self.latency.get_or_create_owned(&MethodLabels { method }),
                )
            });
            calls.inc();
            latency.observe(elapsed.as_secs_f64());
            return;
        }
        self.requests
            .get_or_create(&CallLabels {
                method,
                code: format!("{code:?}"),
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels { method })
            .observe(elapsed.as_secs_f64());
    }

    /// Records one stage duration, given in microseconds.
    pub fn record_stage(&self, stage: Stage, micros: u64) {
        self.stage_series[stage as usize]
            .get_or_init(|| self.stages.get_or_create_owned(&StageLabels { stage }))
            .observe(micros as f64 * 1e-6);
    }

    /// Records one answer: by personalization, replayed, under DP, or without
    /// personalization because the privacy budget ran out.
    pub fn record_answer(&self, answer: AnswerFacts) {
        if answer.dp_applied {
            self.dp_answers.inc();
        }
        if answer.budget_exhausted {
            self.budget_exhausted.inc();
        }
        self.record_personalization(answer.personalized, answer.replayed);
    }

    fn record_personalization(&self, personalized: bool, replayed: bool) {
        self.answer_series[usize::from(personalized)]
            .get_or_init(|| {
                let personalized = if personalized { "true" } else { "false" };
                self.answers
                    .get_or_create_owned(&AnswerLabels { personalized })
            })
            .inc();
        if replayed {
            self.replayed.inc();
        }
    }

    /// Records a reload or rollback outcome.
    pub fn record_table_change(&self, table: &'static str, operation: &'static str, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.table_changes
            .get_or_create(&TableChangeLabels {
                table,
                operation,
                outcome,
            })
            .inc();
    }

    /// Count of table changes of every table with this operation and outcome.
    pub fn table_changes_total(&self, operation: &'static str, ok: bool) -> u64 {
        let outcome = if ok { "ok" } else { "failed" };
        ["items", "users"]
            .into_iter()
            .map(|table| {
                self.table_changes
                    .get(&TableChangeLabels {
                        table,
                        operation,
                        outcome,
                    })
                    .map_or(0, |counter| counter.get())
            })
            .sum()
    }

    /// Answers with this personalization so far.
    pub fn answers_total(&self, personalized: bool) -> u64 {
        let personalized = if personalized { "true" } else { "false" };
        self.answers
            .get(&AnswerLabels { personalized })
            .map_or(0, |counter| counter.get())
    }

    /// Sets the gauges of one served table.
    pub fn set_table(&self, table: &'static str, generation: u64, rows: usize) {
        let labels = TableLabels { table };
        self.table_generation
            .get_or_create(&labels)
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        self.table_rows
            .get_or_create(&labels)
            .set(i64::try_from(rows).unwrap_or(i64::MAX));
    }

    /// Brings the engine-side metrics up to date (called before each scrape).
    pub fn refresh_engine(&self, status: &engine::EngineStatus) {
        let batcher = &status.batcher;
        advance(&self.batcher_batches, batcher.batches);
        advance(&self.batcher_queries, batcher.queries);
        advance(&self.batcher_expired, batcher.expired);
        self.batcher_queued
            .set(i64::try_from(batcher.queued).unwrap_or(i64::MAX));
        self.personalization_paused
            .set(i64::from(status.personalization_paused));
        self.set_table("items", status.items.version.generation, status.items.rows);
        if let Some(users) = &status.users {
            self.set_table("users", users.version.generation, users.rows);
        }
    }

    /// Renders the OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            text = format!("# encoding failed: {error}\n");
        }
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Raises a counter to a cumulative value read from elsewhere.
fn advance(counter: &Counter, total: u64) {
    let current = counter.get();
    if total > current {
        counter.inc_by(total - current);
    }
}

/// Serves `GET /metrics` on an already bound listener until `shutdown` resolves; `refresh`
/// runs before each scrape.
pub fn spawn_endpoint(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    refresh: impl Fn() + Clone + Send + Sync + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let metrics = Arc::clone(&metrics);
            let refresh = refresh.clone();
            async move {
                refresh();
                (
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        if let Err(error) = served {
            tracing::warn!(%error, "the metrics endpoint stopped");
        }
    })
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// What the metrics count of one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerFacts {
    pub personalized: bool,
    pub replayed: bool,
    /// Produced under differential privacy.
    pub dp_applied: bool,
    /// Answered without personalization because the privacy budget ran out.
    pub budget_exhausted: bool,
}

impl AnswerFacts {
    /// The facts of `answer`.
    pub fn of(answer: &pb::RankResponse) -> AnswerFacts {
        AnswerFacts {
            personalized: answer.personalized,
            replayed: answer.replayed,
            dp_applied: answer
                .privacy
                .as_ref()
                .is_some_and(|report| report.dp_applied),
            budget_exhausted: answer.non_personalized_reason()
                == pb::NonPersonalizedReason::PrivacyBudgetExhausted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_metric() {
        let metrics = Metrics::new();
        metrics.record_call(
            "Rank",
            tonic::Code::InvalidArgument,
            Duration::from_millis(3),
        );
        metrics.record_stage(Stage::select_pool, 120);
        metrics.record_personalization(true, true);
        metrics.record_table_change("items", "reload", false);
        metrics.set_table("items", 2, 2000);
        metrics.shed.inc();
        let text = metrics.render();
        for name in [
            "fairrank_requests_total{method=\"Rank\",code=\"InvalidArgument\"} 1",
            "fairrank_request_duration_seconds_bucket",
            "fairrank_stage_duration_seconds_count{stage=\"select_pool\"} 1",
            "fairrank_in_flight_requests",
            "fairrank_shed_requests_total 1",
            "fairrank_answers_total{personalized=\"true\"} 1",
            "fairrank_replayed_answers_total 1",
            "fairrank_table_generation{table=\"items\"} 2",
            "fairrank_table_changes_total{table=\"items\",operation=\"reload\",outcome=\"failed\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing in:\n{text}");
        }
        assert_eq!(metrics.table_changes_total("reload", false), 1);
        assert_eq!(metrics.table_changes_total("reload", true), 0);
        assert_eq!(metrics.answers_total(true), 1);
    }

    #[test]
    fn cumulative_counters_only_advance() {
        let counter = Counter::default();
        advance(&counter, 5);
        advance(&counter, 3);
        assert_eq!(counter.get(), 5);
        advance(&counter, 9);
        assert_eq!(counter.get(), 9);
    }
}
