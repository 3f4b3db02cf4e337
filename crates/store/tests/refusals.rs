//! One targeted test per refusal of the reader: each corrupts a valid file in one way and
//! checks the typed problem and that the message names the file.

mod common;

use std::path::Path;

use common::{
    f64_max_norm, header_of, open_err, open_ok, patch_bytes, patch_header, read, sample_data,
    scaled_data, write, write_sample,
};
use store::{Dtype, FormatProblem, RowProblem, SectionKind, StoreError, Table, TableData};
use xxhash_rust::xxh3::xxh3_64;

/// The problem of a refused file, checking that the message starts with its path.
fn problem(path: &Path) -> FormatProblem {
    let error = open_err(path);
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("{}: ", path.display())),
        "message does not name the file: {message}"
    );
    match error {
        StoreError::Format { problem, .. } => problem,
        other => panic!("expected a format problem, got {other}"),
    }
}

fn sample() -> (tempfile::TempDir, std::path::PathBuf) {
    write_sample(&sample_data(10))
}

/// Sets raw header bytes and recomputes the header checksum (for fields `Header` cannot
/// express, such as unknown dtype codes).
fn patch_raw_header(path: &Path, offset: usize, new: &[u8]) {
    let mut bytes = read(path);
    bytes[offset..offset + new.len()].copy_from_slice(new);
    let checksum = xxh3_64(&bytes[..248]);
    bytes[248..256].copy_from_slice(&checksum.to_le_bytes());
    write(path, &bytes);
}

/// Byte offset of element `column` of row `row` in the sample file.
fn value_offset(path: &Path, row: u64, column: u64) -> u64 {
    let header = header_of(&read(path));
    header.rows_offset + row * header.row_stride_bytes + column * 4
}

/// Replaces the first occurrence of `from` with `to` (same length) in the file's bytes.
fn replace_bytes(path: &Path, from: &[u8], to: &[u8]) {
    let bytes = read(path);
    let at = bytes
        .windows(from.len())
        .position(|window| window == from)
        .unwrap_or_else(|| panic!("pattern not found"));
    patch_bytes(path, at as u64, to);
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("absent.frt");
    let error = open_err(&path);
    assert!(matches!(error, StoreError::Io { .. }));
    assert!(error.to_string().contains("absent.frt"), "{error}");
    assert_eq!(error.path(), path.as_path());
}

#[test]
fn directory_is_refused() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    assert!(Table::open(dir.path()).is_err());
}

#[test]
fn wrong_magic() {
    let (_dir, path) = sample();
    patch_bytes(&path, 0, b"PK\x03\x04zip!");
    assert!(matches!(problem(&path), FormatProblem::BadMagic { .. }));
}

