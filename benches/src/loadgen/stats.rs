//! Latency samples, exact nearest-rank percentiles, error tallies and the summary of one step.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// Percentiles reported per step, in parts per million (50%, 95%, 99%, 99.9%).
pub const REPORTED_PERCENTILES_PPM: [u32; 4] = [500_000, 950_000, 990_000, 999_000];

/// The exact nearest-rank percentile of ascending `sorted` samples: the smallest sample such
/// that at least `per_million / 1e6` of all samples are less than or equal to it, i.e.
/// `sorted[ceil(per_million * n / 1e6) - 1]` (the first sample for 0). `None` when empty.
///
/// The rank is computed in integers, so 95% of 100 samples is exactly the 95th sample
/// (floating point would give 95.000...01 and round up to the 96th).
pub fn nearest_rank_percentile(sorted: &[u64], per_million: u32) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let count = sorted.len() as u128;
    let per_million = u128::from(per_million.min(1_000_000));
    let rank = (per_million * count).div_ceil(1_000_000).max(1);
    // rank <= count <= usize::MAX, so the conversion cannot fail.
    let index = usize::try_from(rank - 1).unwrap_or(sorted.len() - 1);
    sorted.get(index).copied()
}

/// Latency distribution of a set of calls, in microseconds (fractional).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Median.
    pub p50_us: f64,
    /// 95th percentile.
    pub p95_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest sample.
    pub max_us: f64,
    /// Arithmetic mean.
    pub mean_us: f64,
}

impl LatencySummary {
    /// Summarizes latency samples in nanoseconds; sorts them in place. `None` when empty.
    pub fn from_nanos(samples: &mut [u64]) -> Option<Self> {
        samples.sort_unstable();
        let to_us = |nanos: u64| nanos as f64 / 1_000.0;
        let percentile = |per_million| nearest_rank_percentile(samples, per_million).map(to_us);
        let [p50, p95, p99, p999] = REPORTED_PERCENTILES_PPM;
        let sum: u128 = samples.iter().map(|&nanos| u128::from(nanos)).sum();
        Some(Self {
            p50_us: percentile(p50)?,
            p95_us: percentile(p95)?,
            p99_us: percentile(p99)?,
            p999_us: percentile(p999)?,
            max_us: to_us(*samples.last()?),
            mean_us: sum as f64 / samples.len() as f64 / 1_000.0,
        })
    }
}

/// Server-reported stage timings (`RankResponse.timings`) of the successful calls of a step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerSamples {
    totals_us: Vec<u64>,
    /// Sums of queue, validate, resolve_user, score, select_pool, rerank, explain, report,
    /// ledger, in that order.
    stage_sums_us: [u64; 9],
}

impl ServerSamples {
    /// Adds one answer's timings.
    pub fn record(&mut self, timings: &api::fairrank::v1::StageTimings) {
        self.totals_us.push(timings.total_us);
        let stages = [
            timings.queue_us,
            timings.validate_us,
            timings.resolve_user_us,
            timings.score_us,
            timings.select_pool_us,
            timings.rerank_us,
            timings.explain_us,
            timings.report_us,
            timings.ledger_us,
        ];
        for (sum, stage) in self.stage_sums_us.iter_mut().zip(stages) {
            *sum = sum.saturating_add(stage);
        }
    }

    /// Adds another set of samples into this one.
    pub fn merge(&mut self, other: &ServerSamples) {
        self.totals_us.extend_from_slice(&other.totals_us);
        for (sum, other) in self.stage_sums_us.iter_mut().zip(other.stage_sums_us) {
            *sum = sum.saturating_add(other);
        }
    }

