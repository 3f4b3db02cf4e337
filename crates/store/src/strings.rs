//! String lists on disk: `count + 1` little-endian `u64` offsets into a block of UTF-8 bytes,
//! each string non-empty. Encoding for the writer, validation and access for the reader.

use crate::error::FormatProblem;

/// The offsets of `strings` laid end to end: `[0, len(s0), len(s0) + len(s1), ...]`.
pub(crate) fn encode_offsets<'a>(strings: impl IntoIterator<Item = &'a str>) -> Vec<u64> {
    let strings = strings.into_iter();
    let mut offsets = Vec::with_capacity(strings.size_hint().0 + 1);
    let mut end = 0u64;
    offsets.push(end);
    for string in strings {
        end += string.len() as u64;
        offsets.push(end);
    }
    offsets
}

/// Checks a stored string list: offsets start at 0, strictly increase (no empty strings)
/// and end at the byte length; the bytes are UTF-8 and every offset is a character boundary,
/// so each string is valid UTF-8 on its own.
pub(crate) fn check_list(
    list: &'static str,
    offsets: &[u64],
    bytes: &[u8],
) -> Result<(), FormatProblem> {
    let bad = |index: usize, offset: u64, reason: &'static str| FormatProblem::BadStringOffsets {
        list,
        index,
        offset,
        reason,
    };
    let (&first, &last) = match (offsets.first(), offsets.last()) {
        (Some(first), Some(last)) => (first, last),
        _ => return Err(bad(0, 0, "the offset table is empty")),
    };
    if first != 0 {
        return Err(bad(0, first, "the first offset must be 0"));
    }
    if last != bytes.len() as u64 {
        return Err(bad(
            offsets.len() - 1,
            last,
            "the last offset must equal the byte length of the strings",
        ));
    }
    // Strict increase: checked branch-free over all pairs first, located only on failure.
    let increasing = offsets
        .windows(2)
        .fold(true, |ok, pair| ok & (pair[0] < pair[1]));
    if !increasing && let Some(index) = offsets.windows(2).position(|pair| pair[0] >= pair[1]) {
        return Err(bad(
            index + 1,
            offsets[index + 1],
            "offsets must strictly increase (strings are non-empty)",
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|error| FormatProblem::InvalidUtf8 {
        list,
        index: entry_containing(offsets, error.valid_up_to() as u64),
    })?;
    // Every offset is in bounds (increasing, last == len); a boundary inside a multi-byte
    // character would make two strings invalid on their own.
    for (index, &offset) in offsets.iter().enumerate() {
        if !text.is_char_boundary(offset as usize) {
            return Err(FormatProblem::InvalidUtf8 {
                list,
                index: index.saturating_sub(1),
            });
        }
    }
    Ok(())
}

/// The entry whose bytes contain byte `position` (offsets already checked).
fn entry_containing(offsets: &[u64], position: u64) -> usize {
    offsets
        .partition_point(|&offset| offset <= position)
        .saturating_sub(1)
}

/// The bytes of entry `index` of a checked list, or `None` if `index` is out of range.
pub(crate) fn entry<'a>(offsets: &[u64], bytes: &'a [u8], index: usize) -> Option<&'a [u8]> {
    let start = usize::try_from(*offsets.get(index)?).ok()?;
    let end = usize::try_from(*offsets.get(index.checked_add(1)?)?).ok()?;
    bytes.get(start..end)
}

/// All entries of a checked list as owned strings (for short lists such as names).
pub(crate) fn to_strings(
    list: &'static str,
    offsets: &[u64],
    bytes: &[u8],
) -> Result<Vec<String>, FormatProblem> {
    let count = offsets.len().saturating_sub(1);
    (0..count)
        .map(|index| {
            entry(offsets, bytes, index)
                .and_then(|bytes| std::str::from_utf8(bytes).ok())
                .map(str::to_owned)
                .ok_or(FormatProblem::InvalidUtf8 { list, index })
        })
        .collect()
}

/// The first pair of equal names, as positions `(first, second)`.
pub(crate) fn first_duplicate(names: &[impl AsRef<str>]) -> Option<(usize, usize)> {
    let mut seen = std::collections::HashMap::with_capacity(names.len());
    for (position, name) in names.iter().enumerate() {
        if let Some(&first) = seen.get(name.as_ref()) {
            return Some((first, position));
        }
        seen.insert(name.as_ref(), position);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(strings: &[&str]) -> (Vec<u64>, Vec<u8>) {
        (
            encode_offsets(strings.iter().copied()),
            strings.concat().into_bytes(),
        )
    }

    #[test]
    fn encoded_lists_check_and_read_back() {
        let strings = ["alpha", "ß", "日本", "x"];
        let (offsets, bytes) = encode(&strings);
        assert_eq!(check_list("ids", &offsets, &bytes), Ok(()));
        for (index, string) in strings.iter().enumerate() {
            assert_eq!(
                entry(&offsets, &bytes, index),
                Some(string.as_bytes()),
                "entry {index}"
            );
        }
        assert_eq!(entry(&offsets, &bytes, strings.len()), None);
        assert_eq!(
            to_strings("ids", &offsets, &bytes),
            Ok(strings.iter().map(|s| s.to_string()).collect())
        );
    }

    #[test]
    fn empty_list_is_valid() {
        assert_eq!(check_list("ids", &[0], &[]), Ok(()));
    }

    #[test]
    fn empty_strings_are_refused() {
        let result = check_list("ids", &[0, 1, 1, 2], b"ab");
        assert!(
            matches!(
                result,
                Err(FormatProblem::BadStringOffsets { index: 2, .. })
            ),
            "{result:?}"
        );
    }

    #[test]
    fn offsets_must_start_at_zero_and_end_at_length() {
        assert!(matches!(
            check_list("ids", &[1, 2], b"ab"),
            Err(FormatProblem::BadStringOffsets { index: 0, .. })
        ));
        assert!(matches!(
            check_list("ids", &[0, 1], b"ab"),
            Err(FormatProblem::BadStringOffsets { index: 1, .. })
        ));
        assert!(matches!(
            check_list("ids", &[], b""),
            Err(FormatProblem::BadStringOffsets { .. })
        ));
    }

    #[test]
    fn split_character_is_invalid_utf8_of_its_entry() {
        // "ß" is two bytes; splitting it leaves both halves invalid.
        let bytes = "aß".as_bytes();
        assert_eq!(
            check_list("ids", &[0, 2, 3], bytes),
            Err(FormatProblem::InvalidUtf8 {
                list: "ids",
                index: 0
            })
        );
    }

    #[test]
    fn invalid_bytes_name_their_entry() {
        let bytes = [b'a', b'b', 0xff, b'c'];
        assert_eq!(
            check_list("ids", &[0, 2, 4], &bytes),
            Err(FormatProblem::InvalidUtf8 {
                list: "ids",
                index: 1
            })
        );
    }

    #[test]
    fn duplicates_are_found_in_order() {
        assert_eq!(first_duplicate(&["a", "b", "c", "b", "a"]), Some((1, 3)));
        assert_eq!(first_duplicate(&["a", "b"]), None);
    }
}