#[test]
fn tiny_and_empty_files() {
    let (_dir, path) = sample();
    write(&path, b"");
    assert_eq!(problem(&path), FormatProblem::TooShort { len: 0 });
    write(&path, &store::MAGIC[..5]);
    assert_eq!(problem(&path), FormatProblem::TooShort { len: 5 });
    let mut prefix = read(&path);
    prefix.clear();
    prefix.extend_from_slice(&store::MAGIC);
    prefix.extend_from_slice(&[1, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
    write(&path, &prefix);
    assert!(matches!(
        problem(&path),
        FormatProblem::TruncatedHeader { len: 18, .. }
    ));
}

#[test]
fn unsupported_version() {
    let (_dir, path) = sample();
    patch_bytes(&path, 8, &2u32.to_le_bytes());
    assert_eq!(
        problem(&path),
        FormatProblem::UnsupportedVersion {
            found: 2,
            supported: 1
        }
    );
}

#[test]
fn wrong_header_size() {
    let (_dir, path) = sample();
    patch_bytes(&path, 12, &512u32.to_le_bytes());
    assert!(matches!(
        problem(&path),
        FormatProblem::BadHeaderSize { found: 512, .. }
    ));
}

#[test]
fn corrupt_header_fails_its_checksum() {
    let (_dir, path) = sample();
    patch_bytes(&path, 24, &6u32.to_le_bytes()); // dim, without fixing the checksum
    assert!(matches!(
        problem(&path),
        FormatProblem::HeaderChecksum { .. }
    ));
}

#[test]
fn non_zero_reserved_bytes() {
    let (_dir, path) = sample();
    patch_raw_header(&path, 230, &[7]);
    assert_eq!(
        problem(&path),
        FormatProblem::NonZeroReserved { offset: 230 }
    );
}

#[test]
fn unknown_dtype_code() {
    let (_dir, path) = sample();
    patch_raw_header(&path, 16, &9u32.to_le_bytes());
    assert_eq!(problem(&path), FormatProblem::UnknownDtype { code: 9 });
}

#[test]
fn reserved_dtypes_are_refused_with_their_name() {
    for dtype in [Dtype::F16, Dtype::Bf16, Dtype::I8] {
        let (_dir, path) = sample();
        patch_header(&path, |h| h.dtype = dtype);
        let error = open_err(&path);
        assert!(error.to_string().contains(dtype.name()), "{error}");
        assert_eq!(
            error.format_problem(),
            Some(&FormatProblem::UnsupportedDtype { dtype })
        );
    }
}

#[test]
fn unknown_flags() {
    // Bits 0-3 are known (prior, dimension names, items, users); bit 4 is the first unknown.
    let (_dir, path) = sample();
    patch_raw_header(&path, 20, &(0b1_0011u32).to_le_bytes());
    assert_eq!(
        problem(&path),
        FormatProblem::UnknownFlags { flags: 0b1_0000 }
    );
}

#[test]
fn both_role_flags_are_refused_with_a_message() {
    // A checksum-valid header whose flags mark the rows as both items and users.
    let (_dir, path) = sample();
    patch_raw_header(&path, 20, &(0b1111u32).to_le_bytes());
    assert_eq!(
        problem(&path),
        FormatProblem::ConflictingRoles { flags: 0b1100 }
    );
    assert_eq!(
        open_err(&path).to_string(),
        format!(
            "{}: header flags 0xc mark the rows as both items (bit 2) and users (bit 3); a \
             table has one role",
            path.display()
        )
    );
}

#[test]
fn truncated_file_message() {
    let (_dir, path) = sample();
    let mut bytes = read(&path);
    let full = bytes.len() as u64;
    bytes.truncate(1000);
    write(&path, &bytes);
    let error = open_err(&path);
    assert_eq!(
        error.to_string(),
        format!(
            "{}: truncated: header says {full} bytes, file has 1000",
            path.display()
        )
    );
}

#[test]
fn trailing_bytes() {
    let (_dir, path) = sample();
    let mut bytes = read(&path);
    bytes.push(0);
    let expected = bytes.len() as u64 - 1;
    write(&path, &bytes);
    assert_eq!(
        problem(&path),
        FormatProblem::TrailingBytes {
            expected,
            actual: expected + 1
        }
    );
}

#[test]
fn zero_dim_and_bad_stride() {
    let (_dir, path) = sample();
    patch_header(&path, |h| h.dim = 0);
    assert_eq!(problem(&path), FormatProblem::ZeroDim);

    let (_dir, path) = sample();
    patch_header(&path, |h| h.row_stride_bytes = 20);
    assert!(matches!(
        problem(&path),
        FormatProblem::BadRowStride {
            found: 20,
            expected: 64,
            dim: 5
        }
    ));
}

#[test]
fn absurd_row_counts() {
    let (_dir, path) = sample();
    patch_header(&path, |h| h.row_count = u64::MAX);
    assert!(matches!(problem(&path), FormatProblem::TooManyRows { .. }));

    let (_dir, path) = sample();
    patch_header(&path, |h| h.row_count = 11);
    assert!(matches!(
        problem(&path),
        FormatProblem::LengthMismatch {
            region: "row block",
            ..
        }
    ));
}

#[test]
fn overlapping_sections() {
    let (_dir, path) = sample();
    patch_header(&path, |h| {
        let ids = h.section(SectionKind::IdOffsets);
        h.sections[SectionKind::Prior.slot()].offset = ids.offset;
    });
    match problem(&path) {
        FormatProblem::Overlap { first, second, .. } => {
            let mut pair = [first, second];
            pair.sort_unstable();
            assert_eq!(pair, ["id offsets", "prior"]);
        }
        other => panic!("expected an overlap, got {other}"),
    }

    let (_dir, path) = sample();
    patch_header(&path, |h| {
        h.sections[SectionKind::GroupLabels.slot()].offset = h.rows_offset + 64;
    });
    assert!(matches!(
        problem(&path),
        FormatProblem::Overlap {
            first: "row block",
            second: "group labels",
            ..
        }
    ));
}

#[test]
fn section_inside_the_header_overlaps_it() {
    let (_dir, path) = sample();
    patch_header(&path, |h| {
        h.sections[SectionKind::GroupNameBytes.slot()].offset = 128;
    });
    assert!(matches!(
        problem(&path),
        FormatProblem::Overlap {
            first: "header",
            ..
        }
    ));
}

#[test]
fn misaligned_offsets() {
    let (_dir, path) = sample();
    patch_header(&path, |h| {
        h.sections[SectionKind::IdBytes.slot()].offset += 1
    });
    assert!(matches!(
        problem(&path),
        FormatProblem::Misaligned {
            region: "id bytes",
            alignment: 64,
            ..
        }
    ));

    let (_dir, path) = sample();
    patch_header(&path, |h| h.rows_offset = 4096 + 64);
    assert!(matches!(
        problem(&path),
        FormatProblem::Misaligned {
            region: "row block",
            offset: 4160,
            alignment: 4096
        }
    ));
}

#[test]
fn section_length_disagrees_with_counts() {
    let (_dir, path) = sample();
    patch_header(&path, |h| {
        h.sections[SectionKind::GroupLabels.slot()].length -= 4
    });
    assert!(matches!(
        problem(&path),
        FormatProblem::LengthMismatch {
            region: "group labels",
            expected: 80,
            found: 76
        }
    ));

    let (_dir, path) = sample();
    patch_header(&path, |h| h.has_prior = false);
    assert!(matches!(
        problem(&path),
        FormatProblem::LengthMismatch {
            region: "prior",
            expected: 0,
            ..
        }
    ));
}

#[test]
fn sections_past_the_end() {
    let (_dir, path) = sample();
    patch_header(&path, |h| {
        // Aligned, within 64 bytes of the end: the 110 id bytes cannot fit.
        h.sections[SectionKind::IdBytes.slot()].offset = h.file_size & !63;
    });
    assert!(matches!(
        problem(&path),
        FormatProblem::OutOfBounds {
            region: "id bytes",
            ..
        }
    ));

    let (_dir, path) = sample();
    patch_header(&path, |h| {
        h.sections[SectionKind::DimNameBytes.slot()].offset = u64::MAX - 63;
    });
    assert!(matches!(problem(&path), FormatProblem::OutOfBounds { .. }));
}

#[test]
fn invalid_utf8_id() {
    let (_dir, path) = sample();
    let header = header_of(&read(&path));
    // Row 3's id starts at 3 * 11 bytes ("item-003-é" is 11 bytes).
    patch_bytes(
        &path,
        header.section(SectionKind::IdBytes).offset + 33,
        &[0xff],
    );
    assert_eq!(
        problem(&path),
        FormatProblem::InvalidUtf8 {
            list: "item ids",
            index: 3
        }
    );
}

#[test]
fn id_offsets_out_of_order() {
    let (_dir, path) = sample();
    let header = header_of(&read(&path));
    patch_bytes(
        &path,
        header.section(SectionKind::IdOffsets).offset + 2 * 8,
        &5u64.to_le_bytes(),
    );
    assert!(matches!(
        problem(&path),
        FormatProblem::BadStringOffsets {
            list: "item ids",
            index: 2,
            offset: 5,
            ..
        }
    ));
}

#[test]
fn duplicate_id() {
    let (_dir, path) = sample();
    replace_bytes(&path, b"item-007", b"item-002");
    let found = problem(&path);
    assert_eq!(
        found,
        FormatProblem::DuplicateId {
            id: "item-002-é".into(),
            first: 2,
            second: 7
        }
    );
}

#[test]
fn duplicate_group_attribute_name() {
    let mut data = sample_data(4);
    data.groups[0].name = "gx".into();
    data.groups[1].name = "gy".into();
    let (_dir, path) = write_sample(&data);
    replace_bytes(&path, b"gxgy", b"gxgx");
    assert!(matches!(
        problem(&path),
        FormatProblem::DuplicateName {
            list: "group attribute names",
            first: 0,
            second: 1,
            ..
        }
    ));
}

#[test]
fn nan_and_infinite_values() {
    for (value, column) in [(f32::NAN, 3u64), (f32::INFINITY, 0), (f32::NEG_INFINITY, 4)] {
        let (_dir, path) = sample();
        patch_bytes(&path, value_offset(&path, 6, column), &value.to_le_bytes());
        match problem(&path) {
            FormatProblem::BadRow {
                row: 6,
                problem:
                    RowProblem::NonFinite {
                        column: c,
                        value: v,
                    },
            } => {
                assert_eq!(c as u64, column);
                assert_eq!(v.to_bits(), value.to_bits());
            }
            other => panic!("expected a non-finite value, got {other}"),
        }
    }
}

#[test]
fn overflowing_row_norm() {
    let (_dir, path) = sample();
    patch_bytes(&path, value_offset(&path, 2, 1), &3.0e19f32.to_le_bytes());
    assert_eq!(
        problem(&path),
        FormatProblem::BadRow {
            row: 2,
            problem: RowProblem::NormOverflow
        }
    );
}

#[test]
fn non_zero_row_padding() {
    let (_dir, path) = sample();
    patch_bytes(&path, value_offset(&path, 9, 12), &1.0f32.to_le_bytes());
    assert_eq!(
        problem(&path),
        FormatProblem::BadRow {
            row: 9,
            problem: RowProblem::NonZeroPadding {
                column: 12,
                bits: 1.0f32.to_bits()
            }
        }
    );
}

#[test]
fn wrong_max_row_norm() {
    for stored in [0.5f32, f32::NAN, -1.0, f32::INFINITY] {
        let (_dir, path) = sample();
        let honest = open_ok(&path).max_row_norm();
        patch_header(&path, |h| h.max_row_norm = honest * stored);
        assert!(
            matches!(problem(&path), FormatProblem::NormMismatch { .. }),
            "stored factor {stored}"
        );
    }
}

/// The norm a writer that summed squares in f32 stored: the f32 sum's root, to nearest.
fn f32_writer_norm(data: &TableData) -> f32 {
    data.rows
        .chunks_exact(data.dim)
        .map(|row| {
            row.iter()
                .fold(0.0f32, |sum, &value| sum + value * value)
                .sqrt()
        })
        .fold(0.0f32, f32::max)
}

/// Files from writers that summed squares in f32 load when their rows' squares are normal
/// f32 values, and serve a bound never below the exact norm; when the rows are so small that
/// the stored norm is too low (0 at 1e-24, about 4 % low at 1e-22) they are refused.
#[test]
fn norms_stored_by_f32_writers() {
    for scale in [1.0, 1e-3, 1e-18] {
        let data = scaled_data(scale);
        let (_dir, path) = write_sample(&data);
        let old = f32_writer_norm(&data);
        patch_header(&path, |h| h.max_row_norm = old);
        let served = f64::from(open_ok(&path).max_row_norm());
        assert!(served >= f64_max_norm(&data), "scale {scale:e}");
    }
    for scale in [1e-22, 1e-24] {
        let data = scaled_data(scale);
        let (_dir, path) = write_sample(&data);
        let old = f32_writer_norm(&data);
        assert!(
            f64::from(old) < 0.97 * f64_max_norm(&data),
            "scale {scale:e}"
        );
        patch_header(&path, |h| h.max_row_norm = old);
        let refused = problem(&path);
        assert!(
            matches!(refused, FormatProblem::NormMismatch { stored, .. } if stored == old),
            "scale {scale:e}: {refused:?}"
        );
        assert!(refused.to_string().contains("write it again"), "{refused}");
    }
}

#[test]
fn slightly_different_norm_rounding_is_accepted() {
    let (_dir, path) = sample();
    let honest = open_ok(&path).max_row_norm();
    let nudged = f32::from_bits(honest.to_bits() + 2);
    patch_header(&path, |h| h.max_row_norm = nudged);
    let table = open_ok(&path);
    assert_eq!(
        table.max_row_norm(),
        nudged,
        "the larger value is the bound"
    );
}

#[test]
fn non_finite_prior() {
    let (_dir, path) = sample();
    let header = header_of(&read(&path));
    patch_bytes(
        &path,
        header.section(SectionKind::Prior).offset + 4 * 4,
        &f32::NAN.to_le_bytes(),
    );
    assert!(matches!(
        problem(&path),
        FormatProblem::NonFinitePrior { row: 4, .. }
    ));
}

#[test]
fn bad_data_checksum_is_found_by_verify() {
    let (_dir, path) = sample();
    // A different but still finite value: open accepts it, the checksum does not.
    patch_bytes(&path, value_offset(&path, 1, 1), &0.25f32.to_le_bytes());
    let table = open_ok(&path);
    let error = match table.verify() {
        Ok(()) => panic!("verify accepted modified data"),
        Err(e) => e,
    };
    assert!(
        error
            .to_string()
            .starts_with(&format!("{}: data checksum mismatch", path.display()))
    );
    assert!(matches!(
        error.format_problem(),
        Some(FormatProblem::DataChecksum { .. })
    ));
    assert!(Table::open_verified(&path).is_err());
}

#[test]
fn checksum_covers_alignment_gaps() {
    let (_dir, path) = sample();
    patch_bytes(&path, 1000, &[1]);
    let table = open_ok(&path);
    assert!(table.verify().is_err());
}

#[test]
fn untouched_file_verifies() {
    let data: TableData = sample_data(10);
    let (_dir, path) = write_sample(&data);
    assert!(Table::open_verified(&path).is_ok());
}