    /// Summarizes the samples (sorts the totals in place); `None` when there are none.
    pub fn summarize(&mut self) -> Option<ServerTimingsSummary> {
        if self.totals_us.is_empty() {
            return None;
        }
        self.totals_us.sort_unstable();
        let count = self.totals_us.len();
        let [p50, _, p99, _] = REPORTED_PERCENTILES_PPM;
        let mean = |sum: u64| sum as f64 / count as f64;
        let [
            queue,
            validate,
            resolve_user,
            score,
            select_pool,
            rerank,
            explain,
            report,
            ledger,
        ] = self.stage_sums_us.map(mean);
        Some(ServerTimingsSummary {
            samples: count as u64,
            total_p50_us: nearest_rank_percentile(&self.totals_us, p50)?,
            total_p99_us: nearest_rank_percentile(&self.totals_us, p99)?,
            mean_total_us: mean(self.totals_us.iter().sum()),
            mean_queue_us: queue,
            mean_validate_us: validate,
            mean_resolve_user_us: resolve_user,
            mean_score_us: score,
            mean_select_pool_us: select_pool,
            mean_rerank_us: rerank,
            mean_explain_us: explain,
            mean_report_us: report,
            mean_ledger_us: ledger,
        })
    }
}

/// Summary of the server's own stage timings: where the server says the time went.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ServerTimingsSummary {
    /// Answers that carried timings.
    pub samples: u64,
    /// Median of the handler's total time (decode to response ready), microseconds.
    pub total_p50_us: u64,
    /// 99th percentile of the handler's total time, microseconds.
    pub total_p99_us: u64,
    /// Mean handler total time, microseconds.
    pub mean_total_us: f64,
    /// Mean wait for admission and a compute thread.
    pub mean_queue_us: f64,
    /// Mean validation time.
    pub mean_validate_us: f64,
    /// Mean user resolution time.
    pub mean_resolve_user_us: f64,
    /// Mean scoring time.
    pub mean_score_us: f64,
    /// Mean pool selection time.
    pub mean_select_pool_us: f64,
    /// Mean fairness re-ranking time.
    pub mean_rerank_us: f64,
    /// Mean explanation time.
    pub mean_explain_us: f64,
    /// Mean report time.
    pub mean_report_us: f64,
    /// Mean ledger, audit and idempotency bookkeeping time.
    pub mean_ledger_us: f64,
}

/// Key of an error tally: the gRPC code and, if the status carried one, the fairrank
/// `ErrorReason` name from its metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorKey {
    /// gRPC status code.
    pub code: tonic::Code,
    /// `ErrorReason` name such as `ERROR_REASON_OVERLOADED`; empty when none.
    pub reason: &'static str,
}

impl Ord for ErrorKey {
    /// By code number, then reason.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.code as i32, self.reason).cmp(&(other.code as i32, other.reason))
    }
}

impl PartialOrd for ErrorKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl ErrorKey {
    /// The key of a failed call.
    pub fn of(status: &tonic::Status) -> Self {
        let reason = api::status::error_reason(status);
        let reason = if reason == api::fairrank::v1::ErrorReason::Unspecified {
            ""
        } else {
            reason.as_str_name()
        };
        Self {
            code: status.code(),
            reason,
        }
    }

    /// `CODE` or `CODE/REASON`, with the code in its canonical upper-case gRPC name
    /// (`RESOURCE_EXHAUSTED/ERROR_REASON_OVERLOADED`).
    pub fn label(&self) -> String {
        let code = code_name(self.code);
        if self.reason.is_empty() {
            code.to_owned()
        } else {
            format!("{code}/{}", self.reason)
        }
    }
}

/// Canonical gRPC name of a status code (`DEADLINE_EXCEEDED`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Errors of a step: count per key and the first message seen per key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ErrorTally {
    entries: BTreeMap<ErrorKey, (u64, String)>,
}

impl ErrorTally {
    /// Counts one failed call (allocates only for the first error of each key).
    pub fn record(&mut self, status: &tonic::Status) {
        let entry = self
            .entries
            .entry(ErrorKey::of(status))
            .or_insert_with(|| (0, status.message().to_owned()));
        entry.0 += 1;
    }

    /// Adds another tally into this one (keeps the first message of each key).
    pub fn merge(&mut self, other: ErrorTally) {
        for (key, (count, message)) in other.entries {
            self.entries.entry(key).or_insert((0, message)).0 += count;
        }
    }

    /// Total number of failed calls.
    pub fn total(&self) -> u64 {
        self.entries.values().map(|(count, _)| count).sum()
    }

