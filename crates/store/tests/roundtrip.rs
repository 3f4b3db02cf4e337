//! Write-then-open round trips, writer validation and atomic publishing.

mod common;

use common::{f64_max_norm, open_ok, sample_data, scaled_data, write_sample};
use proptest::prelude::*;
use store::{
    DataProblem, GroupAttribute, RowProblem, SectionKind, StoreError, Table, TableData, TableRole,
    TableWriter, write_table,
};

/// Asserts that `table` serves exactly `data`.
fn assert_serves(table: &Table, data: &TableData) {
    let rows = data.ids.len();
    assert_eq!(table.len(), rows);
    assert_eq!(table.is_empty(), rows == 0);
    assert_eq!(table.dim(), data.dim);
    assert_eq!(table.row_stride(), data.dim.div_ceil(16) * 16);
    assert_eq!(table.rows().len(), rows * table.row_stride());
    assert_eq!(
        table.rows().as_ptr() as usize % 4096,
        0,
        "row block alignment"
    );
    for (row, id) in data.ids.iter().enumerate() {
        assert_eq!(
            table.row(row),
            &data.rows[row * data.dim..(row + 1) * data.dim]
        );
        let padded = table.get_padded_row(row).unwrap_or(&[]);
        assert_eq!(padded.len(), table.row_stride());
        assert!(padded[data.dim..].iter().all(|v| v.to_bits() == 0));
        assert_eq!(table.id(row), id);
        assert_eq!(table.index_of(id), Some(row as u32));
    }
    assert_eq!(table.get_row(rows), None);
    assert_eq!(table.get_id(rows), None);
    assert_eq!(table.index_of("no such item"), None);
    let names: Vec<String> = data.groups.iter().map(|g| g.name.clone()).collect();
    assert_eq!(table.group_attribute_names(), names.as_slice());
    for (attribute, group) in data.groups.iter().enumerate() {
        assert_eq!(table.group_attribute_index(&group.name), Some(attribute));
        assert_eq!(table.group_labels(attribute), group.labels.as_slice());
    }
    assert_eq!(table.get_group_labels(data.groups.len()), None);
    assert_eq!(table.group_attribute_index("no such attribute"), None);
    assert_eq!(table.prior(), data.prior.as_deref());
    assert_eq!(table.dim_names(), data.dim_names.as_deref());
    let expected_norm = data
        .rows
        .chunks_exact(data.dim)
        .map(|row| {
            row.iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                .sqrt()
        })
        .fold(0.0f64, f64::max);
    let tolerance = (data.dim as f64 + 2.0) * f64::from(f32::EPSILON) * expected_norm + 1e-30;
    assert!(
        (f64::from(table.max_row_norm()) - expected_norm).abs() <= tolerance,
        "norm {} vs {expected_norm}",
        table.max_row_norm()
    );
    assert!(table.verify().is_ok());
}

#[test]
fn sample_table_round_trips() {
    let data = sample_data(40);
    let (_dir, path) = write_sample(&data);
    let table = open_ok(&path);
    assert_serves(&table, &data);
    assert_eq!(table.path(), path.as_path());
    let header = table.header();
    assert_eq!(header.row_count, 40);
    assert_eq!(header.dim, 5);
    assert_eq!(header.row_stride_bytes, 64);
    assert_eq!(header.rows_offset, 4096);
    assert!(header.has_prior && header.has_dim_names);
    let stats = table.stats();
    assert_eq!(
        stats.file_bytes,
        std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
    );
    assert_eq!(stats.row_padding_bytes, 40 * 11 * 4);
    let covered: u64 = stats.regions.iter().map(|r| r.range.length).sum();
    assert_eq!(covered + stats.gap_bytes, stats.file_bytes);
    assert_eq!(stats.regions.len(), SectionKind::ALL.len() + 2);
}

#[test]
fn summary_matches_the_file() {
    let data = sample_data(7);
    let dir = tempfile::tempdir().map_err(|e| e.to_string());
    let dir = dir.unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("t.frt");
    let summary = write_table(&path, &data).unwrap_or_else(|e| panic!("{e}"));
    let table = open_ok(&path);
    assert_eq!(summary.rows, 7);
    assert_eq!(summary.dim, 5);
    assert_eq!(summary.file_bytes, table.header().file_size);
    assert_eq!(summary.checksum, table.header().data_checksum);
}

