//! Cold-cache benchmark of the Rank candidate lookups (`cargo bench -p benches --bench
//! lookup_cold`): `Table::index_of_many_hinting_rows` over 1000 random ids of the default
//! table with the engine's row hint (the int8 copy's `prefetch_row`), with the index's
//! buckets and the hinted rows evicted from the caches before every call, as the server
//! finds them (between two requests it runs the HTTP/2 stack, scores 1000 rows, and shares
//! the L3 with the load generator).
//!
//! The `candidates` bench measured 6.3 us per 1000 ids for its `lookup` case where the
//! server's profile shows about 13 us: that case has no row hint, and its loop does nothing
//! else, so the index (2 MB) and the int8 rows (6.8 MB) stay in L2/L3. Here each call is
//! preceded (untimed) by a walk over an eviction buffer (BENCHMARKS.md, section `lookup2`):
//!
//! - `warm`: no walk (the previous lists' lookups leave the index and rows partly in L2,
//!   mostly in L3: this reproduces the server's 13 us);
//! - `l2`: 4 MiB written (the 1 MiB L2 and L1 hold none of the index or rows; L3 does);
//! - `l3`: 64 MiB written (twice the 32 MiB L3: buckets and rows come from DRAM, and the
//!   TLB is cold too).
//!
//! After the walk the list's own bytes are read again (a request's ids were just decoded, so
//! they are in cache in the server), then the call is timed with the thread's CPU clock
//! (`CLOCK_THREAD_CPUTIME_ID`, so time other processes take on this shared machine is not
//! counted, but their cache traffic is). Cases per mode: `hinting` (the engine's call),
//! `plain` (`index_of_many`, no row hint: the buckets' cost alone), `hint_after`
//! (`index_of_many`, then the same row hints for the rows found, from this loop: what
//! `index_of_many_hinting_rows` does since branch `lookup2`, so a binary of the code before
//! compares both placements in one process), `hint_codes` and `hint_codes_scale` (the
//! same placement with `QuantizedRowHints`: the code line only, or with the scale's line
//! too, as the engine does since branch `dedup`), and each of them `+score` (then
//! `quantized_candidates_topk` at k = 100, T1's pool: the row hints' benefit shows in the
//! scoring), `joined` and `joined_hinting` (`index_of_many_spans` and
//! `index_of_many_spans_hinting_rows` with `codes_and_scale`: the ids' spans of their text
//! rather than an iterator, branch `lookup3`), both also `+score` (`joined+score`: no row
//! hint at all, which on the Intel KVM guest beat every hint: section `lookup4`). The cases take
//! turns call by call, so they share the machine's state. Prints
//! the median, mean and 10th/90th percentiles in us per call.
//!
//! `FAIRRANK_LOOKUP_COLD_CALLS` (default 400) sets the calls per case and mode,
//! `FAIRRANK_LOOKUP_COLD_MODES` (default `warm,l2,l3`) the modes, in order, and
//! `FAIRRANK_LOOKUP_COLD_CASES` (default all) the cases, by label (`plain,hinting`, say).

use std::hint::black_box;

use benches::thread_cpu::thread_cpu_nanos;
use kernels::{QuantizedRows, RowMatrix, ScoredItem, TopKScratch, quantized_candidates_topk};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use store::Table;

const CANDIDATES: usize = 1000;
const LISTS: usize = 64;
/// T1's top-k: the engine's default re-ranking pool.
const POOL_K: usize = 100;

/// A request's candidate ids as the engine holds them: spans of the request body, each id
/// after its field's key and length bytes.
struct IdList {
    text: Vec<u8>,
    spans: Vec<(usize, usize)>,
}

impl IdList {
    fn iter_bytes(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.spans
            .iter()
            .map(|&(start, end)| self.text.get(start..end).unwrap_or_default())
    }

    /// Reads every byte (brings the list back into cache after an eviction walk).
    fn touch(&self) -> usize {
        self.text.iter().map(|&b| usize::from(b)).sum::<usize>()
            + self
                .spans
                .iter()
                .map(|&(start, end)| start ^ end)
                .sum::<usize>()
    }
}

