//! The writer: validates a [`TableData`] and publishes it atomically (temporary file in the
//! target directory, fsync, rename over the target, fsync the directory). [`TableWriter`]
//! marks the file's role (items or users); [`write_table`] writes it unmarked.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::Xxh3Default;

use crate::error::{DataProblem, StoreError};
use crate::format::{
    Dtype, HEADER_SIZE, Header, LayoutPlan, MAX_ROWS, TableRole, row_stride_bytes,
};
use crate::id_index::{BuildError, IdIndex};
use crate::scan::{certified_norm, scan_rows};
use crate::strings::{encode_offsets, first_duplicate};
use crate::{TableData, TableSummary};

/// Message names of the name lists.
const GROUP_NAMES: &str = "group attribute name";
const DIM_NAMES: &str = "dimension name";

/// Writes `data` to `path` atomically (temporary file, fsync, rename), unmarked: the file
/// says neither that its rows are items nor users (see [`TableWriter::role`] to say so).
///
/// The data is validated first (lengths consistent, `dim > 0`, ids non-empty and unique,
/// values finite with finite norms, attribute and dimension names non-empty and unique,
/// prior finite); on refusal nothing is written. The file appears at `path` complete or
/// not at all: readers that opened the previous file keep reading it.
pub fn write_table(path: &Path, data: &TableData) -> Result<TableSummary, StoreError> {
    TableWriter::new().write(path, data)
}

/// [`write_table`] with options: a builder whose [`TableWriter::write`] validates and
/// publishes a table the same way.
///
/// ```
/// use store::{Table, TableData, TableRole, TableWriter};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("users.frt");
/// let data = TableData {
///     dim: 2,
///     rows: vec![1.0, 0.0],
///     ids: vec!["u1".into()],
///     groups: Vec::new(),
///     prior: None,
///     dim_names: None,
/// };
/// TableWriter::new().role(TableRole::Users).write(&path, &data)?;
/// assert_eq!(Table::open(&path)?.role(), Some(TableRole::Users));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableWriter {
    role: Option<TableRole>,
}

impl TableWriter {
    /// A writer with the defaults: the file is unmarked (no role).
    pub fn new() -> TableWriter {
        TableWriter::default()
    }

    /// Marks the file's rows as items or users (header flag bit 2 or 3). Readers older than
    /// the role flags refuse a marked file ("unknown header flags"); an unmarked file is
    /// read by every version-1 reader.
    #[must_use]
    pub fn role(mut self, role: TableRole) -> TableWriter {
        self.role = Some(role);
        self
    }

    /// Marks the file with `role`, or leaves it unmarked with `None`.
    #[must_use]
    pub fn maybe_role(mut self, role: Option<TableRole>) -> TableWriter {
        self.role = role;
        self
    }

    /// Validates `data` and publishes it at `path`, as [`write_table`] describes.
    pub fn write(&self, path: &Path, data: &TableData) -> Result<TableSummary, StoreError> {
        write_marked(path, data, self.role)
    }
}

fn write_marked(
    path: &Path,
    data: &TableData,
    role: Option<TableRole>,
) -> Result<TableSummary, StoreError> {
    let file_name = match path.file_name() {
        Some(name) => name.to_string_lossy().into_owned(),
        None => return Err(StoreError::data(path, DataProblem::NoFileName)),
    };
    let mut header = validate(data).map_err(|problem| StoreError::data(path, problem))?;
    header.role = role;
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut temporary = TemporaryFile::create(&directory, &file_name)?;
    let io = |action| {
        let temp = temporary.path.clone();
        move |e| StoreError::io(&temp, action, e)
    };
    let data_checksum =
        write_body(&temporary.file, &header, data).map_err(io("write the table"))?;
    header.data_checksum = data_checksum;
    let header_bytes = header.to_bytes();
    (&temporary.file)
        .seek(SeekFrom::Start(0))
        .and_then(|_| (&temporary.file).write_all(&header_bytes))
        .map_err(io("write the header"))?;
    temporary
        .file
        .sync_all()
        .map_err(io("flush the table to disk"))?;
    temporary.publish(path)?;
    sync_directory(&directory)?;
    Ok(TableSummary {
        rows: header.row_count,
        dim: header.dim,
        file_bytes: header.file_size,
        checksum: data_checksum,
    })
}

