//! Shared helpers of the end-to-end gRPC tests: small synthetic tables in a temporary folder,
//! the real `fairrank serve` process on a free loopback port, tonic clients, the exact
//! scalar top-k to compare answers with, and a minimal HTTP GET for `/metrics`.

#![allow(dead_code)] // each test binary uses a subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use api::fairrank::v1 as pb;
use api::fairrank::v1::admin_client::AdminClient;
use api::fairrank::v1::ranker_client::RankerClient;
use datasets::{SyntheticDataset, SyntheticParams};
use store::{Table, TableData};
use tempfile::TempDir;
use tonic::transport::Channel;

/// Embedding dimension of the test tables.
pub const DIM: usize = 16;
/// Items of the test item tables.
pub const ITEMS: usize = 2000;
/// Users of the test user table.
pub const USERS: usize = 50;
/// Longest the server may take to start on a loaded machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest any single call or wait may take in these tests.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The admin token of servers started with [`admin_env`].
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A synthetic dataset of the test size.
pub fn dataset(seed: u64) -> SyntheticDataset {
    datasets::generate(&SyntheticParams {
        items: ITEMS,
        dim: DIM,
        users: USERS,
        seed,
        ..SyntheticParams::default()
    })
    .expect("the synthetic dataset generates")
}

/// Item and user tables written to a fresh temporary folder.
pub struct Tables {
    pub dir: TempDir,
    pub items_path: PathBuf,
    pub users_path: PathBuf,
    pub data: SyntheticDataset,
}

/// Writes the dataset of `seed` as `items.frt` and `users.frt`.
pub fn tables(seed: u64) -> Tables {
    let dir = tempfile::tempdir().expect("temporary folder");
    let data = dataset(seed);
    let items_path = dir.path().join("items.frt");
    let users_path = dir.path().join("users.frt");
    store::write_table(&items_path, &data.items).expect("items write");
    store::write_table(&users_path, &data.users).expect("users write");
    Tables {
        dir,
        items_path,
        users_path,
        data,
    }
}

/// Writes the item table of another seed (same dimension) to `path`.
pub fn write_items(path: &Path, seed: u64) -> TableData {
    let data = dataset(seed).items;
    store::write_table(path, &data).expect("items write");
    data
}

/// Row `row` of a table.
pub fn row(data: &TableData, row: usize) -> &[f32] {
    &data.rows[row * data.dim..(row + 1) * data.dim]
}

/// The exact top-k of the table file at `items` for `query`, by the scalar reference kernel.
pub fn reference_topk(items: &Path, query: &[f32], k: usize) -> Vec<(String, f32)> {
    let table = Table::open(items).expect("the table opens");
    let matrix =
        kernels::RowMatrix::new(table.rows(), table.len(), table.dim(), table.row_stride())
            .expect("a valid matrix");
    kernels::scalar::scan_topk(matrix, query, k)
        .expect("k > 0")
        .iter()
        .map(|item| (table.id(item.index as usize).to_owned(), item.score))
        .collect()
}

/// The exact top-k over a candidate list of `items`, by the scalar reference kernel.
pub fn reference_candidates(
    items: &TableData,
    candidates: &[String],
    query: &[f32],
    k: usize,
) -> Vec<(String, f32)> {
    let mut scored: Vec<(usize, String, f32)> = candidates
        .iter()
        .map(|id| {
            let position = items.ids.iter().position(|x| x == id).expect("known id");
            let score = kernels::scalar::dot(row(items, position), query);
            (position, id.clone(), score)
        })
        .collect();
    scored.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
    scored.truncate(k);
    scored
        .into_iter()
        .map(|(_, id, score)| (id, score))
        .collect()
}

/// Asserts that an answer is the expected ranking: same ids in the same order, scores
/// within 1e-4 (SIMD and batched kernels round differently; near-ties may swap).
pub fn assert_ranking(response: &pb::RankResponse, expected: &[(String, f32)]) {
    assert_eq!(
        response.items.len(),
        expected.len(),
        "answer {:?}",
        response.items
    );
    for (position, (item, (id, score))) in response.items.iter().zip(expected).enumerate() {
        assert_eq!(item.rank as usize, position + 1);
        let served = item.score.expect("a personalized answer releases scores");
        assert!(
            (served - score).abs() < 1e-4,
            "score at {position}: {served} vs {score}"
        );
        if &item.item_id != id {
            let other = expected
                .iter()
                .find(|(candidate, _)| *candidate == item.item_id)
                .unwrap_or_else(|| panic!("unexpected id {} at {position}", item.item_id));
            assert!(
                (other.1 - score).abs() < 1e-4,
                "{} swapped with {id}",
                item.item_id
            );
        }
    }
}

/// A whole-catalog request for a user of the user table.
pub fn rank_request(request_id: &str, user_id: &str, k: u32) -> pb::RankRequest {
    pb::RankRequest {
        request_id: request_id.to_owned(),
        user: Some(pb::rank_request::User::UserId(user_id.to_owned())),
        k,
        ..pb::RankRequest::default()
    }
}

