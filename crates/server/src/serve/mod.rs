//! `fairrank serve`: the gRPC ranking server (Ranker, Admin, Echo, health, reflection) and
//! its Prometheus endpoint, with admission control, deadlines, idempotent replays, hot
//! reload on SIGHUP and graceful shutdown on SIGTERM/SIGINT.
//!
//! Start-up prints two parseable lines on stdout: `listening on HOST:PORT` and
//! `metrics on http://HOST:PORT/metrics` (or `metrics off`). Logs go to stderr.

mod admin;
mod answer;
mod connection;
mod convert;
mod deadline;
mod echo;
mod errors;
mod front;
mod handoff;
mod pinned;
pub mod privacy;
mod rank_route;
mod ranker;
mod reflection;
mod replay;
mod routes;
pub mod state_setup;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io::{IsTerminal as _, Write as _};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use api::fairrank::bench::v1::echo_server::EchoServer;
use engine::{Engine, TableKind};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tonic::Status;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::{Config, LogFormat};
use crate::metrics::Metrics;

/// Arguments of `fairrank serve`. Flags override the configuration file.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); every key is optional. See `--print-config`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Item table file (`tables.items`); without it, the built-in default dataset.
    #[arg(long)]
    pub table: Option<PathBuf>,
    /// User table file (`tables.users`).
    #[arg(long)]
    pub users: Option<PathBuf>,
    /// gRPC listen address (`server.addr`), e.g. `127.0.0.1:50051`; port 0 picks a free one.
    #[arg(long)]
    pub addr: Option<std::net::SocketAddr>,
    /// Metrics listen address (`server.metrics_addr`); an empty string turns metrics off.
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// State directory (`state.dir`): the privacy ledger and amortized fairness state
    /// database; one server per directory.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Print the effective configuration (documented TOML, secrets redacted) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Runs `fairrank serve` until SIGTERM or SIGINT.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(table) = &args.table {
        config.tables.items = Some(table.clone());
    }
    if let Some(users) = &args.users {
        config.tables.users = Some(users.clone());
    }
    if let Some(addr) = args.addr {
        config.server.addr = addr;
    }
    if let Some(metrics_addr) = &args.metrics_addr {
        config.server.metrics_addr = metrics_addr.clone();
    }
    if let Some(state_dir) = &args.state_dir {
        config.state.dir = Some(state_dir.clone());
    }
    config
        .validate()
        .context("invalid configuration after applying the command-line flags")?;
    if args.print_config {
        print!("{}", config.to_documented_toml());
        return Ok(());
    }
    init_logging(config.server.log_format);

    let (items_path, users_path) = table_paths(&config)?;
    // The start is the first load: the same checks as a reload, checksum included.
    let verify = config.ranking.verify_checksum_on_reload;
    let items = engine::open_table(TableKind::Items, &items_path, verify)?;
    let users = users_path
        .as_deref()
        .map(|path| engine::open_table(TableKind::Users, path, verify))
        .transpose()?;
    let reload_dirs = ReloadDirs::new(&config, &items_path, users_path.as_deref())?;
    let state_setup::ServerState {
        fairness,
        privacy,
        ledger,
        closer,
    } = state_setup::ServerState::open(&config)?;
    let engine = Engine::with_setup(config.ranking.clone(), items, users, fairness, privacy)?;

    // With pinned connections the main runtime only accepts connections, handles signals
    // and serves metrics; the connection threads (`pinned`) carry the calls.
    let workers = if config.server.pin_connections {
        1
    } else {
        config.io_threads()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .thread_name("fairrank-io")
        .build()
        .context("cannot start the async runtime")?;
    let served = runtime.block_on(serve(config, engine, ledger, reload_dirs));
    // A table reload still running on the blocking pool must not hold the exit up for long.
    runtime.shutdown_timeout(Duration::from_secs(5));
    // Writes the amortized fairness state of the last flush interval and the ledger's
    // pending answers, and returns unused budget leases.
    let closed = closer.close();
    served?;
    closed
}

