//! Step reports of the load generator: one object per concurrency step (Rank, its Echo
//! baseline and their ratios), printed as a readable table or as one JSON object per line.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::loadgen::closed_loop::StepResult;
use crate::loadgen::cpu::CpuPerCall;
use crate::loadgen::stats::Outcome;

/// Outcome of one request kind within a target's step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KindReport {
    /// The kind, e.g. `candidates1000`.
    pub kind: String,
    /// Mean encoded size of a request of this kind, in bytes.
    pub request_bytes: f64,
    /// What was measured.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Outcome of one target (Rank or Echo) at one concurrency.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetReport {
    /// `rank` or `echo`.
    pub target: String,
    /// Server address, or `in-process` for the load generator's own Echo server.
    pub addr: String,
    /// Length of the measured window in seconds.
    pub window_s: f64,
    /// Whether the window was cut short by the load generator's bounds.
    pub truncated: bool,
    /// Mix-weighted mean encoded request size, in bytes.
    pub request_bytes: f64,
    /// All kinds together.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Per kind; present only for mixes of several kinds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<KindReport>,
    /// First error message per error label; present only when there were errors.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub error_messages: BTreeMap<String, String>,
    /// CPU time per call over the measured window (see [`crate::loadgen::cpu`]); absent
    /// when the step was not metered or completed no call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuPerCall>,
}

impl TargetReport {
    /// Builds the report of a step result; `request_bytes` holds the mean request size of
    /// each kind and `weights` the mix weights (both in the mix's kind order);
    /// `server_in_process` says the target's server runs inside the load generator (the
    /// in-process Echo), so its CPU is counted in the load generator's.
    pub fn new(
        target: &str,
        addr: &str,
        result: StepResult,
        request_bytes: &[f64],
        weights: &[f64],
        server_in_process: bool,
    ) -> Self {
        let calls = result.overall.requests_ok + result.overall.requests_failed;
        let cpu = result
            .cpu_window
            .and_then(|(start, end)| CpuPerCall::between(start, end, calls, server_in_process));
        let mean_request_bytes = request_bytes
            .iter()
            .zip(weights)
            .map(|(bytes, weight)| bytes * weight)
            .sum();
        let kinds = if result.per_kind.len() > 1 {
            result
                .per_kind
                .into_iter()
                .zip(request_bytes)
                .map(|((kind, outcome), &bytes)| KindReport {
                    kind: kind.to_string(),
                    request_bytes: bytes,
                    outcome,
                })
                .collect()
        } else {
            Vec::new()
        };
        Self {
            target: target.to_owned(),
            addr: addr.to_owned(),
            window_s: result.window.as_secs_f64(),
            truncated: result.truncated,
            request_bytes: mean_request_bytes,
            outcome: result.overall,
            kinds,
            error_messages: result.error_messages,
            cpu,
        }
    }
}

/// One concurrency step: Rank, its Echo baseline at the same concurrency and message
/// sizes, and Rank as a multiple of Echo.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepReport {
    /// Concurrent callers.
    pub concurrency: usize,
    /// HTTP/2 connections per target used in this step.
    pub connections: usize,
    /// The request mix as `--mix` takes it.
    pub mix: String,
    /// Items requested per Rank call.
    pub k: u32,
    /// Worker threads of the load generator's runtime.
    pub client_threads: usize,
    /// The Rank measurement.
    pub rank: TargetReport,
    /// The Echo measurement; absent when the baseline is off.
    pub echo: Option<TargetReport>,
    /// Rank throughput / Echo throughput (1 = as fast as the bare transport).
    pub throughput_ratio_vs_echo: Option<f64>,
    /// Rank median latency / Echo median latency.
    pub p50_latency_ratio_vs_echo: Option<f64>,
    /// Rank 95th-percentile latency / Echo's.
    pub p95_latency_ratio_vs_echo: Option<f64>,
    /// Rank 99th-percentile latency / Echo's.
    pub p99_latency_ratio_vs_echo: Option<f64>,
    /// Rank's CPU per call (load generator and server together) / Echo's. When client and
    /// server share the machine's cores and keep them busy, the throughput ratio cannot
    /// exceed its inverse. Absent unless both totals were measured (`--server-pid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_per_call_ratio_vs_echo: Option<f64>,
}

