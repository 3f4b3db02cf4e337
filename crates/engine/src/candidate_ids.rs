//! [`CandidateIds`]: a request's candidate item ids stored back to back in one string, so a
//! list of thousands of ids costs two allocations instead of one per id.

use std::fmt;

/// The candidate item ids of a request, in request order (empty: the whole catalog).
///
/// The ids are kept end to end in one `String` with the end offset of each, so building the
/// list from a wire message copies bytes once and allocates twice, whatever the number of
/// ids (a `Vec<String>` allocates, and later frees, once per id). Build it from a
/// `Vec<String>` or any iterator of strings (`collect()`), or id by id with
/// [`CandidateIds::push`].
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct CandidateIds {
    text: String,
    /// `ends[i]` is the byte offset in `text` where id `i` ends (ids may be empty).
    ends: Vec<usize>,
}

impl CandidateIds {
    /// An empty list.
    pub fn new() -> CandidateIds {
        CandidateIds::default()
    }

    /// An empty list with room for `ids` ids of `bytes` bytes in total.
    pub fn with_capacity(ids: usize, bytes: usize) -> CandidateIds {
        CandidateIds {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(ids),
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
        (!decreasing && !inside_characters && last == text.len())
            .then_some(CandidateIds { text, ends })
    }

    /// Appends an id.
    pub fn push(&mut self, id: &str) {
        self.text.push_str(id);
        self.ends.push(self.text.len());
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are no ids.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Total bytes of all ids.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }

    /// All ids back to back, in order (cut them with [`CandidateIds::ends`]).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The byte offset in [`CandidateIds::text`] where each id ends, in order.
    pub fn ends(&self) -> &[usize] {
        &self.ends
    }

    /// The ids' bytes in order: as [`CandidateIds::iter`], without cutting `str`s (no
    /// character-boundary checks), for hashing and lookups.
    pub fn iter_bytes(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        let text = self.text.as_bytes();
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let id = text.get(start..end).unwrap_or_default();
            start = end;
            id
        })
    }

    /// Id `index`, or `None` past the end.
    pub fn get(&self, index: usize) -> Option<&str> {
        let end = *self.ends.get(index)?;
        let start = match index.checked_sub(1) {
            Some(previous) => self.ends[previous],
            None => 0,
        };
        self.text.get(start..end)
    }

    /// The ids in order.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            ids: self,
            start: 0,
            next: 0,
        }
    }

    /// The ids as owned strings.
    pub fn to_vec(&self) -> Vec<String> {
        self.iter().map(str::to_owned).collect()
    }
}

/// Iterator over [`CandidateIds`], in order.
#[derive(Debug, Clone)]
pub struct Iter<'a> {
    ids: &'a CandidateIds,
    start: usize,
    next: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let end = *self.ids.ends.get(self.next)?;
        let id = self.ids.text.get(self.start..end)?;
        self.start = end;
        self.next += 1;
        Some(id)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.ids.ends.len() - self.next;
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
            let parts = CandidateIds::from_parts(list.text().to_owned(), list.ends().to_vec());
            prop_assert_eq!(parts.map(|parts| parts.to_vec()), Some(ids));
        }
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
