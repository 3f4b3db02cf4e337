//! Helpers shared by the store's integration tests: sample tables and file surgery.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::path::{Path, PathBuf};

use store::{GroupAttribute, Header, StoreError, Table, TableData, write_table};

/// A small table exercising every section: padded rows (dim 5), unicode ids, two group
/// attributes, a prior and dimension names.
pub fn sample_data(rows: usize) -> TableData {
    let dim = 5;
    let values = (0..rows * dim)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    TableData {
        dim,
        rows: values,
        ids: (0..rows).map(|i| format!("item-{i:03}-é")).collect(),
        groups: vec![
            GroupAttribute {
                name: "provider_group".into(),
                labels: (0..rows as u32).map(|i| i % 3).collect(),
            },
            GroupAttribute {
                name: "region".into(),
                labels: (0..rows as u32).map(|i| i % 2).collect(),
            },
        ],
        prior: Some((0..rows).map(|i| 1.0 / (i as f32 + 1.0)).collect()),
        dim_names: Some((0..dim).map(|d| format!("d{d}")).collect()),
    }
}

/// Writes `data` into a fresh temporary directory; returns the directory guard and path.
pub fn write_sample(data: &TableData) -> (tempfile::TempDir, PathBuf) {
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => panic!("cannot create a temporary directory: {e}"),
    };
    let path = dir.path().join("items.frt");
    if let Err(e) = write_table(&path, data) {
        panic!("writing the sample failed: {e}");
    }
    (dir, path)
}

/// The bytes of the file [`write_sample`] produces for `sample_data(rows)`, computed once
/// per test binary (publishing fsyncs, which is slow in loops).
pub fn sample_bytes(rows: usize) -> Vec<u8> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<usize, Vec<u8>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    cache
        .entry(rows)
        .or_insert_with(|| {
            let (_dir, path) = write_sample(&sample_data(rows));
            read(&path)
        })
        .clone()
}

/// A path in `dir` that no earlier call returned (new files avoid the slow
/// truncate-and-rewrite path of some file systems).
pub fn fresh_path(dir: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    dir.join(format!("case-{}.frt", NEXT.fetch_add(1, Ordering::Relaxed)))
}

/// A temporary directory for test files.
pub fn temp_dir() -> tempfile::TempDir {
    match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => panic!("cannot create a temporary directory: {e}"),
    }
}

/// Reads a whole file.
pub fn read(path: &Path) -> Vec<u8> {
    match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => panic!("cannot read {}: {e}", path.display()),
    }
}

/// Replaces a file's contents.
pub fn write(path: &Path, bytes: &[u8]) {
    if let Err(e) = std::fs::write(path, bytes) {
        panic!("cannot write {}: {e}", path.display());
    }
}

/// Parses the header of a file written by the writer.
pub fn header_of(bytes: &[u8]) -> Header {
    match Header::from_bytes(bytes, bytes.len() as u64) {
        Ok(header) => header,
        Err(e) => panic!("sample header does not parse: {e}"),
    }
}

/// Changes header fields and re-encodes the header with a valid header checksum, so that
/// the reader gets past the checksum to the check under test.
pub fn patch_header(path: &Path, change: impl FnOnce(&mut Header)) {
    let mut bytes = read(path);
    let mut header = header_of(&bytes);
    change(&mut header);
    bytes[..store::HEADER_SIZE].copy_from_slice(&header.to_bytes());
    write(path, &bytes);
}

/// Overwrites bytes at `offset` in a file (the header is left as is).
pub fn patch_bytes(path: &Path, offset: u64, new: &[u8]) {
    let mut bytes = read(path);
    let start = offset as usize;
    bytes[start..start + new.len()].copy_from_slice(new);
    write(path, &bytes);
}

/// Opens a table that must be refused and returns the error.
pub fn open_err(path: &Path) -> StoreError {
    match Table::open(path) {
        Ok(table) => panic!("{} was accepted: {table:?}", path.display()),
        Err(e) => e,
    }
}

/// Opens a table that must be accepted.
pub fn open_ok(path: &Path) -> Table {
    match Table::open(path) {
        Ok(table) => table,
        Err(e) => panic!("refused: {e}"),
    }
}

/// The auditor's table: 40 rows of 8 values, row `i` = `[1 - 0.02 i, 0.1, ..., 0.1]` times
/// `scale` (rounded to f32 once).
pub fn scaled_data(scale: f64) -> TableData {
    let (rows, dim) = (40, 8);
    let values = (0..rows)
        .flat_map(|row| {
            (0..dim).map(move |column| {
                let value = if column == 0 {
                    1.0 - 0.02 * row as f64
                } else {
                    0.1
                };
                (value * scale) as f32
            })
        })
        .collect();
    TableData {
        dim,
        rows: values,
        ids: (0..rows).map(|i| format!("item-{i}")).collect(),
        groups: vec![],
        prior: None,
        dim_names: None,
    }
}

/// The largest row norm of `data` from f64 sums of the (exact) squares: within about an f64
/// rounding of the exact value.
pub fn f64_max_norm(data: &TableData) -> f64 {
    data.rows
        .chunks_exact(data.dim)
        .map(|row| {
            row.iter()
                .map(|&value| f64::from(value) * f64::from(value))
                .sum::<f64>()
                .sqrt()
        })
        .fold(0.0f64, f64::max)
}
