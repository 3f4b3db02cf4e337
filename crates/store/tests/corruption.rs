//! Fuzz-style tests: truncations at every length, random byte flips, random garbage and
//! random header fields. The reader must never panic; any change to a published file must
//! be refused by `open` or by `verify`.

mod common;

use std::path::Path;

use common::{fresh_path, header_of, sample_bytes, temp_dir, write};
use proptest::prelude::*;
use store::{HEADER_SIZE, SECTION_COUNT, Table};

/// Opens and verifies; on success touches every accessor so that a bad table accepted by
/// mistake would surface as a panic. Returns whether the file was accepted.
fn open_verify_and_touch(path: &Path) -> bool {
    let Ok(table) = Table::open(path) else {
        return false;
    };
    exercise(&table);
    table.verify().is_ok()
}

fn exercise(table: &Table) {
    let _ = table
        .rows()
        .iter()
        .map(|v| v.to_bits())
        .fold(0u32, |a, b| a ^ b);
    for row in 0..table.len() {
        let values = table.row(row);
        assert_eq!(values.len(), table.dim());
        assert!(values.iter().all(|v| v.is_finite()));
        let id = table.id(row);
        assert_eq!(table.index_of(id), Some(row as u32));
    }
    for attribute in 0..table.group_attribute_names().len() {
        assert_eq!(table.group_labels(attribute).len(), table.len());
    }
    if let Some(prior) = table.prior() {
        assert_eq!(prior.len(), table.len());
    }
    if let Some(names) = table.dim_names() {
        assert_eq!(names.len(), table.dim());
    }
    let _ = table.stats();
    assert!(table.max_row_norm().is_finite());
}

#[test]
fn every_truncation_is_refused() {
    let dir = temp_dir();
    let full = sample_bytes(10);
    for len in 0..full.len() {
        let path = fresh_path(dir.path());
        write(&path, &full[..len]);
        assert!(
            Table::open(&path).is_err(),
            "truncated to {len} bytes was accepted"
        );
        let _ = std::fs::remove_file(&path);
    }
    let path = fresh_path(dir.path());
    write(&path, &full);
    assert!(open_verify_and_touch(&path));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_byte_flip_is_refused(
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let dir = temp_dir();
        let path = fresh_path(dir.path());
        let original = sample_bytes(6);
        let mut bytes = original.clone();
        for (at, mask) in flips {
            let at = at.index(bytes.len());
            bytes[at] ^= mask;
        }
        prop_assume!(bytes != original); // flips may cancel out
        write(&path, &bytes);
        prop_assert!(!open_verify_and_touch(&path));
    }

    #[test]
    fn random_garbage_never_panics(
        garbage in prop::collection::vec(any::<u8>(), 0..6000),
        with_magic in any::<bool>(),
    ) {
        let dir = temp_dir();
        let path = fresh_path(dir.path());
        let mut bytes = garbage;
        if with_magic && bytes.len() >= 8 {
            bytes[..8].copy_from_slice(&store::MAGIC);
        }
        write(&path, &bytes);
        prop_assert!(!open_verify_and_touch(&path));
    }

    #[test]
    fn garbage_body_behind_a_valid_header_never_panics(
        seed in any::<u64>(),
        keep_rows in any::<bool>(),
    ) {
        let dir = temp_dir();
        let path = fresh_path(dir.path());
        let mut bytes = sample_bytes(8);
        let header = header_of(&bytes);
        let start = if keep_rows {
            (header.rows_offset + header.rows_length) as usize
        } else {
            HEADER_SIZE
        };
        let mut state = seed | 1;
        for byte in &mut bytes[start..] {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        write(&path, &bytes);
        prop_assert!(!open_verify_and_touch(&path));
    }

    #[test]
    fn random_header_fields_never_panic(
        changes in prop::collection::vec((0usize..(9 + 2 * SECTION_COUNT), interesting_value()), 1..4),
    ) {
        let dir = temp_dir();
        let path = fresh_path(dir.path());
        let bytes = sample_bytes(8);
        let mut header = header_of(&bytes);
        let file_size = header.file_size;
        for (field, value) in changes {
            let value = value.resolve(file_size);
            match field {
                0 => header.dim = value as u32,
                1 => header.group_attribute_count = value as u32,
                2 => header.row_count = value,
                3 => header.row_stride_bytes = value,
                4 => header.rows_offset = value,
                5 => header.rows_length = value,
                6 => header.file_size = value,
                7 => header.max_row_norm = f32::from_bits(value as u32),
                8 => {
                    header.has_prior = value & 1 != 0;
                    header.has_dim_names = value & 2 != 0;
                }
                slot => {
                    let section = &mut header.sections[(slot - 9) / 2];
                    if slot % 2 == 1 {
                        section.offset = value;
                    } else {
                        section.length = value;
                    }
                }
            }
        }
        let mut patched = bytes.clone();
        patched[..HEADER_SIZE].copy_from_slice(&header.to_bytes());
        write(&path, &patched);
        // Must not panic; a consistent rearrangement may be accepted.
        let _ = open_verify_and_touch(&path);
    }
}

/// Header values near the edges that matter: zero, alignments, the file size and the
/// integer limits.
#[derive(Debug, Clone, Copy)]
enum Interesting {
    Fixed(u64),
    FileSize(i64),
}

impl Interesting {
    fn resolve(self, file_size: u64) -> u64 {
        match self {
            Interesting::Fixed(value) => value,
            Interesting::FileSize(delta) => file_size.wrapping_add_signed(delta),
        }
    }
}

fn interesting_value() -> impl Strategy<Value = Interesting> {
    prop_oneof![
        prop::sample::select(vec![
            0u64,
            1,
            4,
            8,
            63,
            64,
            128,
            256,
            4095,
            4096,
            4160,
            u64::from(u32::MAX),
            u64::from(u32::MAX) + 1,
            u64::MAX / 8,
            u64::MAX - 63,
            u64::MAX,
        ])
        .prop_map(Interesting::Fixed),
        (-130i64..130).prop_map(Interesting::FileSize),
        any::<u64>().prop_map(Interesting::Fixed),
        (0u64..8192).prop_map(Interesting::Fixed),
    ]
}