/// The table files to open: configured, or the built-in default dataset.
fn table_paths(config: &Config) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    match &config.tables.items {
        Some(items) => Ok((items.clone(), config.tables.users.clone())),
        None => {
            tracing::info!("no item table configured: serving the built-in default dataset");
            let dataset =
                datasets::default_dataset().context("preparing the built-in default dataset")?;
            let users = config.tables.users.clone().unwrap_or(dataset.users);
            Ok((dataset.items, Some(users)))
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second initialization (never in the binary) is harmless: keep the first.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// What every handler shares.
#[derive(Debug)]
pub struct Shared {
    engine: Engine,
    metrics: Arc<Metrics>,
    replay: Arc<replay::ReplayStore>,
    admission: Arc<Semaphore>,
    max_concurrent: usize,
    /// `server.max_message_bytes`: the largest answer the transport will send.
    max_message_bytes: usize,
    /// Whether the privacy budget ledger is durable (`state.mode = "durable"`).
    durable_ledger: bool,
    /// The privacy budget ledger (the engine charges it), read for `GetStatus`'s totals.
    ledger: Arc<dyn state::BudgetLedger>,
    default_deadline: Duration,
    admin_token: Option<String>,
    admin_token_env: String,
    config_text: String,
    started_at: SystemTime,
    started: Instant,
    reload_dirs: ReloadDirs,
    pseudonym_key: RandomState,
}

impl Shared {
    /// Admits `requests` rank requests under the server-wide concurrency limit, or sheds
    /// them. A batch takes one permit per entry, at most the whole limit (so a batch
    /// larger than the limit runs when the server is otherwise idle).
    fn admit(&self, requests: usize) -> Result<Admission, Status> {
        let permits = u32::try_from(requests.min(self.max_concurrent)).unwrap_or(u32::MAX);
        match Arc::clone(&self.admission).try_acquire_many_owned(permits) {
            Ok(permit) => {
                let count = i64::try_from(requests).unwrap_or(i64::MAX);
                self.metrics.in_flight.inc_by(count);
                Ok(Admission {
                    _permit: permit,
                    in_flight: self.metrics.in_flight.clone(),
                    count,
                })
            }
            Err(_) => {
                self.metrics.shed.inc_by(requests as u64);
                Err(errors::overloaded(self.max_concurrent, requests))
            }
        }
    }

    /// A per-process pseudonym of a user id for logs: a keyed hash (the key never leaves
    /// the process, so pseudonyms cannot be reversed or linked across restarts).
    fn pseudonym(&self, user_id: &str) -> String {
        format!("{:016x}", self.pseudonym_key.hash_one(user_id))
    }

    /// Updates the table gauges from the engine.
    fn refresh_metrics(&self) {
        if let Ok(status) = self.engine.status() {
            self.metrics.refresh_engine(&status);
        }
    }
}

/// Admitted rank requests: holds their concurrency permits and in-flight count until the
/// engine has answered them (not merely until the caller stops waiting).
#[derive(Debug)]
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    in_flight: Gauge<i64, AtomicI64>,
    count: i64,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.in_flight.dec_by(self.count);
    }
}

/// The folders that `Admin.ReloadTable` paths must lie in, canonical.
#[derive(Debug, Clone)]
pub struct ReloadDirs {
    items: PathBuf,
    users: PathBuf,
}

impl ReloadDirs {
    fn new(config: &Config, items: &Path, users: Option<&Path>) -> anyhow::Result<ReloadDirs> {
        let canonical = |folder: &Path| {
            folder
                .canonicalize()
                .with_context(|| format!("cannot resolve the folder {}", folder.display()))
        };
        if let Some(folder) = &config.tables.reload_dir {
            let folder = canonical(folder).context("tables.reload_dir")?;
            return Ok(ReloadDirs {
                items: folder.clone(),
                users: folder,
            });
        }
        let parent = |file: &Path| -> anyhow::Result<PathBuf> {
            let absolute = file
                .canonicalize()
                .with_context(|| format!("cannot resolve {}", file.display()))?;
            Ok(absolute.parent().map(Path::to_path_buf).unwrap_or(absolute))
        };
        let items_dir = parent(items)?;
        let users_dir = match users {
            Some(users) => parent(users)?,
            None => items_dir.clone(),
        };
        Ok(ReloadDirs {
            items: items_dir,
            users: users_dir,
        })
    }

    fn folder(&self, kind: TableKind) -> &Path {
        match kind {
            TableKind::Items => &self.items,
            TableKind::Users => &self.users,
        }
    }