/// `numerator / denominator` when both are finite and the denominator is positive.
fn ratio(numerator: f64, denominator: f64) -> Option<f64> {
    (numerator.is_finite() && denominator.is_finite() && denominator > 0.0)
        .then(|| numerator / denominator)
}

impl StepReport {
    /// Assembles a step and computes the ratios to the Echo baseline.
    pub fn new(
        concurrency: usize,
        connections: usize,
        mix: String,
        k: u32,
        client_threads: usize,
        rank: TargetReport,
        echo: Option<TargetReport>,
    ) -> Self {
        let rank_latency = rank.outcome.latency;
        let echo_latency = echo.as_ref().and_then(|echo| echo.outcome.latency);
        let latency_ratio = |pick: fn(&crate::loadgen::stats::LatencySummary) -> f64| {
            rank_latency
                .zip(echo_latency)
                .and_then(|(rank, echo)| ratio(pick(&rank), pick(&echo)))
        };
        let total_cpu = |report: &TargetReport| report.cpu.and_then(|cpu| cpu.total_us_per_call);
        Self {
            cpu_per_call_ratio_vs_echo: total_cpu(&rank)
                .zip(echo.as_ref().and_then(total_cpu))
                .and_then(|(rank, echo)| ratio(rank, echo)),
            throughput_ratio_vs_echo: echo
                .as_ref()
                .and_then(|echo| ratio(rank.outcome.throughput_rps, echo.outcome.throughput_rps)),
            p50_latency_ratio_vs_echo: latency_ratio(|latency| latency.p50_us),
            p95_latency_ratio_vs_echo: latency_ratio(|latency| latency.p95_us),
            p99_latency_ratio_vs_echo: latency_ratio(|latency| latency.p99_us),
            concurrency,
            connections,
            mix,
            k,
            client_threads,
            rank,
            echo,
        }
    }

    /// The step as one line of JSON.
    pub fn to_json_line(&self) -> String {
        // Serializing plain structs of numbers, strings and maps with string keys cannot
        // fail; keep a readable fallback anyway rather than panic.
        serde_json::to_string(self)
            .unwrap_or_else(|error| format!("{{\"error\":\"cannot serialize step: {error}\"}}"))
    }
}

/// The column header of the table.
pub fn table_header() -> String {
    format!(
        "{:>5} {:>5}  {:<6} {:<16} {:>9} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "conc",
        "conns",
        "target",
        "kind",
        "ok",
        "failed",
        "req/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "req B",
        "resp B"
    )
}

/// Milliseconds with three decimals (microsecond resolution), `-` when absent.
fn millis(micros: Option<f64>) -> String {
    micros.map_or_else(
        || "-".to_owned(),
        |micros| format!("{:.3}", micros / 1_000.0),
    )
}

/// A ratio as `0.61x`, `-` when absent.
fn times(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| format!("{value:.2}x"))
}

fn outcome_row(
    out: &mut String,
    step: &StepReport,
    target: &str,
    kind: &str,
    request_bytes: f64,
    outcome: &Outcome,
) {
    let latency = outcome.latency;
    let _ = writeln!(
        out,
        "{:>5} {:>5}  {:<6} {:<16} {:>9} {:>7} {:>10.1} {:>9} {:>9} {:>9} {:>9} {:>8.0} {:>8.0}",
        step.concurrency,
        step.connections,
        target,
        kind,
        outcome.requests_ok,
        outcome.requests_failed,
        outcome.throughput_rps,
        millis(latency.map(|latency| latency.p50_us)),
        millis(latency.map(|latency| latency.p95_us)),
        millis(latency.map(|latency| latency.p99_us)),
        millis(latency.map(|latency| latency.max_us)),
        request_bytes,
        outcome.mean_response_bytes,
    );
}

