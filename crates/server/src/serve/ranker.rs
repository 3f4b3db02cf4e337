//! The `fairrank.v1.Ranker` service: `Rank` and `RankBatch`.
//!
//! A call is converted, looked up in the idempotency store, admitted under the concurrency
//! limit (or shed), and handed to the engine, which computes on rayon and answers through a
//! callback; the callback converts the answer, stores it for replay and wakes the handler
//! through a oneshot channel. The handler waits until the call's deadline at most. The
//! admission is released when the engine answers, so abandoned calls still count against
//! the limit while they compute, and their answers are still stored for a retry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::fairrank::v1 as pb;
use api::fairrank::v1::rank_batch_result::Outcome;
use engine::{CandidateIds, RankCallback};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use super::answer::WireRankResponse;
use super::rank_route::WireRankRequest;
use super::replay::{Begin, IdEntries, Ticket};
use super::{Shared, convert, deadline, errors, handoff};
use crate::metrics::{AnswerFacts, Metrics, Stage};

/// The Ranker service.
#[derive(Debug, Clone)]
pub struct RankerService {
    shared: Arc<Shared>,
}

impl RankerService {
    /// The server's metrics (for the routes, which count calls refused before a handler).
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.shared.metrics)
    }

    /// The most candidate ids a request may carry (`ranking.max_candidates`).
    pub fn max_candidates(&self) -> usize {
        self.shared.engine.config().max_candidates
    }

    /// What a `RankBatch` body may hold (`ranking.max_batch_requests`,
    /// `ranking.max_batch_candidates`).
    pub fn batch_limits(&self) -> super::rank_route::BatchLimits {
        let config = self.shared.engine.config();
        super::rank_route::BatchLimits {
            max_entries: config.max_batch_requests,
            max_ids: config.max_batch_candidates,
        }
    }

    /// The service over the shared server state.
    pub fn new(shared: Arc<Shared>) -> RankerService {
        RankerService { shared }
    }
}

#[tonic::async_trait]
impl pb::ranker_server::Ranker for RankerService {
    async fn rank(
        &self,
        request: Request<pb::RankRequest>,
    ) -> Result<Response<pb::RankResponse>, Status> {
        let started = Instant::now();
        let deadline = deadline::of(&request, self.shared.default_deadline);
        let mut message = request.into_inner();
        let candidate_ids = std::mem::take(&mut message.candidate_ids).into();
        let answer = self
            .rank_call(
                message,
                candidate_ids,
                IdEntries::default(),
                deadline,
                started,
            )
            .await?;
        answer
            .to_message()
            .map(Response::new)
            .map_err(|_| errors::internal("an encoded answer failed to decode"))
    }

    async fn rank_batch(
        &self,
        request: Request<pb::RankBatchRequest>,
    ) -> Result<Response<pb::RankBatchResponse>, Status> {
        let started = Instant::now();
        let entries = request.get_ref().requests.len();
        let abandoned = Abandoned::watch(&self.shared.metrics, "RankBatch", started);
        let result = self.rank_many(request, started).await;
        abandoned.disarm();
        let metrics = &self.shared.metrics;
        match &result {
            Ok(response) => {
                for result in &response.results {
                    match &result.outcome {
                        Some(Outcome::Response(answer)) => {
                            metrics.record_answer(AnswerFacts::of(answer));
                        }
                        _ => {
                            metrics.rank_errors.inc();
                        }
                    }
                }
            }
            Err(_) => {
                metrics.rank_errors.inc_by(entries as u64);
            }
        }
        finish_call(
            metrics,
            "RankBatch",
            result.as_ref().err(),
            started.elapsed(),
            "",
            None,
        );
        result.map(Response::new)
    }
}

impl RankerService {
    /// `Rank` as decoded by the fast route ([`super::rank_route`]).
    pub(super) async fn rank_wire(
        &self,
        request: Request<WireRankRequest>,
    ) -> Result<Response<WireRankResponse>, Status> {
        let started = Instant::now();
        let deadline = deadline::of(&request, self.shared.default_deadline);
        let (message, candidate_ids, id_entries) = request.into_inner().into_parts();
        self.rank_call(message, candidate_ids, id_entries, deadline, started)
            .await
            .map(Response::new)
    }

