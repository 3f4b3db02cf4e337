//! The store's one error type, [`StoreError`], and the typed problems it carries.
//!
//! Every refusal names the file it is about and says what is wrong in terms a person can act
//! on, for example `items.frt: truncated: header says 524292096 bytes, file has 1000`.

use std::io;
use std::path::{Path, PathBuf};

use crate::format::Dtype;

/// Errors of the table store. Every message names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An operating-system call on the file failed.
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        /// The file (or, for a directory sync, the directory).
        path: PathBuf,
        /// What was being done, for example `"open the table"`.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// [`write_table`](crate::write_table) refused the data it was given; nothing was written.
    #[error("{}: refusing to write table: {problem}", path.display())]
    InvalidData {
        /// The target file.
        path: PathBuf,
        /// What is wrong with the data.
        problem: DataProblem,
    },
    /// [`Table::open`](crate::Table::open) or [`Table::verify`](crate::Table::verify) refused
    /// the file.
    #[error("{}: {problem}", path.display())]
    Format {
        /// The table file.
        path: PathBuf,
        /// What is wrong with the file.
        problem: FormatProblem,
    },
}

impl StoreError {
    /// The file this error is about.
    pub fn path(&self) -> &Path {
        match self {
            StoreError::Io { path, .. }
            | StoreError::InvalidData { path, .. }
            | StoreError::Format { path, .. } => path,
        }
    }

    /// The format problem, when the error is a refused file.
    pub fn format_problem(&self) -> Option<&FormatProblem> {
        match self {
            StoreError::Format { problem, .. } => Some(problem),
            _ => None,
        }
    }

    /// The data problem, when the error is refused writer input.
    pub fn data_problem(&self) -> Option<&DataProblem> {
        match self {
            StoreError::InvalidData { problem, .. } => Some(problem),
            _ => None,
        }
    }

    pub(crate) fn io(path: &Path, action: &'static str, source: io::Error) -> Self {
        StoreError::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    }

    pub(crate) fn format(path: &Path, problem: FormatProblem) -> Self {
        StoreError::Format {
            path: path.to_path_buf(),
            problem,
        }
    }

    pub(crate) fn data(path: &Path, problem: DataProblem) -> Self {
        StoreError::InvalidData {
            path: path.to_path_buf(),
            problem,
        }
    }
}

/// What is wrong with one embedding row (found by the writer or by the reader's scan).
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum RowProblem {
    /// A value is NaN or infinite.
    #[error("column {column} holds {value}, which is not finite")]
    NonFinite {
        /// Column of the first offending value.
        column: usize,
        /// The value.
        value: f32,
    },
    /// All values are finite but the squared Euclidean norm exceeds `f32::MAX`.
    #[error("its squared norm overflows f32 (values are too large)")]
    NormOverflow,
    /// A padding element between `dim` and the row stride is not zero.
    #[error("padding element {column} is not zero (bits {bits:#010x})")]
    NonZeroPadding {
        /// Element index within the padded row (at least `dim`).
        column: usize,
        /// The raw bits found there.
        bits: u32,
    },
}

