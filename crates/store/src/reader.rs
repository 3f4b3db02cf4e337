//! The validated, memory-mapped reader: [`Table::open`] checks a file once, then serves rows
//! straight from the mapping (no copies), ids, group labels, the prior and dimension names.
//!
//! # Memory-map safety
//!
//! Mapping a file is sound only while no one modifies it. Table files are immutable once
//! published: [`write_table`](crate::write_table) writes a temporary file and renames it over
//! the target, so an open table keeps the old inode and never sees a partial write. Tools must
//! never modify a table file in place (truncating or rewriting a mapped file can fault the
//! process or change data behind validated slices); replacing it by rename is always safe.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapOptions};
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{FormatProblem, StoreError};
use crate::format::{HEADER_SIZE, Header, Layout, MAX_ROWS, SectionKind, SectionRange, TableRole};
use crate::id_index::{BuildError, IdIndex, LookupHints};
use crate::prefetch;
use crate::scan::{certified_norm, norm_tolerance, scan_rows};
use crate::strings;

/// Message names of the string lists.
const IDS: &str = "item ids";
const GROUP_NAMES: &str = "group attribute names";
const DIM_NAMES: &str = "dimension names";

/// An open, validated, memory-mapped table file.
///
/// Opening checks everything except the data checksum (see [`Table::verify`]); afterwards
/// every accessor is a slice into the mapping. `Table` is `Send + Sync`: share it in an `Arc`.
pub struct Table {
    path: PathBuf,
    header: Header,
    layout: Layout,
    map: Mmap,
    id_index: IdIndex,
    group_attribute_names: Vec<String>,
    dim_names: Option<Vec<String>>,
    max_row_norm: f32,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("path", &self.path)
            .field("rows", &self.layout.rows)
            .field("dim", &self.layout.dim)
            .field("group_attributes", &self.group_attribute_names)
            .field("has_prior", &self.header.has_prior)
            .field("role", &self.header.role)
            .finish_non_exhaustive()
    }
}

/// One region of the file, for inspection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionStats {
    /// Region name (`"header"`, `"row block"` or a [`SectionKind::name`]).
    pub name: &'static str,
    /// Where it lies.
    pub range: SectionRange,
}

/// Sizes of a table's parts, cheap to compute (for `fairrank table inspect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableStats {
    /// Total file size.
    pub file_bytes: u64,
    /// Header, row block and sections, in header order.
    pub regions: Vec<RegionStats>,
    /// Bytes of row padding (between `dim` and the row stride) in the row block.
    pub row_padding_bytes: u64,
    /// Bytes in no region (alignment gaps).
    pub gap_bytes: u64,
    /// Heap bytes of the id lookup table built at open.
    pub id_index_heap_bytes: u64,
}

/// The prefetches of [`Table::index_of_many`]: a likely row's id offset, then its id bytes.
struct IdHints<'t> {
    offsets: &'t [u64],
    bytes: &'t [u8],
}

impl LookupHints for IdHints<'_> {
    #[inline(always)]
    fn offset(&self, row: usize) {
        prefetch::element(self.offsets, row);
    }

    #[inline(always)]
    fn bytes(&self, row: usize) {
        if let Some(&start) = self.offsets.get(row) {
            prefetch::element(self.bytes, usize::try_from(start).unwrap_or(usize::MAX));
        }
    }
}

/// The prefetches of [`Table::index_of_many_prefetch_rows`]: those of [`IdHints`], and the
/// row's own values as soon as a bucket names it.
struct CallerRowHints<'t, F> {
    ids: IdHints<'t>,
    row: F,
}

impl<F: Fn(usize)> LookupHints for CallerRowHints<'_, F> {
    #[inline(always)]
    fn offset(&self, row: usize) {
        self.ids.offset(row);
    }

    #[inline(always)]
    fn bytes(&self, row: usize) {
        self.ids.bytes(row);
    }

    #[inline(always)]
    fn row(&self, row: usize) {
        (self.row)(row);
    }
}

/// Reinterprets validated bytes as a slice of `T`. Open checked every section's length and
/// alignment with this same cast, so the empty fallback is unreachable; it exists so that no
/// accessor can panic.
fn cast<T: bytemuck::AnyBitPattern>(bytes: &[u8]) -> &[T] {
    bytemuck::try_cast_slice(bytes).unwrap_or(&[])
}

