//! The closed loop: `concurrency` callers, each sending its next request as soon as the
//! previous one is answered, spread over a few HTTP/2 connections, for a warm-up and then a
//! measured window of fixed duration or fixed request count.
//!
//! Latency is measured from just before the call is handed to the channel (so client-side
//! queueing counts) to the arrival of the whole response. A call counts in the window when
//! it completes inside it. Like every closed-loop generator this measures service time at
//! a given concurrency, not latency under an open arrival rate (no coordinated-omission
//! correction applies).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tonic::client::Grpc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

use crate::error::LoadgenError;
use crate::loadgen::codec::{MAX_WORKER_INDEX, PreEncoded, RawCodec, RequestId, ResponseInfo};
use crate::loadgen::cpu::{CpuMeter, CpuSample};
use crate::loadgen::mix::{Mix, RequestKind};
use crate::loadgen::parse::{MAX_CONCURRENCY, MAX_CONNECTIONS, MAX_PHASE, MAX_REQUESTS_PER_STEP};
use crate::loadgen::stats::{ErrorTally, Outcome, ServerSamples};

/// gRPC path of `fairrank.v1.Ranker/Rank`.
pub const RANK_PATH: &str = "/fairrank.v1.Ranker/Rank";

/// gRPC path of `fairrank.bench.v1.Echo/Echo`.
pub const ECHO_PATH: &str = "/fairrank.bench.v1.Echo/Echo";

/// Opens `count` HTTP/2 connections (one tonic channel each) to a loopback server.
pub async fn connect(
    addr: &str,
    count: usize,
    timeout: Duration,
) -> Result<Vec<Channel>, LoadgenError> {
    if count == 0 || count > MAX_CONNECTIONS {
        return Err(LoadgenError::invalid(
            "--connections",
            count.to_string(),
            format!("must be in 1..={MAX_CONNECTIONS}"),
        ));
    }
    let uri = crate::loadgen::parse::loopback_uri(addr)?;
    let connect_error = |source| LoadgenError::Connect {
        addr: addr.to_owned(),
        source,
    };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(connect_error)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout);
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        channels.push(endpoint.connect().await.map_err(connect_error)?);
    }
    Ok(channels)
}

/// The requests of one target: the method and the pre-encoded messages of each kind.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The gRPC method path, e.g. [`RANK_PATH`].
    pub path: PathAndQuery,
    /// Whether each call gets a fresh request id (Rank) or is sent as is (Echo).
    pub fresh_request_ids: bool,
    /// Top-level response field holding the server's `StageTimings`, if any
    /// ([`crate::loadgen::codec::RANK_RESPONSE_TIMINGS_FIELD`] for Rank, `None` for Echo).
    pub timings_field: Option<u32>,
    /// The mix choosing a kind per call.
    pub mix: Mix,
    /// Pre-encoded messages per kind, in the mix's kind order; each non-empty.
    pub bodies: Vec<Vec<Bytes>>,
}

impl Workload {
    /// Checks that there is a non-empty template list per kind of the mix.
    fn validate(&self) -> Result<(), LoadgenError> {
        if self.bodies.len() != self.mix.kinds().len() || self.bodies.iter().any(Vec::is_empty) {
            return Err(LoadgenError::invalid(
                "workload",
                self.mix.to_string(),
                "needs at least one template per kind of the mix",
            ));
        }
        Ok(())
    }
}

/// When the measured window of a step ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRule {
    /// After this long.
    Duration(Duration),
    /// After this many completed calls (successful or not).
    Requests(u64),
}

/// Settings of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepConfig {
    /// Number of concurrent callers.
    pub concurrency: usize,
    /// Calls before the measured window, discarded.
    pub warmup: Duration,
    /// End of the measured window.
    pub stop: StopRule,
    /// Seed of the callers' kind and template choices.
    pub seed: u64,
    /// Samples CPU time at the measured window's start and end; `None` skips it.
    pub cpu_meter: Option<CpuMeter>,
}