    /// The file a reload of `kind` may open for the requested path: inside the table's
    /// folder (relative paths start there), no `..`, no symbolic link out of it; a regular
    /// file the server can open. Every refusal names the field `path`.
    fn resolve(&self, kind: TableKind, requested: &str) -> Result<PathBuf, Status> {
        let folder = self.folder(kind);
        if requested.is_empty() {
            return Err(errors::invalid_field(
                "path",
                "must not be empty when set (unset it to re-open the current file)",
            ));
        }
        let path = Path::new(requested);
        if path
            .components()
            .any(|component| matches!(component, Component::ParentDir))
        {
            return Err(errors::path_not_allowed(requested, folder));
        }
        let joined = if path.is_absolute() {
            path.to_path_buf()
        } else {
            folder.join(path)
        };
        if !joined.starts_with(folder) {
            return Err(errors::path_not_allowed(requested, folder));
        }
        match joined.canonicalize() {
            Ok(canonical) if canonical.starts_with(folder) => {
                openable_file(&canonical)
                    .map_err(|problem| errors::table_path_unusable(requested, problem))?;
                Ok(canonical)
            }
            Ok(_) => Err(errors::path_not_allowed(requested, folder)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Err(errors::table_file_not_found(&joined))
            }
            // A name too long, a file where a folder should be, a folder it may not search.
            Err(error) => Err(errors::table_path_unusable(requested, error)),
        }
    }
}

/// Why `path` is not a regular file this process can open for reading, if it is not. Not
/// opened unless regular: opening a FIFO would wait for a writer. (The engine opens it again
/// to load it, and reports what fails then with the store's words.)
fn openable_file(path: &Path) -> Result<(), String> {
    let metadata = std::fs::metadata(path).map_err(|error| error.to_string())?;
    if !metadata.is_file() {
        return Err(if metadata.is_dir() {
            "it is a folder, not a table file".to_owned()
        } else {
            "it is not a regular file".to_owned()
        });
    }
    std::fs::File::open(path)
        .map(drop)
        .map_err(|error| format!("it cannot be read: {error}"))
}

/// Names of the services whose health is reported (besides the server as a whole, ""):
/// those this server answers.
fn health_names(admin_enabled: bool, echo_enabled: bool) -> Vec<&'static str> {
    let mut names = vec![api::fairrank::v1::ranker_server::SERVICE_NAME];
    if echo_enabled {
        names.push(api::fairrank::bench::v1::echo_server::SERVICE_NAME);
    }
    if admin_enabled {
        names.push(api::fairrank::v1::admin_server::SERVICE_NAME);
    }
    names
}

/// The protobuf package of the Echo benchmark service.
const BENCH_PACKAGE: &str = "fairrank.bench.v1";

/// The API's encoded descriptor set as reflection serves it: without the Echo benchmark's
/// file (package `fairrank.bench.v1`) unless `echo_enabled`, so that a service that is off
/// is neither listed nor described.
fn api_descriptors(echo_enabled: bool) -> anyhow::Result<Vec<u8>> {
    use prost::Message as _;
    let mut set = prost_types::FileDescriptorSet::decode(api::FILE_DESCRIPTOR_SET)
        .context("decoding the API's descriptor set")?;
    if !echo_enabled {
        set.file.retain(|file| file.package() != BENCH_PACKAGE);
    }
    Ok(set.encode_to_vec())
}

async fn set_health(reporter: &HealthReporter, names: &[&str], status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for name in names {
        reporter.set_service_status(*name, status).await;
    }
}

/// Resolves once `flag` becomes true (or its sender is gone).
async fn raised(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|raised| *raised).await;
}

