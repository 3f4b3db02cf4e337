//! [`CandidateIds`]: a request's candidate item ids cut from one buffer, so a list of
//! thousands of ids costs two allocations instead of one per id (and none of the ids' bytes
//! are copied when the buffer is the request's own body).

use std::borrow::Cow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// The bytes the ids are cut from.
#[derive(Clone)]
enum IdBytes {
    /// The ids' own text, back to back (built by [`CandidateIds::push`] and the
    /// conversions).
    Own(String),
    /// A buffer shared with its owner, e.g. a request's body, in which the ids lie
    /// anywhere (built by [`CandidateIds::from_shared`]).
    Shared(Arc<dyn AsRef<[u8]> + Send + Sync>),
}

impl Default for IdBytes {
    fn default() -> IdBytes {
        IdBytes::Own(String::new())
    }
}

/// The candidate item ids of a request, in request order (empty: the whole catalog).
///
/// The ids are byte ranges of one buffer: either their own text, kept end to end in one
/// `String` (build it from a `Vec<String>`, any iterator of strings (`collect()`), or id by
/// id with [`CandidateIds::push`]), or a shared buffer such as a request's body, which the
/// ids are cut from without copying ([`CandidateIds::from_shared`]). Either way the list
/// allocates twice whatever the number of ids (a `Vec<String>` allocates, and later frees,
/// once per id). Every id is valid UTF-8 (checked when the list is built).
#[derive(Clone, Default)]
pub struct CandidateIds {
    bytes: IdBytes,
    /// `spans[i]` is the byte range (start, end) of id `i` in `bytes` (ids may be empty).
    spans: Vec<(usize, usize)>,
}

impl CandidateIds {
    /// An empty list.
    pub fn new() -> CandidateIds {
        CandidateIds::default()
    }

    /// An empty list with room for `ids` ids of `bytes` bytes in total.
    pub fn with_capacity(ids: usize, bytes: usize) -> CandidateIds {
        CandidateIds {
            bytes: IdBytes::Own(String::with_capacity(bytes)),
            spans: Vec::with_capacity(ids),
        }
    }

    /// The list whose ids are `text` cut at `ends` (the byte offset where each id ends, in
    /// order), or `None` if `ends` decreases, goes past `text` or stops short of its end,
    /// or cuts a character in two.
    pub fn from_parts(text: String, ends: Vec<usize>) -> Option<CandidateIds> {
        // Passes without early exits (lists are valid but for bugs). An end below the one
        // before flags the list; ends past the text are caught by the last end, which must
        // be the text's length. Every offset into ASCII text (the common case) is a
        // character boundary; in other text an end on a UTF-8 continuation byte
        // (`0x80..=0xBF`; the text's end reads as 0) flags the list too.
        let bytes = text.as_bytes();
        let decreasing = ends
            .iter()
            .zip(ends.iter().skip(1))
            .fold(false, |wrong, (&previous, &end)| wrong | (end < previous));
        let inside_characters = !bytes.is_ascii()
            && ends.iter().fold(false, |wrong, &end| {
                let byte_at_end = bytes.get(end).copied().unwrap_or(0);
                wrong | ((byte_at_end as i8) < -0x40)
            });
        let last = ends.last().copied().unwrap_or(0);
        if decreasing || inside_characters || last != text.len() {
            return None;
        }
        let mut start = 0;
        let spans = ends
            .iter()
            .map(|&end| {
                let span = (start, end);
                start = end;
                span
            })
            .collect();
        Some(CandidateIds {
            bytes: IdBytes::Own(text),
            spans,
        })
    }