impl StepConfig {
    fn validate(&self) -> Result<(), LoadgenError> {
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY.min(MAX_WORKER_INDEX + 1) {
            return Err(LoadgenError::invalid(
                "--concurrency",
                self.concurrency.to_string(),
                format!("must be in 1..={MAX_CONCURRENCY}"),
            ));
        }
        if self.warmup > MAX_PHASE {
            return Err(LoadgenError::invalid(
                "--warmup",
                format!("{:?}", self.warmup),
                format!("at most {} s", MAX_PHASE.as_secs()),
            ));
        }
        match self.stop {
            StopRule::Duration(duration) if duration.is_zero() || duration > MAX_PHASE => {
                Err(LoadgenError::invalid(
                    "--duration",
                    format!("{duration:?}"),
                    format!("must be positive and at most {} s", MAX_PHASE.as_secs()),
                ))
            }
            StopRule::Requests(count) if count == 0 || count > MAX_REQUESTS_PER_STEP => {
                Err(LoadgenError::invalid(
                    "--requests",
                    count.to_string(),
                    format!("must be in 1..={MAX_REQUESTS_PER_STEP}"),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// The measured outcome of one step against one target.
#[derive(Debug, Clone, PartialEq)]
pub struct StepResult {
    /// Length of the measured window.
    pub window: Duration,
    /// Whether the window was cut short by [`MAX_REQUESTS_PER_STEP`] or [`MAX_PHASE`].
    pub truncated: bool,
    /// All kinds together.
    pub overall: Outcome,
    /// Per kind of the mix, in its order.
    pub per_kind: Vec<(RequestKind, Outcome)>,
    /// First message seen per error label.
    pub error_messages: std::collections::BTreeMap<String, String>,
    /// CPU time at the window's start and end (when the step had a meter): the end is read
    /// when the window's time is up, or, with a request count, when the callers stop.
    pub cpu_window: Option<(CpuSample, CpuSample)>,
}

/// State shared by the callers of a step.
#[derive(Debug)]
struct Shared {
    workload: Workload,
    measure_start: Instant,
    /// End of the window in duration mode; the hard limit otherwise.
    measure_end: Instant,
    /// `Some(n)`: stop after n completions in the window.
    request_limit: Option<u64>,
    completed_in_window: AtomicU64,
    stop: AtomicBool,
    truncated: AtomicBool,
    nonce: u64,
}

/// What one caller measured.
#[derive(Debug, Default)]
struct WorkerRecord {
    latencies_nanos: Vec<Vec<u64>>,
    errors: Vec<ErrorTally>,
    response_bytes: Vec<u64>,
    server: Vec<ServerSamples>,
    last_completion: Option<Instant>,
}

/// Runs one step: `config.concurrency` callers over `channels` (caller `i` uses channel
/// `i % channels.len()`).
pub async fn run_step(
    channels: &[Channel],
    workload: Workload,
    config: &StepConfig,
) -> Result<StepResult, LoadgenError> {
    config.validate()?;
    workload.validate()?;
    if channels.is_empty() {
        return Err(LoadgenError::invalid(
            "--connections",
            "0",
            "need at least one connection",
        ));
    }
    let kinds: Vec<RequestKind> = workload.mix.kinds().to_vec();
    let step_start = Instant::now();
    let measure_start = step_start + config.warmup;
    let (measure_end, request_limit) = match config.stop {
        StopRule::Duration(duration) => (measure_start + duration, None),
        StopRule::Requests(count) => (measure_start + MAX_PHASE, Some(count)),
    };
    let shared = Arc::new(Shared {
        workload,
        measure_start,
        measure_end,
        request_limit,
        completed_in_window: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        truncated: AtomicBool::new(false),
        nonce: rand::random(),
    });

    // The meter runs on this runtime next to the callers: it wakes at the window's edges
    // (a timer's lateness of a millisecond or so is noise against windows of seconds).
    let cpu_sampler = config.cpu_meter.map(|meter| {
        let stop = config.stop;
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_start.into()).await;
            let start = meter.sample();
            let end = match stop {
                StopRule::Duration(_) => {
                    tokio::time::sleep_until(measure_end.into()).await;
                    Some(meter.sample())
                }
                StopRule::Requests(_) => None,
            };
            (meter, start, end)
        })
    });

    let mut tasks = Vec::with_capacity(config.concurrency);
    for worker in 0..config.concurrency {
        let grpc = Grpc::new(channels[worker % channels.len()].clone())
            .max_decoding_message_size(64 * 1024 * 1024);
        let shared = Arc::clone(&shared);
        let seed = config.seed ^ (worker as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        tasks.push(tokio::spawn(caller(grpc, shared, worker, seed)));
    }
    let mut merged_latencies: Vec<Vec<u64>> = vec![Vec::new(); kinds.len()];
    let mut merged_errors: Vec<ErrorTally> = vec![ErrorTally::default(); kinds.len()];
    let mut merged_bytes = vec![0_u64; kinds.len()];
    let mut merged_server: Vec<ServerSamples> = vec![ServerSamples::default(); kinds.len()];
    let mut last_completion: Option<Instant> = None;
    for task in tasks {
        let record = task
            .await
            .map_err(|error| LoadgenError::Worker(error.to_string()))?;
        for (index, latencies) in record.latencies_nanos.into_iter().enumerate() {
            merged_latencies[index].extend(latencies);
        }
        for (index, errors) in record.errors.into_iter().enumerate() {
            merged_errors[index].merge(errors);
        }
        for (index, bytes) in record.response_bytes.into_iter().enumerate() {
            merged_bytes[index] += bytes;
        }
        for (index, server) in record.server.iter().enumerate() {
            merged_server[index].merge(server);
        }
        last_completion = last_completion.max(record.last_completion);
    }

    let cpu_window = match cpu_sampler {
        None => None,
        Some(sampler) => {
            // Callers only stop inside or after the window, so the start sample is taken.
            let (meter, start, end) = sampler
                .await
                .map_err(|error| LoadgenError::Worker(error.to_string()))?;
            Some((start, end.unwrap_or_else(|| meter.sample())))
        }
    };
    let truncated = shared.truncated.load(Ordering::Relaxed);
    let window = match (config.stop, truncated) {
        (StopRule::Duration(duration), false) => duration,
        _ => last_completion.map_or(Duration::ZERO, |last| {
            last.saturating_duration_since(measure_start)
        }),
    };
    let mut all_latencies: Vec<u64> = merged_latencies.iter().flatten().copied().collect();
    let mut all_errors = ErrorTally::default();
    let mut all_server = ServerSamples::default();
    for (errors, server) in merged_errors.iter().zip(&merged_server) {
        all_errors.merge(errors.clone());
        all_server.merge(server);
    }
    let overall = Outcome::summarize(
        &mut all_latencies,
        &all_errors,
        merged_bytes.iter().sum(),
        &mut all_server,
        window,
    );
    let per_kind = kinds
        .iter()
        .zip(merged_latencies.iter_mut())
        .zip(merged_errors.iter().zip(&merged_bytes))
        .zip(merged_server.iter_mut())
        .map(|(((&kind, latencies), (errors, &bytes)), server)| {
            (
                kind,
                Outcome::summarize(latencies, errors, bytes, server, window),
            )
        })
        .collect();
    Ok(StepResult {
        window,
        truncated,
        overall,
        per_kind,
        error_messages: all_errors.first_messages(),
        cpu_window,
    })
}

/// One closed-loop caller.
async fn caller(
    mut grpc: Grpc<Channel>,
    shared: Arc<Shared>,
    worker: usize,
    seed: u64,
) -> WorkerRecord {
    let workload = &shared.workload;
    let kind_count = workload.bodies.len();
    let mut record = WorkerRecord {
        latencies_nanos: vec![Vec::new(); kind_count],
        errors: vec![ErrorTally::default(); kind_count],
        response_bytes: vec![0; kind_count],
        server: vec![ServerSamples::default(); kind_count],
        last_completion: None,
    };
    let codec = RawCodec {
        timings_field: workload.timings_field,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut sequence = 0_u64;
    loop {
        if shared.stop.load(Ordering::Relaxed) || Instant::now() >= shared.measure_end {
            break;
        }
        let kind = if kind_count > 1 {
            workload.mix.pick(rng.random::<f64>())
        } else {
            0
        };
        let templates = &workload.bodies[kind];
        let body = templates[rng.random_range(0..templates.len())].clone();
        let request_id = workload
            .fresh_request_ids
            .then(|| RequestId::new(shared.nonce, worker, sequence));
        sequence += 1;
        let request = tonic::Request::new(PreEncoded { request_id, body });

        let started = Instant::now();
        let result = match grpc.ready().await {
            Ok(()) => grpc
                .unary::<_, ResponseInfo, _>(request, workload.path.clone(), codec)
                .await
                .map(tonic::Response::into_inner),
            Err(error) => Err(tonic::Status::unavailable(format!(
                "channel not ready: {error}"
            ))),
        };
        let completed = Instant::now();

        if completed < shared.measure_start {
            continue;
        }
        if completed >= shared.measure_end {
            if shared.request_limit.is_some() {
                shared.truncated.store(true, Ordering::Relaxed);
            }
            break;
        }
        let index = shared.completed_in_window.fetch_add(1, Ordering::Relaxed);
        let limit = shared.request_limit.unwrap_or(MAX_REQUESTS_PER_STEP);
        if index >= limit {
            // Another caller already completed the last call of the window.
            break;
        }
        if index + 1 == limit {
            shared.stop.store(true, Ordering::Relaxed);
            if shared.request_limit.is_none() {
                // Duration mode hit the sample cap before the window's end.
                shared.truncated.store(true, Ordering::Relaxed);
            }
        }
        match result {
            Ok(response) => {
                let nanos =
                    u64::try_from(completed.duration_since(started).as_nanos()).unwrap_or(u64::MAX);
                record.latencies_nanos[kind].push(nanos);
                record.response_bytes[kind] += response.encoded_len as u64;
                if let Some(timings) = &response.timings {
                    record.server[kind].record(timings);
                }
            }
            Err(status) => record.errors[kind].record(&status),
        }
        record.last_completion = Some(completed);
    }
    record
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::loadgen::echo::EchoServerHandle;
    use crate::loadgen::requests::{echo_response_len, echo_template};

    fn echo_workload(mix: &str, sizes: &[(usize, usize)]) -> Workload {
        Workload {
            path: PathAndQuery::from_static(ECHO_PATH),
            fresh_request_ids: false,
            timings_field: None,
            mix: Mix::parse(mix).unwrap(),
            bodies: sizes
                .iter()
                .map(|&(request, response)| {
                    vec![Bytes::from(
                        echo_template(request, response).unwrap().encode_to_vec(),
                    )]
                })
                .collect(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_loop_against_the_in_process_echo_for_half_a_second() {
        let server = EchoServerHandle::start(1).unwrap();
        let channels = connect(&server.uri(), 2, Duration::from_secs(5))
            .await
            .unwrap();
        let sizes = [(10_500, 700), (120, 4_000)];
        let workload = echo_workload("candidates1000:0.7,catalog:0.3", &sizes);
        let config = StepConfig {
            concurrency: 4,
            warmup: Duration::from_millis(100),
            stop: StopRule::Duration(Duration::from_millis(400)),
            seed: 3,
            // The in-process Echo server doubles as "the server" of the meter.
            cpu_meter: Some(crate::loadgen::cpu::CpuMeter::new(Some(std::process::id())).unwrap()),
        };
        let result = run_step(&channels, workload, &config).await.unwrap();
        let (cpu_start, cpu_end) = result.cpu_window.unwrap();
        assert!(cpu_end.load_generator > cpu_start.load_generator);
        assert!(cpu_end.server.is_some());

        assert_eq!(result.window, Duration::from_millis(400));
        assert!(!result.truncated);
        let overall = &result.overall;
        assert!(overall.requests_ok > 0);
        assert_eq!(overall.requests_failed, 0, "{:?}", result.error_messages);
        let expected_rps = overall.requests_ok as f64 / 0.4;
        assert!((overall.throughput_rps - expected_rps).abs() < 1e-6);
        let latency = overall.latency.unwrap();
        assert!(latency.p50_us > 0.0);
        assert!(latency.p50_us <= latency.p95_us);
        assert!(latency.p95_us <= latency.p99_us);
        assert!(latency.p99_us <= latency.p999_us);
        assert!(latency.p999_us <= latency.max_us);
        // Each kind got its own response size, and the kinds add up to the total.
        assert_eq!(result.per_kind.len(), 2);
        let mut sum = 0;
        for ((kind, outcome), (request, response)) in result.per_kind.iter().zip(sizes) {
            assert!(outcome.requests_ok > 0, "{kind} never sent");
            let echo = echo_template(request, response).unwrap();
            assert_eq!(outcome.mean_response_bytes, echo_response_len(&echo) as f64);
            sum += outcome.requests_ok;
        }
        assert_eq!(sum, overall.requests_ok);
        // 70/30 mix: the first kind is the more frequent one.
        assert!(result.per_kind[0].1.requests_ok > result.per_kind[1].1.requests_ok);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn request_count_mode_stops_at_the_count_and_tallies_errors() {
        let server = EchoServerHandle::start(1).unwrap();
        let channels = connect(&server.uri(), 1, Duration::from_secs(5))
            .await
            .unwrap();
        let good = StepConfig {
            concurrency: 3,
            warmup: Duration::ZERO,
            stop: StopRule::Requests(150),
            seed: 1,
            cpu_meter: Some(crate::loadgen::cpu::CpuMeter::new(None).unwrap()),
        };
        let result = run_step(&channels, echo_workload("catalog", &[(64, 64)]), &good)
            .await
            .unwrap();
        assert_eq!(result.overall.requests_ok, 150);
        let (cpu_start, cpu_end) = result.cpu_window.unwrap();
        assert!(cpu_end.load_generator >= cpu_start.load_generator);
        assert_eq!(cpu_end.server, None);
        assert!(result.window > Duration::ZERO);

        // Asking for more than the Echo service's 4 MiB limit fails every call.
        let mut too_large = echo_workload("catalog", &[(64, 64)]);
        let request = api::fairrank::bench::v1::EchoRequest {
            payload: Bytes::new(),
            response_bytes: Some(5 << 20),
        };
        too_large.bodies = vec![vec![Bytes::from(request.encode_to_vec())]];
        let result = run_step(
            &channels,
            too_large,
            &StepConfig {
                stop: StopRule::Requests(40),
                ..good.clone()
            },
        )
        .await
        .unwrap();
        assert_eq!(result.overall.requests_ok, 0);
        assert_eq!(result.overall.requests_failed, 40);
        assert_eq!(result.overall.errors["INVALID_ARGUMENT"], 40);
        assert!(result.error_messages["INVALID_ARGUMENT"].contains("response_bytes"));
        assert!(result.overall.latency.is_none());
        assert_eq!(result.overall.throughput_rps, 0.0);
    }

    #[tokio::test]
    async fn bad_settings_are_refused_before_any_call() {
        let server = EchoServerHandle::start(1).unwrap();
        let channels = connect(&server.uri(), 1, Duration::from_secs(5))
            .await
            .unwrap();
        let config = StepConfig {
            concurrency: 1,
            warmup: Duration::ZERO,
            stop: StopRule::Requests(1),
            seed: 1,
            cpu_meter: None,
        };
        for bad in [
            StepConfig {
                concurrency: 0,
                ..config.clone()
            },
            StepConfig {
                stop: StopRule::Requests(0),
                ..config.clone()
            },
            StepConfig {
                stop: StopRule::Duration(Duration::ZERO),
                ..config.clone()
            },
            StepConfig {
                warmup: MAX_PHASE * 2,
                ..config.clone()
            },
        ] {
            let workload = echo_workload("catalog", &[(64, 64)]);
            assert!(
                run_step(&channels, workload, &bad).await.is_err(),
                "{bad:?}"
            );
        }
        let mut empty = echo_workload("catalog", &[(64, 64)]);
        empty.bodies[0].clear();
        assert!(run_step(&channels, empty, &config).await.is_err());
        assert!(
            run_step(&[], echo_workload("catalog", &[(64, 64)]), &config)
                .await
                .is_err()
        );
        assert!(
            connect("http://10.1.2.3:50051", 1, Duration::from_secs(1))
                .await
                .is_err()
        );
        assert!(
            connect(&server.uri(), 0, Duration::from_secs(1))
                .await
                .is_err()
        );
    }
}
