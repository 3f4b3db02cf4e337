//! Measures `Table::open` (warm page cache), `verify` and id lookups on a large table.
//!
//! Usage: `cargo run --release -p store --example open_speed -- [rows] [dim] [dir]`
//! (defaults: 1000000 rows, dim 128, a temporary directory). Writes the table once, then
//! opens it repeatedly and prints the best and median times.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use store::{GroupAttribute, Table, TableData, write_table};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let rows: usize = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let dim: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(128);
    let temp = tempfile::tempdir()?;
    let dir = args
        .get(3)
        .map(PathBuf::from)
        .unwrap_or_else(|| temp.path().to_path_buf());
    let path = dir.join("open_speed.frt");

    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let data = TableData {
        dim,
        rows: (0..rows * dim).map(|_| next()).collect(),
        ids: (0..rows).map(|i| format!("item-{i:08}")).collect(),
        groups: vec![GroupAttribute {
            name: "provider_group".into(),
            labels: (0..rows as u32).map(|i| i % 7).collect(),
        }],
        prior: Some((0..rows).map(|i| 1.0 / (i as f32 + 1.0)).collect()),
        dim_names: None,
    };
    let started = Instant::now();
    let summary = write_table(&path, &data)?;
    println!(
        "write_table: {} rows x {} dims, {:.1} MiB in {:.2?}",
        summary.rows,
        summary.dim,
        summary.file_bytes as f64 / (1 << 20) as f64,
        started.elapsed()
    );
    drop(data);

    let runs = 40;
    let mut opens = Vec::with_capacity(runs);
    let mut table = Table::open(&path)?; // warms the page cache
    let (process_before, thread_before) = (process_cpu(), thread_cpu());
    for _ in 0..runs {
        drop(table);
        let started = Instant::now();
        table = Table::open(&path)?;
        opens.push(started.elapsed());
    }
    let (process_after, thread_after) = (process_cpu(), thread_cpu());
    report("Table::open (warm)", &mut opens);
    // On a shared machine wall time includes waiting for a core; CPU time does not.
    if let (Some(before), Some(after)) = (process_before, process_after) {
        println!(
            "Table::open CPU time, all threads: {:.2?} per open (includes dropping the previous table)",
            (after - before) / runs as u32
        );
    }
    if let (Some(before), Some(after)) = (thread_before, thread_after) {
        println!(
            "Table::open CPU time, calling thread (header, map, row scan): {:.2?} per open",
            (after - before) / runs as u32
        );
    }

    let mut verifies = Vec::with_capacity(5);
    for _ in 0..5 {
        let started = Instant::now();
        table.verify()?;
        verifies.push(started.elapsed());
    }
    report("Table::verify", &mut verifies);

    let lookups = rows.min(200_000);
    let ids: Vec<String> = (0..lookups)
        .map(|i| format!("item-{:08}", (i * 7919) % rows))
        .collect();
    let started = Instant::now();
    let mut found = 0usize;
    for id in &ids {
        found += usize::from(table.index_of(id).is_some());
    }
    let elapsed = started.elapsed();
    println!(
        "index_of: {found}/{lookups} found, {:.0} ns per lookup",
        elapsed.as_nanos() as f64 / lookups as f64
    );
    Ok(())
}

/// User + system CPU time of the whole process (Linux `/proc/self/stat`, 100 Hz ticks).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let after_name = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// On-CPU time of the calling thread (Linux `/proc/thread-self/schedstat`, nanoseconds).
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    Some(Duration::from_nanos(
        stat.split_whitespace().next()?.parse().ok()?,
    ))
}

fn report(what: &str, times: &mut [Duration]) {
    times.sort();
    println!(
        "{what}: best {:.2?}, median {:.2?}, worst {:.2?} over {} runs",
        times[0],
        times[times.len() / 2],
        times[times.len() - 1],
        times.len()
    );
}
