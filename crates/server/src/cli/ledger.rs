//! `fairrank privacy ledger show USER_ID`: a user's privacy budget spend and the ledger's
//! totals, read from the state database of a state directory (stop the server first: the
//! database is locked while it runs).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use engine::StateLedger;

use crate::config::{Config, PSEUDONYM_SECRET_FILE, StateMode};
use crate::serve::privacy::{open_durable, pseudonym_key};
use crate::serve::state_setup::open_database;

/// `fairrank privacy ledger ...`.
#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Print a user's spend in the current window, and the ledger's totals, as JSON.
    Show(ShowArgs),
}

/// Arguments of `fairrank privacy ledger show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The user id (or inline subject id) as sent in requests.
    pub user_id: String,
    /// The server's configuration file (for `[state]`, `[ledger]` and `[privacy]`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The server's state directory, overriding the configuration's `state.dir` (default:
    /// the same default directory as `fairrank serve`).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// Runs `fairrank privacy ledger ...`.
pub fn run(command: LedgerCommand) -> anyhow::Result<()> {
    match command {
        LedgerCommand::Show(args) => show(&args),
    }
}

fn show(args: &ShowArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if config.state.mode == StateMode::Memory && args.state_dir.is_none() {
        anyhow::bail!(
            "the configuration keeps the server's state in memory (state.mode = \"memory\"): \
             there is no ledger to read"
        );
    }
    let dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| config.state.resolved_dir());
    let database = open_database(&dir, true)?;
    let path = database.path().to_path_buf();
    let secret_file = config
        .ledger
        .secret_file
        .clone()
        .unwrap_or_else(|| dir.join(PSEUDONYM_SECRET_FILE));
    let env = &config.ledger.secret_env;
    let secret_in_env =
        !env.is_empty() && std::env::var(env).is_ok_and(|value| !value.trim().is_empty());
    if !secret_in_env && !secret_file.exists() {
        // A fresh secret would match no user: refuse rather than report every user as new.
        anyhow::bail!(
            "no pseudonym secret: ${env} is unset and {} does not exist; give this command the \
             secret the server used (the same ${env}, or --config with its ledger.secret_file)",
            secret_file.display()
        );
    }
    let key = pseudonym_key(&config, Some(&secret_file))?;
    let store = open_durable(&config, &database)?;
    let ledger = StateLedger::new(store, key);
    let now = SystemTime::now();
    let spend = ledger
        .spend(&args.user_id, now)
        .map_err(|failure| anyhow::anyhow!("{failure}"))?;
    let totals = ledger
        .store()
        .totals()
        .map_err(|error| anyhow::anyhow!("reading the ledger's totals: {error}"))?;
    let millis = |time: SystemTime| {
        time.duration_since(UNIX_EPOCH)
            .map(|since| since.as_millis() as u64)
            .unwrap_or(0)
    };
    let json = serde_json::json!({
        "user_id": args.user_id,
        "ledger": path.display().to_string(),
        "rho_spent": spend.spent.to_f64(),
        "rho_cap": spend.cap.map(state::Rho::to_f64),
        "rho_remaining": spend.remaining().map(state::Rho::to_f64),
        "charges": spend.charges,
        "window_start_unix_ms": spend.window_start.map(millis),
        "window_secs": spend.window.map(|window| window.as_secs_f64()),
        // As GetStatus reports them (`privacy_ledger.subjects`, `rho_charged_total`).
        "ledger_subjects": totals.subjects,
        "ledger_rho_charged_total": totals.rho_charged.to_f64(),
    });
    println!("{json}");
    ledger
        .store()
        .close()
        .map_err(|error| anyhow::anyhow!("closing the ledger: {error}"))?;
    Ok(())
}
