//! `fairrank.toml`: the server's configuration file, its documented defaults and CLI overrides.
//!
//! Every key is optional. `fairrank serve --print-config` prints the effective configuration
//! (file, environment and flags merged) with each key's documentation and default, in the
//! file's own format, so its output is a valid starting configuration.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// Text that replaces secrets in rendered configurations.
const REDACTED: &str = "<redacted>";

/// Most threads `server.io_threads` may ask for.
const MAX_IO_THREADS: usize = 1024;

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Network, limits, shutdown, admin access and logging.
    pub server: ServerConfig,
    /// Which table files to serve and where reloads may read from.
    pub tables: TablesConfig,
    /// The idempotency (replay) store of Rank answers.
    pub replay: ReplayConfig,
    /// Request limits, defaults and the micro-batcher (the engine's configuration).
    pub ranking: engine::EngineConfig,
    /// Differential privacy: defaults, limits and per-subject budgets.
    pub privacy: engine::PrivacyConfig,
    /// The durable privacy budget ledger and the pseudonym secret.
    pub ledger: LedgerConfig,
    /// Durable server state (amortized fairness state).
    pub state: StateConfig,
}

/// Environment variable that replaces the default state directory (a configured `[state]
/// dir` or `--state-dir` still wins).
pub const STATE_DIR_ENV_VAR: &str = "FAIRRANK_STATE_DIR";

/// File name of the state database inside the state directory.
pub const STATE_DATABASE_FILE: &str = "state.redb";

/// File name of the generated pseudonym secret inside the state directory.
pub const PSEUDONYM_SECRET_FILE: &str = "pseudonym.secret";

/// `[state]`: the server's data directory. It holds ONE embedded database
/// ([`STATE_DATABASE_FILE`]) with the privacy budget ledger and the amortized fairness state
/// (separate tables, each with its own commit policy), and the generated pseudonym secret
/// ([`PSEUDONYM_SECRET_FILE`]). One server process per directory: the database is locked
/// while a server runs, and a second server on the same directory refuses to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// Data directory (created, mode 0700, if missing). Unset: `$FAIRRANK_STATE_DIR`, else
    /// `$XDG_DATA_HOME/fairrank`, else `$HOME/.local/share/fairrank`, else
    /// `./.fairrank-state` (see [`StateConfig::resolved_dir`]). The `--state-dir` flag
    /// overrides it.
    pub dir: Option<PathBuf>,
    /// `durable` (default): the ledger and the amortized state live in the database and
    /// survive restarts and crashes. `memory`: both live in memory only and are LOST on
    /// restart (a refunded privacy budget); for tests and development, with a loud warning.
    pub mode: StateMode,
    /// How often changed amortized scopes are written, in milliseconds (default 50): the
    /// most a crash can lose. A graceful shutdown writes everything.
    pub amortized_flush_ms: u64,
}

/// `state.mode`: where the server's state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateMode {
    /// In the state database of the state directory.
    #[default]
    Durable,
    /// In memory only (tests and development; lost on restart).
    Memory,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: None,
            mode: StateMode::Durable,
            amortized_flush_ms: 50,
        }
    }
}

impl StateConfig {
    /// The state directory in force: `dir` if set, else the per-user default from the
    /// environment.
    ///
    /// The default is a *data* directory, not a cache or a state directory in the XDG sense
    /// (`$XDG_STATE_HOME` is for state "not important enough" for `$XDG_DATA_HOME`): losing
    /// the ledger silently refunds every user's privacy budget, so it belongs with the data
    /// users back up. Production services should set `dir` (for example
    /// `/var/lib/fairrank`).
    pub fn resolved_dir(&self) -> PathBuf {
        self.resolved_dir_from(|name| std::env::var_os(name))
    }

    /// [`StateConfig::resolved_dir`] with the environment given as a lookup function. Empty
    /// variables count as unset, and so does a relative `XDG_DATA_HOME` (the XDG
    /// specification says to ignore it).
    fn resolved_dir_from(&self, lookup: impl Fn(&str) -> Option<OsString>) -> PathBuf {
        if let Some(dir) = &self.dir {
            return dir.clone();
        }
        let non_empty = |name: &str| lookup(name).filter(|value| !value.is_empty());
        if let Some(dir) = non_empty(STATE_DIR_ENV_VAR) {
            return PathBuf::from(dir);
        }
        if let Some(dir) = non_empty("XDG_DATA_HOME").map(PathBuf::from)
            && dir.is_absolute()
        {
            return dir.join("fairrank");
        }
        if let Some(home) = non_empty("HOME") {
            return PathBuf::from(home)
                .join(".local")
                .join("share")
                .join("fairrank");
        }
        PathBuf::from(".fairrank-state")
    }
}