    /// One `Rank` call: `message` without its candidate ids, which come separately (with
    /// where the body holds their entries, for the replay digest).
    async fn rank_call(
        &self,
        message: pb::RankRequest,
        candidate_ids: CandidateIds,
        id_entries: IdEntries,
        deadline: Instant,
        started: Instant,
    ) -> Result<WireRankResponse, Status> {
        let user = user_tag(&self.shared, &message);
        let request_id = message.request_id.clone();
        let abandoned = Abandoned::watch(&self.shared.metrics, "Rank", started);
        let mut result = self
            .rank_one(message, candidate_ids, id_entries, deadline, started)
            .await;
        abandoned.disarm();
        // One clock read for the answer's total, the deadline and the call's metrics and log.
        let elapsed = started.elapsed();
        result = refused_if_late(result, started + elapsed, deadline, RANK_PAST_DEADLINE);
        let metrics = &self.shared.metrics;
        if let Ok(response) = &mut result {
            if let Some(timings) = &mut response.timings {
                timings.total_us = micros(elapsed);
            }
            // Refused here rather than by the transport's encoder, which would fail the call
            // after it was counted as answered, with a message that gives no way out.
            let (bytes, limit) = (response.encoded_len(), self.shared.max_message_bytes);
            if bytes > limit {
                result = Err(errors::rank_answer_too_large(bytes, limit));
            }
        }
        match &result {
            Ok(response) => metrics.record_answer(response.facts),
            Err(_) => {
                metrics.rank_errors.inc();
            }
        }
        finish_call(
            metrics,
            "Rank",
            result.as_ref().err(),
            elapsed,
            &request_id,
            user.as_deref(),
        );
        result
    }

