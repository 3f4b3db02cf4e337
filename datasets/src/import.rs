//! Importing item embeddings from a `.npy` file plus an optional item metadata CSV into a table.
//!
//! The CSV has a header row with an `id` column, an optional `prior` column, and any number of
//! group label columns (non-negative integers; the column name becomes the attribute name), one
//! data row per embedding row, in the same order. Every refusal names the file, the line and the
//! column.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use store::{GroupAttribute, TableData};

use crate::error::{CsvProblem, DatasetError, NpyProblem};
use crate::npy::read_npy;

/// Name of the id column of a metadata CSV.
pub const ID_COLUMN: &str = "id";
/// Name of the optional prior column of a metadata CSV.
pub const PRIOR_COLUMN: &str = "prior";

/// Item metadata read from a CSV file.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemMetadata {
    /// Unique item ids, in row order.
    pub ids: Vec<String>,
    /// One attribute per group label column, in column order.
    pub groups: Vec<GroupAttribute>,
    /// The `prior` column, if present.
    pub prior: Option<Vec<f32>>,
}

/// Builds a table from item embeddings in `npy` (see [`read_npy`]) and, optionally, item metadata
/// in `meta_csv`.
///
/// Without a CSV, ids are the row numbers (`"0"`, `"1"`, ...) and there are no groups and no
/// prior. With one, its data row count must equal the matrix's row count.
pub fn import_npy(npy: &Path, meta_csv: Option<&Path>) -> Result<TableData, DatasetError> {
    let matrix = read_npy(npy)?;
    if matrix.rows == 0 {
        return Err(DatasetError::npy(npy, NpyProblem::NoRows));
    }
    let metadata = match meta_csv {
        Some(csv_path) => read_item_metadata(csv_path, matrix.rows, npy)?,
        None => ItemMetadata {
            ids: (0..matrix.rows).map(|row| row.to_string()).collect(),
            groups: Vec::new(),
            prior: None,
        },
    };
    Ok(TableData {
        dim: matrix.dim,
        rows: matrix.data,
        ids: metadata.ids,
        groups: metadata.groups,
        prior: metadata.prior,
        dim_names: None,
    })
}

/// What a header column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnRole {
    Id,
    Prior,
    /// Index into the group attributes.
    Group(usize),
}

/// Reads an item metadata CSV that must have exactly `expected_rows` data rows (the rows of the
/// embedding file `npy`, named in the row count error).
pub fn read_item_metadata(
    path: &Path,
    expected_rows: usize,
    npy: &Path,
) -> Result<ItemMetadata, DatasetError> {
    let file = std::fs::File::open(path)
        .map_err(|source| DatasetError::io(path, "open the file", source))?;
    parse_item_metadata(file, path, expected_rows, npy)
}

fn csv_error(
    path: &Path,
    line: Option<u64>,
    column: Option<&str>,
    problem: CsvProblem,
) -> DatasetError {
    DatasetError::Csv {
        path: path.to_path_buf(),
        line,
        column: column.map(str::to_string),
        problem,
    }
}

fn from_csv_error(path: &Path, error: csv::Error) -> DatasetError {
    let line = error.position().map(csv::Position::line);
    match error.into_kind() {
        csv::ErrorKind::Io(source) => DatasetError::io(path, "read the file", source),
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => csv_error(
            path,
            line,
            None,
            CsvProblem::FieldCount {
                expected: expected_len,
                found: len,
            },
        ),
        csv::ErrorKind::Utf8 { err, .. } => csv_error(
            path,
            line,
            None,
            CsvProblem::Parse {
                message: format!("invalid UTF-8 in field {}", err.field() + 1),
            },
        ),
        other => csv_error(
            path,
            line,
            None,
            CsvProblem::Parse {
                message: format!("{other:?}"),
            },
        ),
    }
}