/// `[ledger]`: where privacy budgets and released DP answers are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerConfig {
    /// Environment variable holding the pseudonym secret (hex, at least 32 bytes) that
    /// keys user ids into ledger pseudonyms (default `FAIRRANK_PSEUDONYM_SECRET`). Unset
    /// variable: a secret is generated once and kept in `secret_file` (with `state.mode =
    /// "memory"` and no `secret_file`: a fresh secret per start).
    pub secret_env: String,
    /// File holding the pseudonym secret when the variable is unset. Unset:
    /// `pseudonym.secret` in the state directory (created with mode 0600).
    pub secret_file: Option<PathBuf>,
    /// Most charges committed by one group commit (default 1024).
    pub max_batch: usize,
    /// How charges reach the disk (default `leased`): `leased` reserves each user's budget
    /// durably in blocks (one fsync per block, renewed ahead of need; a crash wastes the
    /// unused rest of a block, never refunds it) and writes stored answers in the background
    /// (after a kill -9, a retry of an answer released in the last ~100 ms is charged again
    /// and gets new noise: both releases are paid for, nothing is refunded); `per-charge` fsyncs
    /// every charge with its answer before release (group commit), so even a retry right
    /// after a crash replays the same answer, at milliseconds per charge on slow disks.
    pub commit: LedgerCommit,
    /// Charges one leased block covers (default 8; `commit = "leased"` only): a crash
    /// wastes at most this many charges of each active user's budget.
    pub lease_charges: u64,
    /// Most stored answers kept for replays (default 8 000 000; `commit = "leased"` only).
    /// Their index takes about 50 bytes of memory each; beyond this bound the oldest are
    /// pruned before their retention is over (a retry of one is charged again, with new
    /// noise; never a refund).
    pub max_stored_answers: u64,
}

