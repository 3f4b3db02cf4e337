//! The on-disk table format: constants, the fixed little-endian [`Header`], and the layout
//! checks every reader runs before touching a section (see `docs/table-format.md`).

use std::ops::Range;

use xxhash_rust::xxh3::xxh3_64;

use crate::error::FormatProblem;

/// The first eight bytes of every table file. Like PNG's signature, the non-ASCII first byte
/// and the CR LF / SUB / LF tail detect text-mode transfers that would corrupt the file.
pub const MAGIC: [u8; 8] = [0x89, b'F', b'R', b'T', b'\r', b'\n', 0x1A, b'\n'];
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size in bytes of the version-1 header.
pub const HEADER_SIZE: usize = 256;
/// The row block starts at a multiple of this many bytes from the file start (a page).
pub const ROW_BLOCK_ALIGNMENT: u64 = 4096;
/// Each row starts at a multiple of this many bytes (a cache line).
pub const ROW_STRIDE_ALIGNMENT: u64 = 64;
/// Every section starts at a multiple of this many bytes.
pub const SECTION_ALIGNMENT: u64 = 64;
/// Largest row count: row indices fit a signed 32-bit integer (`2^31 - 1`).
pub const MAX_ROWS: u64 = i32::MAX as u64;
/// Header flag: the file has a prior section.
pub const FLAG_HAS_PRIOR: u32 = 1;
/// Header flag: the file has dimension names.
pub const FLAG_HAS_DIM_NAMES: u32 = 1 << 1;
/// Header flag: the rows are items (an item catalog). Exclusive with [`FLAG_ROWS_ARE_USERS`].
pub const FLAG_ROWS_ARE_ITEMS: u32 = 1 << 2;
/// Header flag: the rows are users. Exclusive with [`FLAG_ROWS_ARE_ITEMS`].
pub const FLAG_ROWS_ARE_USERS: u32 = 1 << 3;
const KNOWN_FLAGS: u32 =
    FLAG_HAS_PRIOR | FLAG_HAS_DIM_NAMES | FLAG_ROWS_ARE_ITEMS | FLAG_ROWS_ARE_USERS;

/// What a table's rows are, as marked in the header flags. A file with neither role flag
/// (every file written before the flags existed, or by a writer that did not say) is
/// *unmarked*: [`Header::role`] is `None` and it may serve in either role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableRole {
    /// The rows are items: an item catalog (flag bit 2).
    Items,
    /// The rows are users (flag bit 3).
    Users,
}

impl TableRole {
    /// The header flag that marks this role.
    pub fn flag(self) -> u32 {
        match self {
            TableRole::Items => FLAG_ROWS_ARE_ITEMS,
            TableRole::Users => FLAG_ROWS_ARE_USERS,
        }
    }

    /// Lower-case plural name, as `fairrank table inspect` prints it: `items` or `users`.
    pub fn name(self) -> &'static str {
        match self {
            TableRole::Items => "items",
            TableRole::Users => "users",
        }
    }

    /// The role marked by header `flags` (`Ok(None)` when unmarked); both role bits set is
    /// refused.
    fn from_flags(flags: u32) -> Result<Option<TableRole>, FormatProblem> {
        match (
            flags & FLAG_ROWS_ARE_ITEMS != 0,
            flags & FLAG_ROWS_ARE_USERS != 0,
        ) {
            (true, true) => Err(FormatProblem::ConflictingRoles {
                flags: flags & (FLAG_ROWS_ARE_ITEMS | FLAG_ROWS_ARE_USERS),
            }),
            (true, false) => Ok(Some(TableRole::Items)),
            (false, true) => Ok(Some(TableRole::Users)),
            (false, false) => Ok(None),
        }
    }
}

