//! Client text in error messages: quoted, and clipped so that a message stays small.

/// Bytes of a client's string quoted in an error message (see [`quote_clipped`]).
pub const QUOTED_BYTES: usize = 64;

/// `text` quoted for an error message, clipped to its first [`QUOTED_BYTES`] bytes (at a
/// character boundary) with its length in bytes after a longer one: a message quoting
/// client strings stays small (gRPC carries it in a trailer, which peers cap at 8 to
/// 16 KiB).
pub fn quote_clipped(text: &str) -> String {
    quote_clipped_to(text, QUOTED_BYTES)
}

/// [`quote_clipped`] with `max_bytes` in place of [`QUOTED_BYTES`].
pub fn quote_clipped_to(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return format!("{text:?}");
    }
    format!("{:?}... ({} bytes)", clip(text, max_bytes), text.len())
}

/// A client's JSON `value` for an error message, as JSON text, clipped as
/// [`quote_clipped`] clips strings (but not quoted again: `"a"` stays `"a"`, `5` stays `5`).
pub fn json_clipped(value: &serde_json::Value) -> String {
    let text = value.to_string();
    if text.len() <= QUOTED_BYTES {
        return text;
    }
    format!("{}... ({} bytes)", clip(&text, QUOTED_BYTES), text.len())
}

/// The first `max_bytes` bytes of `text` or fewer, cut at a character boundary.
fn clip(text: &str, max_bytes: usize) -> &str {
    let end = (0..=max_bytes.min(text.len()))
        .rev()
        .find(|&end| text.is_char_boundary(end))
        .unwrap_or(0);
    &text[..end]
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

    #[test]
    fn json_values_are_shown_as_json_and_clipped() {
        use serde_json::json;
        assert_eq!(json_clipped(&json!("abc")), "\"abc\"");
        assert_eq!(json_clipped(&json!(5)), "5");
        assert_eq!(json_clipped(&json!({"a": [1, 2]})), "{\"a\":[1,2]}");
        let long = json!("x".repeat(60_000));
        let shown = json_clipped(&long);
        assert!(shown.len() < 2 * QUOTED_BYTES, "{shown}");
        assert!(shown.ends_with("... (60002 bytes)"), "{shown}");
        let control = json!("\u{1}".repeat(10_000));
        assert!(json_clipped(&control).len() < 2 * QUOTED_BYTES);
    }
}