/// `LISTS` lists of `CANDIDATES` distinct random ids of `table`.
fn candidate_lists(table: &Table, seed: u64) -> Vec<IdList> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut rows: Vec<usize> = (0..table.len()).collect();
    (0..LISTS)
        .map(|_| {
            let (chosen, _) = rows.partial_shuffle(&mut rng, CANDIDATES.min(table.len()));
            let mut list = IdList {
                text: Vec::new(),
                spans: Vec::new(),
            };
            for &row in chosen.iter() {
                let id = table.id(row).as_bytes();
                // The field's key and a one-byte length, as in a Rank request body.
                list.text.extend_from_slice(&[0x52, id.len() as u8]);
                let start = list.text.len();
                list.text.extend_from_slice(id);
                list.spans.push((start, list.text.len()));
            }
            list
        })
        .collect()
}

fn matrix(table: &Table) -> RowMatrix<'_> {
    match RowMatrix::new(table.rows(), table.len(), table.dim(), table.row_stride()) {
        Ok(matrix) => matrix,
        Err(e) => panic!("table rows are not a matrix: {e}"),
    }
}

/// Writes one byte per cache line of `buffer` (evicts what was cached before).
fn evict(buffer: &mut [u8], round: u8) {
    for line in buffer.chunks_mut(64) {
        line[0] = line[0].wrapping_add(round);
    }
    black_box(buffer.first());
}

fn summary(label: &str, mut nanos: Vec<u64>) {
    nanos.sort_unstable();
    let at = |q: f64| nanos[((nanos.len() - 1) as f64 * q) as usize] as f64 / 1e3;
    let mean = nanos.iter().sum::<u64>() as f64 / nanos.len() as f64 / 1e3;
    println!(
        "{label:<22} median {:>7.2} us  mean {mean:>7.2} us  p10 {:>7.2}  p90 {:>7.2}  ({} calls)",
        at(0.5),
        at(0.1),
        at(0.9),
        nanos.len()
    );
}

