//! Item id to row index lookup: an open-addressing hash table of row indices, built at open.
//!
//! The table stores no strings: each slot packs the top 32 bits of the id's hash with
//! `row + 1` (0 marks an empty slot). A slot's home position is the top bits of the hash, and
//! the stored 32 bits double as a tag: ids are compared byte for byte only when the tags of
//! the probed slot and the key agree. The hash is XXH3 with a per-process random seed, so
//! crafted ids cannot force collisions.
//!
//! Because positions follow hash order, the build can avoid a cache and TLB miss per id: it
//! hashes every id in one sequential pass, radix-partitions the `(hash, row)` entries by their
//! top bits (a counting sort), then inserts partition by partition, each into a small stretch
//! of the table that stays in L1 (several times faster than inserting in row order at a
//! million ids).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Hash-table of row indices keyed by item id bytes that live elsewhere.
#[derive(Debug, Clone)]
pub(crate) struct IdIndex {
    slots: Vec<u64>,
    /// `32 - log2(slots.len())`: the home position of a hash is `(hash >> 32) >> shift`.
    shift: u32,
    mask: usize,
    seed: u64,
}

/// Why an index could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BuildError {
    /// Two rows have the same id: the first row (in row order) whose id appeared earlier,
    /// and that earlier row.
    Duplicate {
        /// The earlier row.
        first: usize,
        /// The later row.
        second: usize,
    },
    /// More ids than [`MAX_IDS`].
    TooMany,
}

/// Largest number of ids (row indices must fit 31 bits so that the table has at most 2^32
/// slots, addressed by the top 32 bits of the hash).
pub(crate) const MAX_IDS: usize = i32::MAX as usize;

const EMPTY: u64 = 0;
/// Each build partition covers about 2^PARTITION_SLOT_BITS slots (2 KiB): small enough to stay
/// in L1 while its ids are inserted, large enough that the counting sort's scatter streams
/// stay few (measured best between 6 and 8 at a million ids).
const PARTITION_SLOT_BITS: u32 = 8;
/// Keys per group of [`IdIndex::get_many`]'s pipeline: each stage works on a whole group, and
/// a group moves one stage on per step, so a key's slot is requested one group's work before
/// it is read, its id offset one group before its bytes are requested, and those bytes one
/// group before the comparison. Large enough to cover a miss with the work of the other keys;
/// small enough that the `3 * LOOKUP_GROUP` lines in flight stay within the L1's miss buffers.
const LOOKUP_GROUP: usize = 8;
/// Groups in flight: one per stage.
const LOOKUP_STAGES: usize = 4;

/// What [`IdIndex::get_many`] hints to the caller's storage as keys go through its pipeline.
/// Hints must not change results (they only prefetch).
pub(crate) trait LookupHints {
    /// Row `row` is the likely match of a key: start loading its id offset.
    fn offset(&self, row: usize);
    /// Start loading the id bytes of likely row `row` (its offset was hinted earlier).
    fn bytes(&self, row: usize);
    /// Row `row` is the likely match of a key: start loading whatever the caller will read
    /// of that row after the lookups (nothing by default).
    fn row(&self, row: usize) {
        let _ = row;
    }
}

/// A group of keys in the lookup pipeline.
#[derive(Clone, Copy)]
struct Group<'k> {
    len: usize,
    keys: [&'k [u8]; LOOKUP_GROUP],
    tags: [u64; LOOKUP_GROUP],
    /// The row named by each key's home slot when its tag matches, else `usize::MAX`.
    likely: [usize; LOOKUP_GROUP],
}

impl Group<'_> {
    const EMPTY: Group<'static> = Group {
        len: 0,
        keys: [&[]; LOOKUP_GROUP],
        tags: [0; LOOKUP_GROUP],
        likely: [usize::MAX; LOOKUP_GROUP],
    };
}

/// `a == b`, without a `memcmp` call for the short strings ids usually are: lengths of 4 to
/// 16 bytes compare as two overlapping fixed-size words.
#[inline(always)]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    fn word<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
        let mut word = [0u8; N];
        if let Some(part) = bytes.get(at..at + N) {
            word.copy_from_slice(part);
        }
        word
    }
    let len = a.len();
    if len != b.len() {
        return false;
    }
    match len {
        8..=16 => {
            word::<8>(a, 0) == word::<8>(b, 0) && word::<8>(a, len - 8) == word::<8>(b, len - 8)
        }
        4..=7 => {
            word::<4>(a, 0) == word::<4>(b, 0) && word::<4>(a, len - 4) == word::<4>(b, len - 4)
        }
        _ => a == b,
    }
}

