//! The one error type of the `datasets` crate; every message names the file, line or field at fault.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while generating, importing or caching a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A parameter (of [`crate::SyntheticParams`] or of a function) is out of range.
    #[error("invalid parameter `{name}`: {reason}")]
    InvalidParameter {
        /// The parameter or field at fault.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A row index passed to an accessor is out of range.
    #[error("{what} index {index} is out of range (there are {len})")]
    IndexOutOfRange {
        /// `"user"` or `"item"`.
        what: &'static str,
        /// The index asked for.
        index: usize,
        /// The number of rows.
        len: usize,
    },
    /// An operating system call on a file or folder failed.
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What was being done, e.g. `"open the file"`.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A `.npy` file (read or to be written) is refused.
    #[error("{}: {problem}", path.display())]
    Npy {
        /// The `.npy` file.
        path: PathBuf,
        /// What is wrong.
        problem: NpyProblem,
    },
    /// An item metadata CSV file is refused.
    #[error("{}{}: {problem}", path.display(), csv_location(*line, column.as_deref()))]
    Csv {
        /// The CSV file.
        path: PathBuf,
        /// The 1-based line of the record at fault, when the problem has one.
        line: Option<u64>,
        /// The column at fault, when the problem has one.
        column: Option<String>,
        /// What is wrong.
        problem: CsvProblem,
    },
    /// The table store refused to write or open a table file (its message names the file).
    #[error("{action}: {source}")]
    Store {
        /// What was being done, e.g. `"writing the cached item table"`.
        action: &'static str,
        /// The store's error.
        #[source]
        source: store::StoreError,
    },
}

/// Why a `.npy` file is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NpyProblem {
    /// The file does not start with the NumPy magic string `\x93NUMPY`.
    #[error("not a NumPy .npy file (missing the \\x93NUMPY magic string)")]
    BadMagic,
    /// The format version is not 1.0, 2.0 or 3.0.
    #[error("unsupported .npy format version {major}.{minor} (supported: 1.0, 2.0, 3.0)")]
    UnsupportedVersion {
        /// Major version byte.
        major: u8,
        /// Minor version byte.
        minor: u8,
    },
    /// The file ends before the header does.
    #[error("file ends inside the .npy header ({file_bytes} bytes, header needs {needed})")]
    TruncatedHeader {
        /// Size of the file.
        file_bytes: u64,
        /// Bytes needed to hold the header.
        needed: u64,
    },
    /// The header length field is implausibly large.
    #[error("header length {length} exceeds the limit of {limit} bytes")]
    HeaderTooLarge {
        /// Declared header length.
        length: u64,
        /// The largest accepted header length.
        limit: u64,
    },
    /// The header is not valid text for its format version (UTF-8 in version 3.0; versions 1.0
    /// and 2.0 are latin-1, where every byte is valid).
    #[error("header is not valid {encoding} text")]
    HeaderEncoding {
        /// The expected encoding, `"UTF-8"`.
        encoding: &'static str,
    },
    /// The header is not a well-formed dictionary with exactly `descr`, `fortran_order`, `shape`.
    #[error("malformed header: {reason}")]
    MalformedHeader {
        /// What the parser found wrong.
        reason: String,
    },
    /// The data type is big-endian; only little-endian data is read.
    #[error(
        "big-endian dtype '{descr}' is not supported; convert with \
         arr.astype(arr.dtype.newbyteorder('<'))"
    )]
    BigEndian {
        /// The `descr` field.
        descr: String,
    },
    /// The data type is neither `<f4` nor `<f8`.
    #[error("unsupported dtype '{descr}' (supported: '<f4' float32, '<f8' float64)")]
    UnsupportedDtype {
        /// The `descr` field.
        descr: String,
    },
    /// The array is stored in Fortran (column-major) order.
    #[error(
        "Fortran-order arrays are not supported; save np.ascontiguousarray(arr) (C order) instead"
    )]
    FortranOrder,
    /// The array is not 2-D.
    #[error("shape {} is not 2-D (rows, dim)", format_shape(shape))]
    NotTwoDimensional {
        /// The shape found.
        shape: Vec<u64>,
    },
    /// The rows have zero length.
    #[error("shape ({rows}, 0): rows must have at least one dimension")]
    ZeroDimension {
        /// The number of rows.
        rows: u64,
    },
    /// The matrix has no rows where rows are required.
    #[error("the matrix has no rows")]
    NoRows,
    /// The declared shape does not fit in memory addresses.
    #[error("shape ({rows}, {dim}) is too large to address")]
    SizeOverflow {
        /// Declared rows.
        rows: u64,
        /// Declared dimension.
        dim: u64,
    },
    /// The data section is shorter than the shape requires.
    #[error("truncated data: shape needs {expected} data bytes but the file holds {actual}")]
    TruncatedData {
        /// Bytes the shape requires.
        expected: u64,
        /// Bytes present after the header.
        actual: u64,
    },
    /// The file continues after the array data.
    #[error("{extra} unexpected bytes after the {expected} data bytes the shape requires")]
    TrailingBytes {
        /// Bytes the shape requires.
        expected: u64,
        /// Extra bytes after them.
        extra: u64,
    },
    /// A value is NaN or infinite.
    #[error("non-finite value at row {row}, column {column}")]
    NonFinite {
        /// 0-based row.
        row: usize,
        /// 0-based column.
        column: usize,
    },
    /// A float64 value is too large in magnitude for float32.
    #[error("value {value} at row {row}, column {column} overflows float32")]
    Float32Overflow {
        /// 0-based row.
        row: usize,
        /// 0-based column.
        column: usize,
        /// The float64 value.
        value: f64,
    },
    /// The data slice given to the writer does not have `rows * dim` values.
    #[error("data has {actual} values but rows x dim = {expected}")]
    DataLength {
        /// `rows * dim`.
        expected: u64,
        /// `data.len()`.
        actual: u64,
    },
}

