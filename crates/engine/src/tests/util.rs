//! Test fixtures: small tables of integer embeddings (so every dot product is exact in f32,
//! whatever the summation order) and a brute-force ranking to compare against.

use std::path::{Path, PathBuf};

use store::{GroupAttribute, Table, TableData, TableRole, TableWriter, write_table};
use tempfile::TempDir;

use crate::{Engine, EngineConfig, RankResponse};

/// Embedding dimension of the fixtures.
pub const DIM: usize = 8;
/// Rows of the fixture item table.
pub const ITEMS: usize = 240;
/// Rows of the fixture user table.
pub const USERS: usize = 24;

/// `rows * dim` integers in `-3..=3` from a seeded LCG.
pub fn integer_values(seed: u64, count: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % 7) as f32 - 3.0
        })
        .collect()
}

/// An item table: ids `item-000`..., groups `provider_group` (every third item is 1) and
/// `region` (row % 4), a prior with ties (row * 37 % 50) if `with_prior`, dimension names.
pub fn items_data(seed: u64, rows: usize, with_prior: bool) -> TableData {
    TableData {
        dim: DIM,
        rows: integer_values(seed, rows * DIM),
        ids: (0..rows).map(|row| format!("item-{row:03}")).collect(),
        groups: vec![
            GroupAttribute {
                name: "provider_group".to_owned(),
                labels: (0..rows).map(|row| u32::from(row % 3 == 0)).collect(),
            },
            GroupAttribute {
                name: "region".to_owned(),
                labels: (0..rows).map(|row| (row % 4) as u32).collect(),
            },
        ],
        prior: with_prior.then(|| (0..rows).map(|row| (row * 37 % 50) as f32).collect()),
        dim_names: Some((0..DIM).map(|d| format!("dim{d}")).collect()),
    }
}

/// A user table: ids `user-0`...
pub fn users_data(seed: u64, rows: usize, dim: usize) -> TableData {
    TableData {
        dim,
        rows: integer_values(seed, rows * dim),
        ids: (0..rows).map(|row| format!("user-{row}")).collect(),
        groups: Vec::new(),
        prior: None,
        dim_names: None,
    }
}

/// Writes `data` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, data: &TableData) -> PathBuf {
    let path = dir.join(name);
    write_table(&path, data).expect("fixture table writes");
    path
}

/// Writes `data` to `dir/name` marked with `role` and returns the path.
pub fn write_marked(dir: &Path, name: &str, data: &TableData, role: TableRole) -> PathBuf {
    let path = dir.join(name);
    TableWriter::new()
        .role(role)
        .write(&path, data)
        .expect("fixture table writes");
    path
}

/// A temporary directory with an item and a user table, and an engine serving them.
pub struct Fixture {
    pub dir: TempDir,
    pub items_path: PathBuf,
    pub items: TableData,
    pub users: TableData,
    pub engine: Engine,
}

/// The standard fixture with `config`.
pub fn fixture_with(config: EngineConfig, with_prior: bool) -> Fixture {
    let dir = tempfile::tempdir().expect("temporary directory");
    let items = items_data(1, ITEMS, with_prior);
    let users = users_data(2, USERS, DIM);
    let items_path = write(dir.path(), "items.frt", &items);
    let users_path = write(dir.path(), "users.frt", &users);
    let engine = Engine::new(
        config,
        Table::open(&items_path).expect("items open"),
        Some(Table::open(&users_path).expect("users open")),
    )
    .expect("engine starts");
    Fixture {
        dir,
        items_path,
        items,
        users,
        engine,
    }
}

/// The standard fixture with the default configuration and a prior.
pub fn fixture() -> Fixture {
    fixture_with(EngineConfig::default(), true)
}

/// Row `row` of `data`.
pub fn row(data: &TableData, row: usize) -> &[f32] {
    &data.rows[row * data.dim..(row + 1) * data.dim]
}

/// The exact top `k` of `rows` for `query`: score descending, ties by row ascending.
pub fn brute_force(
    data: &TableData,
    query: &[f32],
    rows: impl IntoIterator<Item = usize>,
    k: usize,
) -> Vec<(String, f32)> {
    let mut scored: Vec<(usize, f64)> = rows
        .into_iter()
        .map(|r| {
            let score = row(data, r)
                .iter()
                .zip(query)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            (r, score)
        })
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(k);
    scored
        .into_iter()
        .map(|(r, score)| (data.ids[r].clone(), score as f32))
        .collect()
}

/// The answer as (id, score) pairs.
pub fn ids_scores(response: &RankResponse) -> Vec<(String, f32)> {
    response
        .items
        .iter()
        .map(|item| (item.id.clone(), item.score.unwrap_or(f32::NAN)))
        .collect()
}

/// The answer's ids.
pub fn ids(response: &RankResponse) -> Vec<String> {
    response.items.iter().map(|item| item.id.clone()).collect()
}