    /// `(label, count)` per key, ordered by code.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.entries
            .iter()
            .map(|(key, (count, _))| (key.label(), *count))
            .collect()
    }

    /// `(label, first message)` per key, ordered by code.
    pub fn first_messages(&self) -> BTreeMap<String, String> {
        self.entries
            .iter()
            .map(|(key, (_, message))| (key.label(), message.clone()))
            .collect()
    }
}

/// The measured outcome of one target (Rank or Echo) at one concurrency, for one request
/// kind or for all kinds together.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// Successful calls completed in the measured window.
    pub requests_ok: u64,
    /// Failed calls completed in the measured window.
    pub requests_failed: u64,
    /// Failed calls per `CODE` or `CODE/ERROR_REASON`.
    pub errors: BTreeMap<String, u64>,
    /// Successful calls per second of the measured window.
    pub throughput_rps: f64,
    /// Latency of the successful calls; absent when there were none.
    pub latency: Option<LatencySummary>,
    /// Mean encoded size of a successful response's message, in bytes.
    pub mean_response_bytes: f64,
    /// The server's stage timings; absent when the answers carry none (Echo).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_timings: Option<ServerTimingsSummary>,
}

impl Outcome {
    /// Summarizes samples (nanoseconds, sorted in place), errors, response bytes and server
    /// timings measured over a window of `window` length.
    pub fn summarize(
        latencies_nanos: &mut [u64],
        errors: &ErrorTally,
        response_bytes_total: u64,
        server: &mut ServerSamples,
        window: Duration,
    ) -> Self {
        let requests_ok = latencies_nanos.len() as u64;
        let seconds = window.as_secs_f64();
        Self {
            requests_ok,
            requests_failed: errors.total(),
            errors: errors.counts(),
            throughput_rps: if seconds > 0.0 {
                requests_ok as f64 / seconds
            } else {
                0.0
            },
            latency: LatencySummary::from_nanos(latencies_nanos),
            mean_response_bytes: if requests_ok > 0 {
                response_bytes_total as f64 / requests_ok as f64
            } else {
                0.0
            },
            server_timings: server.summarize(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_matches_the_definition_on_small_lists() {
        let hundred: Vec<u64> = (1..=100).collect();
        assert_eq!(nearest_rank_percentile(&hundred, 500_000), Some(50));
        assert_eq!(nearest_rank_percentile(&hundred, 950_000), Some(95));
        assert_eq!(nearest_rank_percentile(&hundred, 990_000), Some(99));
        assert_eq!(nearest_rank_percentile(&hundred, 999_000), Some(100));
        assert_eq!(nearest_rank_percentile(&hundred, 1_000_000), Some(100));
        assert_eq!(nearest_rank_percentile(&hundred, 0), Some(1));
        assert_eq!(nearest_rank_percentile(&hundred, 10_000), Some(1));
        assert_eq!(nearest_rank_percentile(&hundred, 10_001), Some(2));

        let ten = [3, 5, 7, 11, 13, 17, 19, 23, 29, 31];
        assert_eq!(nearest_rank_percentile(&ten, 500_000), Some(13));
        assert_eq!(nearest_rank_percentile(&ten, 500_001), Some(17));
        assert_eq!(nearest_rank_percentile(&ten, 990_000), Some(31));

        assert_eq!(nearest_rank_percentile(&[42], 500_000), Some(42));
        assert_eq!(nearest_rank_percentile(&[], 500_000), None);
        // Out-of-range requests are clamped to the maximum.
        assert_eq!(nearest_rank_percentile(&ten, 2_000_000), Some(31));
    }

    #[test]
    fn nearest_rank_agrees_with_counting_on_a_large_list() {
        // Pseudo-random permutation of 0..10007 (a prime), sorted: the percentile is the
        // smallest value v with count(<= v) >= p * n.
        let n = 10_007_u64;
        let mut samples: Vec<u64> = (0..n).map(|i| (i * 7_919) % n).collect();
        samples.sort_unstable();
        for per_million in [1, 500_000, 950_000, 990_000, 999_000, 999_999] {
            let value = nearest_rank_percentile(&samples, per_million).unwrap();
            let at_or_below = value + 1; // the values are exactly 0..n
            assert!(at_or_below * 1_000_000 >= u64::from(per_million) * n);
            assert!((at_or_below - 1) * 1_000_000 < u64::from(per_million) * n);
        }
    }

    #[test]
    fn latency_summary_sorts_and_converts_to_microseconds() {
        let mut nanos: Vec<u64> = (1..=1000).rev().map(|i| i * 1_000).collect();
        let summary = LatencySummary::from_nanos(&mut nanos).unwrap();
        assert_eq!(summary.p50_us, 500.0);
        assert_eq!(summary.p95_us, 950.0);
        assert_eq!(summary.p99_us, 990.0);
        assert_eq!(summary.p999_us, 999.0);
        assert_eq!(summary.max_us, 1000.0);
        assert!((summary.mean_us - 500.5).abs() < 1e-9);
        assert!(LatencySummary::from_nanos(&mut []).is_none());
    }

    #[test]
    fn error_tally_counts_by_code_and_reason() {
        let shed = api::status::error_status(
            tonic::Code::ResourceExhausted,
            "load shed",
            api::fairrank::v1::ErrorReason::Overloaded,
            None,
        );
        let mut tally = ErrorTally::default();
        tally.record(&tonic::Status::unavailable("first"));
        tally.record(&tonic::Status::unavailable("second"));
        tally.record(&shed);
        let mut other = ErrorTally::default();
        other.record(&tonic::Status::unavailable("third"));
        other.record(&tonic::Status::deadline_exceeded("late"));
        tally.merge(other);

        assert_eq!(tally.total(), 5);
        let counts = tally.counts();
        assert_eq!(counts["UNAVAILABLE"], 3);
        assert_eq!(counts["DEADLINE_EXCEEDED"], 1);
        assert_eq!(counts["RESOURCE_EXHAUSTED/ERROR_REASON_OVERLOADED"], 1);
        assert_eq!(counts.len(), 3);
        assert_eq!(tally.first_messages()["UNAVAILABLE"], "first");
    }

    #[test]
    fn outcome_divides_by_the_window() {
        let mut nanos = vec![2_000_u64; 50];
        let mut errors = ErrorTally::default();
        errors.record(&tonic::Status::internal("bug"));
        let mut server = ServerSamples::default();
        let outcome = Outcome::summarize(
            &mut nanos,
            &errors,
            50 * 300,
            &mut server,
            Duration::from_millis(500),
        );
        assert_eq!(outcome.requests_ok, 50);
        assert_eq!(outcome.requests_failed, 1);
        assert_eq!(outcome.throughput_rps, 100.0);
        assert_eq!(outcome.mean_response_bytes, 300.0);
        assert_eq!(outcome.latency.unwrap().p99_us, 2.0);
        assert_eq!(outcome.errors["INTERNAL"], 1);

        assert!(outcome.server_timings.is_none());
        let empty = Outcome::summarize(
            &mut [],
            &ErrorTally::default(),
            0,
            &mut ServerSamples::default(),
            Duration::ZERO,
        );
        assert_eq!(empty.throughput_rps, 0.0);
        assert!(empty.latency.is_none());
    }

    #[test]
    fn server_timings_are_averaged_per_stage() {
        use api::fairrank::v1::StageTimings;
        let mut first = ServerSamples::default();
        let mut second = ServerSamples::default();
        for total in 1..=50 {
            first.record(&StageTimings {
                total_us: total,
                queue_us: 10,
                score_us: 2,
                ..Default::default()
            });
        }
        for total in 51..=100 {
            second.record(&StageTimings {
                total_us: total,
                queue_us: 20,
                ledger_us: 4,
                ..Default::default()
            });
        }
        first.merge(&second);
        let summary = first.summarize().unwrap();
        assert_eq!(summary.samples, 100);
        assert_eq!(summary.total_p50_us, 50);
        assert_eq!(summary.total_p99_us, 99);
        assert_eq!(summary.mean_total_us, 50.5);
        assert_eq!(summary.mean_queue_us, 15.0);
        assert_eq!(summary.mean_score_us, 1.0);
        assert_eq!(summary.mean_ledger_us, 2.0);
        assert_eq!(summary.mean_rerank_us, 0.0);
        assert!(ServerSamples::default().summarize().is_none());
    }
}
