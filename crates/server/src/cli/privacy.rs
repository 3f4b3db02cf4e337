//! `fairrank privacy ...`: offline differential-privacy tools (noise calibration, zCDP to
//! (epsilon, delta) conversion, and a Gumbel top-k simulator), each printing one JSON object.
//!
//! To add a subcommand (for example `privacy ledger show`), add a variant to
//! [`PrivacyCommand`] whose payload is the new module's argument type and one arm to [`run`].

use anyhow::{Context, bail};
use rand::SeedableRng;
use serde_json::json;

/// Subcommands of `fairrank privacy`.
#[derive(Debug, clap::Subcommand)]
pub enum PrivacyCommand {
    /// Noise scale of the Laplace mechanism (b = S / epsilon) or of the analytic Gaussian
    /// mechanism (Balle & Wang 2018) for a query of sensitivity S: prints {"scale": ...}.
    Calibrate(CalibrateArgs),
    /// Converts rho-zCDP to (epsilon, delta)-DP with the tight conversion of Canonne, Kamath
    /// & Steinke 2020: prints {"epsilon": ...}.
    Convert(ConvertArgs),
    /// Runs one-shot Gumbel top-k (k picks of the exponential mechanism) many times on the
    /// given scores and counts which index was released at each position.
    Topk(PrivacyTopkArgs),
}

/// The noise mechanisms `calibrate` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mechanism {
    /// Laplace noise, pure epsilon-DP for L1 sensitivity S: scale b = S / epsilon.
    Laplace,
    /// Gaussian noise, (epsilon, delta)-DP for L2 sensitivity S: the smallest sigma by the
    /// analytic Gaussian mechanism (needs --delta).
    Gaussian,
}

/// Arguments of `fairrank privacy calibrate`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Output: {\"scale\": s, \"mechanism\": ..., \"epsilon\": E, \"delta\": D|null, \
\"sensitivity\": S, \"rho\": r}. For laplace, scale is b = S / E (rounded up) and rho = E^2 / 2; \
for gaussian, scale is sigma, certified (epsilon, delta)-DP, and rho = S^2 / (2 sigma^2).")]
pub struct CalibrateArgs {
    /// Noise mechanism.
    #[arg(long, value_enum)]
    pub mechanism: Mechanism,
    /// Privacy parameter epsilon (> 0).
    #[arg(long)]
    pub epsilon: f64,
    /// Privacy parameter delta in (0, 1); required for gaussian, refused for laplace.
    #[arg(long)]
    pub delta: Option<f64>,
    /// Sensitivity of the query (L1 for laplace, L2 for gaussian; > 0).
    #[arg(long)]
    pub sensitivity: f64,
}

