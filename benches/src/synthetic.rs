//! Synthetic tables and scratch directories shared by the criterion benchmarks.

use std::path::{Path, PathBuf};

use store::{GroupAttribute, TableData};

/// A temporary directory removed on drop (the benches crate has no `tempfile`).
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates `<system temp>/fairrank-bench-<name>-<pid>`.
    pub fn new(name: &str) -> std::io::Result<ScratchDir> {
        let path =
            std::env::temp_dir().join(format!("fairrank-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(ScratchDir(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The id of row `row` in [`synthetic_table`].
pub fn item_id(row: usize) -> String {
    format!("item-{row:08}")
}

/// A `rows` x `dim` table of uniform values in [-0.5, 0.5) from a xorshift generator
/// (deterministic), ids from [`item_id`], a `provider_group` attribute (row % 7) and a
/// popularity prior 1 / (row + 1).
pub fn synthetic_table(rows: usize, dim: usize) -> TableData {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    TableData {
        dim,
        rows: (0..rows * dim).map(|_| next()).collect(),
        ids: (0..rows).map(item_id).collect(),
        groups: vec![GroupAttribute {
            name: "provider_group".into(),
            labels: (0..rows).map(|row| (row % 7) as u32).collect(),
        }],
        prior: Some((0..rows).map(|row| 1.0 / (row as f32 + 1.0)).collect()),
        dim_names: None,
    }
}