fn parse_item_metadata(
    input: impl std::io::Read,
    path: &Path,
    expected_rows: usize,
    npy: &Path,
) -> Result<ItemMetadata, DatasetError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .trim(csv::Trim::All)
        .from_reader(input);
    let mut records = reader.records();
    let header = match records.next() {
        Some(record) => record.map_err(|error| from_csv_error(path, error))?,
        None => return Err(csv_error(path, None, None, CsvProblem::Empty)),
    };
    let header_line = header.position().map_or(1, csv::Position::line);
    let mut names: Vec<String> = Vec::with_capacity(header.len());
    let mut roles = Vec::with_capacity(header.len());
    let mut groups: Vec<GroupAttribute> = Vec::new();
    let mut has_prior = false;
    for (index, raw_name) in header.iter().enumerate() {
        // Spreadsheet exports often start with a UTF-8 byte order mark.
        let name = if index == 0 {
            raw_name.trim_start_matches('\u{feff}').trim()
        } else {
            raw_name
        };
        let column_label = format!("#{}", index + 1);
        if name.is_empty() {
            return Err(csv_error(
                path,
                Some(header_line),
                Some(&column_label),
                CsvProblem::EmptyColumnName,
            ));
        }
        if names.iter().any(|seen| seen == name) {
            return Err(csv_error(
                path,
                Some(header_line),
                Some(name),
                CsvProblem::DuplicateColumn,
            ));
        }
        let role = match name {
            ID_COLUMN => ColumnRole::Id,
            PRIOR_COLUMN => {
                has_prior = true;
                ColumnRole::Prior
            }
            _ => {
                groups.push(GroupAttribute {
                    name: name.to_string(),
                    labels: Vec::with_capacity(expected_rows),
                });
                ColumnRole::Group(groups.len() - 1)
            }
        };
        names.push(name.to_string());
        roles.push(role);
    }
    if !roles.contains(&ColumnRole::Id) {
        return Err(csv_error(
            path,
            Some(header_line),
            None,
            CsvProblem::MissingIdColumn,
        ));
    }

    let mut ids: Vec<String> = Vec::with_capacity(expected_rows);
    let mut first_line_of_id: HashMap<String, u64> = HashMap::with_capacity(expected_rows);
    let mut prior: Vec<f32> = Vec::with_capacity(if has_prior { expected_rows } else { 0 });
    let mut data_rows: u64 = 0;
    let mut last_line = header_line;
    for record in records {
        let record = record.map_err(|error| from_csv_error(path, error))?;
        data_rows += 1;
        let line = record
            .position()
            .map_or(header_line + data_rows, csv::Position::line);
        last_line = line;
        if data_rows > expected_rows as u64 {
            // Count the rest so the error reports the real total.
            continue;
        }
        for ((cell, role), name) in record.iter().zip(&roles).zip(&names) {
            let cell_error = |problem| csv_error(path, Some(line), Some(name), problem);
            match *role {
                ColumnRole::Id => {
                    if cell.is_empty() {
                        return Err(cell_error(CsvProblem::EmptyId));
                    }
                    if let Some(&first_line) = first_line_of_id.get(cell) {
                        return Err(cell_error(CsvProblem::DuplicateId {
                            id: cell.to_string(),
                            first_line,
                        }));
                    }
                    first_line_of_id.insert(cell.to_string(), line);
                    ids.push(cell.to_string());
                }
                ColumnRole::Prior => prior.push(parse_prior(cell).ok_or_else(|| {
                    cell_error(CsvProblem::BadPrior {
                        value: cell.to_string(),
                    })
                })?),
                ColumnRole::Group(attribute) => {
                    let label = cell.parse::<u32>().map_err(|_| {
                        cell_error(CsvProblem::BadLabel {
                            value: cell.to_string(),
                        })
                    })?;
                    if let Some(group) = groups.get_mut(attribute) {
                        group.labels.push(label);
                    }
                }
            }
        }
    }
    if data_rows != expected_rows as u64 {
        return Err(csv_error(
            path,
            Some(last_line),
            None,
            CsvProblem::RowCountMismatch {
                csv_rows: data_rows,
                npy_rows: expected_rows as u64,
                npy: PathBuf::from(npy),
            },
        ));
    }
    Ok(ItemMetadata {
        ids,
        groups,
        prior: has_prior.then_some(prior),
    })
}