    async fn rank_one(
        &self,
        message: pb::RankRequest,
        candidate_ids: CandidateIds,
        id_entries: IdEntries,
        deadline: Instant,
        started: Instant,
    ) -> Result<WireRankResponse, Status> {
        let shared = &self.shared;
        shared.metrics.rank_requests.inc();
        let digest = shared
            .replay
            .digest_rank(&message, &candidate_ids, &id_entries);
        let native = convert::rank_request(message, candidate_ids, Some(deadline))?;
        // The engine's request carries the request id unchanged.
        let request_id = native.request_id.as_str();
        let ticket = match shared.replay.begin(request_id, digest, started) {
            Begin::Run(ticket) => ticket,
            Begin::Replay(stored) => {
                return replayed_stored(stored, started).map(WireRankResponse::encode);
            }
            Begin::Reused => return Err(errors::request_id_reused(request_id)),
            Begin::InProgress => return Err(errors::request_in_progress(request_id)),
        };
        let admission = shared.admit(1)?;

        let (sender, receiver) = oneshot::channel();
        let metrics = Arc::clone(&shared.metrics);
        let engine = shared.engine.clone();
        let completion: RankCallback = Box::new(move |result| {
            let outcome = match result {
                Ok(answer) => Ok(respond_wire(&metrics, answer, ticket)),
                Err(error) => {
                    // Free the id before answering, so an immediate retry runs.
                    drop(ticket);
                    Err(refusal(&metrics, &error))
                }
            };
            drop(admission);
            // The handler may have stopped waiting (deadline, cancellation).
            let _ = sender.send(outcome);
        });
        // On a connection thread, queued where an idle sibling thread may take it.
        handoff::rank(move || engine.submit_small_inline(native, completion)).await;
        // The caller sets the answer's `timings.total_us`.
        match tokio::time::timeout_at(deadline.into(), receiver).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(errors::internal("the engine lost the request")),
            Err(_) => Err(errors::deadline_exceeded(RANK_PAST_DEADLINE)),
        }
    }

    async fn rank_many(
        &self,
        request: Request<pb::RankBatchRequest>,
        started: Instant,
    ) -> Result<pb::RankBatchResponse, Status> {
        let shared = &self.shared;
        let deadline = deadline::of(&request, shared.default_deadline);
        let batch = request.into_inner();
        shared.metrics.rank_batch_calls.inc();
        shared
            .metrics
            .rank_requests
            .inc_by(batch.requests.len() as u64);
        check_batch(&batch.requests, shared.engine.config().max_batch_requests)?;

        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(batch.requests.len());
        let mut positions = Vec::new();
        let mut natives = Vec::new();
        let mut tickets = Vec::new();
        for (position, mut entry) in batch.requests.into_iter().enumerate() {
            let candidate_ids = std::mem::take(&mut entry.candidate_ids).into();
            let digest = shared
                .replay
                .digest_rank(&entry, &candidate_ids, &IdEntries::default());
            let request_id = entry.request_id.clone();
            let native = match convert::rank_request(entry, candidate_ids, Some(deadline)) {
                Ok(native) => native,
                Err(status) => {
                    outcomes.push(Some(Outcome::Error(pb::EntryError::from(&status))));
                    continue;
                }
            };
            let outcome = match shared.replay.begin(&request_id, digest, started) {
                Begin::Run(ticket) => {
                    positions.push(position);
                    natives.push(native);
                    tickets.push(ticket);
                    None
                }
                Begin::Replay(stored) => Some(match replayed_stored(stored, started) {
                    Ok(response) => Outcome::Response(response),
                    Err(status) => Outcome::Error(pb::EntryError::from(&status)),
                }),
                Begin::Reused => Some(Outcome::Error(pb::EntryError::from(
                    &errors::request_id_reused(&request_id),
                ))),
                Begin::InProgress => Some(Outcome::Error(pb::EntryError::from(
                    &errors::request_in_progress(&request_id),
                ))),
            };
            outcomes.push(outcome);
        }

        let mut timings = pb::StageTimings::default();
        if !natives.is_empty() {
            let admission = shared.admit(natives.len())?;
            let (sender, receiver) = oneshot::channel();
            let metrics = Arc::clone(&shared.metrics);
            shared.engine.submit_batch(
                natives,
                Box::new(move |result| {
                    let outcome = match result {
                        Ok(batch) => {
                            let answers: Vec<Outcome> = batch
                                .results
                                .into_iter()
                                .zip(tickets)
                                .map(|(result, ticket)| match result {
                                    Ok(answer) => {
                                        Outcome::Response(respond(&metrics, answer, ticket))
                                    }
                                    Err(error) => {
                                        drop(ticket);
                                        Outcome::Error(pb::EntryError::from(&refusal(
                                            &metrics, &error,
                                        )))
                                    }
                                })
                                .collect();
                            Ok((answers, convert::stage_timings(&batch.timings)))
                        }
                        Err(error) => {
                            // Free the ids before answering, so immediate retries run.
                            drop(tickets);
                            Err(refusal(&metrics, &error))
                        }
                    };
                    drop(admission);
                    let _ = sender.send(outcome);
                }),
            );
            let (answers, batch_timings) =
                match tokio::time::timeout_at(deadline.into(), receiver).await {
                    Ok(Ok(outcome)) => {
                        refused_if_late(outcome, Instant::now(), deadline, BATCH_PAST_DEADLINE)?
                    }
                    Ok(Err(_)) => return Err(errors::internal("the engine lost the batch")),
                    Err(_) => return Err(errors::deadline_exceeded(BATCH_PAST_DEADLINE)),
                };
            for (position, answer) in positions.into_iter().zip(answers) {
                outcomes[position] = Some(answer);
            }
            timings = batch_timings;
        }
        timings.total_us = micros_since(started);
        let results = outcomes
            .into_iter()
            .map(|outcome| pb::RankBatchResult {
                outcome: Some(outcome.unwrap_or_else(|| {
                    Outcome::Error(pb::EntryError::from(&errors::internal(
                        "the batch entry received no answer",
                    )))
                })),
            })
            .collect();
        let response = pb::RankBatchResponse {
            results,
            timings: Some(timings),
        };
        // Refused here rather than by the transport's encoder, which would fail the call
        // after it was counted as answered, with a message that gives no way out.
        let bytes = prost::Message::encoded_len(&response);
        if bytes > shared.max_message_bytes {
            return Err(errors::answer_too_large(bytes, shared.max_message_bytes));
        }
        Ok(response)
    }
}