/// Why an item metadata CSV file is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CsvProblem {
    /// The file has no header row.
    #[error("the file is empty (expected a header row with an `id` column)")]
    Empty,
    /// The header has no `id` column.
    #[error("the header has no `id` column")]
    MissingIdColumn,
    /// A header cell is empty.
    #[error("empty column name")]
    EmptyColumnName,
    /// A column name appears twice.
    #[error("duplicate column name")]
    DuplicateColumn,
    /// The CSV parser failed (invalid UTF-8, for example).
    #[error("{message}")]
    Parse {
        /// The parser's message.
        message: String,
    },
    /// A record has a different number of fields than the header.
    #[error("record has {found} fields but the header has {expected}")]
    FieldCount {
        /// Fields in the header.
        expected: u64,
        /// Fields in this record.
        found: u64,
    },
    /// An id is empty.
    #[error("empty id")]
    EmptyId,
    /// An id repeats an earlier one.
    #[error("duplicate id `{id}` (first seen on line {first_line})")]
    DuplicateId {
        /// The repeated id.
        id: String,
        /// The line of its first occurrence.
        first_line: u64,
    },
    /// A group label is not a non-negative integer that fits `u32`.
    #[error("`{value}` is not a group label (an integer from 0 to 4294967295)")]
    BadLabel {
        /// The cell text.
        value: String,
    },
    /// A prior is not a finite number (or not representable as float32).
    #[error("`{value}` is not a finite float32 prior")]
    BadPrior {
        /// The cell text.
        value: String,
    },
    /// The number of data rows differs from the number of rows of the `.npy` file.
    #[error("{csv_rows} data rows, but {} has {npy_rows} rows", npy.display())]
    RowCountMismatch {
        /// Data rows in the CSV.
        csv_rows: u64,
        /// Rows of the embedding matrix.
        npy_rows: u64,
        /// The `.npy` file.
        npy: PathBuf,
    },
}

fn csv_location(line: Option<u64>, column: Option<&str>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!(": line {line}, column `{column}`"),
        (Some(line), None) => format!(": line {line}"),
        (None, Some(column)) => format!(": column `{column}`"),
        (None, None) => String::new(),
    }
}

fn format_shape(shape: &[u64]) -> String {
    match shape {
        [single] => format!("({single},)"),
        _ => {
            let parts: Vec<String> = shape.iter().map(u64::to_string).collect();
            format!("({})", parts.join(", "))
        }
    }
}

impl DatasetError {
    pub(crate) fn io(path: impl Into<PathBuf>, action: &'static str, source: io::Error) -> Self {
        Self::Io {
            path: path.into(),
            action,
            source,
        }
    }

    pub(crate) fn npy(path: impl Into<PathBuf>, problem: NpyProblem) -> Self {
        Self::Npy {
            path: path.into(),
            problem,
        }
    }

    pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidParameter {
            name,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_messages_name_file_line_and_column() {
        let error = DatasetError::Csv {
            path: PathBuf::from("meta.csv"),
            line: Some(7),
            column: Some("provider_group".to_string()),
            problem: CsvProblem::BadLabel {
                value: "-1".to_string(),
            },
        };
        let message = error.to_string();
        assert!(
            message.starts_with("meta.csv: line 7, column `provider_group`:"),
            "{message}"
        );
        assert!(message.contains("`-1`"), "{message}");
    }

    #[test]
    fn npy_messages_name_file_and_shape() {
        let error = DatasetError::npy("q.npy", NpyProblem::NotTwoDimensional { shape: vec![5] });
        assert_eq!(
            error.to_string(),
            "q.npy: shape (5,) is not 2-D (rows, dim)"
        );
    }
}