fn target_rows(out: &mut String, step: &StepReport, report: &TargetReport) {
    outcome_row(
        out,
        step,
        &report.target,
        "all",
        report.request_bytes,
        &report.outcome,
    );
    for kind in &report.kinds {
        outcome_row(
            out,
            step,
            &report.target,
            &kind.kind,
            kind.request_bytes,
            &kind.outcome,
        );
    }
    if let Some(server) = &report.outcome.server_timings {
        let _ = writeln!(
            out,
            "{:>13}  {} server time: total p50 {} p99 {} mean {} ms; mean ms queue {} validate {} \
             user {} score {} pool {} rerank {} explain {} report {} ledger {}",
            "",
            report.target,
            millis(Some(server.total_p50_us as f64)),
            millis(Some(server.total_p99_us as f64)),
            millis(Some(server.mean_total_us)),
            millis(Some(server.mean_queue_us)),
            millis(Some(server.mean_validate_us)),
            millis(Some(server.mean_resolve_user_us)),
            millis(Some(server.mean_score_us)),
            millis(Some(server.mean_select_pool_us)),
            millis(Some(server.mean_rerank_us)),
            millis(Some(server.mean_explain_us)),
            millis(Some(server.mean_report_us)),
            millis(Some(server.mean_ledger_us)),
        );
    }
    if let Some(cpu) = &report.cpu {
        let micros =
            |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |us| format!("{us:.1}"));
        let _ = writeln!(
            out,
            "{:>13}  {} cpu per call: load generator {} us, server {} us, total {} us",
            "",
            report.target,
            micros(Some(cpu.load_generator_us_per_call)),
            micros(cpu.server_us_per_call),
            micros(cpu.total_us_per_call),
        );
    }
    for (label, count) in &report.outcome.errors {
        let message = report.error_messages.get(label).map_or("", String::as_str);
        let _ = writeln!(
            out,
            "{:>13}  {} error {label} x{count}: {message}",
            "", report.target
        );
    }
    if report.truncated {
        let _ = writeln!(
            out,
            "{:>13}  {} window cut short by the load generator's bounds",
            "", report.target
        );
    }
}

