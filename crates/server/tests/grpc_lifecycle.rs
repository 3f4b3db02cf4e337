//! End-to-end tests of the server process around the ranking itself: health and reflection,
//! `/metrics`, SIGHUP reload, graceful SIGTERM shutdown, load shedding and the effective
//! configuration.

mod grpc_support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use api::fairrank::v1 as pb;
use api::status::error_reason;
use grpc_support::*;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn health(client: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
    client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status
}

/// Service names listed by reflection v1alpha, and whether it can describe the Ranker.
async fn reflection_v1alpha(server: &Server) -> (BTreeSet<String>, bool) {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let requests = [
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "fairrank.v1.Ranker".to_owned(),
            )),
        },
    ];
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection v1alpha answers")
        .into_inner();
    let mut names = BTreeSet::new();
    let mut described = false;
    while let Some(response) = stream.message().await.expect("a reflection message") {
        match response.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                names.extend(list.service.into_iter().map(|service| service.name));
            }
            Some(MessageResponse::FileDescriptorResponse(files)) => {
                described = !files.file_descriptor_proto.is_empty();
            }
            other => panic!("unexpected reflection answer {other:?}"),
        }
    }
    (names, described)
}

/// A reflection request as the tests ask it, the same for v1 and v1alpha.
#[derive(Debug, Clone, Copy)]
enum Question {
    Symbol(&'static str),
    File(&'static str),
    ListServices,
}

/// A reflection answer as the tests read it, the same for v1 and v1alpha.
#[derive(Debug)]
enum Reply {
    Error { code: i32, message: String },
    Services(Vec<String>),
    Files(Vec<prost_types::FileDescriptorProto>),
}

/// Defines `async fn $name(server, questions) -> Vec<Reply>` for reflection `$version`:
/// asks the questions on ONE stream, each once the answer to the one before has come (so
/// the stream must stay open between them), checks that every answer carries its request
/// and host, then ends the client's side and checks that the server ends the stream with OK.
macro_rules! reflection_conversation {
    ($name:ident, $version:ident) => {
        async fn $name(server: &Server, questions: &[Question]) -> Vec<Reply> {
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            let mut client = ServerReflectionClient::new(server.channel().await);
            let (sender, requests) = tokio::sync::mpsc::channel(1);
            let mut answers = client
                .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(requests))
                .await
                .expect("the reflection stream opens")
                .into_inner();
            let mut replies = Vec::new();
            for question in questions {
                let message_request = match *question {
                    Question::Symbol(symbol) => {
                        MessageRequest::FileContainingSymbol(symbol.to_owned())
                    }
                    Question::File(file) => MessageRequest::FileByFilename(file.to_owned()),
                    Question::ListServices => MessageRequest::ListServices(String::new()),
                };
                let request = ServerReflectionRequest {
                    host: "reflection-test".to_owned(),
                    message_request: Some(message_request),
                };
                sender
                    .send(request.clone())
                    .await
                    .expect("the stream takes the request");
                let response = tokio::time::timeout(CALL_TIMEOUT, answers.message())
                    .await
                    .unwrap_or_else(|_| panic!("no answer to {question:?} in time"))
                    .unwrap_or_else(|status| {
                        panic!("the stream failed at {question:?}: {status:?}")
                    })
                    .unwrap_or_else(|| panic!("the stream ended before answering {question:?}"));
                assert_eq!(response.original_request.as_ref(), Some(&request));
                assert_eq!(response.valid_host, "reflection-test");
                replies.push(match response.message_response {
                    Some(MessageResponse::ErrorResponse(error)) => Reply::Error {
                        code: error.error_code,
                        message: error.error_message,
                    },
                    Some(MessageResponse::ListServicesResponse(list)) => Reply::Services(
                        list.service
                            .into_iter()
                            .map(|service| service.name)
                            .collect(),
                    ),
                    Some(MessageResponse::FileDescriptorResponse(files)) => Reply::Files(
                        files
                            .file_descriptor_proto
                            .iter()
                            .map(|file| {
                                prost::Message::decode(file.as_slice())
                                    .expect("a FileDescriptorProto")
                            })
                            .collect(),
                    ),
                    other => panic!("unexpected answer to {question:?}: {other:?}"),
                });
            }
            drop(sender);
            let end = tokio::time::timeout(CALL_TIMEOUT, answers.message())
                .await
                .expect("the stream ends in time");
            assert!(
                matches!(end, Ok(None)),
                "the server ends the stream with OK after the client's side: {end:?}"
            );
            replies
        }
    };
}

reflection_conversation!(reflection_v1_conversation, v1);
reflection_conversation!(reflection_v1alpha_conversation, v1alpha);

/// The reflection protocol answers a failed request with an `error_response` in the stream
/// and goes on: an unknown symbol, then an unknown file, then the service list, then a
/// method's symbol, on one stream, for v1 and for v1alpha.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_answers_unknown_names_in_the_stream_and_goes_on() {
    let tables = tables(53);
    let server = Server::start(&tables, None, &[]);
    let questions = [
        Question::Symbol("fairrank.v1.Nope"),
        Question::File("nope.proto"),
        Question::ListServices,
        Question::Symbol("fairrank.v1.Ranker.Rank"),
    ];
    let conversations = [
        ("v1", reflection_v1_conversation(&server, &questions).await),
        (
            "v1alpha",
            reflection_v1alpha_conversation(&server, &questions).await,
        ),
    ];
    for (version, replies) in conversations {
        let [symbol, file, list, method] = replies.as_slice() else {
            panic!("{version}: four answers expected: {replies:?}");
        };
        match symbol {
            Reply::Error { code, message } => {
                assert_eq!(*code, Code::NotFound as i32, "{version}: {message}");
                assert!(message.contains("fairrank.v1.Nope"), "{version}: {message}");
            }
            other => panic!("{version}: an error_response expected, got {other:?}"),
        }
        match file {
            Reply::Error { code, message } => {
                assert_eq!(*code, Code::NotFound as i32, "{version}: {message}");
                assert!(message.contains("nope.proto"), "{version}: {message}");
            }
            other => panic!("{version}: an error_response expected, got {other:?}"),
        }
        match list {
            // Exactly the services this server answers (Admin and Echo are off), in order.
            Reply::Services(names) => assert_eq!(
                names,
                &[
                    "fairrank.v1.Ranker",
                    "grpc.health.v1.Health",
                    "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection",
                ],
                "{version}"
            ),
            other => panic!("{version}: a service list expected, got {other:?}"),
        }
        match method {
            // The file that defines the method, alone (its imports are asked for by name).
            Reply::Files(files) => {
                assert_eq!(files.len(), 1, "{version}: {files:?}");
                let file = &files[0];
                assert_eq!(file.name(), "fairrank/v1/ranker.proto", "{version}");
                assert_eq!(file.package(), "fairrank.v1", "{version}");
                let ranker = file
                    .service
                    .iter()
                    .find(|service| service.name() == "Ranker")
                    .expect("the file defines the Ranker");
                assert!(
                    ranker.method.iter().any(|method| method.name() == "Rank"),
                    "{version}: {ranker:?}"
                );
            }
            other => panic!("{version}: a file descriptor expected, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_reflection_streams_do_not_hold_up_the_shutdown() {
    idle_reflection_streams_end_at_the_shutdown(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_reflection_streams_do_not_hold_up_the_shutdown_with_shared_connections() {
    idle_reflection_streams_end_at_the_shutdown(false).await;
}

/// An open, idle reflection stream (v1 or v1alpha) does not hold up a graceful shutdown:
/// the server ends it with UNAVAILABLE once the drain starts, and the drain finishes well
/// within the grace (connections pinned to connection threads or shared).
async fn idle_reflection_streams_end_at_the_shutdown(pin_connections: bool) {
    let tables = tables(54);
    let mut server = Server::start(
        &tables,
        Some(&format!(
            "[server]\nshutdown_grace_ms = 30000\npin_connections = {pin_connections}\n"
        )),
        &[],
    );
    // Opens a stream of reflection `$version`, has one answer, and leaves it open and idle.
    macro_rules! idle_stream {
        ($version:ident) => {{
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            let mut client = ServerReflectionClient::new(server.channel().await);
            let (sender, requests) = tokio::sync::mpsc::channel(1);
            let mut answers = client
                .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(requests))
                .await
                .expect("the reflection stream opens")
                .into_inner();
            sender
                .send(ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(MessageRequest::ListServices(String::new())),
                })
                .await
                .expect("the stream takes the request");
            let listed = tokio::time::timeout(CALL_TIMEOUT, answers.message())
                .await
                .expect("an answer in time")
                .expect("an answer")
                .expect("one answer");
            assert!(listed.message_response.is_some());
            (sender, answers)
        }};
    }
    let (_v1_requests, mut v1_answers) = idle_stream!(v1);
    let (_v1alpha_requests, mut v1alpha_answers) = idle_stream!(v1alpha);

    let signalled = Instant::now();
    server.signal("TERM");
    for (version, end) in [
        (
            "v1",
            tokio::time::timeout(CALL_TIMEOUT, v1_answers.message())
                .await
                .map(|end| end.map(|answer| answer.is_some())),
        ),
        (
            "v1alpha",
            tokio::time::timeout(CALL_TIMEOUT, v1alpha_answers.message())
                .await
                .map(|end| end.map(|answer| answer.is_some())),
        ),
    ] {
        let status = end
            .unwrap_or_else(|_| panic!("{version}: the stream did not end; {}", server.logs()))
            .expect_err("the stream ends with a status");
        assert_eq!(status.code(), Code::Unavailable, "{version}: {status:?}");
        assert!(
            status.message().contains("shutting down"),
            "{version}: {status:?}"
        );
    }
    let (exit, logs) = tokio::task::spawn_blocking(move || {
        let exit = server.wait(Duration::from_secs(60));
        (exit, server.logs())
    })
    .await
    .expect("the wait task runs");
    assert!(exit.success(), "exit status {exit:?}; log:\n{logs}");
    assert!(
        logs.contains("shutdown complete: every call finished"),
        "{logs}"
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(20),
        "the drain waited for the idle streams: {:?}",
        signalled.elapsed()
    );
}

/// A client that sends reflection requests without reading the answers is held back by
/// flow control: the server reads requests only as it can send their answers, so it buffers
/// no more than the HTTP/2 windows allow, and the stream still answers afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reflection_client_that_does_not_read_is_held_back() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let tables = tables(55);
    let server = Server::start(&tables, None, &[]);
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&sent);
    // Endless requests for a large answer (the Ranker's file), counted as the client's
    // transport takes them.
    let requests = tokio_stream::StreamExt::map(tokio_stream::iter(0..), move |_| {
        counter.fetch_add(1, Ordering::AcqRel);
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "fairrank.v1.Ranker".to_owned(),
            )),
        }
    });
    let mut client = ServerReflectionClient::new(server.channel().await);
    let mut answers = client
        .server_reflection_info(requests)
        .await
        .expect("the reflection stream opens")
        .into_inner();
    // Until the count stops growing: the windows are full.
    let started = Instant::now();
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = sent.load(Ordering::Acquire);
        if now == last {
            break;
        }
        last = now;
        assert!(
            started.elapsed() < CALL_TIMEOUT && now < 200_000,
            "the server keeps reading requests nobody reads the answers to: {now}"
        );
    }
    // About 42 000 with the HTTP/2 windows of tonic's defaults (1 MiB on the server).
    assert!(last < 200_000, "{last} requests taken");
    // The answers still come, in order.
    for _ in 0..10 {
        let answer = tokio::time::timeout(CALL_TIMEOUT, answers.message())
            .await
            .expect("an answer in time")
            .expect("an answer")
            .expect("the stream goes on");
        assert!(
            matches!(
                answer.message_response,
                Some(MessageResponse::FileDescriptorResponse(_))
            ),
            "{answer:?}"
        );
    }
    eprintln!("requests taken before the windows filled: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_metrics_are_served() {
    let tables = tables(31);
    let mut env = admin_env();
    env.push(("RUST_LOG", "info,fairrank=debug"));
    let server = Server::start(&tables, None, &env);
    let mut health_client = HealthClient::new(server.channel().await);
    for service in ["", "fairrank.v1.Ranker", "fairrank.v1.Admin"] {
        assert_eq!(
            health(&mut health_client, service).await,
            ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    // The Echo baseline is off by default: health does not report it either.
    let echo = health_client
        .check(HealthCheckRequest {
            service: "fairrank.bench.v1.Echo".to_owned(),
        })
        .await
        .expect_err("no Echo on a default server");
    assert_eq!(echo.code(), Code::NotFound, "{echo:?}");

    // Reflection lists exactly the services this server answers: not Echo, which is off.
    let expected: BTreeSet<String> = [
        "fairrank.v1.Ranker",
        "fairrank.v1.Admin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    let v1 = reflection_v1_services(&server).await;
    let (v1alpha, described) = reflection_v1alpha(&server).await;
    assert_eq!(v1, expected, "reflection v1");
    assert_eq!(v1alpha, expected, "reflection v1alpha");
    assert!(described, "reflection describes fairrank.v1.Ranker");

    let mut ranker = server.ranker().await;
    ranker
        .rank(rank_request("m-1", &tables.data.users.ids[0], 5))
        .await
        .expect("ranks");
    let _ = ranker
        .rank(rank_request("m-2", "nobody", 5))
        .await
        .expect_err("unknown user");
    let text = server.metrics_text();
    for name in [
        "fairrank_requests_total{method=\"Rank\",code=\"Ok\"} 1",
        "fairrank_requests_total{method=\"Rank\",code=\"NotFound\"} 1",
        "fairrank_request_duration_seconds_count{method=\"Rank\"} 2",
        "fairrank_stage_duration_seconds_count{stage=\"validate\"} 1",
        "fairrank_stage_duration_seconds_count{stage=\"score\"} 1",
        "fairrank_stage_duration_seconds_count{stage=\"select_pool\"} 1",
        "fairrank_stage_duration_seconds_count{stage=\"rerank\"} 1",
        "fairrank_stage_duration_seconds_count{stage=\"respond\"} 1",
        "fairrank_in_flight_requests 0",
        "fairrank_shed_requests_total 0",
        "fairrank_table_generation{table=\"items\"} 1",
        "fairrank_table_generation{table=\"users\"} 1",
        "fairrank_batcher_batches_total",
    ] {
        assert!(text.contains(name), "{name} missing in:\n{text}");
    }
    // Calls are logged, with a pseudonym at most: never the raw user id.
    let logs = server.logs();
    assert!(logs.contains("call finished"), "{logs}");
    assert!(!logs.contains(&tables.data.users.ids[0]), "{logs}");
    assert!(!logs.contains("nobody"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_tables_from_their_paths() {
    let tables = tables(32);
    let server = Server::start(&tables, None, &[]);
    let mut ranker = server.ranker().await;
    let user_id = tables.data.users.ids[3].clone();
    let first = ranker
        .rank(rank_request("before-hup", &user_id, 10))
        .await
        .expect("ranks")
        .into_inner();
    assert_eq!(first.items_table.map(|v| v.generation), Some(1));

    // Republish the file at the same path (write to a temporary file, rename), then SIGHUP.
    write_items(&tables.items_path, 33);
    let expected = reference_topk(&tables.items_path, row(&tables.data.users, 3), 10);
    server.signal("HUP");
    let started = Instant::now();
    let response = loop {
        let response = ranker
            .rank(rank_request(
                &format!("after-hup-{}", started.elapsed().as_micros()),
                &user_id,
                10,
            ))
            .await
            .expect("ranks during the reload")
            .into_inner();
        if response.items_table.map(|v| v.generation) == Some(2) {
            break response;
        }
        assert!(
            started.elapsed() < CALL_TIMEOUT,
            "no reload after SIGHUP; log:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_ranking(&response, &expected);
    assert_ne!(
        response.items_table.map(|v| v.checksum),
        first.items_table.map(|v| v.checksum)
    );

    // A broken file, published the way table files are (never rewritten in place: the
    // serving table maps the old file): SIGHUP keeps the old table and says why.
    let staged = tables.dir.path().join("items.frt.staged");
    std::fs::write(&staged, b"garbage").expect("write");
    std::fs::rename(&staged, &tables.items_path).expect("rename");
    server.signal("HUP");
    let started = Instant::now();
    while !server.logs().contains("SIGHUP reload failed") {
        assert!(started.elapsed() < CALL_TIMEOUT, "{}", server.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let still = ranker
        .rank(rank_request("after-bad-hup", &user_id, 10))
        .await
        .expect("still serving")
        .into_inner();
    assert_eq!(still.items_table.map(|v| v.generation), Some(2));
    assert_ranking(&still, &expected);

    // A valid table marked as a user table, published at the item table's path: refused
    // by its role, naming the file; the old table keeps serving.
    store::TableWriter::new()
        .role(store::TableRole::Users)
        .write(&tables.items_path, &tables.data.users)
        .expect("users write");
    server.signal("HUP");
    let marked = format!(
        "`{}` is marked as a user table; the item table slot needs an item table",
        tables.items_path.display()
    );
    let started = Instant::now();
    while !server.logs().contains(&marked) {
        assert!(started.elapsed() < CALL_TIMEOUT, "{}", server.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let still = ranker
        .rank(rank_request("after-users-hup", &user_id, 10))
        .await
        .expect("still serving")
        .into_inner();
    assert_eq!(still.items_table.map(|v| v.generation), Some(2));
    assert_ranking(&still, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls_and_exits_zero() {
    drains_in_flight_calls_and_exits_zero(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls_and_exits_zero_with_shared_connections() {
    drains_in_flight_calls_and_exits_zero(false).await;
}

/// Four connections under load (pinned to connection threads or shared by the runtime's
/// workers) and an idle one, then SIGTERM: health turns NOT_SERVING while calls still
/// succeed, every call the server took finishes, later ones are refused, and the server
/// exits 0 without waiting out the grace for the idle connection.
async fn drains_in_flight_calls_and_exits_zero(pin_connections: bool) {
    let tables = tables(34);
    let mut server = Server::start(
        &tables,
        Some(&format!(
            "[server]\nshutdown_delay_ms = 1500\nshutdown_grace_ms = 20000\n\
             io_threads = 3\npin_connections = {pin_connections}\n"
        )),
        &[],
    );
    let successes = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for task in 0..4 {
        let mut ranker = server.ranker().await;
        let successes = Arc::clone(&successes);
        let user_id = tables.data.users.ids[task].clone();
        load.push(tokio::spawn(async move {
            let mut answered = 0usize;
            loop {
                let mut request = rank_request(&format!("drain-{task}-{answered}"), &user_id, 50);
                request.explain = Some(pb::ExplainOptions {
                    level: pb::ExplainLevel::Dimensions as i32,
                    max_dimensions: 8,
                });
                match ranker.rank(request).await {
                    Ok(response) => {
                        assert_eq!(response.into_inner().items.len(), 50);
                        answered += 1;
                        successes.fetch_add(1, Ordering::AcqRel);
                    }
                    // After the listener closed: refused, never cut off mid-call.
                    Err(status) => return (answered, status),
                }
            }
        }));
    }
    let started = Instant::now();
    while successes.load(Ordering::Acquire) < 20 {
        assert!(started.elapsed() < CALL_TIMEOUT, "{}", server.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut health_client = HealthClient::new(server.channel().await);
    // A connection that never sends a request does not hold the drain up.
    let idle = idle_connection(&server, b"").await;
    server.signal("TERM");
    // During the shutdown delay health says NOT_SERVING while calls still succeed.
    let started = Instant::now();
    loop {
        let status = health(&mut health_client, "").await;
        if status == ServingStatus::NotServing as i32 {
            break;
        }
        assert!(started.elapsed() < CALL_TIMEOUT, "{}", server.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let during_delay = successes.load(Ordering::Acquire);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        successes.load(Ordering::Acquire) > during_delay,
        "calls are still served while health says NOT_SERVING"
    );

    let exit = tokio::task::spawn_blocking(move || {
        let exit = server.wait(Duration::from_secs(60));
        (exit, server.logs())
    })
    .await
    .expect("the wait task runs");
    let (exit, logs) = exit;
    assert!(exit.success(), "exit status {exit:?}; log:\n{logs}");
    assert!(
        logs.contains("shutdown complete: every call finished"),
        "{logs}"
    );
    drop(idle);
    for task in load {
        let (answered, status) = task.await.expect("the load task ends");
        assert!(answered > 0);
        assert!(
            refused(&status),
            "a call failed other than by refusal: {status:?}"
        );
    }
}

/// Whether a failed call never ran on the server: refused (UNAVAILABLE: connection
/// refused, stream refused after GOAWAY), a stream above the last one the server's graceful
/// GOAWAY (NO_ERROR) accepted, which by RFC 9113 section 6.8 was not processed, or never
/// sent because the client's connection was closing (hyper's "canceled"), or reset: a
/// request the client wrote after the server's GOAWAY and before it closed the socket is
/// never read, and closing a socket with unread bytes sends RST (seen once in CI), as
/// opposed to a call cut off while it ran. (That no call accepted by the server was cut
/// off is checked on the server's side: its log must say every call finished.)
fn refused(status: &tonic::Status) -> bool {
    if status.code() == Code::Unavailable {
        return true;
    }
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        if let Some(hyper) = error.downcast_ref::<hyper::Error>()
            && hyper.is_canceled()
        {
            return true;
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionReset
        {
            return true;
        }
        source = error.source();
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_beyond_the_concurrency_limit_is_shed() {
    let tables = tables(35);
    let server = Server::start(
        &tables,
        Some("[server]\nmax_concurrent_requests = 1\n"),
        &admin_env(),
    );
    let user_id = tables.data.users.ids[0].clone();
    let ranker = server.ranker().await;
    let mut shed = 0usize;
    let mut answered = 0usize;
    for burst in 0..50 {
        let mut calls = Vec::new();
        for call in 0..16 {
            let mut ranker = ranker.clone();
            let request = rank_request(&format!("shed-{burst}-{call}"), &user_id, 200);
            calls.push(tokio::spawn(async move { ranker.rank(request).await }));
        }
        for call in calls {
            match call.await.expect("the call task runs") {
                Ok(_) => answered += 1,
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    assert_eq!(error_reason(&status), pb::ErrorReason::Overloaded);
                    shed += 1;
                }
            }
        }
        if shed > 0 && answered > 0 {
            break;
        }
    }
    assert!(
        shed > 0,
        "16 concurrent calls against a limit of 1 never shed"
    );
    assert!(answered > 0);
    let text = server.metrics_text();
    assert_eq!(
        metric_value(&text, "fairrank_shed_requests_total"),
        Some(shed as f64),
        "{text}"
    );
    let status = server.status().await;
    assert_eq!(status.counters.map(|c| c.shed_requests), Some(shed as u64));
}

#[test]
fn print_config_shows_the_documented_effective_configuration() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let config = dir.path().join("fairrank.toml");
    std::fs::write(
        &config,
        "[server]\nadmin_token = \"very-secret\"\n[ranking]\nmax_k = 77\n",
    )
    .expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fairrank"))
        .args(["serve", "--print-config", "--addr", "127.0.0.1:6000"])
        .arg("--config")
        .arg(&config)
        .env("FAIRRANK_CACHE", dir.path())
        .output()
        .expect("the binary runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8");
    assert!(text.contains("max_k = 77"), "{text}");
    assert!(text.contains("addr = \"127.0.0.1:6000\""), "{text}");
    assert!(
        text.contains("# Largest k a request may ask for."),
        "{text}"
    );
    assert!(!text.contains("very-secret"), "{text}");

    std::fs::write(&config, "[server]\nmax_concurrent_requests = 0\n").expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fairrank"))
        .args(["serve", "--print-config", "--config"])
        .arg(&config)
        .output()
        .expect("the binary runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("max_concurrent_requests"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_table_the_default_dataset_is_served() {
    let server = Server::start_with(Vec::new(), None, &admin_env());
    let status = server.status().await;
    let items = status.items_table.expect("the default item table");
    let users = status.users_table.expect("the default user table");
    assert_eq!(
        items.rows,
        datasets::SyntheticParams::default().items as u64
    );
    let users_table = store::Table::open(std::path::Path::new(&users.path)).expect("opens");
    let response = server
        .ranker()
        .await
        .rank(rank_request("default-dataset", users_table.id(0), 5))
        .await
        .expect("ranks")
        .into_inner();
    assert_ranking(
        &response,
        &reference_topk(std::path::Path::new(&items.path), users_table.row(0), 5),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_routed_by_their_path_and_every_service_gets_its_deadline() {
    let tables = tables(49);
    let server = Server::start(&tables, None, &[]);
    // A path naming no service, a method a service lacks, no method: UNIMPLEMENTED.
    for path in [
        "/no.such.Service/Call",
        "/fairrank.v1.Ranker/NoSuchMethod",
        "/grpc.health.v1.Health/NoSuchMethod",
        "/fairrank.v1.Ranker/",
    ] {
        let status = server
            .raw_call(path, Vec::new(), &[])
            .await
            .expect_err(path);
        assert_eq!(status.code(), Code::Unimplemented, "{path}: {status:?}");
        // tonic's answer to an unknown method carries the reason too.
        assert_eq!(
            api::status::error_reason(&status),
            pb::ErrorReason::NotSupported,
            "{path}: {status:?}"
        );
    }
    // Not only the Ranker: a health check whose deadline passed on arrival is refused.
    let mut late = tonic::Request::new(HealthCheckRequest::default());
    late.set_timeout(Duration::ZERO);
    let status = server
        .health_without_client_deadline()
        .check(late)
        .await
        .expect_err("too late");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("on arrival"), "{status:?}");
    let mut in_time = tonic::Request::new(HealthCheckRequest::default());
    in_time.set_timeout(Duration::from_secs(30));
    let answer = server
        .health_without_client_deadline()
        .check(in_time)
        .await
        .expect("in time");
    assert_eq!(answer.into_inner().status, ServingStatus::Serving as i32);
    // A Rank call refused on arrival is counted like any other failed Rank call.
    let mut late_rank = tonic::Request::new(rank_request("late", &tables.data.users.ids[0], 3));
    late_rank.set_timeout(Duration::ZERO);
    let status = server
        .ranker_without_client_deadline()
        .rank(late_rank)
        .await
        .expect_err("too late");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        calls_counted(&server.metrics_text(), "Rank", "DeadlineExceeded"),
        Some(1.0)
    );
}

/// Health's unary and server-streaming methods, and both reflection versions' stream.
const CHECK: &str = "/grpc.health.v1.Health/Check";
const WATCH: &str = "/grpc.health.v1.Health/Watch";
const REFLECTION_PATHS: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The refusal of `body` by each of `unary` (unary calls), Watch (a trailers-only answer)
/// and both reflection streams (which open, their status coming in the trailers), with
/// its path.
async fn refusals_of(
    server: &Server,
    body: &[u8],
    unary: &[&'static str],
) -> Vec<(&'static str, tonic::Status)> {
    let mut refusals = Vec::new();
    for &path in unary {
        let status = server
            .raw_call(path, body.to_vec(), &[])
            .await
            .expect_err(path);
        refusals.push((path, status));
    }
    let status = server
        .raw_server_stream(WATCH, body.to_vec(), &[])
        .await
        .expect_err(WATCH);
    refusals.push((WATCH, status));
    for path in REFLECTION_PATHS {
        let mut answers = server
            .raw_stream(path, vec![body.to_vec()], &[])
            .await
            .expect("the stream opens: its status comes in the trailers");
        let status = answers.message().await.expect_err(path);
        refusals.push((path, status));
    }
    refusals
}

/// The statuses the gRPC layer makes itself (tonic's, outside fairrank's handlers) carry a
/// `fairrank-error-reason` like every other error, with tonic's code and message kept, in
/// trailers-only answers (the status in the headers) and in a stream's trailers; health and
/// reflection read request messages up to `server.max_message_bytes` (here 5 MiB, above
/// tonic's 4 MiB default) and refuse larger ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_of_the_grpc_layer_carry_a_reason() {
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};
    const LIMIT: usize = 5 << 20;
    let tables = tables(57);
    let server = Server::start(
        &tables,
        Some(&format!(
            "[server]\nmax_message_bytes = {LIMIT}\necho_service = true\n"
        )),
        &admin_env(),
    );
    let expect = |what: &str, status: &tonic::Status, code: Code, reason: pb::ErrorReason| {
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert_eq!(error_reason(status), reason, "{what}: {status:?}");
    };
    let check = |service: &str| {
        prost::Message::encode_to_vec(&HealthCheckRequest {
            service: service.to_owned(),
        })
    };
    let reflection = |message_request: MessageRequest| {
        prost::Message::encode_to_vec(&ServerReflectionRequest {
            host: String::new(),
            message_request: Some(message_request),
        })
    };
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let token = [("authorization", bearer.as_str())];

    // A method the service lacks: tonic's UNIMPLEMENTED with no message.
    for service in [
        "fairrank.v1.Ranker",
        "fairrank.v1.Admin",
        "fairrank.bench.v1.Echo",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        let path = format!("/{service}/Nope");
        let status = server
            .raw_call(&path, Vec::new(), &token)
            .await
            .expect_err(&path);
        expect(
            &path,
            &status,
            Code::Unimplemented,
            pb::ErrorReason::NotSupported,
        );
        assert_eq!(status.message(), "", "{path}");
    }

    // A compressed request body (the server accepts none): tonic's UNIMPLEMENTED naming
    // the encoding, before any handler runs.
    let gzip = [("grpc-encoding", "gzip"), token[0]];
    let compressed = |what: &str, status: &tonic::Status| {
        expect(
            what,
            status,
            Code::Unimplemented,
            pb::ErrorReason::NotSupported,
        );
        assert!(
            status.message().contains("`gzip` which isn't supported"),
            "{what}: {status:?}"
        );
    };
    for (path, body) in [
        (
            "/fairrank.v1.Ranker/Rank",
            prost::Message::encode_to_vec(&rank_request("gzip", &tables.data.users.ids[0], 3)),
        ),
        ("/fairrank.v1.Ranker/RankBatch", Vec::new()),
        ("/fairrank.v1.Admin/GetStatus", Vec::new()),
        ("/fairrank.bench.v1.Echo/Echo", Vec::new()),
        (CHECK, check("")),
    ] {
        let status = server.raw_call(path, body, &gzip).await.expect_err(path);
        compressed(path, &status);
    }
    let status = server
        .raw_server_stream(WATCH, check(""), &gzip)
        .await
        .expect_err("Watch: a trailers-only answer");
    compressed(WATCH, &status);
    for path in REFLECTION_PATHS {
        let status = server
            .raw_stream(
                path,
                vec![reflection(MessageRequest::ListServices(String::new()))],
                &gzip,
            )
            .await
            .expect_err("reflection: a trailers-only answer");
        compressed(path, &status);
    }

    // Health of a service this server does not serve: NOT_FOUND.
    let unknown = |what: &str, status: &tonic::Status| {
        expect(what, status, Code::NotFound, pb::ErrorReason::NotSupported);
        assert_eq!(status.message(), "service not registered", "{what}");
    };
    let status = server
        .raw_call(CHECK, check("no.such.Service"), &[])
        .await
        .expect_err("not served");
    unknown(CHECK, &status);
    let status = server
        .raw_server_stream(WATCH, check("no.such.Service"), &[])
        .await
        .expect_err("not served");
    unknown(WATCH, &status);

    // A body that is not a message of the method's request type: tonic's INTERNAL with
    // prost's message; for reflection in the stream's trailers.
    let garbage = vec![0xff_u8; 16];
    let undecodable = |what: &str, status: &tonic::Status| {
        expect(what, status, Code::Internal, pb::ErrorReason::InvalidField);
        assert!(
            status
                .message()
                .starts_with("failed to decode Protobuf message"),
            "{what}: {status:?}"
        );
    };
    for (path, status) in
        refusals_of(&server, &garbage, &[CHECK, "/fairrank.bench.v1.Echo/Echo"]).await
    {
        undecodable(path, &status);
    }

    // Messages above tonic's default limit but within the configured one are read whole...
    let long_name = "n".repeat(LIMIT - (LIMIT >> 3));
    assert!(long_name.len() > 4 << 20);
    let status = server
        .raw_call(CHECK, check(&long_name), &[])
        .await
        .expect_err("not served");
    unknown(CHECK, &status);
    for path in REFLECTION_PATHS {
        let mut answers = server
            .raw_stream(
                path,
                vec![reflection(MessageRequest::FileByFilename(
                    long_name.clone(),
                ))],
                &[],
            )
            .await
            .expect("the stream opens");
        let answer = answers
            .message()
            .await
            .expect("an answer")
            .expect("one answer");
        let answer: ServerReflectionResponse =
            prost::Message::decode(answer.as_slice()).expect("a reflection answer");
        match answer.message_response {
            Some(MessageResponse::ErrorResponse(error)) => {
                assert_eq!(error.error_code, Code::NotFound as i32, "{path}: {error:?}");
            }
            other => panic!("{path}: an error_response expected, got {other:?}"),
        }
        assert!(matches!(answers.message().await, Ok(None)), "{path}");
    }
    // ... and larger ones are refused as every service refuses them: RESOURCE_EXHAUSTED
    // naming the message's size and the configured limit (tonic's own code is OUT_OF_RANGE).
    let too_long = check(&"n".repeat(LIMIT + 1));
    let too_large = |what: &str, status: &tonic::Status| {
        expect(
            what,
            status,
            Code::ResourceExhausted,
            pb::ErrorReason::LimitExceeded,
        );
        let size = too_long.len();
        assert!(
            status.message().contains(&format!(
                "message of {size} bytes is above the server's limit of {LIMIT} bytes"
            )),
            "{what}: {status:?}"
        );
    };
    for (path, status) in refusals_of(&server, &too_long, &[CHECK]).await {
        too_large(path, &status);
    }
}

/// The HTTP/2 connection preface a client sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An empty SETTINGS frame (no parameters, no flags, stream 0).
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];

/// A connection to `server` that sends `sent` and then nothing, open once the server
/// serves it: its first frame, SETTINGS, which it sends before reading anything, has come.
async fn idle_connection(server: &Server, sent: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("the server accepts connections");
    stream.write_all(sent).await.expect("the bytes are sent");
    let mut head = [0_u8; 9];
    tokio::time::timeout(CALL_TIMEOUT, stream.read_exact(&mut head))
        .await
        .expect("the server's first frame in time")
        .expect("the server's first frame");
    assert_eq!(head[3], 0x4, "a SETTINGS frame first: {head:?}");
    stream
}

/// SIGTERM while connections that never sent a request are open (each sent one of
/// `openings`): the server exits 0 at once, having drained, not after the 20 s grace.
async fn idle_connections_do_not_hold_up_the_shutdown(openings: &[&[u8]], pin_connections: bool) {
    let tables = tables(58);
    let mut server = Server::start(
        &tables,
        Some(&format!(
            "[server]\nshutdown_grace_ms = 20000\npin_connections = {pin_connections}\n"
        )),
        &[],
    );
    let mut connections = Vec::new();
    for sent in openings {
        connections.push(idle_connection(&server, sent).await);
    }
    let signalled = Instant::now();
    server.signal("TERM");
    let (exit, logs) = tokio::task::spawn_blocking(move || {
        let exit = server.wait(Duration::from_secs(3));
        (exit, server.logs())
    })
    .await
    .expect("the server exits within 3 s");
    assert!(exit.success(), "exit status {exit:?}; log:\n{logs}");
    assert!(
        logs.contains("shutdown complete: every call finished"),
        "{logs}"
    );
    eprintln!("exited {:?} after SIGTERM", signalled.elapsed());
    drop(connections);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_does_not_hold_up_the_shutdown() {
    idle_connections_do_not_hold_up_the_shutdown(&[b""], true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_only_the_preface_does_not_hold_up_the_shutdown() {
    idle_connections_do_not_hold_up_the_shutdown(&[PREFACE], true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_the_preface_and_settings_does_not_hold_up_the_shutdown() {
    let opening = [PREFACE, &EMPTY_SETTINGS].concat();
    idle_connections_do_not_hold_up_the_shutdown(&[&opening], true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_hold_up_the_shutdown_with_shared_connections() {
    let opening = [PREFACE, &EMPTY_SETTINGS].concat();
    idle_connections_do_not_hold_up_the_shutdown(&[b"", PREFACE, &opening], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_get_the_exact_answers_pinned_or_shared() {
    let tables = tables(51);
    let query: Vec<f32> = (0..DIM).map(|d| (d as f32 * 0.21).cos()).collect();
    let candidates: Vec<String> = tables.data.items.ids.iter().step_by(3).cloned().collect();
    let expected = reference_candidates(&tables.data.items, &candidates, &query, 9);
    for pin_connections in [true, false] {
        let server = Server::start(
            &tables,
            Some(&format!(
                "[server]\nio_threads = 2\npin_connections = {pin_connections}\n"
            )),
            &[],
        );
        // Seven connections over two threads, each with several calls in flight.
        let mut calls = Vec::new();
        for connection in 0..7 {
            let ranker = server.ranker().await;
            for call in 0..4 {
                let mut ranker = ranker.clone();
                let mut request =
                    inline_request(&format!("conn-{connection}-{call}"), query.clone(), 9);
                request.candidate_ids = candidates.clone();
                calls.push(tokio::spawn(async move { ranker.rank(request).await }));
            }
        }
        for call in calls {
            let answer = call.await.expect("the call task ends").expect("ranks");
            assert_ranking(&answer.into_inner(), &expected);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_busy_connection_gets_exact_answers_and_errors_from_both_threads() {
    // One connection over two pinned threads: its calls' rankings are shared with the idle
    // thread (serve/handoff.rs), and each answer or error must still reach its own call.
    let tables = tables(52);
    let query: Vec<f32> = (0..DIM).map(|d| (d as f32 * 0.37).sin()).collect();
    let candidates: Vec<String> = tables.data.items.ids.iter().step_by(2).cloned().collect();
    let expected = reference_candidates(&tables.data.items, &candidates, &query, 7);
    let server = Server::start(
        &tables,
        Some("[server]\nio_threads = 2\npin_connections = true\n"),
        &[],
    );
    let ranker = server.ranker().await;
    let shared = |text: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix("fairrank_rankings_shared_total "))
            .and_then(|count| count.trim().parse().ok())
            .expect("the shared rankings counter is exported")
    };
    // Rounds until the idle thread has taken some (usually the first round does).
    for round in 0..40 {
        if round >= 3 && shared(&server.metrics_text()) > 0 {
            break;
        }
        let mut calls = Vec::new();
        for call in 0..24 {
            let mut ranker = ranker.clone();
            let mut request = inline_request(&format!("one-{round}-{call}"), query.clone(), 7);
            request.candidate_ids = candidates.clone();
            let unknown = call % 5 == 3;
            if unknown {
                request.candidate_ids.push(format!("no-such-item-{call}"));
            }
            calls.push((
                unknown,
                call,
                tokio::spawn(async move { ranker.rank(request).await }),
            ));
        }
        for (unknown, call, answer) in calls {
            let answer = answer.await.expect("the call task ends");
            if unknown {
                let status = answer.expect_err("an unknown id");
                assert_eq!(status.code(), Code::NotFound, "{status:?}");
                assert!(
                    status.message().contains(&format!("no-such-item-{call}")),
                    "{status:?}"
                );
            } else {
                assert_ranking(&answer.expect("ranks").into_inner(), &expected);
            }
        }
    }
    assert!(shared(&server.metrics_text()) > 0, "no ranking was shared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_the_same_with_vectored_writes_on_or_off() {
    let tables = tables(50);
    let user = tables.data.users.ids[0].clone();
    let mut answers = Vec::new();
    for vectored in [false, true] {
        let server = Server::start(
            &tables,
            Some(&format!("[server]\nvectored_writes = {vectored}\n")),
            &[],
        );
        let mut ranker = server.ranker().await;
        let mut request = rank_request("writes", &user, 5);
        // A large answer too: its message is over 1 KiB (the copy threshold).
        request.k = 60;
        request.candidate_ids = tables.data.items.ids.iter().take(80).cloned().collect();
        let mut answer = ranker.rank(request).await.expect("ranks").into_inner();
        answer.timings = None;
        assert!(prost::Message::encoded_len(&answer) > 1024);
        answers.push(answer);
    }
    assert_eq!(answers[0], answers[1]);
}