async fn serve(
    config: Config,
    engine: Engine,
    ledger: Arc<dyn state::BudgetLedger>,
    reload_dirs: ReloadDirs,
) -> anyhow::Result<()> {
    let server_config = &config.server;
    let listener = tokio::net::TcpListener::bind(server_config.addr)
        .await
        .with_context(|| format!("cannot listen on {}", server_config.addr))?;
    let addr = listener.local_addr()?;
    let metrics_listener = match config.metrics_addr()? {
        Some(metrics_addr) => Some(
            crate::metrics::bind(metrics_addr)
                .await
                .with_context(|| format!("cannot listen on {metrics_addr} for metrics"))?,
        ),
        None => None,
    };

    let admin_token = config.admin_token();
    let admin_enabled = admin_token.is_some();
    let metrics = Arc::new(Metrics::new());
    let shared = Arc::new(Shared {
        engine: engine.clone(),
        metrics: Arc::clone(&metrics),
        replay: replay::ReplayStore::new(
            Duration::from_millis(config.replay.window_ms),
            config.replay.max_entries,
            config.replay.max_bytes,
        ),
        admission: Arc::new(Semaphore::new(server_config.max_concurrent_requests)),
        max_concurrent: server_config.max_concurrent_requests,
        max_message_bytes: server_config.max_message_bytes,
        durable_ledger: config.state.mode == crate::config::StateMode::Durable,
        ledger,
        default_deadline: Duration::from_millis(server_config.default_deadline_ms),
        admin_token,
        admin_token_env: server_config.admin_token_env.clone(),
        config_text: config.to_documented_toml(),
        started_at: SystemTime::now(),
        started: Instant::now(),
        reload_dirs,
        pseudonym_key: RandomState::new(),
    });
    shared.refresh_metrics();

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let names = health_names(admin_enabled, server_config.echo_service);
    set_health(&health_reporter, &names, ServingStatus::Serving).await;
    // Raised when the graceful shutdown starts: the server stops accepting and drains, and
    // reflection streams end (an idle one would otherwise hold the drain up).
    let (stop_sender, stop) = watch::channel(false);
    let descriptors = api_descriptors(server_config.echo_service)?;
    let reflection_index = reflection::ReflectionIndex::of_server(&names, &descriptors)
        .context("building the reflection index")?;
    let (reflection_v1, reflection_v1alpha) =
        reflection::services(reflection_index, &stop, server_config.max_message_bytes);

    // Signals are hooked before the address is announced, so a SIGHUP or SIGTERM sent as
    // soon as the server says it listens is handled, never fatal.
    let (force_sender, force) = watch::channel(false);
    let signals = Signals::install()?;
    let signal_task = tokio::spawn(signals.handle(
        Arc::clone(&shared),
        health_reporter,
        names,
        Duration::from_millis(server_config.shutdown_delay_ms),
        stop_sender,
        force_sender,
    ));

    let metrics_addr = match metrics_listener {
        Some(listener) => {
            let bound = listener.local_addr()?;
            let refresher = Arc::clone(&shared);
            crate::metrics::spawn_endpoint(
                listener,
                Arc::clone(&metrics),
                move || refresher.refresh_metrics(),
                raised(stop.clone()),
            );
            Some(bound)
        }
        None => None,
    };
    let status = engine.status()?;
    warn_without_default_group(&config.ranking, &status.items);
    announce(addr, metrics_addr)?;
    tracing::info!(
        %addr,
        metrics = ?metrics_addr,
        items = %status.items.path.display(),
        items_rows = status.items.rows,
        users = ?status.users.as_ref().map(|users| users.path.display().to_string()),
        dim = status.items.dim,
        admin = admin_enabled,
        max_concurrent_requests = server_config.max_concurrent_requests,
        io_threads = config.io_threads(),
        pinned_connections = server_config.pin_connections,
        "fairrank serving"
    );

    let max_message = server_config.max_message_bytes;
    let ranker =
        rank_route::RankerRoutes::new(ranker::RankerService::new(Arc::clone(&shared)), max_message);
    let admin = admin::AdminRoutes::new(admin::AdminService::new(Arc::clone(&shared)), max_message);
    let echo = server_config.echo_service.then(|| {
        EchoServer::new(echo::EchoService::new(Arc::clone(&shared)))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message)
    });
    let front = front::Front::new(
        front::Services {
            ranker,
            echo,
            admin,
            // Request messages up to the configured limit, as every service reads them
            // (tonic's default is 4 MiB).
            health: health_service.max_decoding_message_size(max_message),
            reflection_v1,
            reflection_v1alpha,
        },
        shared.default_deadline,
        Arc::clone(&shared.metrics),
    );
    // Answers under 1 KiB leave in one write with their headers and trailers unless
    // vectored writes are on (see `connection`).
    let vectored = server_config.vectored_writes;
    let mut server: std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> =
        if server_config.pin_connections {
            Box::pin(pinned::serve(
                listener,
                config.io_threads(),
                vectored,
                front,
                &stop,
                metrics.rankings_shared.clone(),
            )?)
        } else {
            let connection_stop = stop.clone();
            let incoming = tokio_stream::StreamExt::map(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                move |accepted| {
                    accepted.map(|stream| {
                        connection::Connection::new(stream, vectored, &connection_stop)
                    })
                },
            );
            let served = Server::builder().serve_with_incoming_shutdown(
                front,
                incoming,
                raised(stop.clone()),
            );
            Box::pin(async move { served.await.context("the gRPC server failed") })
        };

    let grace = Duration::from_millis(server_config.shutdown_grace_ms);
    let grace_elapsed = async {
        raised(stop.clone()).await;
        tokio::time::sleep(grace).await;
    };
    let drained = tokio::select! {
        served = &mut server => {
            served?;
            true
        }
        () = grace_elapsed => false,
        () = raised(force) => false,
    };
    signal_task.abort();
    let in_flight = engine.in_flight();
    if drained {
        tracing::info!(in_flight, "shutdown complete: every call finished");
    } else {
        tracing::warn!(
            in_flight,
            grace_ms = grace.as_millis() as u64,
            "shutdown grace elapsed (or a second signal came): abandoning the calls still running"
        );
    }
    Ok(())
}