/// The rows of one step: Echo (if measured), Rank, per-kind rows for mixes, the ratio row,
/// then one line per error label with its first message.
pub fn table_rows(step: &StepReport) -> String {
    let mut out = String::new();
    if let Some(echo) = &step.echo {
        target_rows(&mut out, step, echo);
    }
    target_rows(&mut out, step, &step.rank);
    if step.echo.is_some() {
        let _ = writeln!(
            out,
            "{:>5} {:>5}  {:<6} {:<16} {:>9} {:>7} {:>10} {:>9} {:>9} {:>9}",
            step.concurrency,
            step.connections,
            "ratio",
            "rank/echo",
            "",
            "",
            times(step.throughput_ratio_vs_echo),
            times(step.p50_latency_ratio_vs_echo),
            times(step.p95_latency_ratio_vs_echo),
            times(step.p99_latency_ratio_vs_echo),
        );
        if let Some(cpu_ratio) = step.cpu_per_call_ratio_vs_echo {
            let _ = writeln!(
                out,
                "{:>13}  rank/echo cpu per call {} (throughput ratio at most {} on busy shared cores)",
                "",
                times(Some(cpu_ratio)),
                times(Some(1.0 / cpu_ratio)),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::loadgen::mix::RequestKind;
    use crate::loadgen::stats::{ErrorTally, ServerSamples};

    fn result(latency_us: u64, count: usize, errors: &[tonic::Status], kinds: usize) -> StepResult {
        let mut tally = ErrorTally::default();
        errors.iter().for_each(|status| tally.record(status));
        let window = Duration::from_secs(2);
        let mut latencies = vec![latency_us * 1_000; count];
        let mut server = ServerSamples::default();
        for total in 0..count as u64 {
            server.record(&api::fairrank::v1::StageTimings {
                total_us: total % 300,
                score_us: 100,
                ..Default::default()
            });
        }
        let overall = Outcome::summarize(
            &mut latencies,
            &tally,
            500 * count as u64,
            &mut server,
            window,
        );
        let per_kind = [RequestKind::Candidates(1000), RequestKind::Catalog][..kinds]
            .iter()
            .map(|&kind| (kind, overall.clone()))
            .collect();
        StepResult {
            window,
            truncated: false,
            overall,
            per_kind,
            error_messages: tally.first_messages(),
            cpu_window: None,
        }
    }

    fn step(echo: bool, kinds: usize, rank_errors: &[tonic::Status]) -> StepReport {
        let weights = [0.8, 0.2];
        let bytes = [10_000.0, 100.0];
        let rank = TargetReport::new(
            "rank",
            "http://127.0.0.1:50051",
            result(800, 3_000, rank_errors, kinds),
            &bytes[..kinds],
            &weights[..kinds],
            false,
        );
        let echo = echo.then(|| {
            TargetReport::new(
                "echo",
                "in-process",
                result(400, 5_000, &[], kinds),
                &bytes[..kinds],
                &weights[..kinds],
                true,
            )
        });
        StepReport::new(16, 2, "candidates1000".into(), 10, 1, rank, echo)
    }

    #[test]
    fn cpu_per_call_and_its_ratio_to_echo() {
        use crate::loadgen::cpu::CpuSample;
        let seconds = |client: u64, server: Option<u64>| CpuSample {
            load_generator: Duration::from_secs(client),
            server: server.map(Duration::from_secs),
        };
        // Rank: 3 000 calls, 0.3 s of load generator and 0.6 s of server CPU: 100 + 200 us.
        let mut rank_result = result(800, 3_000, &[], 1);
        rank_result.cpu_window = Some((
            seconds(1, Some(10)),
            CpuSample {
                load_generator: Duration::from_millis(1_300),
                server: Some(Duration::from_millis(10_600)),
            },
        ));
        let rank = TargetReport::new("rank", "a", rank_result, &[10_000.0], &[1.0], false);
        let cpu = rank.cpu.unwrap();
        assert!((cpu.load_generator_us_per_call - 100.0).abs() < 1e-6);
        assert!((cpu.server_us_per_call.unwrap() - 200.0).abs() < 1e-6);
        assert!((cpu.total_us_per_call.unwrap() - 300.0).abs() < 1e-6);
        // In-process Echo: 5 000 calls, 0.5 s in the load generator (client and server).
        let mut echo_result = result(400, 5_000, &[], 1);
        echo_result.cpu_window = Some((
            seconds(2, Some(10)),
            CpuSample {
                load_generator: Duration::from_millis(2_500),
                server: Some(Duration::from_secs(99)),
            },
        ));
        let echo = TargetReport::new("echo", "in-process", echo_result, &[10_000.0], &[1.0], true);
        assert_eq!(echo.cpu.unwrap().server_us_per_call, None);
        let step = StepReport::new(16, 2, "candidates1000".into(), 10, 1, rank, Some(echo));
        assert!((step.cpu_per_call_ratio_vs_echo.unwrap() - 3.0).abs() < 1e-6);
        let value: serde_json::Value = serde_json::from_str(&step.to_json_line()).unwrap();
        assert!(
            (value["rank"]["cpu"]["server_us_per_call"].as_f64().unwrap() - 200.0).abs() < 1e-6
        );
        assert!(value["echo"]["cpu"]["server_us_per_call"].is_null());
        let rows = table_rows(&step);
        assert!(
            rows.contains(
                "rank cpu per call: load generator 100.0 us, server 200.0 us, total 300.0 us"
            ),
            "{rows}"
        );
        assert!(
            rows.contains(
                "echo cpu per call: load generator 100.0 us, server - us, total 100.0 us"
            ),
            "{rows}"
        );
        assert!(
            rows.contains("rank/echo cpu per call 3.00x (throughput ratio at most 0.33x"),
            "{rows}"
        );
        // Without metering, none of it appears.
        assert!(step_without_cpu_has_no_cpu_fields());
    }

    fn step_without_cpu_has_no_cpu_fields() -> bool {
        let plain = step(true, 1, &[]);
        let value: serde_json::Value = serde_json::from_str(&plain.to_json_line()).unwrap();
        value["rank"].get("cpu").is_none()
            && value.get("cpu_per_call_ratio_vs_echo").is_none()
            && !table_rows(&plain).contains("cpu per call")
    }

    #[test]
    fn ratios_divide_rank_by_echo() {
        let report = step(true, 1, &[]);
        assert_eq!(report.throughput_ratio_vs_echo, Some(0.6));
        assert_eq!(report.p50_latency_ratio_vs_echo, Some(2.0));
        assert_eq!(report.p99_latency_ratio_vs_echo, Some(2.0));
        let without = step(false, 1, &[]);
        assert_eq!(without.throughput_ratio_vs_echo, None);
        assert_eq!(without.p95_latency_ratio_vs_echo, None);
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
    }

    #[test]
    fn json_line_has_one_object_with_the_documented_fields() {
        let report = step(true, 2, &[tonic::Status::unavailable("gone")]);
        let line = report.to_json_line();
        assert!(!line.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["concurrency"], 16);
        assert_eq!(value["throughput_ratio_vs_echo"], 0.6);
        assert_eq!(value["rank"]["target"], "rank");
        assert_eq!(value["rank"]["requests_ok"], 3_000);
        assert_eq!(value["rank"]["throughput_rps"], 1_500.0);
        assert_eq!(value["rank"]["latency"]["p99_us"], 800.0);
        assert_eq!(value["rank"]["errors"]["UNAVAILABLE"], 1);
        assert_eq!(value["rank"]["error_messages"]["UNAVAILABLE"], "gone");
        assert_eq!(value["rank"]["kinds"][1]["kind"], "catalog");
        assert_eq!(value["rank"]["request_bytes"], 8_020.0);
        assert_eq!(value["echo"]["throughput_rps"], 2_500.0);
        assert!(value["echo"].get("error_messages").is_none());
        assert_eq!(value["rank"]["server_timings"]["mean_score_us"], 100.0);
        assert_eq!(value["rank"]["server_timings"]["samples"], 3_000);

        let single =
            serde_json::from_str::<serde_json::Value>(&step(false, 1, &[]).to_json_line()).unwrap();
        assert!(single["rank"].get("kinds").is_none());
        assert!(single["echo"].is_null());
        assert!(single["throughput_ratio_vs_echo"].is_null());
    }

    #[test]
    fn table_rows_line_up_with_the_header_and_show_errors() {
        let report = step(true, 2, &[tonic::Status::unavailable("gone")]);
        let header = table_header();
        let rows = table_rows(&report);
        let lines: Vec<&str> = rows.lines().collect();
        // echo all + 2 kinds + server line, rank all + 2 kinds + server line, rank error,
        // ratio.
        assert_eq!(lines.len(), 10, "{rows}");
        assert!(
            rows.contains("rank server time: total p50 0.149 p99 0.296 mean 0.1"),
            "{rows}"
        );
        assert!(rows.contains("score 0.100"), "{rows}");
        for line in lines.iter().filter(|line| line.contains("  all ")) {
            assert_eq!(line.len(), header.len(), "{line}");
        }
        let rank_all = lines
            .iter()
            .find(|line| line.contains("rank   all"))
            .unwrap();
        for field in ["3000", "1500.0", "0.800", "8020", "500"] {
            assert!(rank_all.contains(field), "{field} missing from {rank_all}");
        }
        assert!(rows.contains("rank error UNAVAILABLE x1: gone"), "{rows}");
        let ratio_line = lines.last().unwrap();
        assert!(ratio_line.contains("rank/echo"));
        assert!(ratio_line.contains("0.60x") && ratio_line.contains("2.00x"));

        let no_echo = table_rows(&step(false, 1, &[]));
        assert_eq!(no_echo.lines().count(), 2);
        assert!(!no_echo.contains("rank/echo"));
    }

    #[test]
    fn missing_latencies_print_as_dashes() {
        let mut report = step(false, 1, &[]);
        report.rank.outcome.latency = None;
        let rows = table_rows(&report);
        assert!(rows.contains(" - "), "{rows}");
        assert_eq!(millis(Some(1_234.4)), "1.234");
        assert_eq!(times(Some(0.6049)), "0.60x");
    }
}