/// A request with an inline embedding.
pub fn inline_request(request_id: &str, embedding: Vec<f32>, k: u32) -> pb::RankRequest {
    pb::RankRequest {
        request_id: request_id.to_owned(),
        user: Some(pb::rank_request::User::InlineUser(pb::InlineUser {
            embedding,
            subject_id: String::new(),
        })),
        k,
        ..pb::RankRequest::default()
    }
}

/// Environment that gives a server the admin token [`ADMIN_TOKEN`].
pub fn admin_env() -> Vec<(&'static str, &'static str)> {
    vec![("FAIRRANK_ADMIN_TOKEN", ADMIN_TOKEN)]
}

/// Adds `authorization: Bearer <token>` to a request.
pub fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ASCII metadata"),
    );
    request
}

/// A request carrying `message` and the ASCII `metadata` pairs.
fn with_metadata<T>(message: T, metadata: &[(&'static str, &str)]) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    for (key, value) in metadata {
        request
            .metadata_mut()
            .insert(*key, value.parse().expect("an ASCII value"));
    }
    request
}

/// A running `fairrank serve` process, killed on drop if still running.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub metrics: Option<SocketAddr>,
    log_path: PathBuf,
    _scratch: TempDir,
}

impl Server {
    /// Serves `tables` with the optional TOML configuration and extra environment.
    pub fn start(tables: &Tables, config: Option<&str>, env: &[(&str, &str)]) -> Server {
        let args = vec![
            "--table".to_owned(),
            tables.items_path.display().to_string(),
            "--users".to_owned(),
            tables.users_path.display().to_string(),
        ];
        Server::start_with(args, config, env)
    }

