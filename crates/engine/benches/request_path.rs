//! The engine's whole request path at the shape of the server's T1 load: `Engine::rank_blocking`
//! on a rayon worker (so the request runs inline on that thread, as the server's Rank route
//! runs it on a worker), over the tables named by `REQUEST_PATH_ITEMS` and
//! `REQUEST_PATH_USERS` (the server's built-in default dataset: the
//! `synthetic-v1-*-items.frt` and `-users.frt` files in the `datasets` cache, e.g.
//! `~/.cache/fairrank`) or, when unset, random tables of the same shape (100 000 items
//! `i0000000`.. x 64 dimensions, `provider_group` labels 0/1, prior; 10 000 users
//! `u000000`..), each request listing 1 000 distinct random candidate ids for a random user
//! id, k = 10, the default pool (100), the default fairness policy (constraint `none`), no
//! explanations, no privacy.
//!
//! Prints the mean wall time per request over `REQUEST_PATH_REQUESTS` requests (default
//! 3 000, after `REQUEST_PATH_WARMUP` warm-up requests, default 300) in
//! `REQUEST_PATH_ROUNDS` rounds (default 5), and a digest of every answer (ids, ranks,
//! scores, labels, fairness report; no timings) so that two builds can be checked to answer
//! alike. The requests are built (and the ids drawn, seeded) before the clock starts; each
//! is used once.
//!
//! For exact instruction counts run it under callgrind with collection on in the measured
//! function only (one round; the warm-up requests and the digest, about 15 000 instructions
//! per request, mostly formatting the fairness report, count too):
//! `REQUEST_PATH_ROUNDS=1 valgrind --tool=callgrind --collect-atstart=no
//! --toggle-collect='*measured_requests*' target/release/deps/request_path-HASH`.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use engine::{Engine, EngineConfig, RankRequest, RankResponse, UserRef};
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use store::{GroupAttribute, Table, TableData, TableRole, TableWriter};

/// Candidates per request.
const CANDIDATES: usize = 1_000;
/// Answer length.
const K: usize = 10;

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// `count` requests of `CANDIDATES` distinct random item ids for random users.
fn requests(count: usize, items: usize, users: usize, rng: &mut ChaCha8Rng) -> Vec<RankRequest> {
    (0..count)
        .map(|index| {
            let user = format!("u{:06}", rng.random_range(0..users));
            let mut request = RankRequest::new(format!("bench-{index}"), UserRef::id(user), K);
            request.candidate_ids = sample(rng, items, CANDIDATES)
                .iter()
                .map(|item| format!("i{item:07}"))
                .collect();
            request
        })
        .collect()
}

/// Adds what a request answered (not its timings) to `digest`.
fn add_answer(digest: &mut DefaultHasher, response: &RankResponse) {
    for item in &response.items {
        item.id.hash(digest);
        item.rank.hash(digest);
        item.score.map(f32::to_bits).hash(digest);
        item.unconstrained_rank.hash(digest);
        item.group_labels.hash(digest);
        format!("{:?}", item.explanation).hash(digest);
    }
    format!("{:?}", response.fairness).hash(digest);
    response.group_attributes.hash(digest);
    response.scored_items.hash(digest);
    response.pool_size.hash(digest);
    response.skipped_candidate_ids.hash(digest);
}

/// Runs every request in order on this thread; returns the digest of the answers.
#[inline(never)]
fn measured_requests(engine: &Engine, requests: Vec<RankRequest>) -> u64 {
    let mut digest = DefaultHasher::new();
    for request in requests {
        match engine.rank_blocking(request) {
            Ok(response) => add_answer(&mut digest, &response),
            Err(error) => panic!("the request failed: {error}"),
        }
    }
    digest.finish()
}

/// A random table of `rows` rows with ids `prefix` and 7 (items) or 6 (users) digits.
fn random_table(path: &Path, rows: usize, items: bool, rng: &mut ChaCha8Rng) -> Table {
    const DIM: usize = 64;
    let data = TableData {
        dim: DIM,
        rows: (0..rows * DIM)
            .map(|_| rng.random_range(-1.0_f32..1.0))
            .collect(),
        ids: (0..rows)
            .map(|row| match items {
                true => format!("i{row:07}"),
                false => format!("u{row:06}"),
            })
            .collect(),
        groups: match items {
            true => vec![GroupAttribute {
                name: "provider_group".to_owned(),
                labels: (0..rows).map(|_| rng.random_range(0..2)).collect(),
            }],
            false => Vec::new(),
        },
        prior: items.then(|| (0..rows).map(|_| rng.random_range(0.0_f32..1.0)).collect()),
        dim_names: None,
    };
    let role = if items {
        TableRole::Items
    } else {
        TableRole::Users
    };
    if let Err(error) = TableWriter::new().role(role).write(path, &data) {
        panic!("writing {}: {error}", path.display());
    }
    open(path)
}

fn open(path: &Path) -> Table {
    match Table::open(path) {
        Ok(table) => table,
        Err(error) => panic!("opening {}: {error}", path.display()),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; this harness takes no arguments.
    let folder = match tempfile::tempdir() {
        Ok(folder) => folder,
        Err(error) => panic!("creating a temporary folder: {error}"),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0x7430);
    let (items, users) = match (
        std::env::var_os("REQUEST_PATH_ITEMS"),
        std::env::var_os("REQUEST_PATH_USERS"),
    ) {
        (Some(items), Some(users)) => (open(Path::new(&items)), open(Path::new(&users))),
        _ => (
            random_table(&folder.path().join("items.frt"), 100_000, true, &mut rng),
            random_table(&folder.path().join("users.frt"), 10_000, false, &mut rng),
        ),
    };
    let (item_count, user_count) = (items.len(), users.len());
    let engine = match Engine::new(EngineConfig::default(), items, Some(users)) {
        Ok(engine) => engine,
        Err(error) => panic!("starting the engine: {error}"),
    };
    // The int8 copy is built in the background; the server's steady state has it.
    let started = Instant::now();
    while engine
        .status()
        .map(|status| status.items.quantized_copy_bytes.is_none())
        .unwrap_or(true)
    {
        assert!(started.elapsed() < Duration::from_secs(60), "no int8 copy");
        std::thread::sleep(Duration::from_millis(5));
    }
    let warmup = env_count("REQUEST_PATH_WARMUP", 300);
    let count = env_count("REQUEST_PATH_REQUESTS", 3_000);
    let rounds = env_count("REQUEST_PATH_ROUNDS", 5);
    let worker = match rayon::ThreadPoolBuilder::new().num_threads(1).build() {
        Ok(pool) => pool,
        Err(error) => panic!("starting the worker: {error}"),
    };
    worker.install(|| {
        let warm = requests(warmup, item_count, user_count, &mut rng);
        black_box(measured_requests(&engine, warm));
    });
    for round in 0..rounds {
        // Every round draws the same requests: the digests must agree.
        let mut rng = ChaCha8Rng::seed_from_u64(0x7432);
        let batch = requests(count, item_count, user_count, &mut rng);
        let (digest, elapsed) = worker.install(|| {
            let started = Instant::now();
            let digest = measured_requests(&engine, batch);
            (digest, started.elapsed())
        });
        println!(
            "round {round}: {count} requests, {:.2} us/request, answers digest {digest:016x}",
            elapsed.as_secs_f64() * 1e6 / count as f64
        );
    }
}
