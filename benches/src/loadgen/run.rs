//! A whole load-generator run: build the templates, probe every request kind once (which
//! also measures the real response size), set up the Echo baseline with the same message
//! sizes, then run Echo and Rank at each concurrency and report each step.

use std::time::{Duration, Instant};

use api::fairrank::bench::v1::echo_client::EchoClient;
use api::fairrank::v1::ranker_client::RankerClient;
use prost::Message;
use prost::bytes::Bytes;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

use crate::error::LoadgenError;
use crate::loadgen::closed_loop::{
    ECHO_PATH, RANK_PATH, StepConfig, StopRule, Workload, connect, run_step,
};
use crate::loadgen::codec::RANK_RESPONSE_TIMINGS_FIELD;
use crate::loadgen::cpu::CpuMeter;
use crate::loadgen::echo::EchoServerHandle;
use crate::loadgen::mix::{Mix, RequestKind};
use crate::loadgen::parse::{MAX_CONCURRENCY, MAX_CONNECTIONS};
use crate::loadgen::report::{StepReport, TargetReport};
use crate::loadgen::requests::{
    KindTemplates, RequestSpec, build_rank_templates, echo_response_len, echo_template,
};

/// Where the Echo baseline comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EchoBaseline {
    /// The load generator's own Echo server on `127.0.0.1:0`, on its own runtime.
    InProcess {
        /// Worker threads of the Echo server's runtime.
        threads: usize,
    },
    /// The `fairrank.bench.v1.Echo` service of a running server at this address.
    External(String),
    /// No baseline.
    Off,
}

/// Everything a run needs.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// Address of the fairrank server (loopback only), e.g. `http://127.0.0.1:50051`.
    pub addr: String,
    /// The Echo baseline.
    pub echo: EchoBaseline,
    /// The request mix.
    pub mix: Mix,
    /// Concurrency of each step, in order.
    pub concurrency: Vec<usize>,
    /// HTTP/2 connections per target (a step with fewer callers uses fewer).
    pub connections: usize,
    /// Warm-up before each measured window.
    pub warmup: Duration,
    /// Length of each measured window.
    pub stop: StopRule,
    /// Deadline of every call.
    pub timeout: Duration,
    /// What the Rank requests look like.
    pub spec: RequestSpec,
    /// Worker threads of the runtime the caller runs this on (reported only).
    pub client_threads: usize,
    /// Seed of the callers' choices.
    pub seed: u64,
    /// Process id of the server at `addr`, to report its CPU per call (`/proc/<pid>/stat`).
    pub server_pid: Option<u32>,
}

/// What the probe call of one request kind returned.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    /// The kind.
    pub kind: RequestKind,
    /// Encoded size of the probe request, in bytes.
    pub request_bytes: usize,
    /// Encoded size of its response, in bytes.
    pub response_bytes: usize,
    /// Items in the answer.
    pub items_returned: usize,
    /// Items the server scored.
    pub scored_items: u32,
    /// Whether the answer was personalized.
    pub personalized: bool,
    /// Round-trip time of the probe.
    pub latency: Duration,
}

/// Sends the probe request of every kind once; fails with the server's status on the first
/// kind that does not succeed.
pub async fn probe_rank(
    channel: Channel,
    addr: &str,
    templates: &[KindTemplates],
    timeout: Duration,
) -> Result<Vec<ProbeReport>, LoadgenError> {
    let mut client = RankerClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut reports = Vec::with_capacity(templates.len());
    for kind_templates in templates {
        let mut request = tonic::Request::new(kind_templates.probe.clone());
        request.set_timeout(timeout);
        let started = Instant::now();
        let response = client
            .rank(request)
            .await
            .map_err(|status| LoadgenError::Probe {
                kind: kind_templates.kind.to_string(),
                addr: addr.to_owned(),
                code: status.code(),
                message: status.message().to_owned(),
            })?
            .into_inner();
        reports.push(ProbeReport {
            kind: kind_templates.kind,
            request_bytes: kind_templates.probe.encoded_len(),
            response_bytes: response.encoded_len(),
            items_returned: response.items.len(),
            scored_items: response.scored_items,
            personalized: response.personalized,
            latency: started.elapsed(),
        });
    }
    Ok(reports)
}