#[test]
fn empty_table_round_trips() {
    let data = TableData {
        dim: 3,
        rows: vec![],
        ids: vec![],
        groups: vec![GroupAttribute {
            name: "g".into(),
            labels: vec![],
        }],
        prior: Some(vec![]),
        dim_names: None,
    };
    let (_dir, path) = write_sample(&data);
    let table = open_ok(&path);
    assert!(table.is_empty());
    assert_eq!(table.max_row_norm(), 0.0);
    assert_eq!(table.prior(), Some(&[][..]));
    assert_serves(&table, &data);
}

/// Rows scaled far below 1 (their squares are subnormal or zero in f32): the stored and
/// served norm is never below the exact largest norm and at most about an f32 rounding above.
/// (With squares summed in f32 it was 0 at 1e-24 and about 4 % low at 1e-22.)
#[test]
fn tiny_rows_get_a_norm_never_below_their_exact_norm() {
    for scale in [1.0, 1e-18, 1e-22, 1e-24, 1e-30, 1e-40] {
        let data = scaled_data(scale);
        let (_dir, path) = write_sample(&data);
        let table = open_ok(&path);
        let served = f64::from(table.max_row_norm());
        assert_eq!(
            table.header().max_row_norm,
            table.max_row_norm(),
            "scale {scale:e}"
        );
        let exact = f64_max_norm(&data);
        // The reference has an f64 rounding or two; the bound's margin is several.
        assert!(
            served >= exact * (1.0 + 2.0 * f64::EPSILON),
            "scale {scale:e}: {served:e} < {exact:e}"
        );
        let close = exact * (1.0 + 2.0 * f64::from(f32::EPSILON)) + f64::from(f32::from_bits(1));
        assert!(served <= close, "scale {scale:e}: {served:e} vs {exact:e}");
    }
}

#[test]
fn unpadded_rows_round_trip() {
    let rows = 9;
    let dim = 32;
    let data = TableData {
        dim,
        rows: (0..rows * dim).map(|i| i as f32 * 0.01).collect(),
        ids: (0..rows).map(|i| i.to_string()).collect(),
        groups: vec![],
        prior: None,
        dim_names: None,
    };
    let (_dir, path) = write_sample(&data);
    let table = open_ok(&path);
    assert_eq!(table.row_stride(), dim);
    assert_eq!(table.prior(), None);
    assert_serves(&table, &data);
}

