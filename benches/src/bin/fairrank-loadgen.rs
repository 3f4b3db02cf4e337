//! `fairrank-loadgen`: closed-loop gRPC load against a local `fairrank serve`, with a bare
//! Echo baseline of the same message sizes, reported per concurrency step as a table or as
//! JSON lines.

use std::io::Write as _;
use std::num::NonZeroUsize;
use std::time::Duration;

use anyhow::Context as _;
use benches::loadgen::closed_loop::StopRule;
use benches::loadgen::mix::Mix;
use benches::loadgen::parse::{loopback_uri, parse_concurrency_list, parse_duration};
use benches::loadgen::report::{table_header, table_rows};
use benches::loadgen::requests::{RequestSpec, UserSource};
use benches::loadgen::run::{EchoBaseline, ProbeReport, RunConfig, run};
use clap::Parser;

/// Closed-loop load generator for `fairrank.v1.Ranker/Rank` with an Echo transport floor.
///
/// Each step runs a warm-up and a measured window at one concurrency, first against the
/// Echo baseline (same request and response sizes as Rank), then against Rank, and prints
/// throughput, latency percentiles, errors by code and Rank / Echo ratios. Loopback only.
#[derive(Debug, Parser)]
#[command(name = "fairrank-loadgen", version, about)]
struct Args {
    /// Address of the fairrank server (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,

    /// Use the Echo service at this address as the baseline (e.g. the server's own Echo,
    /// the same as --addr, served with `[server] echo_service = true`) instead of the load
    /// generator's in-process Echo server.
    #[arg(long, conflicts_with = "no_echo")]
    echo_addr: Option<String>,

    /// Skip the Echo baseline.
    #[arg(long)]
    no_echo: bool,

    /// Worker threads of the in-process Echo server [default: the machine's cores].
    #[arg(long)]
    echo_server_threads: Option<usize>,

    /// Request mix: `kind[:weight],...` with kinds `candidates<N>` and `catalog`, e.g.
    /// `candidates1000` or `candidates1000:0.8,catalog:0.2`.
    #[arg(long, default_value = "candidates1000")]
    mix: String,

    /// Comma-separated concurrencies, one step each.
    #[arg(long, default_value = "1,4,16,64")]
    concurrency: String,

    /// HTTP/2 connections per target (steps with fewer callers use fewer) [default: the
    /// machine's cores].
    #[arg(long)]
    connections: Option<usize>,

    /// Measured window per step (`10s`, `500ms`, `2m`; at most 10m).
    #[arg(long, default_value = "10s", conflicts_with = "requests")]
    duration: String,

    /// Measure a fixed number of completed calls per step instead of a duration.
    #[arg(long)]
    requests: Option<u64>,

    /// Warm-up before each measured window (discarded).
    #[arg(long, default_value = "2s")]
    warmup: String,

    /// Deadline of every call.
    #[arg(long, default_value = "10s")]
    timeout: String,

    /// Items per answer.
    #[arg(long, default_value_t = 10)]
    k: u32,

    /// Pool size for the fairness re-ranker [default: the server's].
    #[arg(long)]
    pool_size: Option<u32>,

    /// Items in the server's catalog; candidates are drawn from ids i0000000..
    #[arg(long, default_value_t = 100_000)]
    items: usize,

    /// Users in the server's user table; requests use ids u000000.. drawn at random.
    #[arg(long, default_value_t = 10_000, conflicts_with = "inline_dim")]
    users: usize,

    /// Send random unit-norm inline embeddings of this dimension instead of user ids.
    #[arg(long)]
    inline_dim: Option<usize>,

    /// Distinct pre-built requests per kind, chosen at random per call.
    #[arg(long, default_value_t = 64)]
    templates: usize,

    /// Worker threads of the load generator's runtime (1: a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,

    /// Seed of the request templates and of the callers' choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,