/// What a `Rank` call refused at its deadline is told.
const RANK_PAST_DEADLINE: &str =
    "while ranking; a retry with the same request id returns the answer if it completes";

/// What a `RankBatch` call refused at its deadline is told.
const BATCH_PAST_DEADLINE: &str = "while ranking the batch; retries with the same request ids \
                                   return the answers that complete";

/// `result`, or DEADLINE_EXCEEDED (saying `what`) when it was `finished` after `deadline`:
/// an answer that completed inline a little after the engine's last deadline check is
/// refused as one that timed out while waiting would be, since the caller has given up by
/// then. Its answer is stored all the same, so a retry with the same request id returns it.
fn refused_if_late<T>(
    result: Result<T, Status>,
    finished: Instant,
    deadline: Instant,
    what: &str,
) -> Result<T, Status> {
    match result {
        Ok(_) if finished > deadline => Err(errors::deadline_exceeded(what)),
        result => result,
    }
}

/// Converts an engine answer to its wire form on the compute thread, stores it for replay
/// and records its stage timings (a `RankBatch` entry).
fn respond(metrics: &Metrics, answer: engine::RankResponse, ticket: Ticket) -> pb::RankResponse {
    let respond_started = Instant::now();
    let timings = answer.timings;
    let response = convert::rank_response(answer);
    ticket.complete(&response, respond_started);
    record_stages(metrics, &timings, respond_started);
    response
}

/// As [`respond`] for a `Rank` call: the answer is encoded once, and the idempotency store
/// keeps the same buffer that is sent.
fn respond_wire(
    metrics: &Metrics,
    answer: engine::RankResponse,
    ticket: Ticket,
) -> WireRankResponse {
    let respond_started = Instant::now();
    let timings = answer.timings;
    let response = WireRankResponse::encode(convert::rank_response(answer));
    ticket.complete_wire(&response, respond_started);
    record_stages(metrics, &timings, respond_started);
    response
}

/// Records an answer's stage timings, and the `respond` stage since `respond_started`.
fn record_stages(metrics: &Metrics, timings: &engine::StageTimings, respond_started: Instant) {
    for (stage, micros) in [
        (Stage::queue, timings.queue_us),
        (Stage::validate, timings.validate_us),
        (Stage::resolve_user, timings.resolve_user_us),
        (Stage::score, timings.score_us),
        (Stage::select_pool, timings.select_pool_us),
        (Stage::rerank, timings.rerank_us),
        (Stage::explain, timings.explain_us),
        (Stage::report, timings.report_us),
    ] {
        metrics.record_stage(stage, micros);
    }
    metrics.record_stage(Stage::respond, micros_since(respond_started));
}

/// The status of an engine error; a full whole-catalog queue is load shedding too and is
/// counted as such.
fn refusal(metrics: &Metrics, error: &engine::EngineError) -> Status {
    match error {
        engine::EngineError::ResourceExhausted { .. } => metrics.shed.inc(),
        engine::EngineError::PrivacyBudgetExhausted { .. } => metrics.budget_exhausted.inc(),
        _ => 0,
    };
    errors::engine_status(error)
}

/// A stored answer (its encoding without timings), as a replay.
fn replayed_stored(
    stored: prost::bytes::Bytes,
    started: Instant,
) -> Result<pb::RankResponse, Status> {
    use prost::Message as _;
    let stored = pb::RankResponse::decode(stored)
        .map_err(|_| errors::internal("a stored answer failed to decode"))?;
    Ok(replayed_owned(stored, started))
}

/// A stored answer, as a replay: `replayed = true` and this call's timings.
#[cfg(test)]
fn replayed(stored: &pb::RankResponse, started: Instant) -> pb::RankResponse {
    replayed_owned(stored.clone(), started)
}