/// Builds the Echo bodies (one per kind, same sizes as Rank's) and checks with one call per
/// kind that the Echo service answers with the expected size.
async fn prepare_echo(
    channel: Channel,
    addr: &str,
    templates: &[KindTemplates],
    probes: &[ProbeReport],
    timeout: Duration,
) -> Result<Vec<Vec<Bytes>>, LoadgenError> {
    let mut client = EchoClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut bodies = Vec::with_capacity(templates.len());
    for (kind_templates, probe) in templates.iter().zip(probes) {
        let request_bytes = kind_templates.mean_request_bytes.round() as usize;
        let echo = echo_template(request_bytes, probe.response_bytes)?;
        let expected_response = echo_response_len(&echo);
        let mut request = tonic::Request::new(echo.clone());
        request.set_timeout(timeout);
        let probe_error = |code, message| LoadgenError::Probe {
            kind: format!("echo {}", kind_templates.kind),
            addr: addr.to_owned(),
            code,
            message,
        };
        let response = client
            .echo(request)
            .await
            .map_err(|status| probe_error(status.code(), status.message().to_owned()))?
            .into_inner();
        if response.encoded_len() != expected_response {
            return Err(probe_error(
                tonic::Code::Unknown,
                format!(
                    "answered {} bytes instead of {expected_response}",
                    response.encoded_len()
                ),
            ));
        }
        bodies.push(vec![Bytes::from(echo.encode_to_vec())]);
    }
    Ok(bodies)
}