/// Arguments of `fairrank privacy convert`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Output: {\"epsilon\": E, \"rho\": R, \"delta\": D, \"epsilon_bun_steinke\": E'}, where E' = \
R + 2 sqrt(R ln(1/D)) is the looser Bun-Steinke bound, kept for comparison (E <= E').")]
pub struct ConvertArgs {
    /// zCDP parameter rho (>= 0).
    #[arg(long)]
    pub rho: f64,
    /// Target delta in (0, 1).
    #[arg(long)]
    pub delta: f64,
}

/// Arguments of `fairrank privacy topk`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Output: {\"position_counts\": [[count of index 0, index 1, ...] for each position], \
\"first_pick_probabilities\": [...], \"rho\": r, \"repeat\": N}. Each row of position_counts \
sums to N. first_pick_probabilities are the exact probabilities of the first pick \
(softmax of scores / (2 S / E)); rho = k E^2 / 8 is the zCDP cost of one selection.

This is a diagnostic for public or synthetic scores: the N runs together are not private. \
--seed makes the run reproducible (and gives no privacy at all).")]
pub struct PrivacyTopkArgs {
    /// Comma-separated finite scores, e.g. 3,2,1,0 (negative values allowed: -1,0.5).
    #[arg(long, allow_hyphen_values = true, value_parser = parse_scores)]
    pub scores: Scores,
    /// Privacy parameter epsilon of each pick (> 0).
    #[arg(long)]
    pub epsilon: f64,
    /// Sensitivity of each score (> 0).
    #[arg(long)]
    pub sensitivity: f64,
    /// Number of positions released per selection.
    #[arg(long)]
    pub k: usize,
    /// Number of independent selections to count.
    #[arg(long, default_value_t = 1000)]
    pub repeat: u64,
    /// Seed for a reproducible run; without it, noise comes from the operating system.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// The parsed `--scores` list.
#[derive(Debug, Clone)]
pub struct Scores(pub Vec<f32>);

/// Parses comma-separated finite scores, naming the first bad entry.
fn parse_scores(text: &str) -> Result<Scores, String> {
    let mut scores = Vec::new();
    for (index, piece) in text.split(',').enumerate() {
        match piece.trim().parse::<f32>() {
            Ok(score) if score.is_finite() => scores.push(score),
            _ => {
                return Err(format!(
                    "score {index} ({:?}) is not a finite number",
                    piece.trim()
                ));
            }
        }
    }
    Ok(Scores(scores))
}

/// Runs `fairrank privacy ...`.
pub fn run(command: PrivacyCommand) -> anyhow::Result<()> {
    let answer = match command {
        PrivacyCommand::Calibrate(args) => calibrate(&args)?,
        PrivacyCommand::Convert(args) => convert(&args)?,
        PrivacyCommand::Topk(args) => topk(&args)?,
    };
    println!("{answer}");
    Ok(())
}

fn calibrate(args: &CalibrateArgs) -> anyhow::Result<serde_json::Value> {
    let (scale, rho) = match args.mechanism {
        Mechanism::Laplace => {
            if args.delta.is_some() {
                bail!(
                    "--delta does not apply to the Laplace mechanism (it is pure epsilon-DP); \
                     drop it, or use --mechanism gaussian"
                );
            }
            let scale = privacy::calibrate_laplace(args.epsilon, args.sensitivity)?;
            (scale, privacy::rho_pure_dp(args.epsilon)?)
        }
        Mechanism::Gaussian => {
            let Some(delta) = args.delta else {
                bail!("the Gaussian mechanism needs --delta D with 0 < D < 1");
            };
            let sigma = privacy::calibrate_gaussian(args.epsilon, delta, args.sensitivity)?;
            (sigma, privacy::rho_gaussian(args.sensitivity, sigma)?)
        }
    };
    let mechanism = match args.mechanism {
        Mechanism::Laplace => "laplace",
        Mechanism::Gaussian => "gaussian",
    };
    Ok(json!({
        "scale": scale,
        "mechanism": mechanism,
        "epsilon": args.epsilon,
        "delta": args.delta,
        "sensitivity": args.sensitivity,
        "rho": rho,
    }))
}

fn convert(args: &ConvertArgs) -> anyhow::Result<serde_json::Value> {
    let epsilon = privacy::rho_to_epsilon(args.rho, args.delta)?;
    let bun_steinke = privacy::rho_to_epsilon_bun_steinke(args.rho, args.delta)?;
    Ok(json!({
        "epsilon": epsilon,
        "rho": args.rho,
        "delta": args.delta,
        "epsilon_bun_steinke": bun_steinke,
    }))
}

fn topk(args: &PrivacyTopkArgs) -> anyhow::Result<serde_json::Value> {
    let scores = &args.scores.0;
    if args.k == 0 {
        bail!("--k must be at least 1");
    }
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let counts = match args.seed {
        // ChaCha20 is the generator `SecureRng` wraps; seeding it directly keeps the serving
        // build free of the `seeded` feature.
        Some(seed) => privacy::position_counts(
            scores,
            args.epsilon,
            args.sensitivity,
            args.k,
            args.repeat,
            &mut rand_chacha::ChaCha20Rng::seed_from_u64(seed),
        )?,
        None => privacy::position_counts(
            scores,
            args.epsilon,
            args.sensitivity,
            args.k,
            args.repeat,
            &mut privacy::SecureRng::from_os().context("seeding from the operating system")?,
        )?,
    };
    let mechanism = privacy::ExponentialMechanism::new(args.epsilon, args.sensitivity)?;
    let mut first_pick = Vec::new();
    mechanism.selection_probabilities(scores, &mut first_pick)?;
    Ok(json!({
        "position_counts": counts,
        "first_pick_probabilities": first_pick,
        "rho": mechanism.rho(counts.len()),
        "repeat": args.repeat,
    }))
}
