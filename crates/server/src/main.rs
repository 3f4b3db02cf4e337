//! The `fairrank` command-line entry point: table tools, exact top-k, benchmarks, the gRPC
//! ranking server and its command-line client.

mod bench_kernel;
mod cli;
mod config;
mod metrics;
mod serve;

use clap::{Parser, Subcommand};

/// The global allocator: mimalloc with the `mimalloc` feature (the default; it cut the
/// server's CPU per T1 call, see BENCHMARKS.md, branch `srvcpu`), otherwise the system's.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// fairrank: a fairness-aware ranking server over memory-mapped embedding tables.
#[derive(Debug, Parser)]
#[command(name = "fairrank", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build, import, inspect and verify embedding table files.
    #[command(subcommand)]
    Table(cli::table::TableCommand),
    /// Exact top-k of each query over a table (the built-in default dataset without --table).
    Topk(cli::topk::TopkArgs),
    /// Serve the gRPC ranking API (the built-in default dataset without --table).
    Serve(serve::ServeArgs),
    /// Ask a running server for a ranking and print it.
    Rank(cli::rank::RankArgs),
    /// Benchmarks that compare fairrank's kernels with the machine's limits.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Fairness re-ranking of JSON Lines requests (offline, for researchers).
    Rerank(cli::rerank::RerankArgs),
    /// Fairness constraint tools (FA*IR mtables).
    #[command(subcommand)]
    Fair(cli::fair::FairCommand),
    /// Replay user queries through fairness constraints; report utility vs fairness.
    Eval(cli::eval::EvalArgs),
    /// Differential-privacy tools: calibration, accounting conversion, DP top-k simulation,
    /// the budget ledger.
    #[command(subcommand)]
    Privacy(cli::privacy::PrivacyCommand),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Scan, batched and candidate-list kernels against the measured read bandwidth.
    Kernel(bench_kernel::BenchKernelArgs),
}

fn main() -> anyhow::Result<()> {
    // The reader of our output went away (`fairrank topk ... | head`): what it wanted was
    // written; stop quietly, as Unix tools do, whether the write returned the error or
    // `println!` panicked on it.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default_hook(info);
    }));
    match run(Cli::parse()) {
        Err(error) if is_broken_pipe(&error) => std::process::exit(0),
        result => result,
    }
}

/// Whether `error` comes from writing to a closed pipe (directly, or through `serde_json`,
/// whose error hides the I/O error from the source chain).
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        let kind = cause
            .downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind)
            .or_else(|| {
                cause
                    .downcast_ref::<serde_json::Error>()
                    .and_then(serde_json::Error::io_error_kind)
            });
        kind == Some(std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Table(command) => cli::table::run(command),
        Command::Topk(args) => cli::topk::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Rank(args) => cli::rank::run(&args),
        Command::Bench(BenchCommand::Kernel(args)) => {
            for (name, value) in bench_kernel::run(&args)? {
                println!("{name}: {}", cli::format_figure(value));
            }
            Ok(())
        }
        Command::Rerank(args) => {
            if cli::rerank::run(&args)? > 0 {
                // Every line was answered; the status tells scripts that some were refused.
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Fair(command) => cli::fair::run(command),
        Command::Eval(args) => cli::eval::run(&args),
        Command::Privacy(command) => cli::privacy::run(command),
    }
}