/// A finite prior that is also finite as float32.
fn parse_prior(cell: &str) -> Option<f32> {
    let value = cell.parse::<f64>().ok()?;
    let narrowed = value as f32;
    narrowed.is_finite().then_some(narrowed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::npy::write_npy;

    struct Fixture {
        dir: tempfile::TempDir,
        npy: PathBuf,
    }

    fn fixture(rows: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let npy = dir.path().join("items.npy");
        let data: Vec<f32> = (0..rows * 2).map(|v| v as f32).collect();
        write_npy(&npy, rows, 2, &data).unwrap();
        Fixture { dir, npy }
    }

    impl Fixture {
        fn csv(&self, text: &str) -> PathBuf {
            let path = self.dir.path().join("meta.csv");
            std::fs::write(&path, text).unwrap();
            path
        }

        fn csv_error(&self, text: &str) -> (Option<u64>, Option<String>, CsvProblem, String) {
            let csv = self.csv(text);
            match import_npy(&self.npy, Some(&csv)) {
                Err(error @ DatasetError::Csv { .. }) => {
                    let message = error.to_string();
                    assert!(message.starts_with(&csv.display().to_string()), "{message}");
                    let DatasetError::Csv {
                        line,
                        column,
                        problem,
                        ..
                    } = error
                    else {
                        unreachable!("matched above")
                    };
                    (line, column, problem, message)
                }
                other => panic!("expected a CSV error for {text:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn without_csv_ids_are_row_numbers() {
        let fixture = fixture(3);
        let table = import_npy(&fixture.npy, None).unwrap();
        assert_eq!(table.dim, 2);
        assert_eq!(table.ids, vec!["0", "1", "2"]);
        assert_eq!(table.rows, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!(table.groups.is_empty());
        assert!(table.prior.is_none());
        assert!(table.dim_names.is_none());
    }

    #[test]
    fn csv_gives_ids_groups_and_prior() {
        let fixture = fixture(3);
        let csv = fixture.csv(
            "\u{feff}id, provider_group ,prior,region\n\
             a,0,0.5,2\n\
             \"b,c\",1,0.25,0\n\
             d , 1 ,1e-3,7\n",
        );
        let table = import_npy(&fixture.npy, Some(&csv)).unwrap();
        assert_eq!(table.ids, vec!["a", "b,c", "d"]);
        assert_eq!(table.groups.len(), 2);
        assert_eq!(table.groups[0].name, "provider_group");
        assert_eq!(table.groups[0].labels, vec![0, 1, 1]);
        assert_eq!(table.groups[1].name, "region");
        assert_eq!(table.groups[1].labels, vec![2, 0, 7]);
        assert_eq!(table.prior, Some(vec![0.5, 0.25, 1e-3]));
    }

    #[test]
    fn csv_with_only_ids_has_no_groups_or_prior() {
        let fixture = fixture(2);
        let csv = fixture.csv("id\nx\ny\n");
        let table = import_npy(&fixture.npy, Some(&csv)).unwrap();
        assert_eq!(table.ids, vec!["x", "y"]);
        assert!(table.groups.is_empty());
        assert!(table.prior.is_none());
    }

    #[test]
    fn csv_errors_name_line_and_column() {
        let fixture = fixture(2);
        let (line, column, problem, message) = fixture.csv_error("id,group\na,0\nb,-1\n");
        assert_eq!((line, column.as_deref()), (Some(3), Some("group")));
        assert_eq!(problem, CsvProblem::BadLabel { value: "-1".into() });
        assert!(message.contains("line 3, column `group`"), "{message}");

        let (line, column, problem, _) = fixture.csv_error("id,group\na,0\nb,4294967296\n");
        assert_eq!((line, column.as_deref()), (Some(3), Some("group")));
        assert!(matches!(problem, CsvProblem::BadLabel { .. }));

        let (line, column, problem, _) = fixture.csv_error("id,group\na,0\nb,1.5\n");
        assert_eq!((line, column.as_deref()), (Some(3), Some("group")));
        assert!(matches!(problem, CsvProblem::BadLabel { .. }));

        let (line, column, problem, _) = fixture.csv_error("id,prior\na,nan\nb,1\n");
        assert_eq!((line, column.as_deref()), (Some(2), Some("prior")));
        assert!(matches!(problem, CsvProblem::BadPrior { .. }));

        let (line, _, problem, _) = fixture.csv_error("id,prior\na,1e39\nb,1\n");
        assert_eq!(line, Some(2));
        assert!(matches!(problem, CsvProblem::BadPrior { .. }));

        let (line, column, problem, _) = fixture.csv_error("id,g\na,0\na,1\n");
        assert_eq!((line, column.as_deref()), (Some(3), Some("id")));
        assert_eq!(
            problem,
            CsvProblem::DuplicateId {
                id: "a".into(),
                first_line: 2
            }
        );

        let (line, column, problem, _) = fixture.csv_error("id,g\n,0\nb,1\n");
        assert_eq!((line, column.as_deref()), (Some(2), Some("id")));
        assert_eq!(problem, CsvProblem::EmptyId);

        let (line, _, problem, _) = fixture.csv_error("id,g\na,0\nb,1,9\n");
        assert_eq!(line, Some(3));
        assert_eq!(
            problem,
            CsvProblem::FieldCount {
                expected: 2,
                found: 3
            }
        );
    }

    #[test]
    fn csv_header_errors() {
        let fixture = fixture(1);
        let (line, _, problem, _) = fixture.csv_error("name,group\na,0\n");
        assert_eq!((line, problem), (Some(1), CsvProblem::MissingIdColumn));
        let (_, column, problem, _) = fixture.csv_error("id,g,g\na,0,1\n");
        assert_eq!(
            (column.as_deref(), problem),
            (Some("g"), CsvProblem::DuplicateColumn)
        );
        let (_, column, problem, _) = fixture.csv_error("id,,g\na,0,1\n");
        assert_eq!(
            (column.as_deref(), problem),
            (Some("#2"), CsvProblem::EmptyColumnName)
        );
        let (line, _, problem, _) = fixture.csv_error("");
        assert_eq!((line, problem), (None, CsvProblem::Empty));
        let (_, _, problem, _) = fixture.csv_error("id,g\na,\u{0}\n");
        assert!(matches!(problem, CsvProblem::BadLabel { .. }));
    }

    #[test]
    fn row_counts_must_match() {
        let fixture = fixture(3);
        let (_, _, problem, message) = fixture.csv_error("id\na\nb\n");
        assert_eq!(
            problem,
            CsvProblem::RowCountMismatch {
                csv_rows: 2,
                npy_rows: 3,
                npy: fixture.npy.clone()
            }
        );
        assert!(message.contains("items.npy"), "{message}");
        let (_, _, problem, _) = fixture.csv_error("id\na\nb\nc\nd\ne\n");
        assert!(matches!(
            problem,
            CsvProblem::RowCountMismatch { csv_rows: 5, .. }
        ));
    }

    #[test]
    fn invalid_utf8_is_reported_with_its_line() {
        let fixture = fixture(1);
        let path = fixture.dir.path().join("meta.csv");
        std::fs::write(&path, b"id,g\n\xff\xfe,0\n").unwrap();
        match import_npy(&fixture.npy, Some(&path)) {
            Err(DatasetError::Csv {
                line: Some(2),
                problem: CsvProblem::Parse { .. },
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn empty_matrices_and_missing_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let npy = dir.path().join("empty.npy");
        write_npy(&npy, 0, 3, &[]).unwrap();
        assert!(matches!(
            import_npy(&npy, None),
            Err(DatasetError::Npy {
                problem: NpyProblem::NoRows,
                ..
            })
        ));
        let fixture = fixture(1);
        let missing = fixture.dir.path().join("nope.csv");
        let error = import_npy(&fixture.npy, Some(&missing)).unwrap_err();
        assert!(matches!(error, DatasetError::Io { .. }));
        assert!(error.to_string().contains("nope.csv"));
    }
}