/// Runs every step of `config`, calling `on_step` as each finishes, and returns the
/// reports. `on_probe` receives the probe results before the first step.
pub async fn run(
    config: &RunConfig,
    mut on_probe: impl FnMut(&[ProbeReport]),
    mut on_step: impl FnMut(&StepReport),
) -> Result<Vec<StepReport>, LoadgenError> {
    if config.concurrency.is_empty() {
        return Err(LoadgenError::invalid(
            "--concurrency",
            "",
            "needs at least one value",
        ));
    }
    if config.connections == 0 || config.connections > MAX_CONNECTIONS {
        return Err(LoadgenError::invalid(
            "--connections",
            config.connections.to_string(),
            format!("must be in 1..={MAX_CONNECTIONS}"),
        ));
    }
    if let Some(&bad) = config
        .concurrency
        .iter()
        .find(|&&value| value == 0 || value > MAX_CONCURRENCY)
    {
        return Err(LoadgenError::invalid(
            "--concurrency",
            bad.to_string(),
            format!("must be in 1..={MAX_CONCURRENCY}"),
        ));
    }
    let cpu_meter = CpuMeter::new(config.server_pid)?;
    let templates = build_rank_templates(&config.spec, &config.mix)?;
    let max_used_connections = config
        .connections
        .min(config.concurrency.iter().copied().max().unwrap_or(1));
    let rank_channels = connect(&config.addr, max_used_connections, config.timeout).await?;
    let probes = probe_rank(
        rank_channels[0].clone(),
        &config.addr,
        &templates,
        config.timeout,
    )
    .await?;
    on_probe(&probes);

    // Keep the in-process server alive for the whole run.
    let mut _echo_server = None;
    let echo_addr = match &config.echo {
        EchoBaseline::Off => None,
        EchoBaseline::External(addr) => Some((addr.clone(), addr.clone())),
        EchoBaseline::InProcess { threads } => {
            let server = EchoServerHandle::start(*threads)?;
            let uri = server.uri();
            _echo_server = Some(server);
            Some((uri, "in-process".to_owned()))
        }
    };
    let echo = match echo_addr {
        None => None,
        Some((uri, label)) => {
            let channels = connect(&uri, max_used_connections, config.timeout).await?;
            let bodies = prepare_echo(
                channels[0].clone(),
                &uri,
                &templates,
                &probes,
                config.timeout,
            )
            .await?;
            Some((channels, bodies, label))
        }
    };

    let request_bytes: Vec<f64> = templates
        .iter()
        .map(|kind_templates| kind_templates.mean_request_bytes)
        .collect();
    let echo_request_bytes: Vec<f64> = echo
        .as_ref()
        .map(|(_, bodies, _)| {
            bodies
                .iter()
                .map(|kind_bodies| kind_bodies.first().map_or(0.0, |body| body.len() as f64))
                .collect()
        })
        .unwrap_or_default();
    let rank_bodies: Vec<Vec<Bytes>> = templates
        .into_iter()
        .map(|kind_templates| kind_templates.bodies)
        .collect();
    let weights = config.mix.weights();

    let mut reports = Vec::with_capacity(config.concurrency.len());
    for (step_index, &concurrency) in config.concurrency.iter().enumerate() {
        let connections = config.connections.min(concurrency);
        let step = StepConfig {
            concurrency,
            warmup: config.warmup,
            stop: config.stop,
            seed: config.seed.wrapping_add(step_index as u64),
            cpu_meter: Some(cpu_meter),
        };
        let echo_report = match &echo {
            None => None,
            Some((channels, bodies, label)) => {
                let workload = Workload {
                    path: PathAndQuery::from_static(ECHO_PATH),
                    fresh_request_ids: false,
                    timings_field: None,
                    mix: config.mix.clone(),
                    bodies: bodies.clone(),
                };
                // The server pid belongs to `addr`: an Echo elsewhere has no server figure.
                let echo_meter = match &config.echo {
                    EchoBaseline::External(addr) if *addr != config.addr => {
                        Some(cpu_meter.without_server())
                    }
                    _ => Some(cpu_meter),
                };
                let echo_step = StepConfig {
                    cpu_meter: echo_meter,
                    ..step.clone()
                };
                let result = run_step(&channels[..connections], workload, &echo_step).await?;
                Some(TargetReport::new(
                    "echo",
                    label,
                    result,
                    &echo_request_bytes,
                    weights,
                    matches!(config.echo, EchoBaseline::InProcess { .. }),
                ))
            }
        };
        let workload = Workload {
            path: PathAndQuery::from_static(RANK_PATH),
            fresh_request_ids: true,
            timings_field: Some(RANK_RESPONSE_TIMINGS_FIELD),
            mix: config.mix.clone(),
            bodies: rank_bodies.clone(),
        };
        let result = run_step(&rank_channels[..connections], workload, &step).await?;
        let rank_report =
            TargetReport::new("rank", &config.addr, result, &request_bytes, weights, false);
        let report = StepReport::new(
            concurrency,
            connections,
            config.mix.to_string(),
            config.spec.k,
            config.client_threads,
            rank_report,
            echo_report,
        );
        on_step(&report);
        reports.push(report);
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use api::fairrank::v1::ranker_server::{Ranker, RankerServer};
    use api::fairrank::v1::{
        RankBatchRequest, RankBatchResponse, RankRequest, RankResponse, RankedItem, StageTimings,
    };
    use tonic::{Request, Response, Status};

    use super::*;
    use crate::loadgen::requests::UserSource;

    /// A stand-in Ranker that checks what the load generator sends: unique request ids,
    /// candidate lists of the mix's sizes, user ids in range.
    #[derive(Debug, Clone, Default)]
    struct FakeRanker {
        seen_ids: Arc<Mutex<HashSet<String>>>,
        calls: Arc<Mutex<u64>>,
        candidate_counts: Arc<Mutex<HashSet<usize>>>,
    }

    #[tonic::async_trait]
    impl Ranker for FakeRanker {
        async fn rank(
            &self,
            request: Request<RankRequest>,
        ) -> Result<Response<RankResponse>, Status> {
            let request = request.into_inner();
            *self
                .calls
                .lock()
                .map_err(|_| Status::internal("poisoned"))? += 1;
            let fresh = self
                .seen_ids
                .lock()
                .map_err(|_| Status::internal("poisoned"))?
                .insert(request.request_id.clone());
            if !fresh {
                return Err(Status::failed_precondition("request id reused"));
            }
            self.candidate_counts
                .lock()
                .map_err(|_| Status::internal("poisoned"))?
                .insert(request.candidate_ids.len());
            let pool: Vec<String> = if request.candidate_ids.is_empty() {
                (0..50).map(crate::loadgen::requests::item_id).collect()
            } else {
                request.candidate_ids.clone()
            };
            let items = pool
                .into_iter()
                .take(request.k as usize)
                .enumerate()
                .map(|(index, item_id)| RankedItem {
                    item_id,
                    rank: index as u32 + 1,
                    score: Some(1.0 / (index as f32 + 1.0)),
                    unconstrained_rank: index as u32 + 1,
                    ..Default::default()
                })
                .collect();
            Ok(Response::new(RankResponse {
                request_id: request.request_id,
                items,
                personalized: true,
                scored_items: request.candidate_ids.len() as u32,
                timings: Some(StageTimings {
                    total_us: 42,
                    score_us: 17,
                    ..Default::default()
                }),
                ..Default::default()
            }))
        }

        async fn rank_batch(
            &self,
            _request: Request<RankBatchRequest>,
        ) -> Result<Response<RankBatchResponse>, Status> {
            Err(Status::unimplemented("not in the fake"))
        }
    }

    async fn start_fake(ranker: FakeRanker) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RankerServer::new(ranker))
                .serve_with_incoming(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                ),
        );
        addr
    }

    fn config(addr: SocketAddr) -> RunConfig {
        RunConfig {
            addr: format!("http://{addr}"),
            echo: EchoBaseline::InProcess { threads: 1 },
            mix: Mix::parse("candidates100:1,catalog:1").unwrap(),
            concurrency: vec![1, 3],
            connections: 2,
            warmup: Duration::from_millis(20),
            stop: StopRule::Requests(120),
            timeout: Duration::from_secs(5),
            spec: RequestSpec {
                k: 10,
                pool_size: None,
                users: UserSource::Ids { count: 100 },
                items: 1_000,
                templates_per_kind: 8,
                seed: 5,
            },
            client_threads: 2,
            seed: 9,
            // The fake ranker runs in this process: it stands in for the server's pid.
            server_pid: Some(std::process::id()),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_probes_measures_echo_and_rank_and_reports_ratios() {
        let ranker = FakeRanker::default();
        let addr = start_fake(ranker.clone()).await;
        let mut probed = Vec::new();
        let mut streamed = 0;
        let reports = run(
            &config(addr),
            |probes| probed.extend_from_slice(probes),
            |_| streamed += 1,
        )
        .await
        .unwrap();

        assert_eq!(probed.len(), 2);
        for probe in &probed {
            assert_eq!(probe.items_returned, 10);
            assert!(probe.response_bytes > 0);
        }
        assert_eq!(streamed, 2);
        assert_eq!(reports.len(), 2);
        for (report, concurrency) in reports.iter().zip([1, 3]) {
            assert_eq!(report.concurrency, concurrency);
            assert_eq!(report.connections, concurrency.min(2));
            assert_eq!(report.rank.outcome.requests_ok, 120, "{:?}", report.rank);
            let echo = report.echo.as_ref().unwrap();
            assert_eq!(echo.outcome.requests_ok, 120);
            assert_eq!(echo.addr, "in-process");
            // The server's timings come through for Rank, not for Echo.
            let server = report.rank.outcome.server_timings.unwrap();
            assert_eq!(server.samples, 120);
            assert_eq!(server.total_p99_us, 42);
            assert_eq!(server.mean_score_us, 17.0);
            assert!(echo.outcome.server_timings.is_none());
            assert!(report.throughput_ratio_vs_echo.unwrap() > 0.0);
            assert!(report.p99_latency_ratio_vs_echo.unwrap() > 0.0);
            // CPU per call: Rank's server is this process (given as the pid), Echo's runs
            // inside the load generator; both totals are there, so is their ratio.
            let rank_cpu = report.rank.cpu.unwrap();
            assert!(rank_cpu.server_us_per_call.is_some());
            assert!(rank_cpu.total_us_per_call.unwrap() > 0.0);
            let echo_cpu = echo.cpu.unwrap();
            assert_eq!(echo_cpu.server_us_per_call, None);
            assert_eq!(
                echo_cpu.total_us_per_call,
                Some(echo_cpu.load_generator_us_per_call)
            );
            assert!(report.cpu_per_call_ratio_vs_echo.is_some());
            // Echo mirrors Rank's sizes, kind by kind.
            for (rank_kind, echo_kind) in report.rank.kinds.iter().zip(&echo.kinds) {
                assert_eq!(rank_kind.kind, echo_kind.kind);
                assert!((rank_kind.request_bytes - echo_kind.request_bytes).abs() <= 1.0);
                if rank_kind.outcome.requests_ok > 0 && echo_kind.outcome.requests_ok > 0 {
                    let rank_bytes = rank_kind.outcome.mean_response_bytes;
                    let echo_bytes = echo_kind.outcome.mean_response_bytes;
                    assert!(
                        (rank_bytes - echo_bytes).abs() <= 1.0,
                        "{rank_bytes} vs {echo_bytes}"
                    );
                }
            }
        }
        // Every call (probes, warm-up, measured) had its own id, and the sizes were the mix's.
        let calls = *ranker.calls.lock().unwrap();
        assert!(calls >= 2 + 240);
        assert_eq!(ranker.seen_ids.lock().unwrap().len() as u64, calls);
        let counts = ranker.candidate_counts.lock().unwrap().clone();
        assert_eq!(counts, HashSet::from([0, 100]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_probe_names_the_kind_and_the_status() {
        let addr = start_fake(FakeRanker::default()).await;
        let mut bad = config(addr);
        bad.spec.k = 0;
        assert!(matches!(
            run(&bad, |_| {}, |_| {}).await,
            Err(LoadgenError::InvalidArgument { .. })
        ));
        // Nothing listens on the Echo address: the run fails before any step.
        let mut no_echo_server = config(addr);
        no_echo_server.echo = EchoBaseline::External("http://127.0.0.1:1".into());
        assert!(run(&no_echo_server, |_| {}, |_| {}).await.is_err());
        // A server without the Ranker: the probe fails with UNIMPLEMENTED.
        let echo_only = crate::loadgen::echo::EchoServerHandle::start(1).unwrap();
        let mut wrong_server = config(addr);
        wrong_server.addr = echo_only.uri();
        match run(&wrong_server, |_| {}, |_| {}).await {
            Err(LoadgenError::Probe { kind, code, .. }) => {
                assert_eq!(kind, "candidates100");
                assert_eq!(code, tonic::Code::Unimplemented);
            }
            other => panic!("expected a probe error, got {other:?}"),
        }
    }
}