/// Like [`cast`], but reports a misaligned or ragged section (used at open).
fn cast_checked<'a, T: bytemuck::AnyBitPattern>(
    bytes: &'a [u8],
    region: &'static str,
    offset: usize,
) -> Result<&'a [T], FormatProblem> {
    bytemuck::try_cast_slice(bytes).map_err(|_| FormatProblem::Misaligned {
        region,
        offset: offset as u64,
        alignment: std::mem::align_of::<T>() as u64,
    })
}

impl Table {
    /// Opens, maps and validates a table file.
    ///
    /// Checks the magic, version, header checksum, dtype, exact file size, section bounds,
    /// alignment and overlaps, then scans the data once: every row value finite, row norms
    /// finite and consistent with the header, padding zero, ids UTF-8 and unique, names UTF-8
    /// and unique, the prior finite. The data checksum is checked only by [`Table::verify`].
    /// Builds the id lookup table (on a second thread for tables of 65536 rows or more, while
    /// this thread scans the rows). Copies no rows. The map is populated up front
    /// (`MAP_POPULATE` on Linux): the scan touches every page anyway, and one kernel call is
    /// cheaper than a page fault per 64 KiB.
    ///
    /// No `madvise` hint is given, on purpose (measured on Linux 6.18, ext4, a 1M x 128 table
    /// in the page cache): the kernel already maps most of the file with 2 MiB pages
    /// (`FilePmdMapped` covered 446 of 512 MiB without any hint), and neither
    /// `MADV_HUGEPAGE`, `MADV_WILLNEED` nor `MADV_RANDOM` changed that or the speed of scans
    /// and random candidate gathers beyond noise.
    pub fn open(path: &Path) -> Result<Table, StoreError> {
        let file = File::open(path).map_err(|e| StoreError::io(path, "open the table", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| StoreError::io(path, "read the table's metadata", e))?
            .len();
        let mut prefix = Vec::with_capacity(HEADER_SIZE);
        (&file)
            .take(HEADER_SIZE as u64)
            .read_to_end(&mut prefix)
            .map_err(|e| StoreError::io(path, "read the header", e))?;
        let refuse = |problem| StoreError::format(path, problem);
        let header = Header::from_bytes(&prefix, file_len).map_err(refuse)?;
        let layout = header.layout(file_len).map_err(refuse)?;
        // SAFETY: table files are immutable once published (written to a temporary file and
        // renamed into place; see the module documentation), so the mapped bytes do not change
        // while this `Table` borrows from them. The map is read-only and private to `Table`.
        let map = unsafe { MmapOptions::new().populate().map(&file) }
            .map_err(|e| StoreError::io(path, "memory-map the table", e))?;
        // The file may have changed size between the metadata call and the map.
        let mapped = map.len() as u64;
        if mapped < header.file_size {
            return Err(refuse(FormatProblem::Truncated {
                expected: header.file_size,
                actual: mapped,
            }));
        }
        if mapped > header.file_size {
            return Err(refuse(FormatProblem::TrailingBytes {
                expected: header.file_size,
                actual: mapped,
            }));
        }
        Self::validate(path, header, layout, map)
    }

    /// [`Table::open`] followed by [`Table::verify`].
    pub fn open_verified(path: &Path) -> Result<Table, StoreError> {
        let table = Table::open(path)?;
        table.verify()?;
        Ok(table)
    }

    fn validate(
        path: &Path,
        header: Header,
        layout: Layout,
        map: Mmap,
    ) -> Result<Table, StoreError> {
        let refuse = |problem| StoreError::format(path, problem);
        let bytes: &[u8] = &map;

        // The two big checks are independent: on large tables the id index is built on a
        // second thread while this one scans the rows. Row problems are reported first
        // either way, so the error for a given file does not depend on timing.
        let (rows, ids) = if layout.rows >= PARALLEL_OPEN_MIN_ROWS {
            std::thread::scope(|scope| {
                let ids_task = std::thread::Builder::new()
                    .name("store-open-ids".into())
                    .spawn_scoped(scope, || check_ids(bytes, &layout));
                let rows = check_rows(bytes, &layout, &header);
                let ids = match ids_task {
                    Ok(task) => task
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                    // No thread available: do the work here.
                    Err(_) => check_ids(bytes, &layout),
                };
                (rows, ids)
            })
        } else {
            let rows = check_rows(bytes, &layout, &header).map_err(refuse)?;
            (Ok(rows), check_ids(bytes, &layout))
        };
        let max_row_norm = rows.map_err(refuse)?;
        let id_index = ids.map_err(refuse)?;

        // Group attributes: names (labels are plain u32; the layout checked their length).
        let group_attribute_names =
            read_names(&layout, bytes, GROUP_NAMES, SectionKind::GroupNameOffsets)
                .map_err(refuse)?;
        section_as::<u32>(bytes, &layout, SectionKind::GroupLabels).map_err(refuse)?;

        // Prior: finite.
        if header.has_prior {
            let prior: &[f32] = section_as(bytes, &layout, SectionKind::Prior).map_err(refuse)?;
            if let Some(row) = prior.iter().position(|value| !value.is_finite()) {
                return Err(refuse(FormatProblem::NonFinitePrior {
                    row: row as u64,
                    value: prior[row],
                }));
            }
        }

        let dim_names = if header.has_dim_names {
            Some(
                read_names(&layout, bytes, DIM_NAMES, SectionKind::DimNameOffsets)
                    .map_err(refuse)?,
            )
        } else {
            None
        };

        Ok(Table {
            path: path.to_path_buf(),
            header,
            layout,
            map,
            id_index,
            group_attribute_names,
            dim_names,
            max_row_norm,
        })
    }

    /// Checks the data checksum: hashes every byte after the header (a full read of the
    /// file) and compares with the header. Refuses with [`FormatProblem::DataChecksum`].
    pub fn verify(&self) -> Result<(), StoreError> {
        let computed = xxh3_64(self.map.get(HEADER_SIZE..).unwrap_or(&[]));
        if computed != self.header.data_checksum {
            return Err(StoreError::format(
                &self.path,
                FormatProblem::DataChecksum {
                    stored: self.header.data_checksum,
                    computed,
                },
            ));
        }
        Ok(())
    }

    /// The file this table was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of rows (items).
    pub fn len(&self) -> usize {
        self.layout.rows
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.layout.rows == 0
    }

    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.layout.dim
    }

