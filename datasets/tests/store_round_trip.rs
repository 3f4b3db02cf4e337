//! Round trips through the table store: generated and imported tables written with
//! `store::write_table` read back identically with `store::Table::open`, and the dataset cache
//! generates once, reuses valid files and replaces damaged ones.

use std::path::Path;

use datasets::{
    GROUP_ATTRIBUTE, SyntheticParams, cached_dataset, dataset_paths, generate, import_npy,
    write_npy,
};
use store::{Table, TableData, TableRole, TableWriter};

fn small_params() -> SyntheticParams {
    SyntheticParams {
        items: 1_500,
        dim: 12,
        users: 40,
        groups: 3,
        minority_share: 0.3,
        seed: 99,
        ..SyntheticParams::default()
    }
}

/// Asserts that the table file at `path` holds exactly `data`.
fn assert_table_holds(path: &Path, data: &TableData) {
    let table = Table::open(path).unwrap();
    table.verify().unwrap();
    assert_eq!(table.len(), data.ids.len());
    assert_eq!(table.dim(), data.dim);
    for (row, id) in data.ids.iter().enumerate() {
        assert_eq!(table.id(row), id);
        assert_eq!(
            table.row(row),
            &data.rows[row * data.dim..(row + 1) * data.dim]
        );
    }
    assert_eq!(
        table.index_of(&data.ids[data.ids.len() - 1]),
        Some(data.ids.len() as u32 - 1)
    );
    assert_eq!(table.group_attribute_names().len(), data.groups.len());
    for group in &data.groups {
        let attribute = table.group_attribute_index(&group.name).unwrap();
        assert_eq!(table.group_labels(attribute), group.labels.as_slice());
    }
    assert_eq!(table.prior().map(<[f32]>::to_vec), data.prior);
}

#[test]
fn generated_tables_round_trip_through_the_store() {
    let dataset = generate(&small_params()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, data) in [
        ("items.frt", &dataset.items),
        ("users.frt", &dataset.users),
        ("true-items.frt", &dataset.true_item_table()),
    ] {
        let path = dir.path().join(name);
        let summary = store::write_table(&path, data).unwrap();
        assert_eq!(summary.rows, data.ids.len() as u64);
        assert_table_holds(&path, data);
    }
    let items = Table::open(&dir.path().join("items.frt")).unwrap();
    assert!(items.group_attribute_index(GROUP_ATTRIBUTE).is_some());
}

#[test]
fn imported_tables_round_trip_through_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let npy = dir.path().join("emb.npy");
    let data: Vec<f32> = (0..12).map(|v| v as f32 / 3.0).collect();
    write_npy(&npy, 4, 3, &data).unwrap();
    let csv = dir.path().join("meta.csv");
    std::fs::write(
        &csv,
        "id,provider_group,prior\nw,0,0.4\nx,1,0.3\ny,0,0.2\nz,1,0.1\n",
    )
    .unwrap();
    for meta in [None, Some(csv.as_path())] {
        let table_data = import_npy(&npy, meta).unwrap();
        let path = dir.path().join("imported.frt");
        store::write_table(&path, &table_data).unwrap();
        assert_table_holds(&path, &table_data);
    }
}

#[test]
fn cache_generates_once_then_reuses_and_repairs() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("nested").join("cache");
    let params = small_params();
    let first = cached_dataset(&cache, &params).unwrap();
    assert_eq!(first, dataset_paths(&cache, &params));
    let dataset = generate(&params).unwrap();
    assert_table_holds(&first.items, &dataset.items);
    assert_table_holds(&first.users, &dataset.users);
    assert_table_holds(&first.true_items, &dataset.true_item_table());

    // A second call reuses the files untouched.
    let modified = std::fs::metadata(&first.items).unwrap().modified().unwrap();
    let again = cached_dataset(&cache, &params).unwrap();
    assert_eq!(again, first);
    assert_eq!(
        std::fs::metadata(&first.items).unwrap().modified().unwrap(),
        modified
    );

    // A damaged file is regenerated.
    std::fs::write(&first.users, b"garbage").unwrap();
    cached_dataset(&cache, &params).unwrap();
    assert_table_holds(&first.users, &dataset.users);

    // Other parameters get other files next to the first ones.
    let other = SyntheticParams {
        seed: 100,
        ..params
    };
    let other_paths = cached_dataset(&cache, &other).unwrap();
    assert_ne!(other_paths.items, first.items);
    assert!(first.items.exists() && other_paths.items.exists());
    let names: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
    assert_eq!(names.len(), 6, "no temporary files are left behind");
}

#[test]
fn cached_tables_are_marked_with_their_roles() {
    let dir = tempfile::tempdir().unwrap();
    let params = small_params();
    let paths = cached_dataset(dir.path(), &params).unwrap();
    let role = |path: &Path| Table::open(path).unwrap().role();
    assert_eq!(role(&paths.items), Some(TableRole::Items));
    assert_eq!(role(&paths.true_items), Some(TableRole::Items));
    assert_eq!(role(&paths.users), Some(TableRole::Users));

    // An unmarked cached file (from before the role flags) is reused as it is.
    let dataset = generate(&params).unwrap();
    store::write_table(&paths.users, &dataset.users).unwrap();
    cached_dataset(dir.path(), &params).unwrap();
    assert_eq!(role(&paths.users), None);

    // A file marked with the other role is not: the dataset is written again, marked.
    TableWriter::new()
        .role(TableRole::Items)
        .write(&paths.users, &dataset.users)
        .unwrap();
    cached_dataset(dir.path(), &params).unwrap();
    assert_eq!(role(&paths.users), Some(TableRole::Users));
    assert_table_holds(&paths.users, &dataset.users);
}

#[test]
fn racing_processes_both_get_a_valid_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let params = small_params();
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| cached_dataset(dir.path(), &params)))
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().unwrap())
            .collect()
    });
    let dataset = generate(&params).unwrap();
    for result in results {
        let paths = result.unwrap();
        assert_table_holds(&paths.items, &dataset.items);
    }
}

#[test]
fn invalid_parameters_never_touch_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let params = SyntheticParams {
        bias: 1.5,
        ..small_params()
    };
    assert!(cached_dataset(&cache, &params).is_err());
    assert!(!cache.exists());
}
