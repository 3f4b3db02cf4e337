//! `fairrank fair ...`: inspection tools for fairness constraints (for now the FA*IR mtable).

use clap::error::ErrorKind;
use fairness::{MAX_MTABLE_K, MTable};

/// Subcommands of `fairrank fair`.
#[derive(Debug, clap::Subcommand)]
pub enum FairCommand {
    /// Print the FA*IR mtable (minimum protected candidates per prefix), its exact failure
    /// probability and the adjusted significance level, as one JSON object.
    Mtable(MtableArgs),
}

/// Arguments of `fairrank fair mtable`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Output: {\"mtable\": [m(1), ..., m(k)], \"failure_probability\": F, \"alpha\": A, \
\"adjusted_alpha\": A', \"adjusted\": true|false, \"k\": K, \"p\": P}

m(i) = min { m : BinomCDF(m; i, p) > alpha' } (Zehlike et al., CIKM 2017). F is the exact \
probability that a ranking whose positions are protected independently with probability p \
fails some prefix 1..k. By default alpha' is the largest level <= alpha whose table fails \
with probability <= alpha. With --no-adjust the table is built at alpha itself: \
adjusted_alpha then equals alpha and adjusted is false (F may exceed alpha).

Exit status: 0 on success, 2 for invalid arguments (p or alpha outside (0, 1), alpha above \
0.5 or below 1e-12, k = 0 or k above 10000).")]
pub struct MtableArgs {
    /// Ranking length: the table covers prefixes 1..=K (1 to 10000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_MTABLE_K as u64))]
    pub k: u64,
    /// Target minimum proportion of protected candidates, strictly between 0 and 1.
    #[arg(long, value_parser = parse_open_unit)]
    pub p: f64,
    /// Significance level of the ranked group fairness test, strictly between 0 and 1 (FA*IR
    /// accepts 1e-12 to 0.5).
    #[arg(long, value_parser = parse_open_unit)]
    pub alpha: f64,
    /// Build the table at alpha itself instead of the multiple-test-adjusted level.
    #[arg(long)]
    pub no_adjust: bool,
}

/// Parses a number strictly between 0 and 1.
fn parse_open_unit(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if value > 0.0 && value < 1.0 {
        Ok(value)
    } else {
        Err(format!("{value} must lie strictly between 0 and 1"))
    }
}

/// Runs `fairrank fair ...`.
pub fn run(command: FairCommand) -> anyhow::Result<()> {
    match command {
        FairCommand::Mtable(args) => {
            let line = mtable_json(&args).unwrap_or_else(|message| {
                // Same exit status (2) and format as clap's own argument errors.
                clap::Error::raw(ErrorKind::ValueValidation, format!("{message}\n")).exit()
            });
            println!("{line}");
            Ok(())
        }
    }
}

/// The JSON answer of `fairrank fair mtable`, or the reason the arguments are refused.
fn mtable_json(args: &MtableArgs) -> Result<serde_json::Value, String> {
    let k = usize::try_from(args.k).map_err(|_| format!("--k {} is too large", args.k))?;
    let table = MTable::compute(k, args.p, args.alpha, !args.no_adjust)
        .map_err(|error| format!("invalid argument: {error}"))?;
    Ok(serde_json::json!({
        "mtable": table.min_protected,
        "failure_probability": table.failure_probability,
        "alpha": table.alpha,
        "adjusted_alpha": table.adjusted_alpha,
        "adjusted": table.adjusted,
        "k": table.k,
        "p": table.p,
    }))
}
