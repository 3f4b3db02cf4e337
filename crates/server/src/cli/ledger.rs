//! `fairrank privacy ledger show USER_ID`: a user's privacy budget spend, read from the
//! durable ledger (stop the server first: the ledger file is locked while it runs).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use engine::StateLedger;

use crate::config::Config;
use crate::serve::privacy::{open_durable, pseudonym_key};

/// `fairrank privacy ledger ...`.
#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Print a user's spend in the current window as JSON.
    Show(ShowArgs),
}

/// Arguments of `fairrank privacy ledger show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The user id (or inline subject id) as sent in requests.
    pub user_id: String,
    /// The server's configuration file (for `[ledger]` and `[privacy]`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The ledger file, overriding the configuration's `ledger.path`.
    #[arg(long)]
    pub ledger: Option<PathBuf>,
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
    let Some(path) = args.ledger.clone().or_else(|| config.ledger.path.clone()) else {
        anyhow::bail!(
            "no ledger file: pass --ledger PATH or a --config with ledger.path (a server \
             without ledger.path keeps its ledger in memory only)"
        );
    };
    if !path.exists() {
        anyhow::bail!("no privacy ledger at {}", path.display());
    }
    let key = pseudonym_key(&config, Some(&path))?;
    let store = open_durable(&config, &path)?;
    let ledger = StateLedger::new(store, key);
    let now = SystemTime::now();
    let spend = ledger
        .spend(&args.user_id, now)
        .map_err(|failure| anyhow::anyhow!("{failure}"))?;
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
    });
    println!("{json}");
    ledger
        .store()
        .close()
        .map_err(|error| anyhow::anyhow!("closing the ledger: {error}"))?;
    Ok(())
}