/// Checks `data` and returns the planned header (with the maximum row norm set).
fn validate(data: &TableData) -> Result<Header, DataProblem> {
    if data.dim == 0 {
        return Err(DataProblem::ZeroDim);
    }
    let dim = u32::try_from(data.dim).map_err(|_| DataProblem::DimTooLarge {
        dim: data.dim,
        max: u64::from(u32::MAX),
    })?;
    let rows = data.ids.len();
    if rows as u64 > MAX_ROWS {
        return Err(DataProblem::TooManyRows {
            rows,
            max: MAX_ROWS,
        });
    }
    let expected = rows.checked_mul(data.dim);
    if expected != Some(data.rows.len()) {
        return Err(DataProblem::RowsLength {
            expected: expected.unwrap_or(usize::MAX),
            found: data.rows.len(),
            ids: rows,
            dim: data.dim,
        });
    }
    if let Some(row) = data.ids.iter().position(String::is_empty) {
        return Err(DataProblem::EmptyId { row });
    }
    IdIndex::build(rows, |row| data.ids[row].as_bytes()).map_err(|error| match error {
        BuildError::Duplicate { first, second } => DataProblem::DuplicateId {
            id: data.ids[first].clone(),
            first,
            second,
        },
        BuildError::TooMany => DataProblem::TooManyRows {
            rows,
            max: MAX_ROWS,
        },
    })?;
    let max_squared = scan_rows(&data.rows, data.dim, data.dim)
        .map_err(|(row, problem)| DataProblem::BadRow { row, problem })?;

    let attributes =
        u32::try_from(data.groups.len()).map_err(|_| DataProblem::TooManyAttributes {
            count: data.groups.len(),
            max: u64::from(u32::MAX),
        })?;
    let group_names: Vec<&str> = data.groups.iter().map(|g| g.name.as_str()).collect();
    check_names(GROUP_NAMES, &group_names)?;
    for group in &data.groups {
        if group.labels.len() != rows {
            return Err(DataProblem::LabelsLength {
                name: group.name.clone(),
                expected: rows,
                found: group.labels.len(),
            });
        }
    }
    if let Some(prior) = &data.prior {
        if prior.len() != rows {
            return Err(DataProblem::PriorLength {
                expected: rows,
                found: prior.len(),
            });
        }
        if let Some(row) = prior.iter().position(|value| !value.is_finite()) {
            return Err(DataProblem::NonFinitePrior {
                row,
                value: prior[row],
            });
        }
    }
    if let Some(names) = &data.dim_names {
        if names.len() != data.dim {
            return Err(DataProblem::DimNamesLength {
                expected: data.dim,
                found: names.len(),
            });
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        check_names(DIM_NAMES, &names)?;
    }

    let total_len = |strings: &mut dyn Iterator<Item = &String>| -> u64 {
        strings.map(|s| s.len() as u64).sum()
    };
    let plan = LayoutPlan {
        dim,
        rows: rows as u64,
        group_attributes: attributes,
        id_bytes: total_len(&mut data.ids.iter()),
        group_name_bytes: total_len(&mut data.groups.iter().map(|g| &g.name)),
        has_prior: data.prior.is_some(),
        dim_name_bytes: data
            .dim_names
            .as_ref()
            .map(|names| total_len(&mut names.iter())),
    };
    let mut header = plan.header().ok_or(DataProblem::TooManyRows {
        rows,
        max: MAX_ROWS,
    })?;
    header.max_row_norm = certified_norm(max_squared, data.dim);
    Ok(header)
}

fn check_names(list: &'static str, names: &[&str]) -> Result<(), DataProblem> {
    if let Some(index) = names.iter().position(|name| name.is_empty()) {
        return Err(DataProblem::EmptyName { list, index });
    }
    if let Some((first, second)) = first_duplicate(names) {
        return Err(DataProblem::DuplicateName {
            list,
            name: names[first].to_owned(),
            first,
            second,
        });
    }
    Ok(())
}

/// Everything after the header, written through a hasher; returns the data checksum.
/// Leaves the header bytes zero (the caller writes the header last).
fn write_body(file: &File, header: &Header, data: &TableData) -> io::Result<u64> {
    let mut sink = HashingSink {
        out: BufWriter::with_capacity(1 << 20, file),
        hasher: Xxh3Default::new(),
        position: HEADER_SIZE as u64,
    };
    sink.out.write_all(&[0u8; HEADER_SIZE])?;

    sink.pad_to(header.rows_offset)?;
    let stride =
        usize::try_from(row_stride_bytes(header.dim, Dtype::F32) / 4).map_err(io::Error::other)?;
    if stride == data.dim {
        sink.put(bytemuck::cast_slice(&data.rows))?;
    } else {
        let padding = vec![0.0f32; stride - data.dim];
        for row in data.rows.chunks_exact(data.dim) {
            sink.put(bytemuck::cast_slice(row))?;
            sink.put(bytemuck::cast_slice(&padding))?;
        }
    }

    use crate::format::SectionKind as Kind;
    let ids: Vec<&str> = data.ids.iter().map(String::as_str).collect();
    write_strings(
        &mut sink,
        header.section(Kind::IdOffsets).offset,
        header.section(Kind::IdBytes).offset,
        &ids,
    )?;
    let names: Vec<&str> = data.groups.iter().map(|g| g.name.as_str()).collect();
    write_strings(
        &mut sink,
        header.section(Kind::GroupNameOffsets).offset,
        header.section(Kind::GroupNameBytes).offset,
        &names,
    )?;
    sink.pad_to(header.section(Kind::GroupLabels).offset)?;
    for group in &data.groups {
        sink.put(bytemuck::cast_slice(&group.labels))?;
    }
    sink.pad_to(header.section(Kind::Prior).offset)?;
    if let Some(prior) = &data.prior {
        sink.put(bytemuck::cast_slice(prior))?;
    }
    if let Some(dim_names) = &data.dim_names {
        let names: Vec<&str> = dim_names.iter().map(String::as_str).collect();
        write_strings(
            &mut sink,
            header.section(Kind::DimNameOffsets).offset,
            header.section(Kind::DimNameBytes).offset,
            &names,
        )?;
    }
    sink.pad_to(header.file_size)?;
    sink.out.flush()?;
    Ok(sink.hasher.digest())
}

/// Writes a string list: the offsets section at `offsets_at`, the bytes at `bytes_at`.
fn write_strings(
    sink: &mut HashingSink<'_>,
    offsets_at: u64,
    bytes_at: u64,
    strings: &[&str],
) -> io::Result<()> {
    sink.pad_to(offsets_at)?;
    sink.put(bytemuck::cast_slice(&encode_offsets(
        strings.iter().copied(),
    )))?;
    sink.pad_to(bytes_at)?;
    for string in strings {
        sink.put(string.as_bytes())?;
    }
    Ok(())
}

/// A buffered writer that hashes what it writes and tracks the file position.
struct HashingSink<'a> {
    out: BufWriter<&'a File>,
    hasher: Xxh3Default,
    position: u64,
}