    /// Serves with the given extra `serve` arguments.
    pub fn start_with(extra: Vec<String>, config: Option<&str>, env: &[(&str, &str)]) -> Server {
        let scratch = tempfile::tempdir().expect("temporary folder");
        let log_path = scratch.path().join("server.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_fairrank"));
        command
            .arg("serve")
            .args(["--addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
            .args(&extra)
            .env("FAIRRANK_CACHE", scratch.path().join("cache"))
            // Each server its own state directory (a configured `[state] dir` still wins).
            .env("FAIRRANK_STATE_DIR", scratch.path().join("state"))
            .env("RUST_LOG", "info")
            .env_remove("FAIRRANK_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        if let Some(config) = config {
            let path = scratch.path().join("fairrank.toml");
            std::fs::write(&path, config).expect("config file");
            command.arg("--config").arg(path);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("the fairrank binary starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let started = Instant::now();
        let mut addr = None;
        let mut metrics = None;
        let mut metrics_announced = false;
        while addr.is_none() || !metrics_announced {
            let remaining = START_TIMEOUT.saturating_sub(started.elapsed());
            let line = match lines.recv_timeout(remaining) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "the server did not announce its addresses; log:\n{}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
            };
            if let Some(rest) = line.strip_prefix("listening on ") {
                addr = Some(rest.parse().expect("a socket address"));
            } else if let Some(rest) = line.strip_prefix("metrics on http://") {
                let rest = rest.strip_suffix("/metrics").expect("a /metrics URL");
                metrics = Some(rest.parse().expect("a socket address"));
                metrics_announced = true;
            } else if line == "metrics off" {
                metrics_announced = true;
            }
        }
        Server {
            child,
            addr: addr.expect("announced"),
            metrics,
            log_path,
            _scratch: scratch,
        }
    }

    /// The gRPC endpoint URI.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A connected channel.
    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(self.uri())
            .expect("a valid URI")
            .connect_timeout(CALL_TIMEOUT)
            .connect()
            .await
            .expect("the server accepts connections")
    }

    /// A Ranker client on a fresh connection.
    pub async fn ranker(&self) -> RankerClient<Channel> {
        RankerClient::new(self.channel().await).max_decoding_message_size(64 << 20)
    }

    /// A Ranker client over a plain HTTP/2 client: unlike tonic's `Channel` it does not
    /// enforce `grpc-timeout` itself, so the server's deadline handling is what the caller
    /// sees.
    pub fn ranker_without_client_deadline(
        &self,
    ) -> RankerClient<
        hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            tonic::body::Body,
        >,
    > {
        let client = plain_http2_client();
        RankerClient::with_origin(client, self.uri().parse().expect("a valid URI"))
    }

    /// A Health client over a plain HTTP/2 client, which leaves `grpc-timeout` to the
    /// server (see [`Server::ranker_without_client_deadline`]).
    pub fn health_without_client_deadline(
        &self,
    ) -> tonic_health::pb::health_client::HealthClient<
        hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            tonic::body::Body,
        >,
    > {
        let client = plain_http2_client();
        tonic_health::pb::health_client::HealthClient::with_origin(
            client,
            self.uri().parse().expect("a valid URI"),
        )
    }

    /// Calls `path` with `body` as the request bytes as given (see [`RawBodyCodec`]) and
    /// `metadata` (ASCII key, value) pairs; the answer's bytes.
    pub async fn raw_call(
        &self,
        path: &str,
        body: Vec<u8>,
        metadata: &[(&'static str, &str)],
    ) -> Result<Vec<u8>, tonic::Status> {
        let mut raw = tonic::client::Grpc::new(self.channel().await);
        raw.ready().await.expect("channel ready");
        let request = with_metadata(body, metadata);
        raw.unary(request, path.parse().expect("a path"), RawBodyCodec)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Opens a bidirectional stream of `path` that sends `bodies` as given (see
    /// [`RawBodyCodec`]) with `metadata`, then ends the client's side. `Err` when the server
    /// answers at once with a status only (a trailers-only answer); otherwise the answers,
    /// whose end (or error status) the server sends in trailers. No answer size limit.
    pub async fn raw_stream(
        &self,
        path: &str,
        bodies: Vec<Vec<u8>>,
        metadata: &[(&'static str, &str)],
    ) -> Result<tonic::Streaming<Vec<u8>>, tonic::Status> {
        let mut raw =
            tonic::client::Grpc::new(self.channel().await).max_decoding_message_size(usize::MAX);
        raw.ready().await.expect("channel ready");
        let request = with_metadata(tokio_stream::iter(bodies), metadata);
        raw.streaming(request, path.parse().expect("a path"), RawBodyCodec)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Calls the server-streaming method `path` with `body` as given; as
    /// [`Server::raw_stream`].
    pub async fn raw_server_stream(
        &self,
        path: &str,
        body: Vec<u8>,
        metadata: &[(&'static str, &str)],
    ) -> Result<tonic::Streaming<Vec<u8>>, tonic::Status> {
        let mut raw =
            tonic::client::Grpc::new(self.channel().await).max_decoding_message_size(usize::MAX);
        raw.ready().await.expect("channel ready");
        let request = with_metadata(body, metadata);
        raw.server_streaming(request, path.parse().expect("a path"), RawBodyCodec)
            .await
            .map(tonic::Response::into_inner)
    }

    /// An Admin client on a fresh connection.
    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await)
    }

    /// `Admin.GetStatus` with the token of [`admin_env`] (the call must succeed).
    pub async fn status(&self) -> pb::GetStatusResponse {
        self.admin()
            .await
            .get_status(with_token(pb::GetStatusRequest {}, ADMIN_TOKEN))
            .await
            .expect("GetStatus answers")
            .into_inner()
    }

    /// Sends a signal (`HUP`, `TERM`, `INT`) to the server process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("the process can be polled") {
                return status;
            }
            assert!(
                started.elapsed() < timeout,
                "the server did not exit within {timeout:?}; log:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything the server logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The `/metrics` exposition.
    pub fn metrics_text(&self) -> String {
        let addr = self.metrics.expect("the metrics endpoint is on");
        http_get(addr, "/metrics")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Service names listed by reflection v1.
pub async fn reflection_v1_services(server: &Server) -> std::collections::BTreeSet<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1 answers")
        .into_inner();
    let response = stream
        .message()
        .await
        .expect("a reflection message")
        .expect("one response");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => list
            .service
            .into_iter()
            .map(|service| service.name)
            .collect(),
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

/// The body of `GET path` over HTTP/1.1, asserting status 200.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, CALL_TIMEOUT).expect("metrics connect");
    stream
        .set_read_timeout(Some(CALL_TIMEOUT))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request written");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response read");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// `fairrank_requests_total` of `method` and `code` (a gRPC code name, e.g. `Ok`) in the
/// metrics `text`; `None` when no such call was counted.
pub fn calls_counted(text: &str, method: &str, code: &str) -> Option<f64> {
    metric_value(
        text,
        &format!("fairrank_requests_total{{method=\"{method}\",code=\"{code}\"}}"),
    )
}

/// The value of an unlabelled or labelled sample line in a metrics exposition.
pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// A codec that sends a request body as given and reads the answer's bytes back: for
/// bodies that are not valid protobuf, which a generated client cannot send.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawBodyCodec;

impl tonic::codec::Codec for RawBodyCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBodyCodec;
    type Decoder = RawBodyCodec;

    fn encoder(&mut self) -> RawBodyCodec {
        RawBodyCodec
    }

    fn decoder(&mut self) -> RawBodyCodec {
        RawBodyCodec
    }
}

impl tonic::codec::Encoder for RawBodyCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBodyCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let len = prost::bytes::Buf::remaining(src);
        Ok(Some(prost::bytes::Buf::copy_to_bytes(src, len).to_vec()))
    }
}

/// `message` encoded, with the bytes of the placeholder string `PLACE` replaced by bytes
/// that are not UTF-8.
pub fn with_invalid_utf8_id(message: &impl prost::Message) -> Vec<u8> {
    let mut bytes = message.encode_to_vec();
    let at = bytes
        .windows(5)
        .position(|window| window == b"PLACE")
        .expect("the placeholder is in the encoding");
    bytes[at..at + 5].copy_from_slice(&[0xff, 0xfe, 0xfd, 0xfc, 0xfb]);
    bytes
}

/// A plain HTTP/2 client (no tonic `Channel`), which sends `grpc-timeout` as given and
/// enforces no deadline itself.
fn plain_http2_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tonic::body::Body,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http()
}