impl IdIndex {
    /// Builds the index over `count` ids, where `id(row)` returns the bytes of row `row`.
    pub fn build<'a>(count: usize, id: impl Fn(usize) -> &'a [u8]) -> Result<IdIndex, BuildError> {
        if count > MAX_IDS {
            return Err(BuildError::TooMany);
        }
        // Load factor at most 1/2 keeps linear-probe chains short; capacity <= 2^32.
        let capacity = (count * 2).next_power_of_two().max(16);
        let bits = capacity.trailing_zeros();
        let mut index = IdIndex {
            slots: vec![EMPTY; capacity],
            shift: 32 - bits,
            mask: capacity - 1,
            seed: RandomState::new().hash_one(0x6672_6b5f_6964_7831_u64),
        };

        // Pass 1: hash every id (sequential reads) into entries `(top 32 hash bits) << 32 |
        // row`, counting entries per partition (the top `partition_bits` of the hash).
        let partition_bits = bits.saturating_sub(PARTITION_SLOT_BITS).max(1);
        let partition_of = |entry: u64| (entry >> (64 - partition_bits)) as usize;
        let mut starts = vec![0usize; (1 << partition_bits) + 1];
        let entries: Vec<u64> = (0..count)
            .map(|row| {
                let entry = (index.hash(id(row)) & !0xffff_ffff) | row as u64;
                starts[partition_of(entry) + 1] += 1;
                entry
            })
            .collect();
        for partition in 1..starts.len() {
            starts[partition] += starts[partition - 1];
        }
        // Pass 2: counting sort by partition, stable (row order within a partition).
        let mut sorted = vec![0u64; count];
        for &entry in &entries {
            let cursor = &mut starts[partition_of(entry)];
            sorted[*cursor] = entry;
            *cursor += 1;
        }
        drop(entries);
        // Pass 3: insert partition by partition. Equal ids have equal hashes, so all copies
        // of an id meet in one partition, in row order: the first copy is inserted and each
        // later copy finds it. Keep going to report the duplicate with the smallest row.
        let mut first_duplicate: Option<(usize, usize)> = None;
        for &entry in &sorted {
            if let Err((first, second)) = index.insert(entry, &id)
                && first_duplicate.is_none_or(|(_, best)| second < best)
            {
                first_duplicate = Some((first, second));
            }
        }
        match first_duplicate {
            Some((first, second)) => Err(BuildError::Duplicate { first, second }),
            None => Ok(index),
        }
    }

    /// Inserts `(top 32 hash bits) << 32 | row`; on a duplicate id returns `(earlier, row)`.
    fn insert<'a>(
        &mut self,
        entry: u64,
        id: &impl Fn(usize) -> &'a [u8],
    ) -> Result<(), (usize, usize)> {
        let tag = entry >> 32;
        let row = (entry & 0xffff_ffff) as usize;
        let mut position = (tag >> self.shift) as usize;
        loop {
            let slot = self.slots[position];
            if slot == EMPTY {
                self.slots[position] = (tag << 32) | (row as u64 + 1);
                return Ok(());
            }
            if slot >> 32 == tag {
                let other = (slot & 0xffff_ffff) as usize - 1;
                if id(other) == id(row) {
                    return Err((other, row));
                }
            }
            position = (position + 1) & self.mask;
        }
    }

    #[inline(always)]
    fn hash(&self, bytes: &[u8]) -> u64 {
        xxh3_64_with_seed(bytes, self.seed)
    }

    /// The row whose id is `key`, where `id(row)` returns the bytes of row `row` (the same
    /// ids the index was built over).
    pub fn get<'a>(&self, key: &[u8], id: impl Fn(usize) -> &'a [u8]) -> Option<u32> {
        self.probe(key, self.hash(key) >> 32, &id)
    }

    /// The linear probe of [`IdIndex::get`] for a key whose tag (top 32 hash bits) is known.
    fn probe<'a>(&self, key: &[u8], tag: u64, id: &impl Fn(usize) -> &'a [u8]) -> Option<u32> {
        let mut position = (tag >> self.shift) as usize;
        loop {
            let slot = *self.slots.get(position)?;
            if slot == EMPTY {
                return None;
            }
            if slot >> 32 == tag {
                let row = (slot & 0xffff_ffff) as usize - 1;
                if same_bytes(id(row), key) {
                    return u32::try_from(row).ok();
                }
            }
            position = (position + 1) & self.mask;
        }
    }

    /// The rows of many keys at once, appended to `out` in key order (`None`: absent).
    ///
    /// Same answers as [`IdIndex::get`] per key, but a lookup costs up to three dependent
    /// cache misses (the slot, then the id's offset, then its bytes), so the keys go through a
    /// software pipeline in groups of [`LOOKUP_GROUP`]: while group `g` is compared, group
    /// `g + 1` has its id bytes requested, group `g + 2` its slots read and id offsets
    /// requested, and group `g + 3` is hashed and its slots requested. Each miss thus has a
    /// group's work to arrive, and no step waits for all of a group's misses. `hints`
    /// prefetches the caller's id storage and, through [`LookupHints::row`], whatever the
    /// caller reads of a found row next (hinted as soon as the slot names the likely row).
    /// See BENCHMARKS.md for the effect on the 1000-candidate Rank path.
    pub fn get_many<'a, 'k>(
        &self,
        keys: impl IntoIterator<Item = &'k [u8]>,
        id: impl Fn(usize) -> &'a [u8],
        hints: &impl LookupHints,
        out: &mut Vec<Option<u32>>,
    ) {
        let mut keys = keys.into_iter().fuse();
        out.reserve(keys.size_hint().0);
        let mut groups = [Group::EMPTY; LOOKUP_STAGES];
        let mut empty_fills = 0;
        for step in 0usize.. {
            // Stage 1, group `step`: hash its keys, request their home slots.
            let group = &mut groups[step % LOOKUP_STAGES];
            group.len = 0;
            for (stored, key) in group.keys.iter_mut().zip(keys.by_ref()) {
                let tag = self.hash(key) >> 32;
                crate::prefetch::element(&self.slots, (tag >> self.shift) as usize);
                *stored = key;
                group.tags[group.len] = tag;
                group.likely[group.len] = usize::MAX;
                group.len += 1;
            }
            if group.len == 0 {
                empty_fills += 1;
            }
            // Stage 2, group `step - 1`: a home slot with the key's tag names the likely row;
            // request its id offset and its row. (Keys that probed past their home slot are
            // found by the exact probe of stage 4.)
            let group = &mut groups[(step + LOOKUP_STAGES - 1) % LOOKUP_STAGES];
            for (&tag, likely) in group.tags[..group.len].iter().zip(&mut group.likely) {
                if let Some(&slot) = self.slots.get((tag >> self.shift) as usize)
                    && slot != EMPTY
                    && slot >> 32 == tag
                {
                    *likely = (slot & 0xffff_ffff) as usize - 1;
                    hints.offset(*likely);
                    hints.row(*likely);
                }
            }
            // Stage 3, group `step - 2`: request the likely rows' id bytes.
            let group = &groups[(step + LOOKUP_STAGES - 2) % LOOKUP_STAGES];
            for &likely in &group.likely[..group.len] {
                if likely != usize::MAX {
                    hints.bytes(likely);
                }
            }
            // Stage 4, group `step - 3`: the exact probes, now mostly from cache.
            let group = &groups[(step + LOOKUP_STAGES - 3) % LOOKUP_STAGES];
            for (key, &tag) in group.keys[..group.len].iter().zip(&group.tags) {
                out.push(self.probe(key, tag, &id));
            }
            // The keys ran out: the three groups before the first empty one are done now.
            if empty_fills == LOOKUP_STAGES - 1 {
                return;
            }
        }
    }

    /// Heap bytes used by the index.
    pub fn heap_bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// No prefetching.
    struct NoHints;

    impl LookupHints for NoHints {
        fn offset(&self, _: usize) {}
        fn bytes(&self, _: usize) {}
    }

    proptest! {
        #[test]
        fn finds_every_id_and_rejects_absent_ones(
            ids in prop::collection::hash_set("[a-z0-9]{1,6}", 0..300),
            probes in prop::collection::vec("[a-z0-9]{1,6}", 0..50),
        ) {
            let ids: Vec<String> = ids.into_iter().collect();
            let index = IdIndex::build(ids.len(), |row| ids[row].as_bytes());
            let index = match index {
                Ok(index) => index,
                Err(error) => return Err(TestCaseError::fail(format!("{error:?}"))),
            };
            for (row, id) in ids.iter().enumerate() {
                prop_assert_eq!(index.get(id.as_bytes(), |r| ids[r].as_bytes()), Some(row as u32));
            }
            for probe in &probes {
                let expected = ids.iter().position(|id| id == probe).map(|row| row as u32);
                prop_assert_eq!(index.get(probe.as_bytes(), |r| ids[r].as_bytes()), expected);
            }
        }

        #[test]
        fn batched_lookups_answer_like_single_ones(
            ids in prop::collection::hash_set("[a-z0-9]{1,4}", 0..200),
            probes in prop::collection::vec("[a-z0-9]{1,4}", 0..70),
        ) {
            let ids: Vec<String> = ids.into_iter().collect();
            let index = IdIndex::build(ids.len(), |row| ids[row].as_bytes())
                .map_err(|error| TestCaseError::fail(format!("{error:?}")))?;
            // Known ids mixed with (mostly) unknown ones, across several lookup groups.
            let keys: Vec<&str> = probes
                .iter()
                .map(String::as_str)
                .chain(ids.iter().map(String::as_str))
                .collect();
            let mut found = vec![Some(u32::MAX)];
            index.get_many(keys.iter().map(|key| key.as_bytes()), |row| ids[row].as_bytes(), &NoHints, &mut found);
            prop_assert_eq!(found.len(), keys.len() + 1, "appends to `out`");
            for (key, row) in keys.iter().zip(&found[1..]) {
                prop_assert_eq!(*row, index.get(key.as_bytes(), |r| ids[r].as_bytes()));
            }
        }

        #[test]
        fn reports_first_duplicate_in_row_order(
            ids in prop::collection::vec("[ab]{1,3}", 1..60),
        ) {
            let expected = (0..ids.len()).find_map(|second| {
                (0..second).find(|&first| ids[first] == ids[second]).map(|first| BuildError::Duplicate { first, second })
            });
            let found = IdIndex::build(ids.len(), |row| ids[row].as_bytes()).err();
            prop_assert_eq!(found, expected);
        }
    }

    proptest! {
        #[test]
        fn ids_differing_by_trailing_zeros_or_prefixes_are_told_apart(
            // A tiny alphabet with zero bytes: ids that differ only by trailing zeros, ids
            // that are prefixes of others, and lengths on both sides of 8 bytes.
            ids in prop::collection::hash_set(
                prop::collection::vec(prop_oneof![Just(0_u8), Just(b'a'), Just(b'b')], 0..12),
                0..200,
            ),
            probes in prop::collection::vec(
                prop::collection::vec(prop_oneof![Just(0_u8), Just(b'a'), Just(b'b')], 0..12),
                0..60,
            ),
        ) {
            let ids: Vec<Vec<u8>> = ids.into_iter().collect();
            let index = IdIndex::build(ids.len(), |row| ids[row].as_slice())
                .map_err(|error| TestCaseError::fail(format!("{error:?}")))?;
            let keys: Vec<&[u8]> = probes
                .iter()
                .chain(ids.iter())
                .map(Vec::as_slice)
                .collect();
            let mut found = Vec::new();
            index.get_many(keys.iter().copied(), |row| ids[row].as_slice(), &NoHints, &mut found);
            for (key, row) in keys.iter().zip(&found) {
                let expected = ids.iter().position(|id| id.as_slice() == *key).map(|row| row as u32);
                prop_assert_eq!(*row, expected, "{:?}", key);
                prop_assert_eq!(index.get(key, |r| ids[r].as_slice()), expected);
            }
        }
    }

    #[test]
    fn short_byte_comparison_matches_slice_equality() {
        let words: Vec<Vec<u8>> = (0..=20)
            .flat_map(|len| {
                let base: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
                // The word itself and every single-byte change of it.
                let mut variants = vec![base.clone()];
                for at in 0..len {
                    let mut changed = base.clone();
                    changed[at] ^= 1;
                    variants.push(changed);
                }
                variants
            })
            .collect();
        for a in &words {
            for b in &words {
                assert_eq!(same_bytes(a, b), a == b, "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn empty_index_finds_nothing() {
        let ids: [&str; 0] = [];
        let index = IdIndex::build(0, |row| ids[row].as_bytes());
        assert!(
            matches!(index, Ok(ref index) if index.get(b"x", |row| ids[row].as_bytes()).is_none())
        );
    }
}