    /// The list whose id `i` is `bytes[spans[i].0..spans[i].1]`, without copying any id:
    /// the list keeps `bytes` (e.g. a request's body, a reference-counted buffer) until it
    /// is dropped. `None` if a span ends before it starts or past `bytes`, or an id is not
    /// valid UTF-8.
    ///
    /// The check is one pass over the spans and, when all the bytes from the first span's
    /// start to the last span's end are ASCII (the common case, whatever lies between the
    /// ids), one ASCII check over them; otherwise each id is checked on its own.
    pub fn from_shared<B>(bytes: B, spans: Vec<(usize, usize)>) -> Option<CandidateIds>
    where
        B: AsRef<[u8]> + Send + Sync + 'static,
    {
        let buffer = bytes.as_ref();
        // One branch-free fold: is every span in order (start <= end) and inside the range
        // from the first span's start to the last span's end? Then, if that range is in
        // `bytes` and ASCII, so is every id. Otherwise (spans out of order, non-ASCII bytes)
        // each id is checked on its own.
        let (first, last) = match (spans.first(), spans.last()) {
            (Some(&(first, _)), Some(&(_, last))) => (first, last),
            _ => (0, 0),
        };
        let irregular = spans.iter().fold(false, |wrong, &(start, end)| {
            wrong | (end < start) | (start < first) | (end > last)
        });
        let valid = (!irregular && buffer.get(first..last).is_some_and(all_ascii))
            || spans.iter().all(|&(start, end)| {
                buffer
                    .get(start..end)
                    .is_some_and(|id| std::str::from_utf8(id).is_ok())
            });
        valid.then(|| CandidateIds {
            bytes: IdBytes::Shared(Arc::new(bytes)),
            spans,
        })
    }

    /// The bytes the ids are cut from: [`CandidateIds::spans`] are ranges of it.
    pub fn buffer(&self) -> &[u8] {
        match &self.bytes {
            IdBytes::Own(text) => text.as_bytes(),
            IdBytes::Shared(shared) => (**shared).as_ref(),
        }
    }

    /// The byte range (start, end) of each id in [`CandidateIds::buffer`], in request order
    /// (ranges may leave gaps: a request body's field keys lie between its ids).
    pub fn spans(&self) -> &[(usize, usize)] {
        &self.spans
    }

    /// Appends an id.
    pub fn push(&mut self, id: &str) {
        // A list cut from a shared buffer takes its ids' text as its own first.
        if matches!(self.bytes, IdBytes::Shared(_)) {
            let mut own = CandidateIds::with_capacity(self.len() + 1, self.text_len() + id.len());
            for id in self.iter() {
                own.push(id);
            }
            *self = own;
        }
        if let IdBytes::Own(text) = &mut self.bytes {
            let start = text.len();
            text.push_str(id);
            self.spans.push((start, text.len()));
        }
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether there are no ids.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Total bytes of all ids.
    pub fn text_len(&self) -> usize {
        match &self.bytes {
            IdBytes::Own(text) => text.len(),
            IdBytes::Shared(_) => self.spans.iter().map(|&(start, end)| end - start).sum(),
        }
    }

    /// All ids back to back, in order (cut them with [`CandidateIds::ends`]): borrowed for a
    /// list with its own text, copied for a list cut from a shared buffer.
    pub fn text(&self) -> Cow<'_, str> {
        match &self.bytes {
            IdBytes::Own(text) => Cow::Borrowed(text),
            IdBytes::Shared(_) => {
                let mut text = String::with_capacity(self.text_len());
                for id in self {
                    text.push_str(id);
                }
                Cow::Owned(text)
            }
        }
    }

    /// The byte offset in [`CandidateIds::text`] where each id ends, in order.
    pub fn ends(&self) -> Vec<usize> {
        let mut end = 0;
        self.spans
            .iter()
            .map(|&(start, stop)| {
                end += stop - start;
                end
            })
            .collect()
    }

    /// The ids' bytes in order: as [`CandidateIds::iter`], without cutting `str`s (no
    /// character-boundary checks), for hashing and lookups.
    pub fn iter_bytes(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        let buffer = self.buffer();
        self.spans
            .iter()
            .map(move |&(start, end)| buffer.get(start..end).unwrap_or_default())
    }

    /// The bytes of id `index` (as [`CandidateIds::iter_bytes`]), or `None` past the end.
    pub fn get_bytes(&self, index: usize) -> Option<&[u8]> {
        let &(start, end) = self.spans.get(index)?;
        self.buffer().get(start..end)
    }