fn arbitrary_table() -> impl Strategy<Value = TableData> {
    (
        1usize..24,
        0usize..20,
        0usize..3,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_flat_map(|(dim, rows, attributes, has_prior, has_names)| {
            (
                prop::collection::vec(-1.0e3f32..1.0e3, rows * dim),
                prop::collection::hash_set("[a-zA-Z0-9_é日-]{1,12}", rows),
                prop::collection::vec(prop::collection::vec(0u32..5, rows), attributes),
                prop::collection::vec(-10.0f32..10.0, rows),
            )
                .prop_map(move |(values, ids, labels, prior)| TableData {
                    dim,
                    rows: values,
                    ids: ids.into_iter().collect(),
                    groups: labels
                        .into_iter()
                        .enumerate()
                        .map(|(i, labels)| GroupAttribute {
                            name: format!("attribute_{i}"),
                            labels,
                        })
                        .collect(),
                    prior: has_prior.then_some(prior),
                    dim_names: has_names.then(|| (0..dim).map(|d| format!("dim {d}")).collect()),
                })
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_valid_table_round_trips(data in arbitrary_table()) {
        let (_dir, path) = write_sample(&data);
        let table = open_ok(&path);
        assert_serves(&table, &data);
    }
}

fn refusal(data: &TableData) -> DataProblem {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("bad.frt");
    let error = match write_table(&path, data) {
        Ok(summary) => panic!("accepted: {summary:?}"),
        Err(e) => e,
    };
    assert!(error.to_string().contains("bad.frt"), "{error}");
    assert!(!path.exists(), "nothing may be published on refusal");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    match error {
        StoreError::InvalidData { problem, .. } => problem,
        other => panic!("expected invalid data, got {other}"),
    }
}

#[test]
fn writer_refuses_inconsistent_data() {
    let good = sample_data(4);

    let mut data = good.clone();
    data.dim = 0;
    assert_eq!(refusal(&data), DataProblem::ZeroDim);

    let mut data = good.clone();
    data.rows.pop();
    assert!(matches!(
        refusal(&data),
        DataProblem::RowsLength {
            expected: 20,
            found: 19,
            ..
        }
    ));

    let mut data = good.clone();
    data.ids[2] = String::new();
    assert_eq!(refusal(&data), DataProblem::EmptyId { row: 2 });

    let mut data = good.clone();
    data.ids[3] = data.ids[1].clone();
    assert!(matches!(
        refusal(&data),
        DataProblem::DuplicateId {
            first: 1,
            second: 3,
            ..
        }
    ));

    let mut data = good.clone();
    data.rows[7] = f32::NAN;
    assert!(matches!(
        refusal(&data),
        DataProblem::BadRow {
            row: 1,
            problem: RowProblem::NonFinite { column: 2, .. }
        }
    ));

    let mut data = good.clone();
    data.rows[19] = f32::NEG_INFINITY;
    assert!(matches!(
        refusal(&data),
        DataProblem::BadRow {
            row: 3,
            problem: RowProblem::NonFinite { column: 4, .. }
        }
    ));

    let mut data = good.clone();
    data.rows[0] = 1.0e20;
    assert_eq!(
        refusal(&data),
        DataProblem::BadRow {
            row: 0,
            problem: RowProblem::NormOverflow
        }
    );

    let mut data = good.clone();
    data.groups[1].name = data.groups[0].name.clone();
    assert!(matches!(
        refusal(&data),
        DataProblem::DuplicateName {
            first: 0,
            second: 1,
            ..
        }
    ));

    let mut data = good.clone();
    data.groups[0].name = String::new();
    assert!(matches!(
        refusal(&data),
        DataProblem::EmptyName { index: 0, .. }
    ));

    let mut data = good.clone();
    data.groups[1].labels.push(0);
    assert!(matches!(
        refusal(&data),
        DataProblem::LabelsLength {
            expected: 4,
            found: 5,
            ..
        }
    ));

    let mut data = good.clone();
    data.prior = Some(vec![1.0; 3]);
    assert_eq!(
        refusal(&data),
        DataProblem::PriorLength {
            expected: 4,
            found: 3
        }
    );

    let mut data = good.clone();
    data.prior = Some(vec![1.0, f32::INFINITY, 0.0, 0.0]);
    assert!(matches!(
        refusal(&data),
        DataProblem::NonFinitePrior { row: 1, .. }
    ));

    let mut data = good.clone();
    data.dim_names = Some(vec!["a".into()]);
    assert_eq!(
        refusal(&data),
        DataProblem::DimNamesLength {
            expected: 5,
            found: 1
        }
    );

    let mut data = good.clone();
    data.dim_names = Some(["a", "b", "c", "b", "e"].map(String::from).to_vec());
    assert!(matches!(
        refusal(&data),
        DataProblem::DuplicateName {
            first: 1,
            second: 3,
            ..
        }
    ));
}

#[test]
fn writer_needs_a_file_name() {
    let result = write_table(std::path::Path::new("/"), &sample_data(1));
    assert!(matches!(
        result,
        Err(StoreError::InvalidData {
            problem: DataProblem::NoFileName,
            ..
        })
    ));
}

#[test]
fn writer_reports_missing_directory() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("missing").join("t.frt");
    let result = write_table(&path, &sample_data(1));
    assert!(matches!(result, Err(StoreError::Io { .. })), "{result:?}");
}

#[test]
fn republishing_leaves_open_tables_on_the_old_file() {
    let old = sample_data(6);
    let (dir, path) = write_sample(&old);
    let old_table = open_ok(&path);

    let mut new = sample_data(3);
    new.rows.iter_mut().for_each(|v| *v += 1.0);
    new.ids = vec!["x".into(), "y".into(), "z".into()];
    write_table(&path, &new).unwrap_or_else(|e| panic!("{e}"));

    // The open table still reads the old (renamed-over) file, intact.
    assert_serves(&old_table, &old);
    assert_serves(&open_ok(&path), &new);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        names,
        vec!["items.frt".to_string()],
        "no temporary files remain"
    );
}

#[test]
fn role_round_trips_for_both_roles_and_unmarked() {
    let data = sample_data(4);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let unmarked = dir.path().join("unmarked.frt");
    write_table(&unmarked, &data).unwrap_or_else(|e| panic!("{e}"));
    let unmarked_bytes = std::fs::read(&unmarked).unwrap_or_else(|e| panic!("{e}"));
    let unmarked_table = open_ok(&unmarked);
    assert_eq!(unmarked_table.role(), None);
    assert_eq!(unmarked_table.header().role, None);
    assert_eq!(unmarked_bytes[20], 0b11, "prior and dimension names only");
    let cases = [
        ("default.frt", TableWriter::new(), None, 0b11),
        (
            "items.frt",
            TableWriter::new().role(TableRole::Items),
            Some(TableRole::Items),
            0b111,
        ),
        (
            "users.frt",
            TableWriter::new().role(TableRole::Users),
            Some(TableRole::Users),
            0b1011,
        ),
        (
            "none.frt",
            TableWriter::new().role(TableRole::Users).maybe_role(None),
            None,
            0b11,
        ),
    ];
    for (name, writer, role, flags) in cases {
        let path = dir.path().join(name);
        let summary = writer.write(&path, &data).unwrap_or_else(|e| panic!("{e}"));
        let table = open_ok(&path);
        table.verify().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(table.role(), role, "{name}");
        assert_serves(&table, &data);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]),
            flags
        );
        // The role lives in the header alone: the body and its checksum are unchanged.
        assert_eq!(bytes[256..], unmarked_bytes[256..], "{name}");
        assert_eq!(summary.checksum, unmarked_table.header().data_checksum);
        assert_eq!(
            bytes[..256] == unmarked_bytes[..256],
            role.is_none(),
            "{name}"
        );
    }
}