    /// Distance between row starts, in f32 elements (`dim()` rounded up to a multiple of 16).
    pub fn row_stride(&self) -> usize {
        self.layout.stride
    }

    /// The whole row block, `len() * row_stride()` values straight from the mapping. Row `i`
    /// starts at `i * row_stride()`; its padding elements are `+0.0`. The block starts on a
    /// 4096-byte boundary and each row on a 64-byte boundary.
    pub fn rows(&self) -> &[f32] {
        cast(self.map.get(self.layout.row_block.clone()).unwrap_or(&[]))
    }

    /// Row `index` (`dim()` values), or `None` if out of range.
    pub fn get_row(&self, index: usize) -> Option<&[f32]> {
        let start = index.checked_mul(self.layout.stride)?;
        self.rows().get(start..start.checked_add(self.layout.dim)?)
    }

    /// Row `index` (`dim()` values).
    ///
    /// # Panics
    ///
    /// If `index >= len()`.
    pub fn row(&self, index: usize) -> &[f32] {
        match self.get_row(index) {
            Some(row) => row,
            None => panic!(
                "row {index} out of range for a table of {} rows",
                self.len()
            ),
        }
    }

    /// Row `index` with its zero padding (`row_stride()` values), or `None` if out of range.
    pub fn get_padded_row(&self, index: usize) -> Option<&[f32]> {
        let start = index.checked_mul(self.layout.stride)?;
        self.rows()
            .get(start..start.checked_add(self.layout.stride)?)
    }

    fn id_offsets(&self) -> &[u64] {
        cast(
            self.map
                .get(self.layout.section(SectionKind::IdOffsets))
                .unwrap_or(&[]),
        )
    }

    fn id_bytes_of(&self, index: usize) -> Option<&[u8]> {
        let bytes = self.map.get(self.layout.section(SectionKind::IdBytes))?;
        strings::entry(self.id_offsets(), bytes, index)
    }

    /// The item id of row `index`, or `None` if out of range.
    pub fn get_id(&self, index: usize) -> Option<&str> {
        // Validated at open; re-checking a short id costs a few nanoseconds and keeps this
        // free of `unsafe`.
        std::str::from_utf8(self.id_bytes_of(index)?).ok()
    }

    /// The item id of row `index`.
    ///
    /// # Panics
    ///
    /// If `index >= len()`.
    pub fn id(&self, index: usize) -> &str {
        match self.get_id(index) {
            Some(id) => id,
            None => panic!(
                "row {index} out of range for a table of {} rows",
                self.len()
            ),
        }
    }