    /// Id `index`, or `None` past the end.
    pub fn get(&self, index: usize) -> Option<&str> {
        let &(start, end) = self.spans.get(index)?;
        match &self.bytes {
            IdBytes::Own(text) => text.get(start..end),
            // Checked when the list was built: this cannot fail.
            IdBytes::Shared(shared) => (**shared)
                .as_ref()
                .get(start..end)
                .and_then(|id| std::str::from_utf8(id).ok()),
        }
    }

    /// The ids in order.
    pub fn iter(&self) -> Iter<'_> {
        Iter { ids: self, next: 0 }
    }

    /// The ids as owned strings.
    pub fn to_vec(&self) -> Vec<String> {
        self.iter().map(str::to_owned).collect()
    }
}

/// Whether every byte of `bytes` is ASCII, as `<[u8]>::is_ascii` says: one OR over all the
/// bytes without early exits, which compiles to 32-byte vector ORs (a few hundred
/// instructions for a T1 request's 9 KB of ids and keys, several times fewer than
/// `is_ascii`'s word loop).
fn all_ascii(bytes: &[u8]) -> bool {
    bytes.iter().fold(0_u8, |any, &byte| any | byte) < 0x80
}

/// Iterator over [`CandidateIds`], in order.
#[derive(Debug, Clone)]
pub struct Iter<'a> {
    ids: &'a CandidateIds,
    next: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let id = self.ids.get(self.next)?;
        self.next += 1;
        Some(id)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.ids.len() - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a CandidateIds {
    type Item = &'a str;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl<S: AsRef<str>> FromIterator<S> for CandidateIds {
    fn from_iter<I: IntoIterator<Item = S>>(ids: I) -> CandidateIds {
        let mut list = CandidateIds::new();
        for id in ids {
            list.push(id.as_ref());
        }
        list
    }
}

impl From<Vec<String>> for CandidateIds {
    fn from(ids: Vec<String>) -> CandidateIds {
        let mut list = CandidateIds::with_capacity(ids.len(), ids.iter().map(String::len).sum());
        for id in &ids {
            list.push(id);
        }
        list
    }
}

impl From<&[&str]> for CandidateIds {
    fn from(ids: &[&str]) -> CandidateIds {
        ids.iter().collect()
    }
}

/// Lists are equal when they hold the same ids in the same order, however they are stored.
impl PartialEq for CandidateIds {
    fn eq(&self, other: &CandidateIds) -> bool {
        self.len() == other.len() && self.iter_bytes().eq(other.iter_bytes())
    }
}

impl Eq for CandidateIds {}

/// Hashes the ids in order (each with its length), as [`PartialEq`] compares them.
impl Hash for CandidateIds {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_usize(self.len());
        for id in self.iter_bytes() {
            id.hash(state);
        }
    }
}