/// Warns when the item table lacks `ranking.default_group_attribute`: requests that name no
/// group attribute then get fairness reports without groups under `none`, and are refused
/// (FAILED_PRECONDITION) under any other constraint. Not an error: a table without
/// groups serves unconstrained rankings.
fn warn_without_default_group(ranking: &engine::EngineConfig, items: &engine::TableStatus) {
    let name = &ranking.default_group_attribute;
    if !items.group_attributes.contains(name) {
        tracing::warn!(
            default_group_attribute = %name,
            table_group_attributes = ?items.group_attributes,
            items = %items.path.display(),
            "the item table has no ranking.default_group_attribute: requests must name a \
             fairness.group_attribute for any constraint but `none`, and reports of `none` \
             carry no group figures"
        );
    }
}

/// Prints the parseable start-up lines.
fn announce(
    addr: std::net::SocketAddr,
    metrics_addr: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "listening on {addr}")?;
    match metrics_addr {
        Some(metrics_addr) => writeln!(out, "metrics on http://{metrics_addr}/metrics")?,
        None => writeln!(out, "metrics off")?,
    }
    out.flush()?;
    Ok(())
}

/// The process signals the server reacts to.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            terminate: signal(SignalKind::terminate()).context("hooking SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("hooking SIGINT")?,
            hangup: signal(SignalKind::hangup()).context("hooking SIGHUP")?,
        })
    }

    /// SIGHUP: reload the tables from their current paths. SIGTERM/SIGINT: health
    /// NOT_SERVING, wait the shutdown delay, end health watches, stop accepting, end
    /// reflection streams and drain; a second one abandons the drain.
    async fn handle(
        mut self,
        shared: Arc<Shared>,
        mut health: HealthReporter,
        names: Vec<&'static str>,
        delay: Duration,
        stop: watch::Sender<bool>,
        force: watch::Sender<bool>,
    ) {
        loop {
            tokio::select! {
                _ = self.hangup.recv() => reload_on_hangup(&shared).await,
                _ = self.terminate.recv() => break,
                _ = self.interrupt.recv() => break,
            }
        }
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "shutdown requested: health is NOT_SERVING, draining"
        );
        set_health(&health, &names, ServingStatus::NotServing).await;
        tokio::time::sleep(delay).await;
        // Health watch streams never end on their own; closing them lets the drain finish.
        health.clear_service_status("").await;
        for name in &names {
            health.clear_service_status(name).await;
        }
        // Stops accepting and drains; reflection streams end on it (`reflection`).
        let _ = stop.send(true);
        loop {
            tokio::select! {
                _ = self.hangup.recv() => {
                    tracing::info!("SIGHUP ignored: the server is shutting down");
                }
                _ = self.terminate.recv() => break,
                _ = self.interrupt.recv() => break,
            }
        }
        let _ = force.send(true);
    }
}