impl std::fmt::Display for TableRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Byte offsets of the header fields (version 1).
mod field {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const HEADER_SIZE: usize = 12;
    pub const DTYPE: usize = 16;
    pub const FLAGS: usize = 20;
    pub const DIM: usize = 24;
    pub const GROUP_ATTRIBUTES: usize = 28;
    pub const ROW_COUNT: usize = 32;
    pub const ROW_STRIDE: usize = 40;
    pub const ROWS_OFFSET: usize = 48;
    pub const ROWS_LENGTH: usize = 56;
    pub const MAX_ROW_NORM: usize = 64;
    pub const RESERVED_A: usize = 68;
    pub const SECTIONS: usize = 72;
    pub const FILE_SIZE: usize = 200;
    pub const DATA_CHECKSUM: usize = 208;
    pub const RESERVED_B: usize = 216;
    pub const HEADER_CHECKSUM: usize = 248;
}

/// Element type of the rows. Only [`Dtype::F32`] is served today; the other codes are
/// reserved so that files with compressed rows are refused with a clear message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE 754 binary32, little-endian.
    F32,
    /// IEEE 754 binary16 (reserved).
    F16,
    /// bfloat16 (reserved).
    Bf16,
    /// Signed 8-bit integers with scales (reserved).
    I8,
}

impl Dtype {
    /// The code stored in the header.
    pub fn code(self) -> u32 {
        match self {
            Dtype::F32 => 1,
            Dtype::F16 => 2,
            Dtype::Bf16 => 3,
            Dtype::I8 => 4,
        }
    }

    /// The dtype for a header code, if the format defines it.
    pub fn from_code(code: u32) -> Option<Dtype> {
        match code {
            1 => Some(Dtype::F32),
            2 => Some(Dtype::F16),
            3 => Some(Dtype::Bf16),
            4 => Some(Dtype::I8),
            _ => None,
        }
    }

    /// Lower-case name, as used in documentation and messages.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::I8 => "i8",
        }
    }

    /// Bytes per element.
    pub fn element_bytes(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::I8 => 1,
        }
    }
}

/// The sections that follow the row block, in header order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SectionKind {
    /// `rows + 1` little-endian `u64` byte offsets into [`SectionKind::IdBytes`].
    IdOffsets,
    /// Concatenated UTF-8 item ids.
    IdBytes,
    /// `group_attribute_count + 1` `u64` offsets into [`SectionKind::GroupNameBytes`].
    GroupNameOffsets,
    /// Concatenated UTF-8 group attribute names.
    GroupNameBytes,
    /// `group_attribute_count * rows` `u32` labels, attribute-major.
    GroupLabels,
    /// `rows` `f32` prior values (empty when the prior flag is clear).
    Prior,
    /// `dim + 1` `u64` offsets into [`SectionKind::DimNameBytes`] (empty without names).
    DimNameOffsets,
    /// Concatenated UTF-8 dimension names (empty without names).
    DimNameBytes,
}

/// Number of section slots in the header.
pub const SECTION_COUNT: usize = 8;

impl SectionKind {
    /// All sections, in header order.
    pub const ALL: [SectionKind; SECTION_COUNT] = [
        SectionKind::IdOffsets,
        SectionKind::IdBytes,
        SectionKind::GroupNameOffsets,
        SectionKind::GroupNameBytes,
        SectionKind::GroupLabels,
        SectionKind::Prior,
        SectionKind::DimNameOffsets,
        SectionKind::DimNameBytes,
    ];

    /// Position of this section's slot in the header's section table.
    pub fn slot(self) -> usize {
        match self {
            SectionKind::IdOffsets => 0,
            SectionKind::IdBytes => 1,
            SectionKind::GroupNameOffsets => 2,
            SectionKind::GroupNameBytes => 3,
            SectionKind::GroupLabels => 4,
            SectionKind::Prior => 5,
            SectionKind::DimNameOffsets => 6,
            SectionKind::DimNameBytes => 7,
        }
    }

    /// Human-readable name used in messages and by `fairrank table inspect`.
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::IdOffsets => "id offsets",
            SectionKind::IdBytes => "id bytes",
            SectionKind::GroupNameOffsets => "group attribute name offsets",
            SectionKind::GroupNameBytes => "group attribute name bytes",
            SectionKind::GroupLabels => "group labels",
            SectionKind::Prior => "prior",
            SectionKind::DimNameOffsets => "dimension name offsets",
            SectionKind::DimNameBytes => "dimension name bytes",
        }
    }
}

