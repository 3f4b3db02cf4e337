//! The privacy budget ledger of `fairrank serve`: the pseudonym secret, the ledger in the
//! state database (per `[ledger] commit`), and the engine's privacy setup built from
//! `[privacy]` and `[ledger]`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use engine::{PrivacySetup, StateLedger};
use state::{BudgetLedger, LeaseOptions, LedgerOptions, PseudonymKey, StateDatabase};

use crate::config::{Config, LedgerCommit};

/// The pseudonym key: from the configured environment variable, else `ledger.secret_file`,
/// else `default_file` (created with a fresh OS-random secret on first use); with neither
/// file (in-memory state), a fresh secret for this process.
pub fn pseudonym_key(config: &Config, default_file: Option<&Path>) -> anyhow::Result<PseudonymKey> {
    let env = &config.ledger.secret_env;
    if !env.is_empty()
        && let Ok(hex) = std::env::var(env)
        && !hex.trim().is_empty()
    {
        return PseudonymKey::from_hex(&hex)
            .with_context(|| format!("the pseudonym secret in ${env}"));
    }
    let file = match (&config.ledger.secret_file, default_file) {
        (Some(file), _) => file.clone(),
        (None, Some(default_file)) => default_file.to_path_buf(),
        (None, None) => {
            let (key, _) = PseudonymKey::generate().context("generating a pseudonym secret")?;
            return Ok(key);
        }
    };
    if !file.exists() {
        tracing::warn!(
            file = %file.display(),
            "no pseudonym secret in ${env}: generating one and keeping it in this file (back it \
             up with the state database; without it, budgets cannot be matched to users)"
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

/// Starts the durable ledger (leased or per-charge, per `ledger.commit`) in `database`.
pub fn open_durable(
    config: &Config,
    database: &StateDatabase,
) -> anyhow::Result<Arc<dyn BudgetLedger>> {
    let starting = || {
        format!(
            "starting the privacy ledger in {}",
            database.path().display()
        )
    };
    Ok(match config.ledger.commit {
        LedgerCommit::PerCharge => Arc::new(
            database
                .ledger(ledger_options(config))
                .with_context(starting)?,
        ),
        LedgerCommit::Leased => {
            let ledger = database
                .leased_ledger(LeaseOptions {
                    lease_charges: config.ledger.lease_charges,
                    max_stored_answers: config.ledger.max_stored_answers,
                    store: ledger_options(config),
                    ..LeaseOptions::default()
                })
                .with_context(starting)?;
            log_recovery(ledger.recovery());
            Arc::new(ledger)
        }
    })
}

/// Reports what opening the leased ledger's answer log found (a torn tail after a crash, a
/// damaged record).
fn log_recovery(recovery: &state::LogRecovery) {
    for message in &recovery.messages {
        tracing::warn!(
            "stored answers (replay records): {message}; a retry of an answer lost this way is \
             charged again as a new request"
        );
    }
    tracing::debug!(
        segments = recovery.segments,
        answers = recovery.answers,
        database_answers = recovery.database_answers,
        "opened the answer log (database_answers: stored by an older version or the \
         per-charge ledger, read in place)"
    );
}

/// The engine's privacy setup: the configuration, `ledger` keyed by `key`, and the message
/// limit a DP answer must fit before it is charged.
pub fn setup(config: &Config, ledger: Arc<dyn BudgetLedger>, key: PseudonymKey) -> PrivacySetup {
    PrivacySetup {
        config: config.privacy.clone(),
        ledger: Arc::new(StateLedger::new(ledger, key)),
        answer_limit: Some(Arc::new(super::answer::MessageLimit::new(
            config.server.max_message_bytes,
        ))),
    }
}