/// [`replayed`], taking the stored answer. A replay charges nothing: its privacy report
/// says `rho_charged = 0` (as the ledger's own replays do), the rest as first answered.
fn replayed_owned(mut response: pb::RankResponse, started: Instant) -> pb::RankResponse {
    response.replayed = true;
    if let Some(privacy) = &mut response.privacy {
        privacy.rho_charged = 0.0;
    }
    response.timings = Some(pb::StageTimings {
        total_us: micros_since(started),
        ..pb::StageTimings::default()
    });
    response
}

/// Batch-level checks, before any entry runs: entry count and unique request ids (the
/// engine checks the same, but the idempotency store must not see duplicates first).
fn check_batch(requests: &[pb::RankRequest], max: usize) -> Result<(), Status> {
    if requests.is_empty() {
        return Err(errors::invalid_field(
            "requests",
            "a batch needs at least one request",
        ));
    }
    if requests.len() > max {
        return Err(errors::limit_exceeded(
            "requests",
            format!(
                "{} requests exceed the batch limit of {max}",
                requests.len()
            ),
        ));
    }
    let mut ids: Vec<(&str, usize)> = requests
        .iter()
        .enumerate()
        .filter(|(_, request)| !request.request_id.is_empty())
        .map(|(position, request)| (request.request_id.as_str(), position))
        .collect();
    ids.sort_unstable();
    if let Some(pair) = ids.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(errors::invalid_field(
            &format!("requests[{}].request_id", pair[1].1),
            format!(
                "{} repeats the request id of requests[{}]",
                engine::quote_clipped(pair[1].0),
                pair[0].1
            ),
        ));
    }
    Ok(())
}

/// The log pseudonym of the request's user (debug logging only).
fn user_tag(shared: &Shared, request: &pb::RankRequest) -> Option<String> {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return None;
    }
    Some(match &request.user {
        Some(pb::rank_request::User::UserId(id)) => shared.pseudonym(id),
        Some(pb::rank_request::User::InlineUser(inline)) if !inline.subject_id.is_empty() => {
            shared.pseudonym(&inline.subject_id)
        }
        Some(pb::rank_request::User::InlineUser(_)) => "inline".to_owned(),
        None => "none".to_owned(),
    })
}

/// The Ranker method (`Rank` or `RankBatch`) a gRPC path names, if any.
pub(super) fn method_of(path: &str) -> Option<&'static str> {
    match path.strip_prefix("/fairrank.v1.Ranker/")? {
        "Rank" => Some("Rank"),
        "RankBatch" => Some("RankBatch"),
        _ => None,
    }
}

/// Counts and logs a call refused before any handler ran (by its route: a body over a
/// limit, or one that does not decode; or by the front: a deadline passed on arrival): as
/// a failed call of `method`, one rank error.
pub(super) fn refused_before_handler(metrics: &Metrics, method: &'static str, status: &Status) {
    metrics.rank_errors.inc();
    finish_call(metrics, method, Some(status), Duration::ZERO, "", None);
}

/// A call in progress that, if dropped before [`Abandoned::disarm`] (the client cancelled
/// or reset the stream, or its connection closed, and tonic dropped the handler), is
/// counted and logged as a `CANCELLED` call of its method and one rank error, so that
/// `fairrank_requests_total` counts every call that reached a handler.
struct Abandoned<'a> {
    metrics: &'a Metrics,
    method: &'static str,
    started: Instant,
    armed: bool,
}

impl<'a> Abandoned<'a> {
    fn watch(metrics: &'a Metrics, method: &'static str, started: Instant) -> Abandoned<'a> {
        Abandoned {
            metrics,
            method,
            started,
            armed: true,
        }
    }

    /// The call finished: it is counted with its own outcome.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.metrics.rank_errors.inc();
            let status = Status::cancelled("the client abandoned the call before its answer");
            finish_call(
                self.metrics,
                self.method,
                Some(&status),
                self.started.elapsed(),
                "",
                None,
            );
        }
    }
}