/// Where a section lies in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SectionRange {
    /// Byte offset from the file start.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

/// The fixed 256-byte little-endian header at the start of every table file.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// Format version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Header size in bytes ([`HEADER_SIZE`]).
    pub header_size: u32,
    /// Element type of the rows.
    pub dtype: Dtype,
    /// Whether the file has a prior section.
    pub has_prior: bool,
    /// Whether the file has dimension names.
    pub has_dim_names: bool,
    /// What the rows are (flag bit 2: items, bit 3: users); `None`: unmarked.
    pub role: Option<TableRole>,
    /// Embedding dimension.
    pub dim: u32,
    /// Number of group attributes.
    pub group_attribute_count: u32,
    /// Number of rows (items).
    pub row_count: u64,
    /// Bytes from one row to the next: `dim * element size` rounded up to 64.
    pub row_stride_bytes: u64,
    /// Byte offset of the row block (a multiple of 4096).
    pub rows_offset: u64,
    /// Length of the row block: `row_count * row_stride_bytes`.
    pub rows_length: u64,
    /// An upper bound on the largest Euclidean norm of a row, as recorded by the writer
    /// (this crate's writer: squares summed in f64, the root rounded up to f32, never below
    /// the exact norm).
    pub max_row_norm: f32,
    /// Section table, indexed by [`SectionKind::slot`].
    pub sections: [SectionRange; SECTION_COUNT],
    /// Total file size in bytes.
    pub file_size: u64,
    /// XXH3-64 (seed 0) of every byte after the header, `[header_size, file_size)`.
    pub data_checksum: u64,
    /// XXH3-64 (seed 0) of the header bytes before this field, as read from the file (the
    /// writer recomputes it in [`Header::to_bytes`]).
    pub header_checksum: u64,
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Rounds `value` up to a multiple of `alignment` (a power of two); `None` on overflow.
pub(crate) fn align_up(value: u64, alignment: u64) -> Option<u64> {
    Some(value.checked_add(alignment - 1)? & !(alignment - 1))
}

/// The canonical row stride in bytes for `dim` elements of `dtype`.
pub fn row_stride_bytes(dim: u32, dtype: Dtype) -> u64 {
    // dim < 2^32 and element_bytes <= 4, so neither step can overflow u64.
    let raw = u64::from(dim) * dtype.element_bytes();
    (raw + ROW_STRIDE_ALIGNMENT - 1) & !(ROW_STRIDE_ALIGNMENT - 1)
}

impl Header {
    /// The location of one section.
    pub fn section(&self, kind: SectionKind) -> SectionRange {
        self.sections[kind.slot()]
    }