    /// The row of item `id`, if the table has it.
    pub fn index_of(&self, id: &str) -> Option<u32> {
        let offsets = self.id_offsets();
        let bytes = self
            .map
            .get(self.layout.section(SectionKind::IdBytes))
            .unwrap_or(&[]);
        self.id_index.get(id.as_bytes(), |row| {
            strings::entry(offsets, bytes, row).unwrap_or(&[])
        })
    }

    /// The rows of many item ids at once, appended to `out` in order (`None`: not in the
    /// table). Same answers as [`Table::index_of`] per id, several times faster for long
    /// lists: the lookups' cache misses overlap (see `IdIndex::get_many`).
    ///
    /// The ids may be `&str`s or raw `&[u8]`s (ids are compared byte for byte).
    pub fn index_of_many<'k, K: AsRef<[u8]> + ?Sized + 'k>(
        &self,
        ids: impl IntoIterator<Item = &'k K>,
        out: &mut Vec<Option<u32>>,
    ) {
        let hints = self.id_hints();
        self.lookup_many(ids, &hints, out);
    }

    /// [`Table::index_of_many`] for a caller about to read the rows it finds (a candidate
    /// list to score): same answers, and each found row's values are requested into the L2
    /// cache as soon as the id's hash slot names it, so that their loads from memory overlap
    /// the rest of the lookups instead of following them. A hint only: it changes no result,
    /// and rows not read soon after are simply evicted again.
    pub fn index_of_many_prefetch_rows<'k, K: AsRef<[u8]> + ?Sized + 'k>(
        &self,
        ids: impl IntoIterator<Item = &'k K>,
        out: &mut Vec<Option<u32>>,
    ) {
        let (rows, stride, dim) = (self.rows(), self.layout.stride, self.layout.dim);
        let prefetch_row = |row: usize| {
            let start = row.wrapping_mul(stride);
            if let Some(values) = rows.get(start..start.wrapping_add(dim)) {
                prefetch::lines_l2(values);
            }
        };
        let hints = CallerRowHints {
            ids: self.id_hints(),
            row: prefetch_row,
        };
        self.lookup_many(ids, &hints, out);
    }

    /// [`Table::index_of_many`] for a caller that keeps its own copy of the rows (an int8
    /// copy, say) and reads the rows it finds next: same answers, then `row_hint(row)` is
    /// called with each row found, in id order (an absent id has none), so that the caller
    /// can start loading their data before it reads them. The hint must only prefetch, never
    /// change a result.
    ///
    /// The hints follow the lookups rather than going out as each id's bucket names its row
    /// (as [`Table::index_of_many_prefetch_rows`] does): the int8 copy's hint is 2 lines per
    /// row (codes and scale), which issued during the lookups took the miss buffers that the
    /// buckets of the next ids needed; after them, they still arrive before the int8 pass
    /// (whose own look-ahead prefetch then finds them in flight). Measured with the
    /// `lookup_cold` bench at T1's shape, per 1000 ids: the lookup call itself 2.3 us less
    /// with warm caches (the server's usual state), and lookups plus int8 scoring at k = 100
    /// within the noise warm, 1.0 us less with L2 evicted, 7.3 us less from DRAM
    /// (BENCHMARKS.md, section `lookup2`).
    pub fn index_of_many_hinting_rows<'k, K: AsRef<[u8]> + ?Sized + 'k>(
        &self,
        ids: impl IntoIterator<Item = &'k K>,
        row_hint: impl Fn(usize),
        out: &mut Vec<Option<u32>>,
    ) {
        let first = out.len();
        self.index_of_many(ids, out);
        for &row in out.get(first..).unwrap_or_default().iter().flatten() {
            row_hint(row as usize);
        }
    }

    /// [`Table::index_of_many`] over ids held as spans of one buffer (id `i` is
    /// `buffer[spans[i].0..spans[i].1]`; an empty id if that range is not in `buffer`): the
    /// same answers, appended to `out` in id order, for fewer instructions per id than
    /// through an iterator when the ids have at most 8 bytes (see `IdIndex::get_many_spans`;
    /// BENCHMARKS.md, section `lookup3`).
    pub fn index_of_many_spans(
        &self,
        buffer: &[u8],
        spans: &[(usize, usize)],
        out: &mut Vec<Option<u32>>,
    ) {
        let hints = self.id_hints();
        let (offsets, bytes) = (self.id_offsets(), self.id_bytes());
        self.id_index.get_many_spans(
            buffer,
            spans,
            |row| strings::entry(offsets, bytes, row).unwrap_or(&[]),
            &hints,
            out,
        );
    }