/// `ledger.commit`: when a charge becomes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LedgerCommit {
    /// Budget reserved durably in blocks; answers written in the background.
    #[default]
    Leased,
    /// Every charge and its answer fsynced before release.
    PerCharge,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            secret_env: "FAIRRANK_PSEUDONYM_SECRET".to_owned(),
            secret_file: None,
            max_batch: 1024,
            commit: LedgerCommit::Leased,
            lease_charges: 8,
            max_stored_answers: 8_000_000,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[server]`: network, limits, shutdown, admin access and logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address (default `127.0.0.1:50051`; port 0 picks a free port).
    pub addr: SocketAddr,
    /// Prometheus metrics listen address, served at `/metrics` (default `127.0.0.1:9464`).
    /// An empty string turns the metrics endpoint off.
    pub metrics_addr: String,
    /// Rank requests (RankBatch entries count one each) admitted at once across the server;
    /// more are shed with `RESOURCE_EXHAUSTED` (default 256).
    pub max_concurrent_requests: usize,
    /// Largest encoded request message, and largest Rank or RankBatch answer, in bytes
    /// (default 16 MiB); either larger is refused with `RESOURCE_EXHAUSTED` (requests to
    /// every service, health and reflection included). Admin, health and reflection
    /// answers are not limited.
    pub max_message_bytes: usize,
    /// Deadline of calls that send no `grpc-timeout`, in milliseconds (default 5000).
    pub default_deadline_ms: u64,
    /// After SIGTERM or SIGINT, how long health reports `NOT_SERVING` while requests are
    /// still served, so load balancers stop routing before the listener closes, in
    /// milliseconds (default 0).
    pub shutdown_delay_ms: u64,
    /// Longest a graceful shutdown waits for in-flight calls to finish, in milliseconds
    /// (default 10000).
    pub shutdown_grace_ms: u64,
    /// Bearer token required by the Admin service. Prefer `admin_token_env` over writing
    /// the secret here. With no token at all the Admin service answers `UNIMPLEMENTED`.
    pub admin_token: String,
    /// Environment variable holding the admin token, used when `admin_token` is empty
    /// (default `FAIRRANK_ADMIN_TOKEN`).
    pub admin_token_env: String,
    /// Log format: `text` or `json` (default `text`). Verbosity comes from `RUST_LOG`
    /// (default `info`).
    pub log_format: LogFormat,
    /// Whether HTTP/2 writes to a connection are vectored (default false). Off, an answer
    /// whose message is under 1 KiB leaves in one system call with its headers and
    /// trailers (on, in two); a message of 1 KiB or more then takes one write more than
    /// with vectored writes. Turn it on when most answers are over 1 KiB.
    pub vectored_writes: bool,
    /// Whether the `fairrank.bench.v1.Echo` service is served (default false): the load
    /// generator's transport baseline when it measures this server's own Echo
    /// (`fairrank-loadgen --echo-addr`). It needs no token and answers up to 4 MiB to any
    /// request, so it is off unless a benchmark asks for it.
    pub echo_service: bool,
    /// Threads that serve gRPC connections (default 0: one per available core).
    pub io_threads: usize,
    /// Whether each connection is served by one I/O thread from start to end, the one with
    /// the fewest open connections (default true): while every I/O thread is busy, a call's
    /// bytes, its inline ranking and its answer stay on one core; an idle I/O thread takes
    /// Rank rankings queued on a busy one (`serve/handoff.rs`). False: every I/O thread
    /// takes every connection's calls (tokio's shared scheduler), with a hand-off between
    /// threads for most calls.
    pub pin_connections: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_addr: "127.0.0.1:9464".to_owned(),
            max_concurrent_requests: 256,
            max_message_bytes: 16 * 1024 * 1024,
            default_deadline_ms: 5000,
            shutdown_delay_ms: 0,
            shutdown_grace_ms: 10_000,
            admin_token: String::new(),
            admin_token_env: "FAIRRANK_ADMIN_TOKEN".to_owned(),
            log_format: LogFormat::Text,
            vectored_writes: false,
            echo_service: false,
            io_threads: 0,
            pin_connections: true,
        }
    }
}

/// `[tables]`: which table files to serve.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TablesConfig {
    /// Item table file. Unset: the built-in default dataset (generated on first use).
    pub items: Option<PathBuf>,
    /// User table file. Unset with `items` unset: the default dataset's users; unset with
    /// `items` set: no user table (requests must send inline embeddings).
    pub users: Option<PathBuf>,
    /// Folder that `Admin.ReloadTable` paths must lie inside; relative paths are taken
    /// relative to it. Unset: the folder of the table's start-up file (the item table's
    /// folder for a user table loaded later).
    pub reload_dir: Option<PathBuf>,
}

/// `[replay]`: the idempotency store. A Rank request repeated with the same `request_id`
/// and the same content within the window gets the stored answer (`replayed = true`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplayConfig {
    /// How long an answer stays replayable, in milliseconds (default 60000).
    pub window_ms: u64,
    /// Most answers kept; the oldest are dropped first (default 10000). 0 turns the store
    /// off: repeated ids are then ranked again and never refused.
    pub max_entries: usize,
    /// Most encoded answer bytes kept (default 64 MiB); an answer larger than this is not
    /// stored.
    pub max_bytes: usize,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            window_ms: 60_000,
            max_entries: 10_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Documentation of every key, printed above it by [`Config::to_documented_toml`].
const KEY_DOCS: &[(&str, &str, &str)] = &[
    (
        "server",
        "addr",
        "gRPC listen address (port 0 picks a free port).",
    ),
    (
        "server",
        "metrics_addr",
        "Prometheus endpoint address, served at /metrics; \"\" turns it off.",
    ),
    (
        "server",
        "max_concurrent_requests",
        "Rank requests admitted at once (a RankBatch entry counts one); more are shed with RESOURCE_EXHAUSTED.",
    ),
    (
        "server",
        "max_message_bytes",
        "Largest encoded request message (every service), and largest Rank or RankBatch answer, in bytes; either larger is refused with RESOURCE_EXHAUSTED (requests to every service, health and reflection included; Admin, health and reflection answers are not limited).",
    ),
    (
        "server",
        "default_deadline_ms",
        "Deadline of calls without grpc-timeout, in milliseconds.",
    ),
    (
        "server",
        "shutdown_delay_ms",
        "After SIGTERM/SIGINT: health says NOT_SERVING for this long while requests are still served.",
    ),
    (
        "server",
        "shutdown_grace_ms",
        "Longest a graceful shutdown waits for in-flight calls, in milliseconds.",
    ),
    (
        "server",
        "admin_token",
        "Bearer token of the Admin service (prefer admin_token_env); no token: Admin answers UNIMPLEMENTED.",
    ),
    (
        "server",
        "admin_token_env",
        "Environment variable holding the admin token when admin_token is empty.",
    ),
    (
        "server",
        "log_format",
        "Log format: \"text\" or \"json\"; the verbosity comes from RUST_LOG (info when unset).",
    ),
    (
        "server",
        "vectored_writes",
        "Vectored HTTP/2 writes; off, answers under 1 KiB leave in one system call with their headers and trailers, larger ones take one more.",
    ),
    (
        "server",
        "echo_service",
        "Serve the fairrank.bench.v1.Echo benchmark baseline (no token; answers up to 4 MiB to any request), for fairrank-loadgen --echo-addr.",
    ),
    (
        "server",
        "io_threads",
        "Threads serving gRPC connections; 0: one per available core.",
    ),
    (
        "server",
        "pin_connections",
        "Serve each connection on one I/O thread (the one with the fewest open connections), whose calls stay on it except the Rank rankings an idle I/O thread takes over; false: all I/O threads share all connections.",
    ),
    (
        "tables",
        "items",
        "Item table file; unset: the built-in default dataset.",
    ),
    (
        "tables",
        "users",
        "User table file; unset: the default dataset's users if items is unset, else none.",
    ),
    (
        "tables",
        "reload_dir",
        "Folder that ReloadTable paths must lie in (relative paths start there); unset: the table's own folder.",
    ),
    (
        "replay",
        "window_ms",
        "How long an answer stays replayable by its request_id, in milliseconds.",
    ),
    (
        "replay",
        "max_entries",
        "Most answers kept for replay (oldest dropped first); 0 turns replay off.",
    ),
    (
        "replay",
        "max_bytes",
        "Most encoded answer bytes kept for replay.",
    ),
    ("ranking", "max_k", "Largest k a request may ask for."),
    (
        "ranking",
        "max_pool",
        "Largest re-ranking pool (at least max_k).",
    ),
    (
        "ranking",
        "default_pool",
        "Pool size of requests that set none (raised to k if smaller).",
    ),
    (
        "ranking",
        "max_candidates",
        "Most candidate ids per request.",
    ),
    (
        "ranking",
        "inline_max_candidates",
        "Longest candidate list ranked on the async worker that received it instead of the compute pool (small lists cost less than the thread hand-off); 0: never.",
    ),
    (
        "ranking",
        "max_batch_requests",
        "Most entries per RankBatch call.",
    ),
    (
        "ranking",
        "max_batch_candidates",
        "Most candidate ids per RankBatch call, all entries together (checked before the body is decoded).",
    ),
    (
        "ranking",
        "batch_max_wait_us",
        "Longest a whole-catalog request waits for company in the micro-batcher while it is busy, in microseconds.",
    ),
    (
        "ranking",
        "batch_max_queries",
        "Most whole-catalog queries scored by one batched scan.",
    ),
    (
        "ranking",
        "batch_queue_capacity",
        "Whole-catalog requests that may wait for the batcher; more are refused (RESOURCE_EXHAUSTED).",
    ),
    (
        "ranking",
        "default_fairness_constraint",
        "Fairness constraint of requests that name none (a registered name, exact and case-sensitive: none, fa*ir, det-greedy, det-cons, det-relaxed, det-const-sort, min-exposure, fairco, plackett-luce).",
    ),
    (
        "ranking",
        "default_fairness_params",
        "Parameters of the default constraint, as in the fairness registry, e.g. { p = 0.5, alpha = 0.1, protected = 1 } for \"fa*ir\" (Admin GetStatus lists every constraint and its parameters).",
    ),
    (
        "ranking",
        "default_on_infeasible",
        "When a constraint cannot be met on the pool and the request does not say: \"best_effort\", \"unconstrained\" or \"reject\".",
    ),
    (
        "ranking",
        "reranker_cache_capacity",
        "Fairness re-rankers kept built, by canonical policy (0 rebuilds per request).",
    ),
    (
        "ranking",
        "max_exposure_scopes",
        "Most amortized-fairness exposure scopes held; requests opening more get RESOURCE_EXHAUSTED.",
    ),
    (
        "ranking",
        "default_group_attribute",
        "Group attribute of requests that name none.",
    ),
    (
        "ranking",
        "require_explicit_consent",
        "Whether personalization needs an explicit GRANTED consent.",
    ),
    (
        "ranking",
        "verify_checksum_on_reload",
        "Whether table loads (at start, and reloads before swapping) verify the whole-file checksum.",
    ),
    (
        "ranking",
        "quantized_candidates",
        "Whether candidate lists are first scored on an int8 copy of the item rows, and only the candidates its proven error bound cannot rule out rescored in f32 (same answers bit for bit; the copy costs dim rounded up to 16/32/64 or a multiple of 64, plus 4 bytes, per item row, and is built in the background after each item table swap). Not used under differential privacy.",
    ),
    (
        "state",
        "dir",
        "Data directory holding the one state database (state.redb: privacy ledger + amortized fairness state) and the generated pseudonym secret; one server per directory. Unset: $FAIRRANK_STATE_DIR, else $XDG_DATA_HOME/fairrank, else ~/.local/share/fairrank. --state-dir overrides it.",
    ),
    (
        "state",
        "mode",
        "\"durable\" (ledger and amortized state in the database, kept across restarts) or \"memory\" (LOST on restart, privacy budgets refunded: tests and development only).",
    ),
    (
        "state",
        "amortized_flush_ms",
        "How often changed amortized fairness scopes are written, in milliseconds (the most a crash can lose).",
    ),
    (
        "privacy",
        "default_mechanism",
        "Mechanism of requests that name none: \"none\" or \"gumbel-top-k\".",
    ),
    (
        "privacy",
        "require_dp",
        "Refuse requests asking for mechanism NONE (FAILED_PRECONDITION).",
    ),
    (
        "privacy",
        "user_norm_bound",
        "L2 norm C_u user embeddings are clipped to under DP (score sensitivity 2 C_u C_v).",
    ),
    (
        "privacy",
        "default_epsilon_per_pick",
        "Per-pick epsilon of requests without a budget; a pool of m costs m eps^2 / 8 zCDP.",
    ),
    (
        "privacy",
        "default_delta",
        "Delta at which reports state the (epsilon, delta) equivalent.",
    ),
    (
        "privacy",
        "max_request_rho",
        "Largest zCDP charge of one answer; costlier requests get FAILED_PRECONDITION.",
    ),
    (
        "privacy",
        "score_budget_share",
        "Share of the budget spent on noisy scores when a request asks for them, in (0, 1).",
    ),
    (
        "privacy",
        "subject_rho_cap",
        "Each user's zCDP budget per window.",
    ),
    (
        "privacy",
        "budget_window_secs",
        "Budget window in seconds, at most 3155760000 (100 years); 0: a lifetime budget.",
    ),
    (
        "privacy",
        "on_budget_exhausted",
        "When a budget is used up: \"reject\" (RESOURCE_EXHAUSTED) or \"non-personalized\".",
    ),
    (
        "privacy",
        "workers",
        "Threads running DP requests (the ledger commit blocks them, not the compute pool).",
    ),
    (
        "privacy",
        "noise_buffer",
        "Gumbel samples pre-generated per DP worker, refilled between requests.",
    ),
    (
        "ledger",
        "secret_env",
        "Environment variable with the pseudonym secret (hex, at least 32 bytes).",
    ),
    (
        "ledger",
        "secret_file",
        "Pseudonym secret file used when the variable is unset; unset: pseudonym.secret in the state directory.",
    ),
    (
        "ledger",
        "max_batch",
        "Most charges committed by one group commit.",
    ),
    (
        "ledger",
        "commit",
        "\"leased\" (budget reserved durably in blocks; a crash wastes, never refunds) or \"per-charge\" (every charge fsynced before release).",
    ),
    (
        "ledger",
        "lease_charges",
        "Charges one leased block covers (commit = \"leased\").",
    ),
    (
        "ledger",
        "max_stored_answers",
        "Most stored answers kept for replays, about 50 bytes of memory each; beyond it the oldest are pruned early, and a retry of one is charged again (commit = \"leased\").",
    ),
];

/// Section order and headers of the documented rendering.
const SECTION_DOCS: &[(&str, &str)] = &[
    (
        "server",
        "Network, limits, shutdown, admin access and logging.",
    ),
    (
        "tables",
        "Table files (unset keys are listed commented out).",
    ),
    (
        "replay",
        "Idempotency store: same request_id + same content -> stored answer.",
    ),
    ("ranking", "Request limits, defaults and the micro-batcher."),
    (
        "state",
        "Durable state: the data directory (unset keys are listed commented out).",
    ),
    (
        "privacy",
        "Differential privacy: defaults, limits, per-user budgets.",
    ),
    (
        "ledger",
        "Privacy budget ledger (in the state database; charged before every DP answer).",
    ),
];

impl Config {
    /// Reads a configuration file; unknown keys and bad values are errors naming the file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the configuration file", path.display()))?;
        if let Some(moved) = moved_key(&text) {
            bail!("{}: invalid configuration: {moved}", path.display());
        }
        let config: Config = toml::from_str(&text).map_err(|error| {
            anyhow::anyhow!(
                "{}: invalid configuration: {}",
                path.display(),
                toml_problem(&text, &error)
            )
        })?;
        config
            .validate()
            .with_context(|| format!("{}: invalid configuration", path.display()))?;
        Ok(config)
    }

    /// Checks values that the types cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        let server = &self.server;
        if server.max_concurrent_requests == 0 {
            bail!("server.max_concurrent_requests must be at least 1");
        }
        // tokio's semaphore holds at most usize::MAX >> 3 permits.
        if server.max_concurrent_requests > 1 << 24 {
            bail!("server.max_concurrent_requests must be at most {}", 1 << 24);
        }
        if server.max_message_bytes < 1024 {
            bail!("server.max_message_bytes must be at least 1024");
        }
        if server.default_deadline_ms == 0 {
            bail!("server.default_deadline_ms must be at least 1");
        }
        if server.io_threads > MAX_IO_THREADS {
            bail!("server.io_threads must be at most {MAX_IO_THREADS} (0: one per core)");
        }
        self.metrics_addr()?;
        if self.replay.max_entries > 0 && self.replay.window_ms == 0 {
            bail!("replay.window_ms must be at least 1 while replay.max_entries is above 0");
        }
        self.ranking.validate().context("ranking")?;
        self.check_default_fairness()?;
        if self.state.amortized_flush_ms == 0 {
            bail!("state.amortized_flush_ms must be at least 1");
        }
        self.privacy.validate().context("privacy")?;
        if self.ledger.max_batch == 0 {
            bail!("ledger.max_batch must be at least 1");
        }
        if self.ledger.lease_charges == 0 {
            bail!("ledger.lease_charges must be at least 1");
        }
        if self.ledger.max_stored_answers == 0 {
            bail!("ledger.max_stored_answers must be at least 1");
        }
        Ok(())
    }

    /// Builds the default fairness policy (`ranking.default_fairness_constraint` with
    /// `ranking.default_fairness_params`) with the built-in constraints, as the engine will
    /// at start, so that a bad one is refused naming the file and the key, by
    /// `--print-config` too.
    fn check_default_fairness(&self) -> anyhow::Result<()> {
        let ranking = &self.ranking;
        let name = &ranking.default_fairness_constraint;
        if name.len() > engine::MAX_CONSTRAINT_NAME_BYTES {
            bail!(
                "ranking.default_fairness_constraint: {} is {} bytes long, not a constraint \
                 name (at most {} bytes)",
                fairness::quote_clipped(name),
                name.len(),
                engine::MAX_CONSTRAINT_NAME_BYTES
            );
        }
        let params: serde_json::Map<String, serde_json::Value> = ranking
            .default_fairness_params
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        match fairness::Registry::with_builtins()
            .build_named(&ranking.default_fairness_constraint, &params)
        {
            Ok(_) => Ok(()),
            Err(error @ fairness::FairnessError::UnknownConstraint { .. }) => {
                bail!("ranking.default_fairness_constraint: {error}")
            }
            Err(error) => bail!(
                "ranking.default_fairness_params (for {}): {error}",
                fairness::quote_clipped(name)
            ),
        }
    }

    /// The threads that serve gRPC connections: `server.io_threads`, or one per available
    /// core when it is 0.
    pub fn io_threads(&self) -> usize {
        match self.server.io_threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            threads => threads,
        }
    }

    /// The metrics address, `None` when the endpoint is off.
    pub fn metrics_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        let text = self.server.metrics_addr.trim();
        if text.is_empty() {
            return Ok(None);
        }
        let addr = text.parse::<SocketAddr>().with_context(|| {
            format!(
                "server.metrics_addr {} is not HOST:PORT (an IP address and a port)",
                fairness::quote_clipped(text)
            )
        })?;
        Ok(Some(addr))
    }

    /// The admin token in force: `admin_token`, else the variable named by `admin_token_env`.
    pub fn admin_token(&self) -> Option<String> {
        if !self.server.admin_token.is_empty() {
            return Some(self.server.admin_token.clone());
        }
        if self.server.admin_token_env.is_empty() {
            return None;
        }
        std::env::var(&self.server.admin_token_env)
            .ok()
            .filter(|token| !token.is_empty())
    }

    /// A copy with secrets replaced by `<redacted>`.
    pub fn redacted(&self) -> Config {
        let mut redacted = self.clone();
        if !redacted.server.admin_token.is_empty() {
            redacted.server.admin_token = REDACTED.to_owned();
        }
        redacted
    }

    /// The configuration as TOML, secrets redacted, every key preceded by its documentation
    /// (for `--print-config` and `GetStatus.config`). Unset optional keys are printed
    /// commented out.
    pub fn to_documented_toml(&self) -> String {
        let (value, defaults) = match (
            toml::Table::try_from(self.redacted()),
            toml::Table::try_from(Config::default()),
        ) {
            (Ok(value), Ok(defaults)) => (value, defaults),
            (Err(error), _) | (_, Err(error)) => {
                return format!("# the configuration cannot be rendered: {error}\n");
            }
        };
        let mut text = String::from(
            "# fairrank server configuration (`fairrank serve --config FILE`).\n\
             # Every key is optional; the values below are the effective ones.\n",
        );
        for &(section, header) in SECTION_DOCS {
            // Writing to a String cannot fail.
            let _ = write!(text, "\n# {header}\n[{section}]\n");
            let table = value.get(section).and_then(toml::Value::as_table);
            let default_table = defaults.get(section).and_then(toml::Value::as_table);
            for &(_, key, doc) in KEY_DOCS.iter().filter(|(s, _, _)| *s == section) {
                match default_table.and_then(|table| table.get(key)) {
                    Some(default) => {
                        let _ = writeln!(text, "# {doc} Default: {default}.");
                    }
                    None => {
                        let _ = writeln!(text, "# {doc} Default: unset.");
                    }
                }
                match table.and_then(|table| table.get(key)) {
                    Some(value) => {
                        let _ = writeln!(text, "{key} = {value}");
                    }
                    None => {
                        let _ = writeln!(text, "# {key} = (unset)");
                    }
                }
            }
        }
        text
    }
}

/// Explains a key of an earlier version that was replaced, if `text` has one.
/// Longest text of the TOML parser's refusal shown as it is. The parser quotes the whole
/// line at fault, and serde a value of the wrong type: a longer refusal is shown with the
/// line and the message clipped.
const MAX_TOML_PROBLEM_BYTES: usize = 1024;

/// The TOML parser's refusal of `text`, at most about [`MAX_TOML_PROBLEM_BYTES`] long.
fn toml_problem(text: &str, error: &toml::de::Error) -> String {
    let whole = error.to_string();
    if whole.len() <= MAX_TOML_PROBLEM_BYTES {
        return whole;
    }
    let message = clipped(error.message(), MAX_TOML_PROBLEM_BYTES / 2);
    let Some(start) = error.span().map(|span| span.start) else {
        return message;
    };
    let before = text.get(..start).unwrap_or_default();
    let line_start = before.rfind('\n').map_or(0, |at| at + 1);
    let line_end = text[line_start..]
        .find('\n')
        .map_or(text.len(), |end| line_start + end);
    format!(
        "TOML parse error at line {}, column {}, in the line {}: {message}",
        before.matches('\n').count() + 1,
        before.len() - line_start + 1,
        fairness::quote_clipped(&text[line_start..line_end])
    )
}

/// `text`, or its first `max_bytes` bytes or fewer (at a character boundary) and its length.
fn clipped(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_owned();
    }
    let end = (0..=max_bytes)
        .rev()
        .find(|&end| text.is_char_boundary(end))
        .unwrap_or(0);
    format!("{}... ({} bytes)", &text[..end], text.len())
}

fn moved_key(text: &str) -> Option<String> {
    let table: toml::Table = toml::from_str(text).ok()?;
    let (section, _) =
        [("ledger", "path"), ("state", "path")]
            .into_iter()
            .find(|(section, key)| {
                table
                    .get(*section)
                    .and_then(|value| value.get(key))
                    .is_some()
            })?;
    Some(format!(
        "{section}.path was replaced by `[state] dir`: the privacy ledger and the amortized \
         fairness state now share one database, {STATE_DATABASE_FILE} in that directory. Move \
         the old ledger file there as {STATE_DATABASE_FILE} (its tables are compatible; if both \
         ledger.path and state.path were set, keep the ledger's file: the amortized state \
         rebuilds itself) and its .secret file as {PSEUDONYM_SECRET_FILE}, or set \
         ledger.secret_file; `mode = \"memory\"` under [state] keeps everything in memory"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let config: Config = toml::from_str("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.server.addr.to_string(), "127.0.0.1:50051");
        assert_eq!(config.ranking.max_k, 1000);
        assert_eq!(config.replay.max_entries, 10_000);
        config.validate().unwrap();
    }

    #[test]
    fn the_documented_rendering_parses_back_to_the_same_configuration() {
        let mut config = Config::default();
        config.tables.items = Some(PathBuf::from("/data/items.frt"));
        config.ranking.max_k = 50;
        config.server.log_format = LogFormat::Json;
        let text = config.to_documented_toml();
        let parsed: Config = toml::from_str(&text).unwrap();
        assert_eq!(parsed, config, "{text}");
        assert!(text.contains("# users = (unset)"), "{text}");
    }

    #[test]
    fn the_example_file_is_the_documented_default_configuration() {
        let example = include_str!("../fairrank.example.toml");
        assert_eq!(
            example,
            Config::default().to_documented_toml(),
            "regenerate it: fairrank serve --print-config > crates/server/fairrank.example.toml"
        );
        let parsed: Config = toml::from_str(example).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn every_key_is_documented() {
        let value = toml::Table::try_from(Config {
            tables: TablesConfig {
                items: Some("a".into()),
                users: Some("b".into()),
                reload_dir: Some("c".into()),
            },
            state: StateConfig {
                dir: Some("d".into()),
                ..StateConfig::default()
            },
            ledger: LedgerConfig {
                secret_file: Some("e".into()),
                ..LedgerConfig::default()
            },
            ..Config::default()
        })
        .unwrap();
        let mut keys = Vec::new();
        for (section, table) in &value {
            assert!(
                SECTION_DOCS.iter().any(|(name, _)| name == section),
                "section {section} lacks a header"
            );
            for key in table.as_table().unwrap().keys() {
                keys.push((section.clone(), key.clone()));
            }
        }
        for (section, key) in &keys {
            assert!(
                KEY_DOCS.iter().any(|(s, k, _)| s == section && k == key),
                "{section}.{key} is not documented"
            );
        }
        assert_eq!(keys.len(), KEY_DOCS.len(), "KEY_DOCS lists unknown keys");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fairrank.toml");
        std::fs::write(&path, "[server]\nadress = \"127.0.0.1:1\"\n").unwrap();
        let message = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(
            message.contains("fairrank.toml") && message.contains("adress"),
            "{message}"
        );

        std::fs::write(&path, "[server]\nmax_concurrent_requests = 0\n").unwrap();
        let message = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(message.contains("max_concurrent_requests"), "{message}");

        std::fs::write(&path, "[server]\nio_threads = 1025\n").unwrap();
        let message = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(message.contains("io_threads"), "{message}");
        std::fs::write(&path, "[server]\nio_threads = 3\npin_connections = false\n").unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.io_threads(), 3);
        assert!(!config.server.pin_connections);
        // 0: one thread per core.
        assert_eq!(
            Config::default().io_threads(),
            std::thread::available_parallelism().map_or(1, usize::from)
        );

        std::fs::write(&path, "[server]\nmetrics_addr = \"localhost\"\n").unwrap();
        let message = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(message.contains("metrics_addr"), "{message}");

        std::fs::write(&path, "[ranking]\nmax_k = 0\n").unwrap();
        let message = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(message.contains("max_k"), "{message}");

        // A window whose end no clock can represent made every DP request INTERNAL.
        std::fs::write(
            &path,
            "[privacy]\nbudget_window_secs = 9300000000000000000\n",
        )
        .unwrap();
        let message = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(
            message.contains("fairrank.toml")
                && message.contains("privacy.budget_window_secs")
                && message.contains("100 years"),
            "{message}"
        );
        std::fs::write(&path, "[privacy]\nbudget_window_secs = 3155760000\n").unwrap();
        assert_eq!(
            Config::load(&path).unwrap().privacy.budget_window_secs,
            engine::MAX_BUDGET_WINDOW_SECS
        );

        std::fs::write(
            &path,
            "[ranking]\nmax_k = 5\n[server]\nmetrics_addr = \"\"\n",
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.ranking.max_k, 5);
        assert_eq!(config.metrics_addr().unwrap(), None);
    }

    #[test]
    fn a_bad_default_fairness_policy_is_refused_naming_the_file_and_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (text, key) in [
            (
                "[ranking]\ndefault_fairness_constraint = \"FA*IR\"\n",
                "ranking.default_fairness_constraint",
            ),
            (
                "[ranking]\ndefault_fairness_constraint = \"fa*ir\"\n",
                "ranking.default_fairness_params",
            ),
            (
                "[ranking]\ndefault_fairness_constraint = \"fa*ir\"\n\
                 default_fairness_params = { p = 2.0, protected = 1 }\n",
                "ranking.default_fairness_params",
            ),
        ] {
            let path = dir.path().join("bad.toml");
            std::fs::write(&path, text).expect("writes");
            let error = format!("{:#}", Config::load(&path).expect_err(text));
            assert!(error.contains("bad.toml"), "{error}");
            assert!(error.contains(key), "{error}");
        }
    }

    #[test]
    fn long_values_in_refusals_are_clipped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let long = "é".repeat(50_000);
        for (text, key) in [
            (
                format!("[ranking]\ndefault_fairness_constraint = \"{long}\"\n"),
                "ranking.default_fairness_constraint",
            ),
            (
                format!("[ranking]\ndefault_fairness_constrant = \"{long}\"\n"),
                "default_fairness_constrant",
            ),
            (format!("[ranking]\nmax_k = \"{long}\"\n"), "max_k"),
            (
                format!("[server]\nmetrics_addr = \"{long}\"\n"),
                "server.metrics_addr",
            ),
        ] {
            let path = dir.path().join("long.toml");
            std::fs::write(&path, &text).expect("writes");
            let error = format!("{:#}", Config::load(&path).expect_err(key));
            assert!(error.contains("long.toml"), "{key}: {error}");
            assert!(error.contains(key), "{key}: {error}");
            assert!(error.len() < 1536, "{key}: {} bytes: {error}", error.len());
        }
        // Short refusals are the parser's own, with the line and its marker.
        let path = dir.path().join("short.toml");
        std::fs::write(&path, "[ranking]\nmax_k = \"five\"\n").expect("writes");
        let error = format!("{:#}", Config::load(&path).expect_err("a string"));
        assert!(
            error.contains("max_k = \"five\"") && error.contains('^'),
            "{error}"
        );
    }

    #[test]
    fn a_default_fairness_policy_round_trips_through_the_file() {
        let text = "[ranking]\ndefault_fairness_constraint = \"fa*ir\"\n\
                    default_fairness_params = { p = 0.5, alpha = 0.1, protected = 1 }\n\
                    default_on_infeasible = \"reject\"\n\
                    [state]\ndir = \"/var/lib/fairrank\"\nmode = \"memory\"\n";
        let config: Config = toml::from_str(text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.ranking.default_fairness_constraint, "fa*ir");
        assert_eq!(
            config.ranking.default_fairness_params.get("protected"),
            Some(&serde_json::json!(1))
        );
        assert_eq!(
            config.ranking.default_on_infeasible,
            engine::InfeasibleAction::Reject
        );
        let rendered = config.to_documented_toml();
        let parsed: Config = toml::from_str(&rendered).unwrap();
        assert_eq!(parsed, config, "{rendered}");
    }

    #[test]
    fn the_state_directory_follows_the_documented_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| OsString::from(value))
            }
        };
        let unset = StateConfig::default();
        let all: &'static [(&str, &str)] = &[
            (STATE_DIR_ENV_VAR, "/srv/fr"),
            ("XDG_DATA_HOME", "/xdg"),
            ("HOME", "/home/ann"),
        ];
        assert_eq!(unset.resolved_dir_from(env(all)), PathBuf::from("/srv/fr"));
        assert_eq!(
            unset.resolved_dir_from(env(&[
                (STATE_DIR_ENV_VAR, ""),
                ("XDG_DATA_HOME", "/xdg"),
                ("HOME", "/home/ann"),
            ])),
            PathBuf::from("/xdg/fairrank")
        );
        // A relative XDG_DATA_HOME is ignored, as the XDG specification says.
        assert_eq!(
            unset.resolved_dir_from(env(&[("XDG_DATA_HOME", "relative"), ("HOME", "/home/ann")])),
            PathBuf::from("/home/ann/.local/share/fairrank")
        );
        assert_eq!(
            unset.resolved_dir_from(env(&[])),
            PathBuf::from(".fairrank-state")
        );
        let configured = StateConfig {
            dir: Some("/var/lib/fairrank".into()),
            ..StateConfig::default()
        };
        assert_eq!(
            configured.resolved_dir_from(env(all)),
            PathBuf::from("/var/lib/fairrank")
        );
    }

    #[test]
    fn replaced_database_paths_are_refused_with_directions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fairrank.toml");
        for text in [
            "[ledger]\npath = \"/data/ledger.redb\"\n",
            "[state]\npath = \"/data/state.redb\"\n",
        ] {
            std::fs::write(&path, text).unwrap();
            let message = format!("{:#}", Config::load(&path).unwrap_err());
            assert!(
                message.contains("fairrank.toml")
                    && message.contains(".path was replaced by `[state] dir`")
                    && message.contains(STATE_DATABASE_FILE),
                "{message}"
            );
        }
        std::fs::write(&path, "[state]\nmode = \"memory\"\n").unwrap();
        assert_eq!(Config::load(&path).unwrap().state.mode, StateMode::Memory);
        std::fs::write(&path, "[state]\nmode = \"disk\"\n").unwrap();
        let message = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(message.contains("disk"), "{message}");
    }

    #[test]
    fn the_admin_token_is_redacted_and_read_from_the_environment_variable() {
        let mut config = Config::default();
        config.server.admin_token = "s3cret".to_owned();
        let text = config.to_documented_toml();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains(REDACTED), "{text}");
        assert_eq!(config.admin_token().as_deref(), Some("s3cret"));

        let mut from_env = Config::default();
        from_env.server.admin_token_env = "FAIRRANK_TEST_TOKEN_THAT_IS_NEVER_SET".to_owned();
        assert_eq!(from_env.admin_token(), None);
        from_env.server.admin_token_env = "PATH".to_owned();
        assert!(from_env.admin_token().is_some());
    }
}