    /// Serializes the header, computing a fresh header checksum (the `header_checksum`
    /// field of `self` is ignored).
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        let mut put = |at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
        put(field::MAGIC, &MAGIC);
        put(field::VERSION, &self.format_version.to_le_bytes());
        put(field::HEADER_SIZE, &self.header_size.to_le_bytes());
        put(field::DTYPE, &self.dtype.code().to_le_bytes());
        let flags = if self.has_prior { FLAG_HAS_PRIOR } else { 0 }
            | if self.has_dim_names {
                FLAG_HAS_DIM_NAMES
            } else {
                0
            }
            | self.role.map_or(0, TableRole::flag);
        put(field::FLAGS, &flags.to_le_bytes());
        put(field::DIM, &self.dim.to_le_bytes());
        put(
            field::GROUP_ATTRIBUTES,
            &self.group_attribute_count.to_le_bytes(),
        );
        put(field::ROW_COUNT, &self.row_count.to_le_bytes());
        put(field::ROW_STRIDE, &self.row_stride_bytes.to_le_bytes());
        put(field::ROWS_OFFSET, &self.rows_offset.to_le_bytes());
        put(field::ROWS_LENGTH, &self.rows_length.to_le_bytes());
        put(field::MAX_ROW_NORM, &self.max_row_norm.to_le_bytes());
        for (slot, section) in self.sections.iter().enumerate() {
            let at = field::SECTIONS + slot * 16;
            put(at, &section.offset.to_le_bytes());
            put(at + 8, &section.length.to_le_bytes());
        }
        put(field::FILE_SIZE, &self.file_size.to_le_bytes());
        put(field::DATA_CHECKSUM, &self.data_checksum.to_le_bytes());
        let checksum = xxh3_64(&out[..field::HEADER_CHECKSUM]);
        out[field::HEADER_CHECKSUM..].copy_from_slice(&checksum.to_le_bytes());
        out
    }

    /// Parses and checks a header from the first bytes of a file (`prefix` may be shorter
    /// than the header; `file_len` is the length of the whole file).
    ///
    /// Checks, in order: magic, version, header size, that the file holds the whole
    /// header, the header checksum, reserved bytes, dtype code and flags (no unknown bits,
    /// at most one role bit). Section bounds
    /// are checked by the reader against the real file size afterwards.
    pub fn from_bytes(prefix: &[u8], file_len: u64) -> Result<Header, FormatProblem> {
        if prefix.len() < MAGIC.len() {
            return Err(FormatProblem::TooShort { len: file_len });
        }
        let mut found = [0u8; 8];
        found.copy_from_slice(&prefix[..8]);
        if found != MAGIC {
            return Err(FormatProblem::BadMagic {
                found,
                expected: MAGIC,
            });
        }
        if prefix.len() < field::HEADER_SIZE + 4 {
            return Err(FormatProblem::TruncatedHeader {
                len: file_len,
                header_size: HEADER_SIZE as u32,
            });
        }
        let format_version = read_u32(prefix, field::VERSION);
        if format_version != FORMAT_VERSION {
            return Err(FormatProblem::UnsupportedVersion {
                found: format_version,
                supported: FORMAT_VERSION,
            });
        }
        let header_size = read_u32(prefix, field::HEADER_SIZE);
        if header_size as usize != HEADER_SIZE {
            return Err(FormatProblem::BadHeaderSize {
                found: header_size,
                expected: HEADER_SIZE as u32,
            });
        }
        if prefix.len() < HEADER_SIZE {
            return Err(FormatProblem::TruncatedHeader {
                len: file_len,
                header_size,
            });
        }
        let bytes = &prefix[..HEADER_SIZE];
        let stored = read_u64(bytes, field::HEADER_CHECKSUM);
        let computed = xxh3_64(&bytes[..field::HEADER_CHECKSUM]);
        if stored != computed {
            return Err(FormatProblem::HeaderChecksum { stored, computed });
        }
        let reserved = [
            field::RESERVED_A..field::RESERVED_A + 4,
            field::RESERVED_B..field::HEADER_CHECKSUM,
        ];
        for range in reserved {
            let start = range.start;
            if let Some(at) = bytes[range].iter().position(|&b| b != 0) {
                return Err(FormatProblem::NonZeroReserved { offset: start + at });
            }
        }
        let dtype_code = read_u32(bytes, field::DTYPE);
        let dtype =
            Dtype::from_code(dtype_code).ok_or(FormatProblem::UnknownDtype { code: dtype_code })?;
        let flags = read_u32(bytes, field::FLAGS);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(FormatProblem::UnknownFlags {
                flags: flags & !KNOWN_FLAGS,
            });
        }
        let role = TableRole::from_flags(flags)?;
        let mut sections = [SectionRange::default(); SECTION_COUNT];
        for (slot, section) in sections.iter_mut().enumerate() {
            let at = field::SECTIONS + slot * 16;
            *section = SectionRange {
                offset: read_u64(bytes, at),
                length: read_u64(bytes, at + 8),
            };
        }
        Ok(Header {
            format_version,
            header_size,
            dtype,
            has_prior: flags & FLAG_HAS_PRIOR != 0,
            has_dim_names: flags & FLAG_HAS_DIM_NAMES != 0,
            role,
            dim: read_u32(bytes, field::DIM),
            group_attribute_count: read_u32(bytes, field::GROUP_ATTRIBUTES),
            row_count: read_u64(bytes, field::ROW_COUNT),
            row_stride_bytes: read_u64(bytes, field::ROW_STRIDE),
            rows_offset: read_u64(bytes, field::ROWS_OFFSET),
            rows_length: read_u64(bytes, field::ROWS_LENGTH),
            max_row_norm: f32::from_le_bytes(read_u32(bytes, field::MAX_ROW_NORM).to_le_bytes()),
            sections,
            file_size: read_u64(bytes, field::FILE_SIZE),
            data_checksum: read_u64(bytes, field::DATA_CHECKSUM),
            header_checksum: stored,
        })
    }

    /// The section lengths implied by the header counts (`None` for free-length byte
    /// sections). Arithmetic saturates: a saturated length can never match a real file.
    fn expected_section_lengths(&self) -> [Option<u64>; SECTION_COUNT] {
        let rows = self.row_count;
        let attrs = u64::from(self.group_attribute_count);
        let mut expected = [None; SECTION_COUNT];
        expected[SectionKind::IdOffsets.slot()] = Some(rows.saturating_add(1).saturating_mul(8));
        expected[SectionKind::GroupNameOffsets.slot()] = Some((attrs + 1) * 8);
        expected[SectionKind::GroupLabels.slot()] =
            Some(attrs.saturating_mul(rows).saturating_mul(4));
        expected[SectionKind::Prior.slot()] = Some(if self.has_prior {
            rows.saturating_mul(4)
        } else {
            0
        });
        if self.has_dim_names {
            expected[SectionKind::DimNameOffsets.slot()] = Some((u64::from(self.dim) + 1) * 8);
        } else {
            expected[SectionKind::DimNameOffsets.slot()] = Some(0);
            expected[SectionKind::DimNameBytes.slot()] = Some(0);
        }
        expected
    }

    /// Checks the header against the real file length and returns the validated layout.
    ///
    /// Refuses: a size mismatch, dtypes other than f32, zero dim, too many rows, a
    /// non-canonical row stride, misaligned regions, lengths that disagree with the counts,
    /// regions past the end of the file, and overlapping regions.
    pub(crate) fn layout(&self, file_len: u64) -> Result<Layout, FormatProblem> {
        if file_len < self.file_size {
            return Err(FormatProblem::Truncated {
                expected: self.file_size,
                actual: file_len,
            });
        }
        if file_len > self.file_size {
            return Err(FormatProblem::TrailingBytes {
                expected: self.file_size,
                actual: file_len,
            });
        }
        if self.dtype != Dtype::F32 {
            return Err(FormatProblem::UnsupportedDtype { dtype: self.dtype });
        }
        if self.dim == 0 {
            return Err(FormatProblem::ZeroDim);
        }
        if self.row_count > MAX_ROWS {
            return Err(FormatProblem::TooManyRows {
                rows: self.row_count,
                max: MAX_ROWS,
            });
        }
        let stride = row_stride_bytes(self.dim, self.dtype);
        if self.row_stride_bytes != stride {
            return Err(FormatProblem::BadRowStride {
                found: self.row_stride_bytes,
                expected: stride,
                dim: self.dim,
            });
        }
        let file_size = self.file_size;
        // Every region: name, range, required alignment, expected length.
        let mut regions: Vec<(&'static str, SectionRange, u64, Option<u64>)> =
            Vec::with_capacity(SECTION_COUNT + 1);
        regions.push((
            "row block",
            SectionRange {
                offset: self.rows_offset,
                length: self.rows_length,
            },
            ROW_BLOCK_ALIGNMENT,
            Some(self.row_count.saturating_mul(stride)),
        ));
        let expected = self.expected_section_lengths();
        for kind in SectionKind::ALL {
            regions.push((
                kind.name(),
                self.section(kind),
                SECTION_ALIGNMENT,
                expected[kind.slot()],
            ));
        }
        for &(region, range, alignment, expected_length) in &regions {
            if range.offset % alignment != 0 {
                return Err(FormatProblem::Misaligned {
                    region,
                    offset: range.offset,
                    alignment,
                });
            }
            if let Some(expected) = expected_length
                && range.length != expected
            {
                return Err(FormatProblem::LengthMismatch {
                    region,
                    expected,
                    found: range.length,
                });
            }
            let end = range.offset.checked_add(range.length);
            if end.is_none_or(|end| end > file_size) {
                return Err(FormatProblem::OutOfBounds {
                    region,
                    offset: range.offset,
                    length: range.length,
                    file_size,
                });
            }
        }
        // Overlaps: the header itself is a region too; empty regions overlap nothing.
        let mut occupied: Vec<(&'static str, u64, u64)> = regions
            .iter()
            .filter(|(_, range, _, _)| range.length > 0)
            .map(|&(name, range, _, _)| (name, range.offset, range.offset + range.length))
            .collect();
        occupied.push(("header", 0, u64::from(self.header_size)));
        occupied.sort_by_key(|&(_, start, end)| (start, end));
        for pair in occupied.windows(2) {
            let (first, first_start, first_end) = pair[0];
            let (second, second_start, second_end) = pair[1];
            if second_start < first_end {
                return Err(FormatProblem::Overlap {
                    first,
                    first_start,
                    first_end,
                    second,
                    second_start,
                    second_end,
                });
            }
        }
        // All ends are <= file_size, which is the length of a file we could open, so the
        // conversions below cannot fail on any platform that mapped it; refuse if they do.
        let to_range = |range: SectionRange| -> Result<Range<usize>, FormatProblem> {
            let start = usize::try_from(range.offset);
            let end = usize::try_from(range.offset + range.length);
            match (start, end) {
                (Ok(start), Ok(end)) => Ok(start..end),
                _ => Err(FormatProblem::OutOfBounds {
                    region: "file",
                    offset: range.offset,
                    length: range.length,
                    file_size,
                }),
            }
        };
        let mut sections: [Range<usize>; SECTION_COUNT] = Default::default();
        for kind in SectionKind::ALL {
            sections[kind.slot()] = to_range(self.section(kind))?;
        }
        let too_big = || FormatProblem::TooManyRows {
            rows: self.row_count,
            max: MAX_ROWS,
        };
        Ok(Layout {
            rows: usize::try_from(self.row_count).map_err(|_| too_big())?,
            dim: usize::try_from(self.dim).map_err(|_| too_big())?,
            stride: usize::try_from(stride / 4).map_err(|_| too_big())?,
            group_attributes: usize::try_from(self.group_attribute_count).map_err(|_| too_big())?,
            row_block: to_range(SectionRange {
                offset: self.rows_offset,
                length: self.rows_length,
            })?,
            sections,
        })
    }
}

/// A header whose regions were checked against the file: all ranges are in bounds,
/// aligned, of the lengths the counts imply, and disjoint.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// Number of rows.
    pub rows: usize,
    /// Embedding dimension.
    pub dim: usize,
    /// Row stride in f32 elements.
    pub stride: usize,
    /// Number of group attributes.
    pub group_attributes: usize,
    /// Byte range of the row block.
    pub row_block: Range<usize>,
    /// Byte ranges of the sections, indexed by [`SectionKind::slot`].
    pub sections: [Range<usize>; SECTION_COUNT],
}

