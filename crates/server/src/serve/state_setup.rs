//! The server's state: the state directory, its one database (the privacy budget ledger and
//! the amortized fairness state, in separate tables), and the in-memory mode for tests and
//! development.
//!
//! Durable mode (the default) opens `state.redb` in the state directory once and starts both
//! stores on it: the ledger keeps its own commit policy (leased blocks or a group commit per
//! charge, fsynced before any answer is released) and the amortized store its own (changed
//! scopes written in one transaction per flush interval). The database is locked while the
//! server runs: a second server on the same directory refuses to start, naming the file and
//! how to choose another directory. Nothing ever falls back to memory silently: memory mode
//! is an explicit `state.mode = "memory"`, announced by a warning.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use state::{AmortizedStore, BudgetLedger, InMemoryLedger, StateDatabase, StateError};

use crate::config::{
    Config, PSEUDONYM_SECRET_FILE, STATE_DATABASE_FILE, STATE_DIR_ENV_VAR, StateMode,
};
use crate::serve::privacy;

/// What the engine is built with, and the durable stores to close after serving.
pub struct ServerState {
    /// The constraint registry and the amortized state store.
    pub fairness: engine::FairnessSetup,
    /// The privacy configuration and the ledger.
    pub privacy: engine::PrivacySetup,
    /// The same budget ledger as the engine's, for `GetStatus`'s totals
    /// ([`BudgetLedger::totals`]): in memory or in the state database.
    pub ledger: Arc<dyn BudgetLedger>,
    /// Closes the durable stores after serving.
    pub closer: StateCloser,
}

/// The durable stores to close after serving (none in memory mode).
pub struct StateCloser {
    durable: Option<DurableStores>,
}

struct DurableStores {
    path: PathBuf,
    ledger: Arc<dyn BudgetLedger>,
    amortized: Arc<dyn AmortizedStore>,
}

impl ServerState {
    /// Opens the state the configuration asks for.
    pub fn open(config: &Config) -> anyhow::Result<ServerState> {
        match config.state.mode {
            StateMode::Memory => Self::in_memory(config),
            StateMode::Durable => Self::durable(config, &config.state.resolved_dir()),
        }
    }

    fn in_memory(config: &Config) -> anyhow::Result<ServerState> {
        tracing::warn!(
            "STATE IN MEMORY ONLY (state.mode = \"memory\"): privacy budgets, stored DP answers \
             and the amortized fairness state are LOST on restart, which refunds every user's \
             privacy budget; for tests and development only"
        );
        let key = privacy::pseudonym_key(config, None)?;
        let ledger: Arc<dyn BudgetLedger> = Arc::new(InMemoryLedger::new());
        Ok(ServerState {
            fairness: engine::FairnessSetup::in_memory(&config.ranking),
            privacy: privacy::setup(config, Arc::clone(&ledger), key),
            ledger,
            closer: StateCloser { durable: None },
        })
    }

    fn durable(config: &Config, dir: &Path) -> anyhow::Result<ServerState> {
        create_private_dir(dir)?;
        let database = open_database(dir, false)?;
        let key = privacy::pseudonym_key(config, Some(&dir.join(PSEUDONYM_SECRET_FILE)))?;
        let ledger = privacy::open_durable(config, &database)?;
        let amortized: Arc<dyn AmortizedStore> = Arc::new(
            database
                .amortized_store(state::AmortizedOptions {
                    flush_interval: Duration::from_millis(config.state.amortized_flush_ms),
                })
                .context("starting the amortized fairness state store")?,
        );
        tracing::info!(
            database = %database.path().display(),
            "state database: privacy budget ledger and amortized fairness state are durable"
        );
        let adapter = engine::AmortizedStoreAdapter::new(
            Arc::clone(&amortized),
            config.ranking.max_exposure_scopes,
        );
        Ok(ServerState {
            fairness: engine::FairnessSetup {
                registry: fairness::Registry::with_builtins(),
                store: Arc::new(adapter),
            },
            privacy: privacy::setup(config, Arc::clone(&ledger), key),
            ledger: Arc::clone(&ledger),
            closer: StateCloser {
                durable: Some(DurableStores {
                    path: database.path().to_path_buf(),
                    ledger,
                    amortized,
                }),
            },
        })
    }
}

impl StateCloser {
    /// Closes the durable stores after serving: writes the amortized scopes of the last
    /// flush interval, the ledger's pending stored answers, and returns unused budget leases
    /// (a charge arriving later fails closed). Both are attempted; the first error is
    /// returned.
    pub fn close(&self) -> anyhow::Result<()> {
        let Some(stores) = &self.durable else {
            return Ok(());
        };
        let ledger = stores.ledger.close();
        let amortized = stores.amortized.close();
        match (&ledger, &amortized) {
            (Ok(()), Ok(())) => {
                tracing::info!(database = %stores.path.display(), "state database closed");
            }
            _ => {
                for error in [&ledger, &amortized]
                    .into_iter()
                    .filter_map(|result| result.as_ref().err())
                {
                    tracing::error!(%error, "the state database could not be closed cleanly");
                }
            }
        }
        ledger.context("closing the privacy budget ledger")?;
        amortized.context("closing the amortized fairness state")?;
        Ok(())
    }
}

/// Creates the state directory (and its parents) if missing; a new directory gets mode 0700
/// (it holds the pseudonym secret and per-user budgets).
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir).with_context(|| {
        format!(
            "cannot create the state directory {} (choose another with --state-dir DIR, \
             `[state] dir` in the configuration or ${STATE_DIR_ENV_VAR})",
            dir.display()
        )
    })
}

/// Opens the state database of `dir` (`existing_only`: fail if there is none), turning a
/// lock conflict into directions.
pub fn open_database(dir: &Path, existing_only: bool) -> anyhow::Result<StateDatabase> {
    let path = dir.join(STATE_DATABASE_FILE);
    let opened = if existing_only {
        StateDatabase::open_existing(&path)
    } else {
        StateDatabase::open(&path)
    };
    opened.map_err(|error| match error {
        StateError::Locked { .. } => anyhow::anyhow!(
            "the state directory {} is in use: another fairrank process holds its database {} \
             open (one process per state directory). Stop that process, or give this one its \
             own directory with --state-dir DIR, `[state] dir` in the configuration or \
             ${STATE_DIR_ENV_VAR}",
            dir.display(),
            path.display()
        ),
        other => anyhow::Error::new(other)
            .context(format!("opening the state database {}", path.display())),
    })
}