/// Why [`write_table`](crate::write_table) refused its input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DataProblem {
    /// The target path has no file name component.
    #[error("the path has no file name")]
    NoFileName,
    /// `dim` is zero.
    #[error("dimension is 0; tables need at least one dimension")]
    ZeroDim,
    /// `dim` does not fit the header's 32-bit field.
    #[error("dimension {dim} exceeds the format limit of {max}")]
    DimTooLarge {
        /// The requested dimension.
        dim: usize,
        /// The largest dimension the format can store.
        max: u64,
    },
    /// More rows than the format supports.
    #[error("{rows} rows exceed the format limit of {max}")]
    TooManyRows {
        /// The number of ids given.
        rows: usize,
        /// The largest row count the format supports.
        max: u64,
    },
    /// `rows.len()` is not `ids.len() * dim`.
    #[error("rows hold {found} values, expected {expected} ({ids} ids x dim {dim})")]
    RowsLength {
        /// `ids.len() * dim`.
        expected: usize,
        /// `rows.len()`.
        found: usize,
        /// `ids.len()`.
        ids: usize,
        /// `dim`.
        dim: usize,
    },
    /// An item id is the empty string.
    #[error("item id of row {row} is empty")]
    EmptyId {
        /// The row.
        row: usize,
    },
    /// Two rows have the same item id.
    #[error("duplicate item id {id:?} at rows {first} and {second}")]
    DuplicateId {
        /// The repeated id.
        id: String,
        /// The first row with this id.
        first: usize,
        /// The second row with this id.
        second: usize,
    },
    /// A row is not acceptable.
    #[error("row {row}: {problem}")]
    BadRow {
        /// The row.
        row: usize,
        /// What is wrong with it.
        problem: RowProblem,
    },
    /// A name in a list (group attribute names or dimension names) is empty.
    #[error("{list} {index} is empty")]
    EmptyName {
        /// Which list.
        list: &'static str,
        /// Position in the list.
        index: usize,
    },
    /// A name appears twice in a list.
    #[error("{list} {name:?} appears at positions {first} and {second}")]
    DuplicateName {
        /// Which list.
        list: &'static str,
        /// The repeated name.
        name: String,
        /// First position.
        first: usize,
        /// Second position.
        second: usize,
    },
    /// More group attributes than the format supports.
    #[error("{count} group attributes exceed the format limit of {max}")]
    TooManyAttributes {
        /// Number of attributes given.
        count: usize,
        /// The largest count the format supports.
        max: u64,
    },
    /// A group attribute has the wrong number of labels.
    #[error("group attribute {name:?} has {found} labels, expected one per row ({expected})")]
    LabelsLength {
        /// Attribute name.
        name: String,
        /// Number of rows.
        expected: usize,
        /// Number of labels given.
        found: usize,
    },
    /// The prior has the wrong length.
    #[error("prior has {found} values, expected one per row ({expected})")]
    PriorLength {
        /// Number of rows.
        expected: usize,
        /// Number of prior values given.
        found: usize,
    },
    /// A prior value is NaN or infinite.
    #[error("prior of row {row} is {value}, which is not finite")]
    NonFinitePrior {
        /// The row.
        row: usize,
        /// The value.
        value: f32,
    },
    /// The dimension names do not match `dim`.
    #[error("{found} dimension names given, expected one per dimension ({expected})")]
    DimNamesLength {
        /// `dim`.
        expected: usize,
        /// Number of names given.
        found: usize,
    },
}