    /// [`Table::index_of_many_hinting_rows`] over ids held as [`Table::index_of_many_spans`]
    /// takes them: the same answers, then `row_hint(row)` for each row found, in id order.
    pub fn index_of_many_spans_hinting_rows(
        &self,
        buffer: &[u8],
        spans: &[(usize, usize)],
        row_hint: impl Fn(usize),
        out: &mut Vec<Option<u32>>,
    ) {
        let first = out.len();
        self.index_of_many_spans(buffer, spans, out);
        for &row in out.get(first..).unwrap_or_default().iter().flatten() {
            row_hint(row as usize);
        }
    }

    fn id_bytes(&self) -> &[u8] {
        self.map
            .get(self.layout.section(SectionKind::IdBytes))
            .unwrap_or(&[])
    }

    fn id_hints(&self) -> IdHints<'_> {
        IdHints {
            offsets: self.id_offsets(),
            bytes: self.id_bytes(),
        }
    }

    fn lookup_many<'k, K: AsRef<[u8]> + ?Sized + 'k>(
        &self,
        ids: impl IntoIterator<Item = &'k K>,
        hints: &impl LookupHints,
        out: &mut Vec<Option<u32>>,
    ) {
        let offsets = self.id_offsets();
        let bytes = self.id_bytes();
        self.id_index.get_many(
            ids.into_iter().map(AsRef::as_ref),
            |row| strings::entry(offsets, bytes, row).unwrap_or(&[]),
            hints,
            out,
        );
    }

    /// Names of the group attributes, in file order.
    pub fn group_attribute_names(&self) -> &[String] {
        &self.group_attribute_names
    }

    /// Position of the group attribute called `name`.
    pub fn group_attribute_index(&self, name: &str) -> Option<usize> {
        self.group_attribute_names.iter().position(|n| n == name)
    }

    /// The labels of attribute `attribute` (one per row), or `None` if out of range.
    pub fn get_group_labels(&self, attribute: usize) -> Option<&[u32]> {
        if attribute >= self.layout.group_attributes {
            return None;
        }
        let all: &[u32] = cast(
            self.map
                .get(self.layout.section(SectionKind::GroupLabels))
                .unwrap_or(&[]),
        );
        let start = attribute.checked_mul(self.layout.rows)?;
        all.get(start..start.checked_add(self.layout.rows)?)
    }

    /// The labels of attribute `attribute` (one per row), straight from the mapping.
    ///
    /// # Panics
    ///
    /// If `attribute >= group_attribute_names().len()`.
    pub fn group_labels(&self, attribute: usize) -> &[u32] {
        match self.get_group_labels(attribute) {
            Some(labels) => labels,
            None => panic!(
                "group attribute {attribute} out of range for a table with {} attributes",
                self.layout.group_attributes
            ),
        }
    }

    /// The non-personalized prior (one finite value per row), if the table has one.
    pub fn prior(&self) -> Option<&[f32]> {
        if !self.header.has_prior {
            return None;
        }
        Some(cast(
            self.map
                .get(self.layout.section(SectionKind::Prior))
                .unwrap_or(&[]),
        ))
    }

    /// Names of the embedding dimensions, if the table has them.
    pub fn dim_names(&self) -> Option<&[String]> {
        self.dim_names.as_deref()
    }

    /// An upper bound on the Euclidean norm of every row, never below the exact (real-valued)
    /// largest row norm: the larger of the header's value and the value recomputed at open
    /// (they agree to within `(dim + 2)` f32 epsilons, relative, or the file is refused). The
    /// recomputed value sums the squares in f64 and is rounded up to f32, so it exceeds the
    /// exact norm by at most about one f32 unit in the last place; 0 only when every row is
    /// zero (or there are no rows).
    pub fn max_row_norm(&self) -> f32 {
        self.max_row_norm
    }

    /// What the rows are, as the header marks them: items, users, or `None` for an
    /// unmarked file (written before the role flags, or by a writer that did not say).
    pub fn role(&self) -> Option<TableRole> {
        self.header.role
    }

    /// The file header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Sizes of the file's parts.
    pub fn stats(&self) -> TableStats {
        let mut regions = Vec::with_capacity(SectionKind::ALL.len() + 2);
        regions.push(RegionStats {
            name: "header",
            range: SectionRange {
                offset: 0,
                length: u64::from(self.header.header_size),
            },
        });
        regions.push(RegionStats {
            name: "row block",
            range: SectionRange {
                offset: self.header.rows_offset,
                length: self.header.rows_length,
            },
        });
        for kind in SectionKind::ALL {
            regions.push(RegionStats {
                name: kind.name(),
                range: self.header.section(kind),
            });
        }
        let used: u64 = regions.iter().map(|region| region.range.length).sum();
        let padding_per_row = (self.layout.stride - self.layout.dim) as u64 * 4;
        TableStats {
            file_bytes: self.header.file_size,
            regions,
            row_padding_bytes: padding_per_row * self.header.row_count,
            gap_bytes: self.header.file_size.saturating_sub(used),
            id_index_heap_bytes: self.id_index.heap_bytes() as u64,
        }
    }
}

