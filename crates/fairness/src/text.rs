//! Client text in error messages: quoted, and clipped so that a message stays small.

/// Bytes of a client's string quoted in an error message (see [`quote_clipped`]).
pub const QUOTED_BYTES: usize = 64;

/// `text` quoted for an error message, clipped to its first [`QUOTED_BYTES`] bytes (at a
/// character boundary) with its length in bytes after a longer one: a message quoting
/// client strings stays small (gRPC carries it in a trailer, which peers cap at 8 to
/// 16 KiB).
pub fn quote_clipped(text: &str) -> String {
    if text.len() <= QUOTED_BYTES {
        return format!("{text:?}");
    }
    let end = (0..=QUOTED_BYTES)
        .rev()
        .find(|&end| text.is_char_boundary(end))
        .unwrap_or(0);
    format!("{:?}... ({} bytes)", &text[..end], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_client_strings_are_clipped_at_a_character_boundary() {
        assert_eq!(quote_clipped("item-1"), "\"item-1\"");
        let exact = "x".repeat(QUOTED_BYTES);
        assert_eq!(quote_clipped(&exact), format!("{exact:?}"));
        let long = format!("{}{}", "a".repeat(QUOTED_BYTES - 1), "é".repeat(10_000));
        let quoted = quote_clipped(&long);
        assert!(quoted.len() < 2 * QUOTED_BYTES, "{quoted}");
        assert!(
            quoted.ends_with(&format!("... ({} bytes)", long.len())),
            "{quoted}"
        );
        assert!(quoted.starts_with(&format!("\"{}\"", "a".repeat(QUOTED_BYTES - 1))));
    }
}