/// Why a table file was refused at open or by `verify`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FormatProblem {
    /// The file is too short to hold the magic bytes.
    #[error("not a fairrank table: file has only {len} bytes")]
    TooShort {
        /// File length.
        len: u64,
    },
    /// The magic bytes are wrong.
    #[error("not a fairrank table: magic bytes are {found:02x?}, expected {expected:02x?}")]
    BadMagic {
        /// The first eight bytes of the file.
        found: [u8; 8],
        /// The fairrank magic.
        expected: [u8; 8],
    },
    /// The format version is not one this reader understands.
    #[error("unsupported format version {found} (this reader reads version {supported})")]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Version this reader supports.
        supported: u32,
    },
    /// The header size field is wrong for this version.
    #[error("header size field is {found}, expected {expected}")]
    BadHeaderSize {
        /// Value in the file.
        found: u32,
        /// Size required by this version.
        expected: u32,
    },
    /// The file ends inside the header.
    #[error("truncated: file has {len} bytes, shorter than the {header_size}-byte header")]
    TruncatedHeader {
        /// File length.
        len: u64,
        /// Header size.
        header_size: u32,
    },
    /// The header checksum does not match the header bytes.
    #[error(
        "header is corrupt: checksum field is {stored:#018x}, header hashes to {computed:#018x}"
    )]
    HeaderChecksum {
        /// Checksum stored in the header.
        stored: u64,
        /// Checksum of the header bytes.
        computed: u64,
    },
    /// Reserved header bytes are not zero.
    #[error("reserved header bytes at offset {offset} are not zero")]
    NonZeroReserved {
        /// Byte offset of the first non-zero reserved byte.
        offset: usize,
    },
    /// The dtype code is not defined by the format.
    #[error("unknown dtype code {code}")]
    UnknownDtype {
        /// The code found.
        code: u32,
    },
    /// The dtype is defined by the format but this reader cannot serve it.
    #[error("dtype {} (code {}) is defined by the format but not supported by this reader (only f32 is)", .dtype.name(), .dtype.code())]
    UnsupportedDtype {
        /// The dtype found.
        dtype: Dtype,
    },
    /// Header flags this reader does not know are set.
    #[error("unknown header flags {flags:#x} (written by a newer writer?)")]
    UnknownFlags {
        /// The unknown bits.
        flags: u32,
    },
    /// Both role flags are set: the header marks the rows as items and as users.
    #[error(
        "header flags {flags:#x} mark the rows as both items (bit 2) and users (bit 3); a \
         table has one role"
    )]
    ConflictingRoles {
        /// The role bits found (both).
        flags: u32,
    },
    /// The file is shorter than the header says.
    #[error("truncated: header says {expected} bytes, file has {actual}")]
    Truncated {
        /// File size recorded in the header.
        expected: u64,
        /// Actual file length.
        actual: u64,
    },
    /// The file is longer than the header says.
    #[error("size mismatch: header says {expected} bytes, file has {actual} (trailing bytes)")]
    TrailingBytes {
        /// File size recorded in the header.
        expected: u64,
        /// Actual file length.
        actual: u64,
    },
    /// The header says the dimension is zero.
    #[error("dimension is 0")]
    ZeroDim,
    /// More rows than this reader supports.
    #[error("{rows} rows exceed the supported maximum of {max}")]
    TooManyRows {
        /// Row count in the header.
        rows: u64,
        /// Largest supported row count.
        max: u64,
    },
    /// The row stride is not the canonical one for the dimension and dtype.
    #[error("row stride is {found} bytes, expected {expected} for dim {dim}")]
    BadRowStride {
        /// Stride in the header.
        found: u64,
        /// Canonical stride.
        expected: u64,
        /// Dimension in the header.
        dim: u32,
    },
    /// A region does not start at the alignment the format requires.
    #[error("{region} starts at offset {offset}, which is not a multiple of {alignment}")]
    Misaligned {
        /// Which region.
        region: &'static str,
        /// Its offset.
        offset: u64,
        /// Required alignment.
        alignment: u64,
    },
    /// A region's length disagrees with the counts in the header.
    #[error("{region} is {found} bytes long, expected {expected}")]
    LengthMismatch {
        /// Which region.
        region: &'static str,
        /// Length implied by the header counts.
        expected: u64,
        /// Length recorded in the header.
        found: u64,
    },
    /// A region extends past the end of the file (or its end overflows).
    #[error(
        "{region} at offset {offset} with length {length} extends past the end of the file ({file_size} bytes)"
    )]
    OutOfBounds {
        /// Which region.
        region: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        length: u64,
        /// File size.
        file_size: u64,
    },
    /// Two regions overlap.
    #[error(
        "{first} [{first_start}, {first_end}) overlaps {second} [{second_start}, {second_end})"
    )]
    Overlap {
        /// The region that starts first.
        first: &'static str,
        /// Its start.
        first_start: u64,
        /// Its end.
        first_end: u64,
        /// The other region.
        second: &'static str,
        /// Its start.
        second_start: u64,
        /// Its end.
        second_end: u64,
    },
    /// A string offset table is malformed.
    #[error("{list}: offset entry {index} is {offset}: {reason}")]
    BadStringOffsets {
        /// Which string list.
        list: &'static str,
        /// Entry index in the offset table.
        index: usize,
        /// The offending offset.
        offset: u64,
        /// What rule it breaks.
        reason: &'static str,
    },
    /// A string is not valid UTF-8.
    #[error("{list}: entry {index} is not valid UTF-8")]
    InvalidUtf8 {
        /// Which string list.
        list: &'static str,
        /// Entry index.
        index: usize,
    },
    /// Two rows have the same item id.
    #[error("duplicate item id {id:?} at rows {first} and {second}")]
    DuplicateId {
        /// The repeated id.
        id: String,
        /// The first row with this id.
        first: u64,
        /// The second row with this id.
        second: u64,
    },
    /// A name appears twice in a list.
    #[error("{list}: {name:?} appears at positions {first} and {second}")]
    DuplicateName {
        /// Which list.
        list: &'static str,
        /// The repeated name.
        name: String,
        /// First position.
        first: usize,
        /// Second position.
        second: usize,
    },
    /// A row is not acceptable.
    #[error("row {row}: {problem}")]
    BadRow {
        /// The row.
        row: u64,
        /// What is wrong with it.
        problem: RowProblem,
    },
    /// The maximum row norm in the header disagrees with the rows. (Writers that summed the
    /// squares in f32 stored too small a norm for rows with components below about `1e-19`;
    /// such files must be written again.)
    #[error(
        "header says the maximum row norm is {stored:e}, but the rows give {computed:e} \
         (if a writer that summed squares in f32 wrote it, write it again)"
    )]
    NormMismatch {
        /// Value in the header.
        stored: f32,
        /// Value computed from the rows.
        computed: f32,
    },
    /// A prior value is NaN or infinite.
    #[error("prior of row {row} is {value}, which is not finite")]
    NonFinitePrior {
        /// The row.
        row: u64,
        /// The value.
        value: f32,
    },
    /// The data checksum does not match (found by `verify`).
    #[error("data checksum mismatch: header says {stored:#018x}, data hashes to {computed:#018x}")]
    DataChecksum {
        /// Checksum stored in the header.
        stored: u64,
        /// Checksum of the data.
        computed: u64,
    },
}