impl HashingSink<'_> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hasher.update(bytes);
        self.out.write_all(bytes)?;
        self.position += bytes.len() as u64;
        Ok(())
    }

    /// Writes zeros up to `offset`; the planned layout never moves backwards.
    fn pad_to(&mut self, offset: u64) -> io::Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        if offset < self.position {
            return Err(io::Error::other(format!(
                "internal layout error: at byte {}, asked to pad to {offset}",
                self.position
            )));
        }
        while self.position < offset {
            let step = (offset - self.position).min(ZEROS.len() as u64) as usize;
            self.put(&ZEROS[..step])?;
        }
        Ok(())
    }
}

/// A temporary file next to the target, removed on drop unless published.
struct TemporaryFile {
    path: PathBuf,
    file: File,
    published: bool,
}

impl TemporaryFile {
    fn create(directory: &Path, file_name: &str) -> Result<TemporaryFile, StoreError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut attempt = 0;
        loop {
            let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = directory.join(format!(
                ".{file_name}.{}.{unique}.fr.tmp",
                std::process::id()
            ));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => {
                    return Ok(TemporaryFile {
                        path,
                        file,
                        published: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 16 => {
                    attempt += 1;
                }
                Err(e) => {
                    // Named by the output's folder: the temporary name means nothing to the
                    // user, and a missing or read-only folder is the usual cause.
                    return Err(StoreError::io(
                        &directory.join(file_name),
                        "create a temporary file beside it (does its folder exist, and is it \
                         writable?)",
                        e,
                    ));
                }
            }
        }
    }

    /// Renames the temporary file over `target`.
    fn publish(&mut self, target: &Path) -> Result<(), StoreError> {
        std::fs::rename(&self.path, target)
            .map_err(|e| StoreError::io(target, "rename the temporary file over the table", e))?;
        self.published = true;
        Ok(())
    }
}

impl Drop for TemporaryFile {
    fn drop(&mut self) {
        if !self.published {
            // Best effort: the write already failed and that error is being returned.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Makes the rename durable: fsync the directory that holds the table.
fn sync_directory(directory: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        File::open(directory)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| StoreError::io(directory, "sync the directory after publishing", e))?;
    }
    #[cfg(not(unix))]
    {
        // Directories cannot be opened for syncing on this platform; the rename itself is
        // atomic.
        let _ = directory;
    }
    Ok(())
}