impl Layout {
    /// The byte range of one section.
    pub fn section(&self, kind: SectionKind) -> Range<usize> {
        self.sections[kind.slot()].clone()
    }
}

/// Byte sizes of the variable parts of a table, for planning a file layout.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayoutPlan {
    pub dim: u32,
    pub rows: u64,
    pub group_attributes: u32,
    pub id_bytes: u64,
    pub group_name_bytes: u64,
    pub has_prior: bool,
    /// Total bytes of dimension names, when present.
    pub dim_name_bytes: Option<u64>,
}

impl LayoutPlan {
    /// A header for this plan with canonical offsets (row block at 4096, then each section
    /// in header order at the next multiple of 64). Checksums and the norm are left zero.
    /// `None` if the file size would overflow `u64`.
    pub fn header(&self) -> Option<Header> {
        let stride = row_stride_bytes(self.dim, Dtype::F32);
        let rows_offset = align_up(HEADER_SIZE as u64, ROW_BLOCK_ALIGNMENT)?;
        let rows_length = self.rows.checked_mul(stride)?;
        let mut cursor = rows_offset.checked_add(rows_length)?;
        let attrs = u64::from(self.group_attributes);
        let lengths: [u64; SECTION_COUNT] = [
            self.rows.checked_add(1)?.checked_mul(8)?,
            self.id_bytes,
            (attrs + 1) * 8,
            self.group_name_bytes,
            attrs.checked_mul(self.rows)?.checked_mul(4)?,
            if self.has_prior {
                self.rows.checked_mul(4)?
            } else {
                0
            },
            if self.dim_name_bytes.is_some() {
                (u64::from(self.dim) + 1) * 8
            } else {
                0
            },
            self.dim_name_bytes.unwrap_or(0),
        ];
        let mut sections = [SectionRange::default(); SECTION_COUNT];
        for (section, length) in sections.iter_mut().zip(lengths) {
            cursor = align_up(cursor, SECTION_ALIGNMENT)?;
            *section = SectionRange {
                offset: cursor,
                length,
            };
            cursor = cursor.checked_add(length)?;
        }
        Some(Header {
            format_version: FORMAT_VERSION,
            header_size: HEADER_SIZE as u32,
            dtype: Dtype::F32,
            has_prior: self.has_prior,
            has_dim_names: self.dim_name_bytes.is_some(),
            role: None,
            dim: self.dim,
            group_attribute_count: self.group_attributes,
            row_count: self.rows,
            row_stride_bytes: stride,
            rows_offset,
            rows_length,
            max_row_norm: 0.0,
            sections,
            file_size: cursor,
            data_checksum: 0,
            header_checksum: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_header() -> Header {
        let plan = LayoutPlan {
            dim: 5,
            rows: 3,
            group_attributes: 2,
            id_bytes: 9,
            group_name_bytes: 11,
            has_prior: true,
            dim_name_bytes: Some(7),
        };
        match plan.header() {
            Some(header) => header,
            None => panic!("small plan must fit"),
        }
    }

    #[test]
    fn header_round_trips_through_bytes() {
        let mut header = sample_header();
        header.max_row_norm = 3.5;
        header.data_checksum = 0xdead_beef_0123_4567;
        let bytes = header.to_bytes();
        let parsed = Header::from_bytes(&bytes, header.file_size).map_err(|e| e.to_string());
        header.header_checksum = xxh3_64(&bytes[..field::HEADER_CHECKSUM]);
        assert_eq!(parsed, Ok(header));
    }

    #[test]
    fn role_round_trips_through_the_flags() {
        for (role, bits) in [
            (None, 0b11),
            (Some(TableRole::Items), 0b111),
            (Some(TableRole::Users), 0b1011),
        ] {
            let mut header = sample_header();
            header.role = role;
            let bytes = header.to_bytes();
            assert_eq!(read_u32(&bytes, field::FLAGS), bits, "{role:?}");
            let parsed = Header::from_bytes(&bytes, header.file_size).map_err(|e| e.to_string());
            assert_eq!(parsed.map(|parsed| parsed.role), Ok(role));
        }
    }

    #[test]
    fn both_role_flags_are_refused_even_with_a_valid_checksum() {
        let mut bytes = sample_header().to_bytes();
        let flags = FLAG_HAS_PRIOR | FLAG_ROWS_ARE_ITEMS | FLAG_ROWS_ARE_USERS;
        bytes[field::FLAGS..field::FLAGS + 4].copy_from_slice(&flags.to_le_bytes());
        let checksum = xxh3_64(&bytes[..field::HEADER_CHECKSUM]);
        bytes[field::HEADER_CHECKSUM..].copy_from_slice(&checksum.to_le_bytes());
        let problem = match Header::from_bytes(&bytes, bytes.len() as u64) {
            Ok(header) => panic!("both roles accepted: {header:?}"),
            Err(problem) => problem,
        };
        assert_eq!(problem, FormatProblem::ConflictingRoles { flags: 0b1100 });
        assert_eq!(
            problem.to_string(),
            "header flags 0xc mark the rows as both items (bit 2) and users (bit 3); a table \
             has one role"
        );
    }

    #[test]
    fn the_next_flag_bit_is_still_unknown() {
        let mut bytes = sample_header().to_bytes();
        bytes[field::FLAGS..field::FLAGS + 4].copy_from_slice(&(1u32 << 4).to_le_bytes());
        let checksum = xxh3_64(&bytes[..field::HEADER_CHECKSUM]);
        bytes[field::HEADER_CHECKSUM..].copy_from_slice(&checksum.to_le_bytes());
        assert_eq!(
            Header::from_bytes(&bytes, bytes.len() as u64),
            Err(FormatProblem::UnknownFlags { flags: 1 << 4 })
        );
    }

    #[test]
    fn planned_layout_is_accepted_and_aligned() {
        let header = sample_header();
        let layout = header.layout(header.file_size).map_err(|e| e.to_string());
        let layout = match layout {
            Ok(layout) => layout,
            Err(e) => panic!("planned layout refused: {e}"),
        };
        assert_eq!(layout.row_block.start, 4096);
        assert_eq!(layout.stride, 16);
        for kind in SectionKind::ALL {
            assert_eq!(layout.section(kind).start % 64, 0, "{}", kind.name());
        }
        assert_eq!(layout.section(SectionKind::DimNameOffsets).len(), 48);
    }

    /// The worked example at the end of `docs/table-format.md`.
    #[test]
    fn documented_example_layout() {
        let plan = LayoutPlan {
            dim: 5,
            rows: 3,
            group_attributes: 1,
            id_bytes: 3,
            group_name_bytes: "provider_group".len() as u64,
            has_prior: true,
            dim_name_bytes: None,
        };
        let Some(header) = plan.header() else {
            panic!("small plan must fit");
        };
        assert_eq!(header.row_stride_bytes, 64);
        assert_eq!((header.rows_offset, header.rows_length), (4096, 192));
        let ranges: Vec<(u64, u64)> = SectionKind::ALL
            .iter()
            .map(|&kind| {
                let range = header.section(kind);
                (range.offset, range.offset + range.length)
            })
            .collect();
        assert_eq!(
            ranges,
            vec![
                (4288, 4320),
                (4352, 4355),
                (4416, 4432),
                (4480, 4494),
                (4544, 4556),
                (4608, 4620),
                (4672, 4672),
                (4672, 4672),
            ]
        );
        assert_eq!(header.file_size, 4672);
    }

    #[test]
    fn stride_is_dim_rounded_to_cache_lines() {
        assert_eq!(row_stride_bytes(1, Dtype::F32), 64);
        assert_eq!(row_stride_bytes(16, Dtype::F32), 64);
        assert_eq!(row_stride_bytes(17, Dtype::F32), 128);
        assert_eq!(row_stride_bytes(128, Dtype::F32), 512);
        assert_eq!(row_stride_bytes(33, Dtype::F16), 128);
    }

    #[test]
    fn dtype_codes_round_trip() {
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16, Dtype::I8] {
            assert_eq!(Dtype::from_code(dtype.code()), Some(dtype));
        }
        assert_eq!(Dtype::from_code(0), None);
        assert_eq!(Dtype::from_code(5), None);
    }

    #[test]
    fn section_slots_match_table_order() {
        for (index, kind) in SectionKind::ALL.iter().enumerate() {
            assert_eq!(kind.slot(), index);
        }
    }
}