/// Reloads every loaded table from its current path (SIGHUP), off the async threads.
async fn reload_on_hangup(shared: &Arc<Shared>) {
    tracing::info!("SIGHUP: reloading the tables from their current paths");
    let has_users = shared
        .engine
        .status()
        .map(|status| status.users.is_some())
        .unwrap_or(false);
    let mut kinds = vec![TableKind::Items];
    if has_users {
        kinds.push(TableKind::Users);
    }
    for kind in kinds {
        let engine = shared.engine.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            engine.reload(kind, &engine::ReloadRequest::default())
        })
        .await;
        let label = convert::table_label(kind);
        match outcome {
            Ok(Ok(outcome)) => {
                shared.metrics.record_table_change(label, "reload", true);
                shared.metrics.set_table(
                    label,
                    outcome.table.version.generation,
                    outcome.table.rows,
                );
                tracing::info!(
                    target: "fairrank::audit",
                    operation = "reload",
                    trigger = "SIGHUP",
                    table = label,
                    generation = outcome.table.version.generation,
                    path = %outcome.table.path.display(),
                    load_us = outcome.load_us,
                    "table reloaded"
                );
            }
            Ok(Err(error)) => {
                shared.metrics.record_table_change(label, "reload", false);
                tracing::warn!(
                    table = label,
                    %error,
                    "SIGHUP reload failed; the old table keeps serving"
                );
            }
            Err(error) => {
                shared.metrics.record_table_change(label, "reload", false);
                tracing::error!(table = label, %error, "SIGHUP reload task failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflection_describes_the_echo_benchmark_only_when_it_is_served() {
        use prost::Message as _;
        let packages = |echo: bool| {
            let bytes = api_descriptors(echo).unwrap();
            let set = prost_types::FileDescriptorSet::decode(bytes.as_slice()).unwrap();
            set.file
                .iter()
                .map(|file| file.package().to_owned())
                .collect::<Vec<_>>()
        };
        let (on, off) = (packages(true), packages(false));
        assert!(on.iter().any(|package| package == BENCH_PACKAGE), "{on:?}");
        assert!(
            !off.iter().any(|package| package == BENCH_PACKAGE),
            "{off:?}"
        );
        // Everything else stays: the API and its google.protobuf imports.
        assert_eq!(off.len(), on.len() - 1, "{on:?} / {off:?}");
        assert!(
            off.iter().any(|package| package == "fairrank.v1"),
            "{off:?}"
        );
        assert_eq!(
            api::fairrank::bench::v1::echo_server::SERVICE_NAME,
            format!("{BENCH_PACKAGE}.Echo")
        );
    }

    fn dirs(root: &Path) -> ReloadDirs {
        let canonical = root.canonicalize().unwrap();
        ReloadDirs {
            items: canonical.clone(),
            users: canonical,
        }
    }

    #[test]
    fn reload_paths_must_stay_inside_the_folder() {
        let root = tempfile::tempdir().unwrap();
        let inside = root.path().join("items-v2.frt");
        std::fs::write(&inside, b"x").unwrap();
        let dirs = dirs(root.path());
        let canonical = inside.canonicalize().unwrap();

        assert_eq!(
            dirs.resolve(TableKind::Items, "items-v2.frt").unwrap(),
            canonical
        );
        assert_eq!(
            dirs.resolve(TableKind::Items, canonical.to_str().unwrap())
                .unwrap(),
            canonical
        );
        for outside in ["../items.frt", "/etc/passwd", "sub/../../x.frt"] {
            let status = dirs.resolve(TableKind::Items, outside).unwrap_err();
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{outside}");
        }
        let missing = dirs.resolve(TableKind::Users, "missing.frt").unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound);
        let empty = dirs.resolve(TableKind::Users, "").unwrap_err();
        assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn symbolic_links_out_of_the_folder_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("allowed");
        std::fs::create_dir(&allowed).unwrap();
        let secret = root.path().join("secret.frt");
        std::fs::write(&secret, b"x").unwrap();
        std::os::unix::fs::symlink(&secret, allowed.join("link.frt")).unwrap();
        let status = dirs(&allowed)
            .resolve(TableKind::Items, "link.frt")
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
    }
}