#[test]
fn tables_are_published_in_nested_directories() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let nested = dir.path().join("sub");
    std::fs::create_dir(&nested).unwrap_or_else(|e| panic!("{e}"));
    let path = nested.join("nested.frt");
    write_table(&path, &sample_data(2)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(open_ok(&path).len(), 2);
}

/// Enough rows for `open` to build the id index on a second thread.
fn large_data() -> TableData {
    let rows = (1 << 16) + 5;
    TableData {
        dim: 2,
        rows: (0..rows * 2).map(|i| (i % 1000) as f32 * 0.001).collect(),
        ids: (0..rows).map(|i| format!("{i:x}")).collect(),
        groups: vec![],
        prior: None,
        dim_names: None,
    }
}

#[test]
fn large_tables_open_with_the_parallel_checks() {
    let data = large_data();
    let (_dir, path) = write_sample(&data);
    let table = open_ok(&path);
    assert_eq!(table.len(), data.ids.len());
    for (row, id) in data.ids.iter().enumerate().step_by(97) {
        assert_eq!(table.index_of(id), Some(row as u32));
        assert_eq!(table.row(row), &data.rows[row * 2..row * 2 + 2]);
    }
    assert!(table.verify().is_ok());
}

#[test]
fn large_tables_report_row_problems_before_id_problems() {
    let data = large_data();
    let (_dir, path) = write_sample(&data);
    let mut bytes = common::read(&path);
    let header = common::header_of(&bytes);
    // A NaN in the last row and a duplicate id (row 1 becomes "0").
    let last = (header.rows_offset + (header.row_count - 1) * header.row_stride_bytes) as usize;
    bytes[last..last + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let ids_at = header.section(SectionKind::IdBytes).offset as usize;
    bytes[ids_at + 1] = b'0';
    common::write(&path, &bytes);
    let error = common::open_err(&path);
    assert!(
        matches!(
            error.format_problem(),
            Some(store::FormatProblem::BadRow { row, .. }) if *row == header.row_count - 1
        ),
        "{error}"
    );
    // With the NaN repaired, the duplicate is found.
    bytes[last..last + 4].copy_from_slice(&0.5f32.to_le_bytes());
    common::write(&path, &bytes);
    let error = common::open_err(&path);
    assert!(
        matches!(
            error.format_problem(),
            Some(store::FormatProblem::DuplicateId {
                first: 0,
                second: 1,
                ..
            })
        ),
        "{error}"
    );
}

/// `index_of_many`, `index_of_many_prefetch_rows`, `index_of_many_hinting_rows` and their
/// `spans` forms (ids as spans of one buffer) answer exactly like `index_of` per id,
/// for lists of every length around the lookup pipeline's group boundaries (groups of 8,
/// four in flight), with unknown ids, repeated ids and ids that differ by one byte.
#[test]
fn batched_lookups_answer_like_single_ones_at_every_length() {
    let rows = 300;
    let data = TableData {
        dim: 3,
        rows: (0..rows * 3).map(|value| value as f32 / 1000.0).collect(),
        ids: (0..rows).map(|row| format!("item-{row:03}")).collect(),
        groups: Vec::new(),
        prior: None,
        dim_names: None,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("items.frt");
    write_table(&path, &data).expect("writes");
    let table = Table::open(&path).expect("opens");
    // Known, unknown (one byte off, longer, shorter, empty) and repeated ids, interleaved.
    let pool: Vec<String> = (0..80)
        .map(|i| match i % 5 {
            0 => format!("item-{:03}", (i * 37) % rows),
            1 => format!("item-{:03}x", i),
            2 => format!("item-{:03}", (i * 11) % rows).replace('-', "_"),
            3 => "item-007".to_owned(),
            _ => ["", "item-", "item-29"][i % 3].to_owned(),
        })
        .collect();
    for len in (0..=40).chain([63, 64, 65, 80]) {
        let ids = &pool[..len];
        let expected: Vec<Option<u32>> = ids.iter().map(|id| table.index_of(id)).collect();
        let mut plain = vec![Some(u32::MAX)];
        table.index_of_many(ids, &mut plain);
        assert_eq!(plain[0], Some(u32::MAX), "appends to `out`");
        assert_eq!(&plain[1..], expected.as_slice(), "length {len}");
        let mut warm = Vec::new();
        table.index_of_many_prefetch_rows(ids.iter().map(String::as_bytes), &mut warm);
        assert_eq!(warm, expected, "length {len}");
        // The caller's hint sees every found row once, in id order, and nothing else (not
        // the rows already in `out`, not absent ids).
        let hinted = std::cell::RefCell::new(Vec::new());
        let mut with_hint = vec![Some(7)];
        table.index_of_many_hinting_rows(ids, |row| hinted.borrow_mut().push(row), &mut with_hint);
        assert_eq!(with_hint[0], Some(7), "appends to `out`");
        assert_eq!(&with_hint[1..], expected.as_slice(), "length {len}");
        let found: Vec<usize> = expected.iter().flatten().map(|&row| row as usize).collect();
        assert_eq!(hinted.into_inner(), found, "length {len}");
        // The same ids as spans of one buffer, with a gap byte before each (as ids sit
        // between field keys in a request body).
        let mut buffer = Vec::new();
        let spans: Vec<(usize, usize)> = ids
            .iter()
            .map(|id| {
                buffer.push(b'#');
                let start = buffer.len();
                buffer.extend_from_slice(id.as_bytes());
                (start, buffer.len())
            })
            .collect();
        let mut spanned = vec![Some(3)];
        table.index_of_many_spans(&buffer, &spans, &mut spanned);
        assert_eq!(spanned[0], Some(3), "appends to `out`");
        assert_eq!(&spanned[1..], expected.as_slice(), "length {len}");
        let hinted = std::cell::RefCell::new(Vec::new());
        let mut spanned = vec![None];
        table.index_of_many_spans_hinting_rows(
            &buffer,
            &spans,
            |row| hinted.borrow_mut().push(row),
            &mut spanned,
        );
        assert_eq!(&spanned[1..], expected.as_slice(), "length {len}");
        assert_eq!(hinted.into_inner(), found, "length {len}");
    }
    assert!(pool.iter().any(|id| table.index_of(id).is_none()));
}
