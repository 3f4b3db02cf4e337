//! Embedding table files: the on-disk format, an atomic writer and a validated memory-mapped reader.
//!
//! A table holds one embedding row per item plus the item's id, its group labels (categorical
//! attributes such as `provider_group`, used only by fairness code), an optional
//! non-personalized prior and optional dimension names. The format is specified in
//! `docs/table-format.md`: a fixed little-endian [`Header`] with its own checksum, rows
//! aligned to 4096 bytes and padded to 64-byte strides, then raw little-endian sections.
//!
//! - [`write_table`] validates a [`TableData`] and publishes it atomically (temporary file,
//!   fsync, rename, directory fsync); [`TableWriter`] does the same and can mark the file's
//!   [`TableRole`] (its rows are items or users), which [`Table::role`] reads back.
//! - [`Table::open`] memory-maps a file and validates it once (sizes, bounds, alignment, UTF-8,
//!   unique ids, finite values, norms); [`Table::rows`] then borrows the row block straight
//!   from the mapping. [`Table::verify`] checks the full data checksum.
//! - Every refusal is a [`StoreError`] whose message names the file and the problem; no input
//!   file can make the reader panic.
//!
//! ```
//! use store::{GroupAttribute, Table, TableData, write_table};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("items.frt");
//! let data = TableData {
//!     dim: 2,
//!     rows: vec![1.0, 0.0, 0.6, 0.8, 0.0, 2.0],
//!     ids: vec!["a".into(), "b".into(), "c".into()],
//!     groups: vec![GroupAttribute { name: "provider_group".into(), labels: vec![0, 1, 1] }],
//!     prior: Some(vec![0.5, 0.2, 0.3]),
//!     dim_names: None,
//! };
//! let summary = write_table(&path, &data)?;
//! assert_eq!(summary.rows, 3);
//!
//! let table = Table::open(&path)?;
//! table.verify()?;
//! assert_eq!(table.index_of("b"), Some(1));
//! assert_eq!(table.row(1), &[0.6, 0.8]);
//! assert_eq!(table.group_labels(table.group_attribute_index("provider_group").unwrap()), &[0, 1, 1]);
//! // An upper bound on every row's norm (here 2), rounded up: never below it.
//! assert!((2.0..=2.000_001).contains(&table.max_row_norm()));
//! # Ok(())
//! # }
//! ```
//!
//! CONTRACT (other crates are written against these names; the implementation may add
//! items, never rename these):
//! - `TableData` / `GroupAttribute`: an owned table to write.
//! - `write_table(path, &TableData) -> Result<TableSummary, StoreError>`: atomic publish.
//! - `Table::open(path) -> Result<Table, StoreError>` and, on `Table`: `path()`, `len()`,
//!   `is_empty()`, `dim()`, `row_stride()` (in f32 elements), `rows()` (the whole padded
//!   row block `&[f32]` of `len() * row_stride()` elements), `row(i) -> &[f32]` (`dim()`
//!   elements), `id(i) -> &str`, `index_of(&str) -> Option<u32>`,
//!   `group_attribute_names() -> &[String]`, `group_labels(attribute: usize) -> &[u32]`,
//!   `group_attribute_index(name) -> Option<usize>`, `prior() -> Option<&[f32]>`,
//!   `dim_names() -> Option<&[String]>`, `max_row_norm() -> f32`, `header() -> &Header`,
//!   `verify() -> Result<(), StoreError>` (full checksum), `role() -> Option<TableRole>`.
//! - `TableWriter::new().role(TableRole::Items | TableRole::Users).write(path, &TableData)`:
//!   the same publish, with the role marked in the header.
//! - `StoreError`: one typed error; every message names the file.

// Rows and sections are little-endian and read in place; a big-endian host would need a
// byte-swapping copy, which this crate does not implement.
#[cfg(not(target_endian = "little"))]
compile_error!("the store crate reads table files in place and supports little-endian hosts only");

mod error;
mod format;
mod id_index;
mod prefetch;
mod reader;
mod scan;
mod strings;
mod writer;

pub use error::{DataProblem, FormatProblem, RowProblem, StoreError};
pub use format::{
    Dtype, FLAG_HAS_DIM_NAMES, FLAG_HAS_PRIOR, FLAG_ROWS_ARE_ITEMS, FLAG_ROWS_ARE_USERS,
    FORMAT_VERSION, HEADER_SIZE, Header, MAGIC, MAX_ROWS, ROW_BLOCK_ALIGNMENT,
    ROW_STRIDE_ALIGNMENT, SECTION_ALIGNMENT, SECTION_COUNT, SectionKind, SectionRange, TableRole,
    row_stride_bytes,
};
pub use reader::{RegionStats, Table, TableStats};
pub use writer::{TableWriter, write_table};

/// One named categorical attribute of items (for example `provider_group`), one label per item.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupAttribute {
    /// Attribute name, unique within a table.
    pub name: String,
    /// One label per item, in row order.
    pub labels: Vec<u32>,
}

/// An owned embedding table, ready to be written with [`write_table`].
#[derive(Debug, Clone, PartialEq)]
pub struct TableData {
    /// Embedding dimension.
    pub dim: usize,
    /// Row-major item embeddings, `ids.len() * dim` values.
    pub rows: Vec<f32>,
    /// Unique item ids, one per row.
    pub ids: Vec<String>,
    /// Categorical group attributes of items (may be empty).
    pub groups: Vec<GroupAttribute>,
    /// Optional non-personalized prior per item (popularity or quality).
    pub prior: Option<Vec<f32>>,
    /// Optional names of the embedding dimensions.
    pub dim_names: Option<Vec<String>>,
}

/// What [`write_table`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct TableSummary {
    /// Number of rows.
    pub rows: u64,
    /// Embedding dimension.
    pub dim: u32,
    /// Size of the published file in bytes.
    pub file_bytes: u64,
    /// Checksum of the data recorded in the header.
    pub checksum: u64,
}
