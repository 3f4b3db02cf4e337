//! The privacy budget ledger of `fairrank serve`: where it lives, the pseudonym secret, and
//! the engine's privacy setup built from `[privacy]` and `[ledger]`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use engine::{PrivacySetup, StateLedger};
use state::{
    BudgetLedger, InMemoryLedger, LeaseOptions, LedgerOptions, PseudonymKey, StateDatabase,
};

use crate::config::{Config, LedgerCommit};

/// The pseudonym key: from the configured environment variable, else the secret file
/// (created with a fresh OS-random secret on first use).
pub fn pseudonym_key(config: &Config, ledger_path: Option<&Path>) -> anyhow::Result<PseudonymKey> {
    let env = &config.ledger.secret_env;
    if !env.is_empty()
        && let Ok(hex) = std::env::var(env)
        && !hex.trim().is_empty()
    {
        return PseudonymKey::from_hex(&hex)
            .with_context(|| format!("the pseudonym secret in ${env}"));
    }
    let file = match (&config.ledger.secret_file, ledger_path) {
        (Some(file), _) => file.clone(),
        (None, Some(ledger_path)) => {
            let mut name = ledger_path.as_os_str().to_owned();
            name.push(".secret");
            PathBuf::from(name)
        }
        (None, None) => {
            let (key, _) = PseudonymKey::generate().context("generating a pseudonym secret")?;
            return Ok(key);
        }
    };
    if !file.exists() {
        tracing::warn!(
            file = %file.display(),
            "no pseudonym secret in ${env}: generating one and keeping it in this file (back it \
             up with the ledger; without it, budgets cannot be matched to users)"
        );
    }
    PseudonymKey::load_or_create(&file)
        .with_context(|| format!("the pseudonym secret file {}", file.display()))
}

/// The durable ledger options for this configuration: stored answers are kept for at least
/// one budget window (a retry whose answer was pruned would be charged again).
fn ledger_options(config: &Config) -> LedgerOptions {
    let window = config.privacy.window();
    LedgerOptions {
        max_batch: config.ledger.max_batch,
        retention: window.map(|window| window.max(Duration::from_secs(3600))),
        ..LedgerOptions::default()
    }
}

/// Opens the durable ledger at `path`.
pub fn open_durable(config: &Config, path: &Path) -> anyhow::Result<Arc<dyn BudgetLedger>> {
    let database = StateDatabase::open(path)
        .with_context(|| format!("opening the privacy ledger {}", path.display()))?;
    let starting = || format!("starting the privacy ledger {}", path.display());
    Ok(match config.ledger.commit {
        LedgerCommit::PerCharge => Arc::new(
            database
                .ledger(ledger_options(config))
                .with_context(starting)?,
        ),
        LedgerCommit::Leased => Arc::new(
            database
                .leased_ledger(LeaseOptions {
                    lease_charges: config.ledger.lease_charges,
                    store: ledger_options(config),
                    ..LeaseOptions::default()
                })
                .with_context(starting)?,
        ),
    })
}

/// The engine's privacy setup: configuration and ledger (durable at `ledger.path`; in
/// memory, with a loud warning, when none is configured).
pub fn setup(config: &Config) -> anyhow::Result<PrivacySetup> {
    let path = config.ledger.path.as_deref();
    let key = pseudonym_key(config, path)?;
    let store: Arc<dyn BudgetLedger> = match path {
        None => {
            tracing::warn!(
                "PRIVACY LEDGER IN MEMORY ONLY (no ledger.path configured): privacy budgets and \
                 stored DP answers are lost on restart; set ledger.path in production"
            );
            Arc::new(InMemoryLedger::new())
        }
        Some(path) => {
            tracing::info!(path = %path.display(), "privacy budget ledger");
            open_durable(config, path)?
        }
    };
    Ok(PrivacySetup {
        config: config.privacy.clone(),
        ledger: Arc::new(StateLedger::new(store, key)),
    })
}