/// Tables with at least this many rows build the id index on a second thread during open.
const PARALLEL_OPEN_MIN_ROWS: usize = 1 << 16;

/// A section of the mapped file as a slice of `T` (the layout checked bounds and alignment).
fn section_as<'a, T: bytemuck::AnyBitPattern>(
    bytes: &'a [u8],
    layout: &Layout,
    kind: SectionKind,
) -> Result<&'a [T], FormatProblem> {
    let range = layout.section(kind);
    let start = range.start;
    cast_checked(&bytes[range], kind.name(), start)
}

/// The row scan: finite values, zero padding, finite norms; checks the header's maximum
/// row norm and returns the bound to serve: the larger of stored and recomputed (the
/// recomputed value is rounded up, so the bound is never below the exact largest row norm).
fn check_rows(bytes: &[u8], layout: &Layout, header: &Header) -> Result<f32, FormatProblem> {
    let rows: &[f32] = cast_checked(
        &bytes[layout.row_block.clone()],
        "row block",
        layout.row_block.start,
    )?;
    let max_squared = scan_rows(rows, layout.dim, layout.stride).map_err(|(row, problem)| {
        FormatProblem::BadRow {
            row: row as u64,
            problem,
        }
    })?;
    let computed = certified_norm(max_squared, layout.dim);
    let stored = header.max_row_norm;
    let tolerance = norm_tolerance(layout.dim) * computed.max(stored.abs());
    if !stored.is_finite() || stored < 0.0 || (stored - computed).abs() > tolerance {
        return Err(FormatProblem::NormMismatch { stored, computed });
    }
    Ok(stored.max(computed))
}

/// Item ids: offsets, UTF-8, uniqueness; returns the lookup table.
fn check_ids(bytes: &[u8], layout: &Layout) -> Result<IdIndex, FormatProblem> {
    let id_offsets: &[u64] = section_as(bytes, layout, SectionKind::IdOffsets)?;
    let id_bytes = &bytes[layout.section(SectionKind::IdBytes)];
    strings::check_list(IDS, id_offsets, id_bytes)?;
    let id = |row: usize| strings::entry(id_offsets, id_bytes, row).unwrap_or(&[]);
    IdIndex::build(layout.rows, id).map_err(|error| match error {
        BuildError::Duplicate { first, second } => FormatProblem::DuplicateId {
            id: String::from_utf8_lossy(id(first)).into_owned(),
            first: first as u64,
            second: second as u64,
        },
        BuildError::TooMany => FormatProblem::TooManyRows {
            rows: layout.rows as u64,
            max: MAX_ROWS,
        },
    })
}

/// Reads and checks a name list whose offsets section is `offsets_kind` (the bytes section
/// follows it in the header): UTF-8, non-empty, unique.
fn read_names(
    layout: &Layout,
    bytes: &[u8],
    list: &'static str,
    offsets_kind: SectionKind,
) -> Result<Vec<String>, FormatProblem> {
    let bytes_kind = match offsets_kind {
        SectionKind::GroupNameOffsets => SectionKind::GroupNameBytes,
        _ => SectionKind::DimNameBytes,
    };
    let offsets: &[u64] = section_as(bytes, layout, offsets_kind)?;
    let names_bytes = &bytes[layout.section(bytes_kind)];
    strings::check_list(list, offsets, names_bytes)?;
    let names = strings::to_strings(list, offsets, names_bytes)?;
    if let Some((first, second)) = strings::first_duplicate(&names) {
        return Err(FormatProblem::DuplicateName {
            list,
            name: names[first].clone(),
            first,
            second,
        });
    }
    Ok(names)
}