impl fmt::Debug for CandidateIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_come_back_in_order_with_empty_ones() {
        let owned = vec![
            "i1".to_owned(),
            String::new(),
            "ümlaut".to_owned(),
            "x".to_owned(),
        ];
        let ids = CandidateIds::from(owned.clone());
        assert_eq!(ids.len(), 4);
        assert_eq!(ids.text_len(), owned.iter().map(String::len).sum::<usize>());
        assert_eq!(ids.to_vec(), owned);
        assert_eq!(ids.iter().len(), 4);
        // The byte view, the text and the ends describe the same ids.
        let bytes: Vec<&[u8]> = ids.iter_bytes().collect();
        let expected: Vec<&[u8]> = owned.iter().map(String::as_bytes).collect();
        assert_eq!(bytes, expected);
        assert_eq!(ids.iter_bytes().len(), 4);
        assert_eq!(ids.text(), owned.concat());
        assert_eq!(ids.ends(), &[2, 2, 9, 10]);
        assert_eq!(ids.get(1), Some(""));
        assert_eq!(ids.get(2), Some("ümlaut"));
        assert_eq!(ids.get(4), None);
        assert_eq!(ids.get_bytes(2), Some("ümlaut".as_bytes()));
        assert_eq!(ids.get_bytes(4), None);
        assert_eq!(ids, owned.iter().collect::<CandidateIds>());
        assert_eq!(format!("{ids:?}"), format!("{owned:?}"));
        assert!(CandidateIds::new().is_empty());
    }

    proptest! {
        #[test]
        fn parts_are_accepted_exactly_when_they_cut_at_increasing_character_boundaries(
            text in "[aé€\u{10348}]{0,12}",
            picks in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            tweak in prop::option::of((any::<prop::sample::Index>(), 0..50_usize)),
        ) {
            // Valid ends (increasing character boundaries, the last at the text's end), then
            // maybe one end moved anywhere (inside a character, backwards, past the end).
            let boundaries: Vec<usize> =
                text.char_indices().map(|(index, _)| index).chain([text.len()]).collect();
            let mut ends: Vec<usize> = picks.iter().map(|pick| *pick.get(&boundaries)).collect();
            ends.sort_unstable();
            ends.push(text.len());
            if let Some((which, value)) = tweak {
                let which = which.index(ends.len());
                ends[which] = value;
            }
            // The oracle: `str::is_char_boundary` (false past the end), checked end by end.
            let mut start = 0;
            let mut valid = true;
            for &end in &ends {
                valid &= end >= start && text.is_char_boundary(end);
                start = end;
            }
            valid &= start == text.len();
            let parts = CandidateIds::from_parts(text.clone(), ends.clone());
            prop_assert_eq!(parts.is_some(), valid);
            if let Some(ids) = parts {
                let mut start = 0;
                let expected: Vec<String> = ends
                    .iter()
                    .map(|&end| {
                        let id = text[start..end].to_owned();
                        start = end;
                        id
                    })
                    .collect();
                prop_assert_eq!(ids.to_vec(), expected);
            }
        }

        #[test]
        fn ids_pushed_whole_always_cut_back_into_the_same_ids(
            ids in prop::collection::vec("[a-z0-9é€]{0,5}", 0..20),
        ) {
            let list: CandidateIds = ids.iter().collect();
            let parts = CandidateIds::from_parts(list.text().into_owned(), list.ends());
            prop_assert_eq!(parts.map(|parts| parts.to_vec()), Some(ids));
        }
    }

    /// The oracle of [`CandidateIds::from_shared`]: every span in order inside `buffer`,
    /// each a valid UTF-8 string, else `None`.
    fn shared_oracle(buffer: &[u8], spans: &[(usize, usize)]) -> Option<Vec<String>> {
        spans
            .iter()
            .map(|&(start, end)| {
                let id = buffer.get(start..end)?;
                String::from_utf8(id.to_vec()).ok()
            })
            .collect()
    }

    proptest! {
        #[test]
        fn shared_spans_are_accepted_exactly_when_each_is_a_utf8_string_inside_the_buffer(
            buffer in prop::collection::vec(
                prop_oneof![4 => 0x20_u8..0x7f, 1 => any::<u8>()], 0..60),
            text in "[a-z]{0,8}|[aé€\u{10348}]{0,6}",
            picks in prop::collection::vec((any::<prop::sample::Index>(), 0..12_usize), 0..10),
            ordered in any::<bool>(),
            stray in prop::option::of((any::<prop::sample::Index>(), 0..80_usize, 0..80_usize)),
        ) {
            // The buffer: random bytes (mostly ASCII, some not UTF-8) and a UTF-8 text.
            let mut buffer = buffer;
            buffer.extend_from_slice(text.as_bytes());
            let len = buffer.len();
            let mut spans: Vec<(usize, usize)> = picks
                .iter()
                .map(|(start, width)| {
                    let start = start.index(len + 1);
                    (start, (start + width).min(len))
                })
                .collect();
            if ordered {
                spans.sort_unstable();
            }
            // Maybe one span anywhere: reversed, past the end, around the text.
            if let Some((which, start, end)) = stray
                && !spans.is_empty()
            {
                let which = which.index(spans.len());
                spans[which] = (start, end);
            }
            let expected = shared_oracle(&buffer, &spans);
            let ids = CandidateIds::from_shared(buffer.clone(), spans.clone());
            prop_assert_eq!(ids.as_ref().map(CandidateIds::to_vec), expected.clone());
            if let (Some(ids), Some(expected)) = (ids, expected) {
                // Every view agrees with a list of the same ids' own text.
                let own = CandidateIds::from(expected.clone());
                prop_assert_eq!(&ids, &own);
                prop_assert_eq!(ids.len(), expected.len());
                prop_assert_eq!(ids.text(), own.text());
                prop_assert_eq!(ids.ends(), own.ends());
                prop_assert_eq!(ids.text_len(), own.text_len());
                let bytes: Vec<&[u8]> = ids.iter_bytes().collect();
                let own_bytes: Vec<&[u8]> = own.iter_bytes().collect();
                prop_assert_eq!(bytes, own_bytes);
                for index in 0..=expected.len() {
                    prop_assert_eq!(ids.get(index), expected.get(index).map(String::as_str));
                    prop_assert_eq!(
                        ids.get_bytes(index),
                        expected.get(index).map(String::as_bytes)
                    );
                }
                prop_assert_eq!(format!("{ids:?}"), format!("{own:?}"));
                let hash = |list: &CandidateIds| std::hash::BuildHasher::hash_one(
                    &std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default(),
                    list,
                );
                prop_assert_eq!(hash(&ids), hash(&own));
                // Pushing onto a shared list appends, like pushing onto its own text.
                let (mut shared, mut own) = (ids.clone(), own);
                shared.push("tail");
                own.push("tail");
                prop_assert_eq!(shared.to_vec(), own.to_vec());
                prop_assert_eq!(shared.ends(), own.ends());
            }
        }
    }

    proptest! {
        #[test]
        fn the_ascii_check_agrees_with_the_standard_library(
            bytes in prop::collection::vec(prop_oneof![9 => 0_u8..0x80, 1 => any::<u8>()], 0..300),
        ) {
            prop_assert_eq!(all_ascii(&bytes), bytes.is_ascii());
        }
    }

    #[test]
    fn shared_lists_cut_ids_out_of_a_buffer_without_copying_them() {
        // Ids between other bytes (a length byte and a key each, as in a message body).
        let body = b"\x52\x02ab\x52\x00\x52\x03\xc3\xbcx".to_vec();
        let ids = CandidateIds::from_shared(body.clone(), vec![(2, 4), (6, 6), (8, 11)]).unwrap();
        assert_eq!(ids.to_vec(), ["ab", "", "üx"]);
        assert_eq!(ids.text(), "abüx");
        assert_eq!(ids.ends(), &[2, 2, 5]);
        assert_eq!(ids.text_len(), 5);
        // Out of order and overlapping spans are ids too.
        let ids = CandidateIds::from_shared(body.clone(), vec![(8, 11), (2, 4), (3, 4)]).unwrap();
        assert_eq!(ids.to_vec(), ["üx", "ab", "b"]);
        // Inside a character, reversed, past the end, not UTF-8.
        for spans in [vec![(8, 9)], vec![(4, 2)], vec![(2, 12)], vec![(9, 11)]] {
            assert_eq!(
                CandidateIds::from_shared(body.clone(), spans.clone()),
                None,
                "{spans:?}"
            );
        }
        assert_eq!(
            CandidateIds::from_shared(Vec::new(), Vec::new()),
            Some(CandidateIds::new())
        );
    }

    #[test]
    fn parts_must_cut_the_text_into_whole_characters() {
        let text = "abü".to_owned();
        assert_eq!(
            CandidateIds::from_parts(text.clone(), vec![1, 1, 4]).map(|ids| ids.to_vec()),
            Some(vec!["a".to_owned(), String::new(), "bü".to_owned()])
        );
        // Inside `ü`, decreasing, short of the end, past the end.
        for ends in [vec![3, 4], vec![2, 1, 4], vec![2], vec![5]] {
            assert_eq!(
                CandidateIds::from_parts(text.clone(), ends.clone()),
                None,
                "{ends:?}"
            );
        }
        assert_eq!(
            CandidateIds::from_parts(String::new(), Vec::new()),
            Some(CandidateIds::new())
        );
    }
}