    /// Process id of the server at --addr (e.g. `$(pgrep -f 'fairrank serve')`): report its
    /// CPU per call next to the load generator's, and Rank's CPU per call as a multiple of
    /// Echo's (with the in-process Echo or the server's own). The load generator's CPU is
    /// always reported.
    #[arg(long)]
    server_pid: Option<u32>,

    /// Print one JSON object per step on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

fn run_config(args: &Args) -> anyhow::Result<RunConfig> {
    let addr = loopback_uri(&args.addr)?;
    let echo = match (&args.echo_addr, args.no_echo) {
        (_, true) => EchoBaseline::Off,
        (Some(echo_addr), false) => EchoBaseline::External(loopback_uri(echo_addr)?),
        (None, false) => EchoBaseline::InProcess {
            threads: args.echo_server_threads.unwrap_or_else(cores),
        },
    };
    let stop = match args.requests {
        Some(count) => StopRule::Requests(count),
        None => StopRule::Duration(parse_duration(&args.duration)?),
    };
    let users = match args.inline_dim {
        Some(dim) => UserSource::Inline { dim },
        None => UserSource::Ids { count: args.users },
    };
    if args.client_threads == 0 || args.client_threads > 64 {
        anyhow::bail!("--client-threads must be in 1..=64");
    }
    Ok(RunConfig {
        addr,
        echo,
        mix: Mix::parse(&args.mix)?,
        concurrency: parse_concurrency_list(&args.concurrency)?,
        connections: args.connections.unwrap_or_else(cores),
        warmup: parse_duration(&args.warmup)?,
        stop,
        timeout: parse_duration(&args.timeout)?.max(Duration::from_millis(1)),
        spec: RequestSpec {
            k: args.k,
            pool_size: args.pool_size,
            users,
            items: args.items,
            templates_per_kind: args.templates,
            seed: args.seed,
        },
        client_threads: args.client_threads,
        seed: args.seed,
        server_pid: args.server_pid,
    })
}

fn describe_probes(probes: &[ProbeReport]) -> String {
    probes
        .iter()
        .map(|probe| {
            format!(
                "probe {}: {} items of {} scored, personalized {}, request {} B, response {} B, {:.3} ms\n",
                probe.kind,
                probe.items_returned,
                probe.scored_items,
                probe.personalized,
                probe.request_bytes,
                probe.response_bytes,
                probe.latency.as_secs_f64() * 1e3,
            )
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = run_config(&args)?;
    let runtime = if config.client_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.client_threads)
            .thread_name("loadgen")
            .enable_all()
            .build()
    }
    .context("cannot start the client runtime")?;

    let json = args.json;
    // The table goes to stdout, or to stderr when stdout carries JSON.
    let print_table = |text: &str| {
        if json {
            eprint!("{text}");
        } else {
            print!("{text}");
            let _ = std::io::stdout().flush();
        }
    };
    let stop_text = match config.stop {
        StopRule::Duration(duration) => format!("{:?} per step", duration),
        StopRule::Requests(count) => format!("{count} requests per step"),
    };
    print_table(&format!(
        "fairrank-loadgen: {} mix {}, k {}, warm-up {:?}, {stop_text}, echo baseline {}, {} client thread(s), {} cores\n",
        config.addr,
        config.mix,
        config.spec.k,
        config.warmup,
        match &config.echo {
            EchoBaseline::Off => "off".to_owned(),
            EchoBaseline::External(addr) => addr.clone(),
            EchoBaseline::InProcess { threads } => format!("in-process ({threads} threads)"),
        },
        config.client_threads,
        cores(),
    ));
    let mut header_printed = false;
    runtime.block_on(run(
        &config,
        |probes| print_table(&describe_probes(probes)),
        |step| {
            if !header_printed {
                print_table(&format!("{}\n", table_header()));
                header_printed = true;
            }
            print_table(&table_rows(step));
            if json {
                println!("{}", step.to_json_line());
                let _ = std::io::stdout().flush();
            }
        },
    ))?;
    Ok(())
}