fn main() {
    // `cargo bench` passes `--bench` (and any filter); this harness takes its settings from
    // the environment instead.
    let calls: usize = std::env::var("FAIRRANK_LOOKUP_COLD_CALLS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(400);
    let modes = std::env::var("FAIRRANK_LOOKUP_COLD_MODES").unwrap_or("warm,l2,l3".to_owned());
    let default = match datasets::default_dataset() {
        Ok(paths) => paths,
        Err(e) => panic!("cannot generate the default dataset: {e}"),
    };
    let table = match Table::open(&default.items) {
        Ok(table) => table,
        Err(e) => panic!("{e}"),
    };
    let quantized = QuantizedRows::build(matrix(&table));
    let lists = candidate_lists(&table, 5);
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let query: Vec<f32> = (0..table.dim())
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    // Both calls must agree with the single lookups before anything is timed.
    for list in &lists {
        let (mut plain, mut hinting) = (Vec::new(), Vec::new());
        table.index_of_many(list.iter_bytes(), &mut plain);
        table.index_of_many_hinting_rows(
            list.iter_bytes(),
            |row| quantized.prefetch_row(row),
            &mut hinting,
        );
        let single: Vec<Option<u32>> = list
            .iter_bytes()
            .map(|id| table.index_of(std::str::from_utf8(id).unwrap_or_default()))
            .collect();
        let (mut joined, mut joined_hinting) = (Vec::new(), Vec::new());
        table.index_of_many_spans(&list.text, &list.spans, &mut joined);
        table.index_of_many_spans_hinting_rows(
            &list.text,
            &list.spans,
            |row| quantized.prefetch_row(row),
            &mut joined_hinting,
        );
        assert_eq!(joined, single);
        assert_eq!(joined_hinting, single);
        assert_eq!(plain, single);
        assert_eq!(hinting, single);
        assert!(single.iter().all(Option::is_some));
    }

    let mut found: Vec<Option<u32>> = Vec::with_capacity(CANDIDATES);
    let mut rows: Vec<u32> = Vec::with_capacity(CANDIDATES);
    let (mut scratch, mut out) = (TopKScratch::new(), Vec::<ScoredItem>::new());
    let mut buffer = vec![1u8; 64 << 20];
    for mode in modes.split(',') {
        let evicted = match mode {
            "warm" => 0,
            "l2" => 4 << 20,
            "l3" => 64 << 20,
            other => panic!("unknown mode {other:?} (warm, l2, l3)"),
        };
        // (label, row hint: 0 none, 1 `index_of_many_hinting_rows`, 2 the same hints
        // issued by this loop after `index_of_many`, 3 `QuantizedRowHints::codes` (one line
        // per row) and 4 `codes_and_scale` (the engine's hint since branch `dedup`) likewise,
        // 5 `index_of_many_spans_hinting_rows` with `codes_and_scale` (the engine's call since
        // branches `wire2` and `lookup3`), 6 `index_of_many_spans` without a hint; whether the
        // rows are scored after).
        let mut cases = vec![
            ("hinting", 1, false),
            ("plain", 0, false),
            ("hint_after", 2, false),
            ("hint_codes", 3, false),
            ("hint_codes_scale", 4, false),
            ("hinting+score", 1, true),
            ("plain+score", 0, true),
            ("hint_after+score", 2, true),
            ("hint_codes+score", 3, true),
            ("hint_codes_scale+score", 4, true),
            ("joined_hinting", 5, false),
            ("joined", 6, false),
            ("joined_hinting+score", 5, true),
            ("joined+score", 6, true),
        ];
        if let Ok(only) = std::env::var("FAIRRANK_LOOKUP_COLD_CASES") {
            cases.retain(|(label, _, _)| only.split(',').any(|case| case == *label));
        }
        let mut nanos = vec![Vec::with_capacity(calls); cases.len()];
        // Cases interleaved call by call, so each sees the same machine state; lists in turn
        // over all cases, so every list is back after `LISTS` calls, whichever the case.
        let mut next_list = 0;
        for call in 0..calls {
            for ((_, hint, score), nanos) in cases.iter().zip(&mut nanos) {
                let list = &lists[next_list % LISTS];
                next_list += 1;
                evict(&mut buffer[..evicted], call as u8);
                black_box(list.touch());
                found.clear();
                let started = thread_cpu_nanos();
                match *hint {
                    1 => table.index_of_many_hinting_rows(
                        list.iter_bytes(),
                        |row| quantized.prefetch_row(row),
                        &mut found,
                    ),
                    5 => {
                        let hints = quantized.row_hints();
                        table.index_of_many_spans_hinting_rows(
                            &list.text,
                            &list.spans,
                            |row| hints.codes_and_scale(row as u32),
                            &mut found,
                        );
                    }
                    6 => table.index_of_many_spans(&list.text, &list.spans, &mut found),
                    _ => table.index_of_many(list.iter_bytes(), &mut found),
                }
                match *hint {
                    2 => {
                        for &row in found.iter().flatten() {
                            quantized.prefetch_row(row as usize);
                        }
                    }
                    3 => {
                        let hints = quantized.row_hints();
                        for &row in found.iter().flatten() {
                            hints.codes(row);
                        }
                    }
                    4 => {
                        let hints = quantized.row_hints();
                        for &row in found.iter().flatten() {
                            hints.codes_and_scale(row);
                        }
                    }
                    _ => {}
                }
                if *score {
                    rows.clear();
                    rows.extend(found.iter().flatten());
                    if let Err(e) = quantized_candidates_topk(
                        matrix(&table),
                        &quantized,
                        &query,
                        &rows,
                        POOL_K,
                        &mut scratch,
                        &mut out,
                    ) {
                        panic!("{e}");
                    }
                }
                nanos.push(thread_cpu_nanos().saturating_sub(started));
                black_box(found.len());
            }
        }
        for ((label, _, _), nanos) in cases.iter().zip(nanos) {
            summary(&format!("{mode}/{label}"), nanos);
        }
    }
}