/// Records a finished call and logs it: a keyed pseudonym at most, never the user id or
/// the embedding.
fn finish_call(
    metrics: &Metrics,
    method: &'static str,
    error: Option<&Status>,
    elapsed: Duration,
    request_id: &str,
    user: Option<&str>,
) {
    let code = error.map_or(tonic::Code::Ok, Status::code);
    metrics.record_call(method, code, elapsed);
    let elapsed_us = elapsed.as_micros() as u64;
    let reason = error.map(|status| api::status::error_reason(status).as_str_name());
    let field = error.and_then(api::status::error_field);
    match code {
        tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::DataLoss => {
            tracing::error!(
                method,
                ?code,
                request_id,
                elapsed_us,
                message = error.map(Status::message),
                "call failed"
            );
        }
        _ => tracing::debug!(
            method,
            ?code,
            reason,
            field,
            request_id,
            user,
            elapsed_us,
            "call finished"
        ),
    }
}

fn micros_since(started: Instant) -> u64 {
    micros(started.elapsed())
}

/// A duration in whole microseconds (saturating).
fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::status::error_field;

    fn entry(id: &str) -> pb::RankRequest {
        pb::RankRequest {
            request_id: id.into(),
            k: 1,
            ..Default::default()
        }
    }

    #[test]
    fn calls_dropped_before_their_answer_are_counted_as_cancelled() {
        let metrics = Metrics::new();
        let started = Instant::now();
        Abandoned::watch(&metrics, "Rank", started).disarm();
        drop(Abandoned::watch(&metrics, "RankBatch", started));
        let text = metrics.render();
        assert!(
            text.contains("fairrank_requests_total{method=\"RankBatch\",code=\"Cancelled\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("method=\"Rank\",code=\"Cancelled\""),
            "{text}"
        );
    }

    #[test]
    fn answers_finished_after_the_deadline_are_refused_as_late() {
        let deadline = Instant::now();
        let after = deadline + Duration::from_micros(1);
        let late = refused_if_late(Ok(7), after, deadline, RANK_PAST_DEADLINE).unwrap_err();
        assert_eq!(late.code(), tonic::Code::DeadlineExceeded);
        assert!(late.message().contains("same request id"), "{late:?}");
        assert_eq!(refused_if_late(Ok(7), deadline, deadline, "").ok(), Some(7));
        let refused =
            refused_if_late::<u8>(Err(errors::invalid_field("k", "is 0")), after, deadline, "")
                .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    }

    #[test]
    fn batches_must_be_non_empty_bounded_and_without_repeated_ids() {
        assert!(check_batch(&[entry("a"), entry("b"), entry("")], 3).is_ok());
        let empty = check_batch(&[], 3).unwrap_err();
        assert_eq!(error_field(&empty), Some("requests"));
        let too_many = check_batch(&[entry("a"), entry("b")], 1).unwrap_err();
        assert_eq!(
            api::status::error_reason(&too_many),
            pb::ErrorReason::LimitExceeded
        );
        let repeated = check_batch(&[entry("a"), entry("b"), entry("a")], 3).unwrap_err();
        assert_eq!(error_field(&repeated), Some("requests[2].request_id"));
        assert!(repeated.message().contains("requests[0]"));
        // Empty ids are the entries' own error, not a repetition.
        assert!(check_batch(&[entry(""), entry("")], 3).is_ok());
    }

    #[test]
    fn a_replay_is_marked_charges_nothing_and_carries_this_calls_timings() {
        let stored = pb::RankResponse {
            request_id: "r".into(),
            timings: Some(pb::StageTimings {
                total_us: 12_345,
                score_us: 10_000,
                ..Default::default()
            }),
            privacy: Some(pb::PrivacyReport {
                dp_applied: true,
                rho_charged: 0.25,
                rho_remaining: Some(0.5),
                ..Default::default()
            }),
            ..Default::default()
        };
        let replay = replayed(&stored, Instant::now());
        assert!(replay.replayed);
        assert_eq!(replay.timings.unwrap().score_us, 0);
        assert_eq!(replay.request_id, "r");
        let privacy = replay.privacy.expect("the privacy report");
        assert_eq!(privacy.rho_charged, 0.0);
        assert!(privacy.dp_applied);
        assert_eq!(privacy.rho_remaining, Some(0.5));
    }
}
