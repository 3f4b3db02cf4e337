//! Item id to row index lookup: an open-addressing hash table of cache-line buckets, built at
//! open, that resolves an id of up to 8 bytes from its bucket alone.
//!
//! Each bucket is one 64-byte cache line of 5 slots. A slot holds an 8-byte word and
//! `row + 1` (0 marks an empty slot), whose top bit says whether the id is exactly 8 bytes
//! long. The word encodes the id:
//!
//! - exactly 8 bytes: the id's bytes (top bit of the row field set);
//! - 0 to 7 bytes: the bytes zero-padded, with the length in the top byte (0 to 7);
//! - more than 8 bytes: a 64-bit fingerprint (the id's keyed hash) whose top byte is at
//!   least 8, so it never equals a short id's word.
//!
//! So for an id of at most 8 bytes, word and flag equal the key's exactly when the ids are
//! equal: a lookup reads one bucket (one cache line; a second one for the few keys whose
//! bucket overflowed) and never the table's id offsets or id bytes. A longer id whose word
//! and flag match is confirmed byte for byte against the stored id (a 64-bit fingerprint
//! makes a false match rare, never wrong).
//!
//! A key's home bucket is `((hash >> 32) * buckets) >> 32` (multiply-shift, any bucket
//! count), and a full bucket overflows into the next one (linear probing over buckets): a
//! lookup stops at the first bucket with an empty slot. Buckets are sized for a load of
//! 0.65 (about 19.7 bytes per id). The hash is keyed with per-process random keys, so
//! crafted ids cannot force collisions: an id of at most 8 bytes hashes its slot word (and
//! flag) with two keyed folded multiplies (see [`short_hash`]: a few instructions, where
//! XXH3 took about 20 with its length dispatch), a longer id is hashed by XXH3 with a
//! random seed. A bucket's 5 words are compared with the key's at once (one AVX2 compare
//! for 4 of them), so a lookup takes no branch per slot: the slot of a found id, random
//! among the 5, used to cost a mispredicted loop exit per lookup.
//!
//! [`IdIndex::get_many_spans`] takes the keys as spans of one buffer (as the engine holds a
//! request's candidate ids: ranges of the request body): a group of 16 keys that are all
//! exactly 8 bytes long (T1's ids) is checked with one pass over its spans (no branch per
//! key), and each slot word is then one 8-byte load, hashed and sent to its bucket in a
//! straight line; other groups of keys of at most 8 bytes take a two-stage pipeline without
//! the iterator. The short-key hash is unchanged (same keys, same answers). Hashing a group in SIMD lanes was weighed
//! and not done: AVX2 and AVX-512 have no 64x64-to-128-bit multiply, and building the folded
//! multiply from 32-bit products takes more instructions per key than the scalar `mulx`
//! (and a weaker hash was not an option: the keyed multiplies are what keeps crafted ids
//! from colliding).
//!
//! An index of 1 MiB of buckets or more is kept on a 2 MiB huge page where the kernel grants
//! one (see [`BucketStorage`]): with 4 KiB pages, nearly every lookup in the server also paid
//! a page walk.
//!
//! The build inserts in row order, hashing each id (sequential reads of the ids) 16 rows
//! before its insert and requesting its home bucket then, so the buckets' cache misses
//! overlap. (The former 8-byte slots were inserted after radix-partitioning `(hash, row)`
//! entries by hash; with 16-byte entries that sort's scatter and the extra temporary memory
//! cost more than the misses it avoided: see BENCHMARKS.md.) The first copy of an id is
//! inserted and a later copy finds it, so the first duplicate found has the smallest row.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use wide::u64x4;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Slots per bucket: 5 words and 5 row fields fill a 64-byte cache line.
const BUCKET_SLOTS: usize = 5;
/// Bit of a slot's row field set when the id is exactly 8 bytes long (its word is its bytes).
const EXACT_EIGHT: u32 = 1 << 31;
/// The `row + 1` bits of a slot's row field (0: empty slot).
const ROW_BITS: u32 = EXACT_EIGHT - 1;
/// Set in the word of an id longer than 8 bytes: its top byte is then at least 8, which no
/// shorter id's top byte (its length, 0 to 7) is.
const LONG_WORD: u64 = 8 << 56;
/// Target load (slots used / slots): 13 / 20.
const LOAD_NUMERATOR: usize = 13;
const LOAD_DENOMINATOR: usize = 20;

/// One cache line of slots; used slots come first (nothing is ever removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Zeroable, bytemuck::Pod)]
#[repr(C, align(64))]
struct Bucket {
    words: [u64; BUCKET_SLOTS],
    /// `row + 1` (bits 0 to 30, 0: empty) and [`EXACT_EIGHT`].
    rows: [u32; BUCKET_SLOTS],
    _padding: u32,
}

impl Bucket {
    /// Whether every slot is used (lookups of keys not found here go on to the next bucket).
    #[inline(always)]
    fn is_full(&self) -> bool {
        self.rows[BUCKET_SLOTS - 1] != 0
    }

    /// The slots whose word is `word`, as bits 0 to 4 (used or not: an empty slot's word is
    /// 0).
    #[inline(always)]
    fn slots_with_word(&self, word: u64) -> u32 {
        let [first, second, third, fourth, fifth] = self.words;
        let first_four = u64x4::new([first, second, third, fourth]).simd_eq(u64x4::splat(word));
        first_four.to_bitmask() | (u32::from(fifth == word) << 4)
    }
}

const _: () = assert!(std::mem::size_of::<Bucket>() == 64);
/// A bucket's size in words of the index's storage.
const BUCKET_WORDS: usize = 8;

/// The per-index random keys of [`index_key`].
#[derive(Debug, Clone, Copy)]
struct HashKeys {
    /// XXH3's seed, for ids longer than 8 bytes.
    long_seed: u64,
    /// XORed into a short id's slot word before the first multiply.
    short_input: u64,
    /// The first multiplier (odd: never zero, whichever flag is XORed in).
    short_first: u64,
    /// XORed into the first product before the second multiply.
    short_middle: u64,
    /// The second multiplier (odd).
    short_second: u64,
}

impl HashKeys {
    /// Fresh random keys (SipHash of constants under a per-process random `RandomState`).
    fn random() -> HashKeys {
        let state = RandomState::new();
        let key = |salt: u64| state.hash_one(0x6672_6b5f_6964_7831_u64 ^ salt);
        HashKeys {
            long_seed: key(0),
            short_input: key(1),
            short_first: key(2) | 1,
            short_middle: key(3),
            short_second: key(4) | 1,
        }
    }
}

/// The low 64 bits of the 128-bit product `a * b` XORed with its high 64 bits.
#[inline(always)]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

/// The keyed hash of an id of at most 8 bytes, from its slot key (which determines the id:
/// see [`SlotKey::of`]): two keyed folded multiplies, as in foldhash and wyhash.
///
/// Keyed like XXH3 was for these ids, and more: XXH3's 4-to-8-byte hash is a fixed public
/// permutation of `id ^ key`, so the key only shifts which inputs collide, while here the
/// secret is also both multipliers, so how the hash changes with the id's bits depends on
/// keys an attacker never sees (the index's home bucket uses the top 32 bits, which every
/// bit of the id reaches through the high half of the first product). The keys are random
/// per index (per process), as XXH3's seed was.
#[inline(always)]
fn short_hash(keys: &HashKeys, key: SlotKey) -> u64 {
    let first = folded_multiply(
        key.word ^ keys.short_input,
        keys.short_first ^ u64::from(key.flag),
    );
    folded_multiply(first ^ keys.short_middle, keys.short_second)
}

/// The slot key of an id and its keyed hash: [`short_hash`] of the slot key for an id of at
/// most 8 bytes, XXH3 with the index's seed for a longer one (whose slot word is that hash).
#[inline(always)]
fn index_key(keys: &HashKeys, weak_hash: bool, bytes: &[u8]) -> (SlotKey, u64) {
    // The usual id length first: one load, no dispatch on the length.
    if let Ok(eight) = <[u8; 8]>::try_from(bytes) {
        let key = SlotKey {
            word: u64::from_le_bytes(eight),
            flag: EXACT_EIGHT,
        };
        (key, weaken(weak_hash, short_hash(keys, key)))
    } else if SlotKey::is_exact(bytes.len()) {
        let key = SlotKey::of(bytes, 0);
        (key, weaken(weak_hash, short_hash(keys, key)))
    } else {
        let hash = weaken(weak_hash, xxh3_64_with_seed(bytes, keys.long_seed));
        (SlotKey::of(bytes, hash), hash)
    }
}

/// `hash`, or in the tests' weak-hash mode only a few of its bits.
#[inline(always)]
fn weaken(weak_hash: bool, hash: u64) -> u64 {
    if cfg!(test) && weak_hash {
        // Tests only. Home bucket first or last (long overflow chains, the last one wrapping
        // around to the first bucket), and four fingerprints for all long ids.
        let top = if hash >> 63 == 1 {
            0xffff_ffff_u64 << 32
        } else {
            0
        };
        return top | (hash & 3);
    }
    hash
}

/// The home bucket of a hash among `buckets`: multiply-shift of its top 32 bits.
#[inline(always)]
fn home(hash: u64, buckets: usize) -> usize {
    (((hash >> 32) * buckets as u64) >> 32) as usize
}

/// The bucket after `position` among `buckets` (the last one wraps to the first).
#[inline(always)]
fn next(position: usize, buckets: usize) -> usize {
    if position + 1 == buckets {
        0
    } else {
        position + 1
    }
}

/// A key as the slots see it: its word and its [`EXACT_EIGHT`] flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SlotKey {
    word: u64,
    flag: u32,
}

impl SlotKey {
    /// The word and flag of `bytes`, whose keyed hash is `hash`.
    #[inline(always)]
    fn of(bytes: &[u8], hash: u64) -> SlotKey {
        let len = bytes.len();
        let word = match len {
            8 => {
                return SlotKey {
                    word: u64::from_le_bytes(word::<8>(bytes, 0)),
                    flag: EXACT_EIGHT,
                };
            }
            9.. => {
                return SlotKey {
                    word: hash | LONG_WORD,
                    flag: 0,
                };
            }
            // Two overlapping 4-byte loads cover the bytes; their overlap agrees.
            4..=7 => {
                let low = u64::from(u32::from_le_bytes(word::<4>(bytes, 0)));
                let high = u64::from(u32::from_le_bytes(word::<4>(bytes, len - 4)));
                low | (high << (8 * (len - 4)))
            }
            // Bytes 0, len / 2 and len - 1 cover lengths 1 to 3.
            1..=3 => {
                u64::from(bytes[0])
                    | (u64::from(bytes[len / 2]) << (8 * (len / 2)))
                    | (u64::from(bytes[len - 1]) << (8 * (len - 1)))
            }
            0 => 0,
        };
        SlotKey {
            word: word | ((len as u64) << 56),
            flag: 0,
        }
    }

    /// Whether a key of `len` bytes is confirmed by its word alone (at most 8 bytes long).
    #[inline(always)]
    fn is_exact(len: usize) -> bool {
        len <= 8
    }

    /// Whether this is the key of an id longer than 8 bytes (its word only a fingerprint).
    #[inline(always)]
    fn is_long(&self) -> bool {
        self.flag == 0 && self.word >= LONG_WORD
    }

    /// Whether a slot (word, row field) holds this key's word and flag (and is used).
    #[inline(always)]
    fn matches(&self, word: u64, row_field: u32) -> bool {
        // `row_field ^ flag` is in 1..=ROW_BITS exactly when the slot is used and its flag
        // is the key's.
        word == self.word && (row_field ^ self.flag).wrapping_sub(1) < ROW_BITS
    }
}

/// `N` bytes of `bytes` from `at` (zeros if out of range).
#[inline(always)]
fn word<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut word = [0u8; N];
    if let Some(part) = bytes.get(at..at + N) {
        word.copy_from_slice(part);
    }
    word
}

/// Size of a transparent huge page (x86-64, and the usual size elsewhere).
const HUGE_PAGE: usize = 2 << 20;

/// The memory of an index's buckets, zeroed (every slot empty) when allocated.
///
/// A large index lives on huge pages when the kernel grants them: an anonymous mapping whose
/// buckets start at a 2 MiB boundary, advised `MADV_HUGEPAGE` (Linux; the system's
/// transparent huge pages are often `madvise`-only). Lookups touch random buckets, one
/// 4 KiB page each, and the server's other data (the int8 rows, the HTTP/2 buffers, the
/// load generator on the same cores) evicts their TLB entries between requests, so with
/// 4 KiB pages most lookups also paid a page walk, which on a KVM guest (nested paging)
/// costs several dependent memory loads, and only a few walks run at once: the prefetches
/// issued ahead did not help then. One 2 MiB page covers the default table's 1.97 MB of
/// buckets (BENCHMARKS.md, section `lookup4`). Smaller indexes, or when the mapping fails,
/// use plain zeroed heap words: the allocator hands out a large zeroed block of 8-byte
/// alignment as fresh pages, zeroed only when first touched, while a 64-byte aligned one is
/// zeroed up front by `memset`, a pass of its own.
enum BucketStorage {
    /// Words from the allocator; the buckets start at their first 64-byte boundary.
    Heap(Vec<u64>),
    /// An anonymous mapping; the buckets start `offset` bytes in (a 2 MiB boundary).
    Mapped {
        map: memmap2::MmapMut,
        offset: usize,
    },
}

impl BucketStorage {
    /// Zeroed storage for `count` buckets.
    fn zeroed(count: usize) -> BucketStorage {
        let bytes = count * std::mem::size_of::<Bucket>();
        if bytes >= HUGE_PAGE / 2
            && let Some(mapped) = BucketStorage::mapped(bytes)
        {
            return mapped;
        }
        // One bucket more than needed, to start at a 64-byte boundary.
        BucketStorage::Heap(vec![0; (count + 1) * BUCKET_WORDS])
    }

    /// A zeroed anonymous mapping with room for `bytes` from a 2 MiB boundary on, advised
    /// to use huge pages (`None` if the mapping fails; the advice is only a hint).
    fn mapped(bytes: usize) -> Option<BucketStorage> {
        let len = bytes
            .div_ceil(HUGE_PAGE)
            .checked_add(1)?
            .checked_mul(HUGE_PAGE)?;
        let map = memmap2::MmapMut::map_anon(len).ok()?;
        let offset = map.as_ptr().align_offset(HUGE_PAGE);
        #[cfg(target_os = "linux")]
        {
            // Only a hint: without huge pages the index works the same, on 4 KiB pages.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        (offset < HUGE_PAGE).then_some(BucketStorage::Mapped { map, offset })
    }

    /// The storage's bytes from the buckets' start (64-byte aligned), at least as many as
    /// the buckets need.
    fn bytes(&self) -> &[u8] {
        match self {
            BucketStorage::Heap(words) => {
                let (_, buckets, _) = bytemuck::pod_align_to::<u64, Bucket>(words);
                bytemuck::cast_slice(buckets)
            }
            BucketStorage::Mapped { map, offset } => map.get(*offset..).unwrap_or_default(),
        }
    }

    /// [`BucketStorage::bytes`], writable.
    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            BucketStorage::Heap(words) => {
                let (_, buckets, _) = bytemuck::pod_align_to_mut::<u64, Bucket>(words);
                bytemuck::cast_slice_mut(buckets)
            }
            BucketStorage::Mapped { map, offset } => map.get_mut(*offset..).unwrap_or_default(),
        }
    }

    /// Bytes of memory used for `count` buckets: the heap words, or the mapping's pages
    /// that the buckets touch (in 4 KiB pages; the rest of the mapping is address space
    /// only, but for the end of a huge page, at most 2 MiB).
    fn used_bytes(&self, count: usize) -> usize {
        match self {
            BucketStorage::Heap(words) => std::mem::size_of_val(words.as_slice()),
            BucketStorage::Mapped { .. } => {
                (count * std::mem::size_of::<Bucket>()).next_multiple_of(4096)
            }
        }
    }
}

impl Clone for BucketStorage {
    /// Storage of the same kind and size holding the same buckets. (Not the derived clone of
    /// the heap words: the copy's 64-byte boundary may fall at another word, so the buckets
    /// are copied from boundary to boundary.)
    fn clone(&self) -> BucketStorage {
        let mut copy = match self {
            BucketStorage::Heap(words) => BucketStorage::Heap(vec![0; words.len()]),
            BucketStorage::Mapped { map, offset } => BucketStorage::mapped(map.len() - offset)
                .unwrap_or_else(|| {
                    BucketStorage::Heap(vec![0; (map.len() - offset) / 8 + BUCKET_WORDS])
                }),
        };
        let source = self.bytes();
        let target = copy.bytes_mut();
        let len = source.len().min(target.len());
        target[..len].copy_from_slice(&source[..len]);
        copy
    }
}

impl std::fmt::Debug for BucketStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            BucketStorage::Heap(_) => "heap",
            BucketStorage::Mapped { .. } => "mapped",
        };
        write!(f, "BucketStorage({kind}, {} bytes)", self.bytes().len())
    }
}

/// Hash-table of row indices keyed by item id bytes that live elsewhere.
#[derive(Debug, Clone)]
pub(crate) struct IdIndex {
    /// The buckets' memory (see [`BucketStorage`]).
    storage: BucketStorage,
    bucket_count: usize,
    keys: HashKeys,
    /// Tests only: keep just a few hash bits, to force shared buckets and fingerprints.
    #[cfg(test)]
    weak_hash: bool,
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

/// Largest number of ids: `row + 1` must fit the 31 row bits of a slot (and the bucket
/// count, fewer than 2^32, is addressed by the top 32 bits of the hash).
pub(crate) const MAX_IDS: usize = i32::MAX as usize;

/// Ids between the one being inserted by the build and the one whose bucket it requests.
const BUILD_PREFETCH_DISTANCE: usize = 16;
/// Keys per group of [`IdIndex::get_many`]'s pipeline: each stage works on a whole group, and
/// a group moves one stage on per step, so a key's bucket is requested one group's work
/// before it is read, and (for a key longer than 8 bytes) its id offset one group before its
/// bytes are requested, and those bytes one group before the comparison. Large enough to
/// cover a miss with the work of the other keys; small enough that the lines in flight stay
/// within the L1's miss buffers. Was 8 while a lookup took about 18 ns; once the branch-free
/// probe and the cheaper hash cut that to about 8 ns, 8 keys' work no longer covered a
/// bucket's miss (16: 8.3 to 6.6 us per 1000 ids on the default table; 32: no better; see
/// BENCHMARKS.md).
const LOOKUP_GROUP: usize = 16;
/// Groups in flight: one per stage.
const LOOKUP_STAGES: usize = 4;

/// What [`IdIndex::get_many`] hints to the caller's storage as keys go through its pipeline.
/// Hints must not change results (they only prefetch).
pub(crate) trait LookupHints {
    /// Row `row` is the likely match of a key longer than 8 bytes: start loading its id
    /// offset.
    fn offset(&self, row: usize);
    /// Start loading the id bytes of likely row `row` (its offset was hinted earlier).
    fn bytes(&self, row: usize);
    /// Row `row` is the likely (for a key of at most 8 bytes: the certain) match of a key:
    /// start loading whatever the caller will read of that row after the lookups (nothing
    /// by default).
    fn row(&self, row: usize) {
        let _ = row;
    }
}

/// A group of keys in the lookup pipeline.
#[derive(Clone, Copy)]
struct Group<'k> {
    len: usize,
    /// Whether any key is longer than 8 bytes (if not, stage 3 has nothing to do and stage 4
    /// only copies `likely` out).
    has_long_keys: bool,
    keys: [&'k [u8]; LOOKUP_GROUP],
    slot_keys: [SlotKey; LOOKUP_GROUP],
    homes: [usize; LOOKUP_GROUP],
    /// The first row whose slot holds the key's word and flag, else `usize::MAX`: the answer
    /// for a key of at most 8 bytes, a row to confirm for a longer one.
    likely: [usize; LOOKUP_GROUP],
}

impl Group<'_> {
    const EMPTY: Group<'static> = Group {
        len: 0,
        has_long_keys: false,
        keys: [&[]; LOOKUP_GROUP],
        slot_keys: [SlotKey { word: 0, flag: 0 }; LOOKUP_GROUP],
        homes: [0; LOOKUP_GROUP],
        likely: [usize::MAX; LOOKUP_GROUP],
    };
}

/// `a == b`, without a `memcmp` call for the short strings ids usually are: lengths of 4 to
/// 16 bytes compare as two overlapping fixed-size words.
#[inline(always)]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
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

/// A build entry (16 bytes): the id's slot word, and `(top 32 hash bits) << 32 | flag | row`
/// (the [`EXACT_EIGHT`] flag above the 31 row bits).
#[derive(Clone, Copy, bytemuck::Zeroable)]
struct Entry {
    word: u64,
    hash_flag_row: u64,
}

impl Entry {
    fn key(&self) -> SlotKey {
        SlotKey {
            word: self.word,
            flag: self.hash_flag_row as u32 & EXACT_EIGHT,
        }
    }

    fn row(&self) -> usize {
        (self.hash_flag_row as u32 & ROW_BITS) as usize
    }
}

impl IdIndex {
    /// Builds the index over `count` ids, where `id(row)` returns the bytes of row `row`.
    pub fn build<'a>(count: usize, id: impl Fn(usize) -> &'a [u8]) -> Result<IdIndex, BuildError> {
        Self::build_with(count, id, false)
    }

    fn build_with<'a>(
        count: usize,
        id: impl Fn(usize) -> &'a [u8],
        weak_hash: bool,
    ) -> Result<IdIndex, BuildError> {
        if count > MAX_IDS {
            return Err(BuildError::TooMany);
        }
        // Load at most 13 / 20 keeps overflows rare (about 7 % of ids live past their home
        // bucket); fewer than 2^32 buckets.
        let buckets = (count * LOAD_DENOMINATOR)
            .div_ceil(LOAD_NUMERATOR * BUCKET_SLOTS)
            .max(1);
        let mut index = IdIndex {
            storage: BucketStorage::zeroed(buckets),
            bucket_count: buckets,
            keys: HashKeys::random(),
            #[cfg(test)]
            weak_hash,
        };

        // Insert in row order, hashing each id (sequential reads) BUILD_PREFETCH_DISTANCE
        // rows ahead of its insert and requesting its home bucket then, so that the
        // buckets' cache misses overlap. Equal ids have equal hashes: the first copy of an id
        // is inserted and each later copy finds it, so the first duplicate found is the one
        // with the smallest later row, reported with the id's first row.
        let (bucket_count, keys) = (index.bucket_count, index.keys);
        let mut pending = [Entry {
            word: 0,
            hash_flag_row: 0,
        }; BUILD_PREFETCH_DISTANCE];
        let table: &mut [Bucket] =
            bytemuck::try_cast_slice_mut(index.storage.bytes_mut()).unwrap_or_default();
        let table = &mut table[..bucket_count];
        for row in 0..count + BUILD_PREFETCH_DISTANCE {
            let slot = row % BUILD_PREFETCH_DISTANCE;
            if row >= BUILD_PREFETCH_DISTANCE
                && let Err((first, second)) = Self::insert(table, &pending[slot], &id)
            {
                return Err(BuildError::Duplicate { first, second });
            }
            if row < count {
                let bytes = id(row);
                let (key, hash) = index_key(&keys, weak_hash, bytes);
                pending[slot] = Entry {
                    word: key.word,
                    hash_flag_row: (hash & !0xffff_ffff) | u64::from(key.flag) | row as u64,
                };
                crate::prefetch::element(table, home(hash, bucket_count));
            }
        }
        Ok(index)
    }

    /// Inserts an entry; on a duplicate id returns `(earlier row, row)`.
    fn insert<'a>(
        table: &mut [Bucket],
        entry: &Entry,
        id: &impl Fn(usize) -> &'a [u8],
    ) -> Result<(), (usize, usize)> {
        let row = entry.row();
        let key = entry.key();
        let mut position = home(entry.hash_flag_row, table.len());
        loop {
            let bucket = &mut table[position];
            for slot in 0..BUCKET_SLOTS {
                let row_field = bucket.rows[slot];
                if row_field == 0 {
                    bucket.words[slot] = key.word;
                    // `row < MAX_IDS`, so `row + 1` fits the 31 row bits.
                    bucket.rows[slot] = (row as u32 + 1) | key.flag;
                    return Ok(());
                }
                if key.matches(bucket.words[slot], row_field) {
                    let other = (row_field & ROW_BITS) as usize - 1;
                    // Equal words of ids of at most 8 bytes are equal ids; long ids are read
                    // only when their fingerprints agree.
                    if !key.is_long() || id(other) == id(row) {
                        return Err((other, row));
                    }
                }
            }
            position = next(position, table.len());
        }
    }

    /// The buckets: the 64-byte aligned part of `storage`.
    #[inline(always)]
    fn buckets(&self) -> &[Bucket] {
        let buckets: &[Bucket] = bytemuck::try_cast_slice(self.storage.bytes()).unwrap_or(&[]);
        buckets.get(..self.bucket_count).unwrap_or(&[])
    }

    #[inline(always)]
    fn key(&self, bytes: &[u8]) -> (SlotKey, u64) {
        #[cfg(test)]
        let weak_hash = self.weak_hash;
        #[cfg(not(test))]
        let weak_hash = false;
        index_key(&self.keys, weak_hash, bytes)
    }

    /// The first row from bucket `position` on whose slot holds `key` and that `accept`s
    /// (`None` once a bucket with an empty slot has none).
    #[inline(always)]
    fn probe(
        buckets: &[Bucket],
        mut position: usize,
        key: SlotKey,
        mut accept: impl FnMut(usize) -> bool,
    ) -> Option<usize> {
        loop {
            let bucket = buckets.get(position)?;
            // All 5 words compared at once (no branch per slot); the few slots whose word is
            // the key's are then checked for use and flag in slot order.
            let mut same_words = bucket.slots_with_word(key.word);
            while same_words != 0 {
                let slot = same_words.trailing_zeros() as usize;
                same_words &= same_words - 1;
                let row_field = bucket.rows.get(slot).copied().unwrap_or(0);
                if key.matches(key.word, row_field) {
                    let row = (row_field & ROW_BITS) as usize - 1;
                    if accept(row) {
                        return Some(row);
                    }
                }
            }
            if !bucket.is_full() {
                return None;
            }
            position = next(position, buckets.len());
        }
    }

    /// The row whose id is `key`, where `id(row)` returns the bytes of row `row` (the same
    /// ids the index was built over).
    pub fn get<'a>(&self, key: &[u8], id: impl Fn(usize) -> &'a [u8]) -> Option<u32> {
        let (slot_key, hash) = self.key(key);
        let buckets = self.buckets();
        let home = home(hash, buckets.len());
        Self::exact_probe(buckets, key, home, slot_key, &id)
    }

    /// The probe of [`IdIndex::get`] for a key whose home bucket and slot key are known.
    #[inline(always)]
    fn exact_probe<'a>(
        buckets: &[Bucket],
        key: &[u8],
        home: usize,
        slot_key: SlotKey,
        id: &impl Fn(usize) -> &'a [u8],
    ) -> Option<u32> {
        let row = if SlotKey::is_exact(key.len()) {
            Self::probe(buckets, home, slot_key, |_| true)
        } else {
            Self::probe(buckets, home, slot_key, |row| same_bytes(id(row), key))
        };
        row.and_then(|row| u32::try_from(row).ok())
    }

    /// The rows of many keys at once, appended to `out` in key order (`None`: absent).
    ///
    /// Same answers as [`IdIndex::get`] per key. A key of at most 8 bytes costs one cache
    /// miss (its bucket), a longer one up to three dependent ones (the bucket, then the id's
    /// offset, then its bytes), so the keys go through a software pipeline in groups of
    /// [`LOOKUP_GROUP`]: while group `g` is answered, group `g + 1` has the id bytes of its
    /// long keys requested, group `g + 2` its buckets read (which answers its short keys) and
    /// its long keys' id offsets requested, and group `g + 3` is hashed and its buckets
    /// requested. Each miss thus has a group's work to arrive, and no step waits for all of a
    /// group's misses. `hints` prefetches the caller's id storage and, through
    /// [`LookupHints::row`], whatever the caller reads of a found row next (hinted as soon as
    /// the bucket names the likely row). See BENCHMARKS.md for the effect on the
    /// 1000-candidate Rank path.
    pub fn get_many<'a, 'k>(
        &self,
        keys: impl IntoIterator<Item = &'k [u8]>,
        id: impl Fn(usize) -> &'a [u8],
        hints: &impl LookupHints,
        out: &mut Vec<Option<u32>>,
    ) {
        let buckets = self.buckets();
        let mut keys = keys.into_iter().fuse();
        out.reserve(keys.size_hint().0);
        let mut groups = [Group::EMPTY; LOOKUP_STAGES];
        let mut empty_fills = 0;
        for step in 0usize.. {
            // Stage 1, group `step`: hash its keys, request their home buckets.
            let group = &mut groups[step % LOOKUP_STAGES];
            let (mut len, mut has_long_keys) = (0, false);
            let slots = group
                .keys
                .iter_mut()
                .zip(&mut group.slot_keys)
                .zip(&mut group.homes);
            for (((stored_key, stored_slot_key), stored_home), key) in slots.zip(keys.by_ref()) {
                has_long_keys |= !SlotKey::is_exact(key.len());
                let (slot_key, hash) = self.key(key);
                let home = home(hash, buckets.len());
                crate::prefetch::element(buckets, home);
                *stored_key = key;
                *stored_slot_key = slot_key;
                *stored_home = home;
                len += 1;
            }
            (group.len, group.has_long_keys) = (len, has_long_keys);
            if group.len == 0 {
                empty_fills += 1;
            }
            // Stage 2, group `step - 1`: the first slot with the key's word names its row (a
            // key of at most 8 bytes is answered now); request the row, and a long key's id
            // offset.
            let group = &mut groups[(step + LOOKUP_STAGES - 1) % LOOKUP_STAGES];
            let len = group.len.min(LOOKUP_GROUP);
            let slots = group.homes[..len]
                .iter()
                .zip(&group.slot_keys)
                .zip(&mut group.likely);
            for ((&home, &slot_key), stored_likely) in slots {
                let likely = Self::probe(buckets, home, slot_key, |_| true);
                *stored_likely = likely.unwrap_or(usize::MAX);
                if let Some(row) = likely {
                    if slot_key.is_long() {
                        hints.offset(row);
                    }
                    hints.row(row);
                }
            }
            // Stage 3, group `step - 2`: request the long keys' likely id bytes.
            let group = &groups[(step + LOOKUP_STAGES - 2) % LOOKUP_STAGES];
            let long_keys = if group.has_long_keys { group.len } else { 0 };
            for (key, &likely) in group.keys[..long_keys].iter().zip(&group.likely) {
                if likely != usize::MAX && !SlotKey::is_exact(key.len()) {
                    hints.bytes(likely);
                }
            }
            // Stage 4, group `step - 3`: the answers; long keys are confirmed byte for byte,
            // now mostly from cache.
            let group = &groups[(step + LOOKUP_STAGES - 3) % LOOKUP_STAGES];
            if !group.has_long_keys {
                // Every key's answer is its likely row (`usize::MAX`, absent, maps to `None`).
                let likely = group.likely.get(..group.len).unwrap_or_default();
                out.extend(likely.iter().map(|&row| u32::try_from(row).ok()));
            }
            let long_keys = if group.has_long_keys { group.len } else { 0 };
            for key in 0..long_keys {
                let bytes = group.keys[key];
                let likely = group.likely[key];
                let row = if likely == usize::MAX {
                    // No slot holds the key's word: absent, whatever its length.
                    None
                } else if SlotKey::is_exact(bytes.len()) || same_bytes(id(likely), bytes) {
                    u32::try_from(likely).ok()
                } else {
                    // A long key whose fingerprint matched another id: the full probe.
                    Self::exact_probe(buckets, bytes, group.homes[key], group.slot_keys[key], &id)
                };
                out.push(row);
            }
            // The keys ran out: the three groups before the first empty one are done now.
            if empty_fills == LOOKUP_STAGES - 1 {
                return;
            }
        }
    }

    /// [`IdIndex::get_many`] over keys held as spans of one buffer (key `i` is
    /// `buffer[spans[i].0..spans[i].1]`, and empty if that range is not in `buffer`, as
    /// `buffer.get(..).unwrap_or_default()` gives): the same answers, appended to `out` in
    /// key order. The spans may be in any order, overlap or leave gaps (the engine's
    /// candidate ids are spans of the request body, between protobuf field keys).
    ///
    /// Keys of at most 8 bytes (every id of the default catalog) take a shorter pipeline of
    /// two stages, without the iterator and per-stage bookkeeping of [`IdIndex::get_many`]:
    /// a group of [`LOOKUP_GROUP`] keys is read, hashed and has its home buckets requested
    /// while the previous group's buckets are read, which answers them (no id bytes to
    /// confirm). A group whose keys are all exactly 8 bytes long and in the buffer (T1's) is
    /// recognized from its spans in one branch-free pass; each key is then one 8-byte load,
    /// so no length is tested per key (about 70 instructions per id in all, against 107
    /// through [`IdIndex::get_many`]'s iterator: see BENCHMARKS.md, section `lookup3`). At the
    /// first group holding a longer key, the keys from that group on go through
    /// [`IdIndex::get_many`], whose deeper pipeline hides the id offset and id bytes misses
    /// that confirming a long key costs.
    pub fn get_many_spans<'a>(
        &self,
        buffer: &[u8],
        spans: &[(usize, usize)],
        id: impl Fn(usize) -> &'a [u8],
        hints: &impl LookupHints,
        out: &mut Vec<Option<u32>>,
    ) {
        let buckets = self.buckets();
        out.reserve(spans.len());
        let keys = self.keys;
        #[cfg(test)]
        let weak_hash = self.weak_hash;
        #[cfg(not(test))]
        let weak_hash = false;
        // Group `g % 2` is hashed while group `(g + 1) % 2` (the one before) is answered.
        let mut slot_keys = [[SlotKey { word: 0, flag: 0 }; LOOKUP_GROUP]; 2];
        let mut homes = [[0_usize; LOOKUP_GROUP]; 2];
        let mut pending = 0;
        for (group, group_spans) in spans.chunks(LOOKUP_GROUP).enumerate() {
            let (group_keys, group_homes) = (&mut slot_keys[group % 2], &mut homes[group % 2]);
            let mut has_long_keys = false;
            if Self::all_eight_bytes(buffer.len(), group_spans) {
                // Straight line: one load, the hash and the home bucket's request per id.
                for ((&(start, _), stored_key), stored_home) in group_spans
                    .iter()
                    .zip(group_keys.iter_mut())
                    .zip(group_homes.iter_mut())
                {
                    let word = buffer
                        .get(start..)
                        .and_then(|rest| rest.first_chunk::<8>())
                        .copied()
                        .unwrap_or_default();
                    let slot_key = SlotKey {
                        word: u64::from_le_bytes(word),
                        flag: EXACT_EIGHT,
                    };
                    let home = home(
                        weaken(weak_hash, short_hash(&keys, slot_key)),
                        buckets.len(),
                    );
                    crate::prefetch::element(buckets, home);
                    *stored_key = slot_key;
                    *stored_home = home;
                }
            } else {
                for ((&(start, end), stored_key), stored_home) in group_spans
                    .iter()
                    .zip(group_keys.iter_mut())
                    .zip(group_homes.iter_mut())
                {
                    let key = buffer.get(start..end).unwrap_or_default();
                    if !SlotKey::is_exact(key.len()) {
                        has_long_keys = true;
                        break;
                    }
                    let (slot_key, hash) = self.key(key);
                    let home = home(hash, buckets.len());
                    crate::prefetch::element(buckets, home);
                    *stored_key = slot_key;
                    *stored_home = home;
                }
            }
            let previous = (group + 1) % 2;
            Self::answer_short(
                buckets,
                &slot_keys[previous][..pending],
                &homes[previous],
                hints,
                out,
            );
            if has_long_keys {
                // This group and the rest through the general pipeline.
                let rest = spans.get(group * LOOKUP_GROUP..).unwrap_or_default();
                let keys = rest
                    .iter()
                    .map(|&(start, end)| buffer.get(start..end).unwrap_or_default());
                return self.get_many(keys, id, hints, out);
            }
            pending = group_spans.len();
        }
        let last = (spans.len().div_ceil(LOOKUP_GROUP) + 1) % 2;
        Self::answer_short(
            buckets,
            &slot_keys[last][..pending],
            &homes[last],
            hints,
            out,
        );
    }

    /// Whether every span is exactly 8 bytes long and inside a buffer of `buffer_len`
    /// bytes, tested without a branch per span.
    #[inline(always)]
    fn all_eight_bytes(buffer_len: usize, spans: &[(usize, usize)]) -> bool {
        let (differences, outside) =
            spans
                .iter()
                .fold((0, false), |(differences, outside), &(start, end)| {
                    (
                        differences | (end.wrapping_sub(start) ^ 8),
                        outside | (end > buffer_len),
                    )
                });
        differences == 0 && !outside
    }

    /// Appends the rows of keys of at most 8 bytes, whose home buckets were requested.
    #[inline(always)]
    fn answer_short(
        buckets: &[Bucket],
        slot_keys: &[SlotKey],
        homes: &[usize; LOOKUP_GROUP],
        hints: &impl LookupHints,
        out: &mut Vec<Option<u32>>,
    ) {
        // Zipped slices: `extend` writes the answers without a capacity check per key.
        out.extend(slot_keys.iter().zip(homes).map(|(&slot_key, &home)| {
            let row = Self::short_probe(buckets, home, slot_key);
            if let Some(row) = row {
                hints.row(row as usize);
            }
            row
        }));
    }

    /// [`IdIndex::probe`] for a key of at most 8 bytes (its first slot with the key's word
    /// and flag is the answer), as the row's `u32`.
    #[inline(always)]
    fn short_probe(buckets: &[Bucket], position: usize, key: SlotKey) -> Option<u32> {
        Self::probe(buckets, position, key, |_| true).map(|row| row as u32)
    }

    /// Heap bytes used by the index.
    pub fn heap_bytes(&self) -> usize {
        self.storage.used_bytes(self.bucket_count)
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

    /// Ids of 0 to 20 bytes that often share their first 8 bytes (or a prefix of them), with
    /// zero and non-ASCII bytes.
    fn tricky_id() -> impl Strategy<Value = Vec<u8>> {
        const PREFIXES: [&[u8; 8]; 4] =
            [b"i0000123", b"i0000124", b"\xff\x00\xc3\xa9abcd", &[0; 8]];
        (
            0..PREFIXES.len(),
            0..=8_usize,
            prop::collection::vec(prop_oneof![Just(0_u8), Just(b'1'), Just(0xff)], 0..=12),
        )
            .prop_map(|(prefix, cut, suffix)| {
                let mut id = PREFIXES[prefix][..cut].to_vec();
                id.extend(suffix);
                id
            })
    }

    /// `ids` with duplicates dropped (first copy kept), and probes: every id, the given
    /// extra keys, and each id with its last byte changed, dropped, or a byte appended.
    fn ids_and_probes(ids: Vec<Vec<u8>>, extra: Vec<Vec<u8>>) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let mut seen = std::collections::HashSet::new();
        let ids: Vec<Vec<u8>> = ids
            .into_iter()
            .filter(|id| seen.insert(id.clone()))
            .collect();
        let mut probes = extra;
        for id in &ids {
            probes.push(id.clone());
            let mut longer = id.clone();
            longer.push(0);
            probes.push(longer);
            if let Some((&last, rest)) = id.split_last() {
                probes.push(rest.to_vec());
                let mut changed = rest.to_vec();
                changed.push(last ^ 1);
                probes.push(changed);
            }
        }
        (ids, probes)
    }

    fn check_against_oracle(
        ids: &[Vec<u8>],
        probes: &[Vec<u8>],
        weak_hash: bool,
    ) -> Result<(), TestCaseError> {
        let index = IdIndex::build_with(ids.len(), |row| ids[row].as_slice(), weak_hash)
            .map_err(|error| TestCaseError::fail(format!("{error:?}")))?;
        let id = |row: usize| ids[row].as_slice();
        let mut found = Vec::new();
        index.get_many(probes.iter().map(Vec::as_slice), id, &NoHints, &mut found);
        prop_assert_eq!(found.len(), probes.len());
        for (probe, row) in probes.iter().zip(&found) {
            let expected = ids.iter().position(|id| id == probe).map(|row| row as u32);
            prop_assert_eq!(*row, expected, "get_many {:?}", probe);
            prop_assert_eq!(index.get(probe, id), expected, "get {:?}", probe);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn ids_of_any_length_sharing_prefixes_answer_like_the_oracle(
            ids in prop::collection::vec(tricky_id(), 0..150),
            extra in prop::collection::vec(tricky_id(), 0..60),
        ) {
            let (ids, probes) = ids_and_probes(ids, extra);
            check_against_oracle(&ids, &probes, false)?;
        }

        #[test]
        fn colliding_hashes_still_answer_like_the_oracle(
            // A hash of 3 bits: every id shares a home bucket (and overflow chain) with many
            // others, and long ids share fingerprints, so long keys are confirmed against the
            // wrong rows first and absent keys meet slots of every kind.
            ids in prop::collection::vec(tricky_id(), 0..150),
            extra in prop::collection::vec(tricky_id(), 0..60),
        ) {
            let (ids, probes) = ids_and_probes(ids, extra);
            check_against_oracle(&ids, &probes, true)?;
        }

        #[test]
        fn reports_first_duplicate_of_any_length_in_row_order(
            ids in prop::collection::vec(tricky_id(), 1..80),
            weak_hash in any::<bool>(),
        ) {
            let expected = (0..ids.len()).find_map(|second| {
                (0..second).find(|&first| ids[first] == ids[second]).map(|first| BuildError::Duplicate { first, second })
            });
            let found = IdIndex::build_with(ids.len(), |row| ids[row].as_slice(), weak_hash).err();
            prop_assert_eq!(found, expected);
        }
    }

    /// `keys` as spans of one buffer, each after a gap of `gap` bytes (`#`), as candidate
    /// ids sit between field keys in a request body.
    fn spanned(keys: &[Vec<u8>], gap: usize) -> (Vec<u8>, Vec<(usize, usize)>) {
        let mut buffer = Vec::new();
        let spans = keys
            .iter()
            .map(|key| {
                buffer.extend(std::iter::repeat_n(b'#', gap));
                let start = buffer.len();
                buffer.extend_from_slice(key);
                (start, buffer.len())
            })
            .collect();
        (buffer, spans)
    }

    /// `get_many_spans` over `buffer` and `spans` answers, appended after what `out` held,
    /// what a `HashMap` of `ids` answers for each key (an empty key where a span is not a
    /// range of `buffer`).
    fn check_spans_against_oracle(
        index: &IdIndex,
        ids: &[Vec<u8>],
        buffer: &[u8],
        spans: &[(usize, usize)],
    ) -> Result<(), TestCaseError> {
        let oracle: std::collections::HashMap<&[u8], u32> = ids
            .iter()
            .enumerate()
            .map(|(row, id)| (id.as_slice(), row as u32))
            .collect();
        let expected: Vec<Option<u32>> = spans
            .iter()
            .map(|&(start, end)| {
                oracle
                    .get(buffer.get(start..end).unwrap_or_default())
                    .copied()
            })
            .collect();
        let mut found = vec![Some(u32::MAX)];
        index.get_many_spans(
            buffer,
            spans,
            |row| ids[row].as_slice(),
            &NoHints,
            &mut found,
        );
        prop_assert_eq!(found[0], Some(u32::MAX), "appends to `out`");
        prop_assert_eq!(&found[1..], expected.as_slice());
        Ok(())
    }

    proptest! {
        #[test]
        fn span_lookups_answer_like_the_oracle(
            ids in prop::collection::vec(tricky_id(), 0..150),
            extra in prop::collection::vec(tricky_id(), 0..60),
            // Keys of any length (from the first group holding a long one, the general
            // pipeline), of at most 8 bytes (the short pipeline throughout), or of exactly 8
            // (its straight-line groups, but where a moved span breaks one).
            lengths in 0..3_u8,
            count in 0..120_usize,
            stride in 1..40_usize,
            gap in 0..3_usize,
            weak_hash in any::<bool>(),
            // One span moved anywhere: reversed, past the buffer, 8 bytes long but out of
            // it, or inside other keys.
            moved_span in prop::option::of((any::<prop::sample::Index>(), 0..400_usize, 0..12_usize)),
        ) {
            let (ids, mut probes) = ids_and_probes(ids, extra);
            match lengths {
                1 => probes.retain(|probe| probe.len() <= 8),
                2 => probes.retain(|probe| probe.len() == 8),
                _ => {}
            }
            let keys: Vec<Vec<u8>> = if probes.is_empty() {
                Vec::new()
            } else {
                (0..count).map(|at| probes[(at * stride) % probes.len()].clone()).collect()
            };
            let (buffer, mut spans) = spanned(&keys, gap);
            if let Some((which, start, len)) = moved_span
                && !spans.is_empty()
            {
                // `len` 9 to 11 reverses the span.
                let end = if len > 8 { start.saturating_sub(len - 8) } else { start + len };
                *which.get_mut(&mut spans) = (start, end);
            }
            let index = IdIndex::build_with(ids.len(), |row| ids[row].as_slice(), weak_hash)
                .map_err(|error| TestCaseError::fail(format!("{error:?}")))?;
            check_spans_against_oracle(&index, &ids, &buffer, &spans)?;
        }
    }

    #[test]
    fn span_lookups_of_t1_ids_with_another_key_anywhere() {
        // T1-shaped ids (8 bytes, present or absent, some with high bytes): lists of every
        // length around the groups' boundaries, all of 8 bytes (the straight-line groups),
        // then with one key of another length (long, short, empty; present or absent) at
        // every position, which sends its group to the short or the general pipeline.
        let mut ids: Vec<Vec<u8>> = (0..2000)
            .map(|row| format!("i{row:07}").into_bytes())
            .collect();
        ids.extend([
            b"i0000001-long".to_vec(),
            b"i000001".to_vec(),
            b"\xff\xfe\x80".to_vec(),
            b"\xff\xfe\x80\x00\xc3\xa9\xff\x01".to_vec(),
        ]);
        let pool: Vec<Vec<u8>> = (0..70)
            .map(|at| match at % 7 {
                // Absent: one byte off, a high byte.
                3 => format!("i{:07}", 5000 + at).into_bytes(),
                5 => b"\xff\xfe\x80\x00\xc3\xa9\xff\x02".to_vec(),
                6 => b"\xff\xfe\x80\x00\xc3\xa9\xff\x01".to_vec(),
                _ => format!("i{:07}", (at * 131) % 2000).into_bytes(),
            })
            .collect();
        let others: [&[u8]; 7] = [
            b"i0000001-long",
            b"i0000001-lonG",
            b"i000001",
            b"i000002",
            b"\xff\xfe\x80",
            b"",
            b"i00000010",
        ];
        for weak_hash in [false, true] {
            let index = IdIndex::build_with(ids.len(), |row| ids[row].as_slice(), weak_hash)
                .unwrap_or_else(|error| panic!("{error:?}"));
            for len in 0..=pool.len() {
                let keys = &pool[..len];
                let (buffer, spans) = spanned(keys, len % 3);
                check_spans_against_oracle(&index, &ids, &buffer, &spans)
                    .unwrap_or_else(|error| panic!("{error}: length {len}"));
                for at in 0..len {
                    for other in others {
                        let mut keys = keys.to_vec();
                        keys[at] = other.to_vec();
                        let (buffer, spans) = spanned(&keys, at % 3);
                        check_spans_against_oracle(&index, &ids, &buffer, &spans)
                            .unwrap_or_else(|error| panic!("{error}: length {len}, at {at}"));
                    }
                }
            }
        }
    }

    #[test]
    fn slot_keys_of_short_ids_are_equal_only_for_equal_ids() {
        // Every id of up to 8 bytes over a few byte values (including zero and 0xff), and
        // ids longer than 8 bytes, whose words must differ from every short id's.
        let alphabet = [0_u8, 7, 8, b'a', 0xff];
        let mut short: Vec<Vec<u8>> = vec![Vec::new()];
        let mut frontier: Vec<Vec<u8>> = vec![Vec::new()];
        for len in 1..=8 {
            frontier = frontier
                .iter()
                .flat_map(|id| {
                    alphabet.iter().map(move |&byte| {
                        let mut longer = id.clone();
                        longer.push(byte);
                        longer
                    })
                })
                .filter(|id| len <= 4 || id[..len - 1].iter().all(|&b| b == id[0]))
                .collect();
            short.extend(frontier.iter().cloned());
        }
        let keys: std::collections::HashMap<SlotKey, &Vec<u8>> = short
            .iter()
            .map(|id| (SlotKey::of(id, 0x1234_5678_9abc_def0), id))
            .collect();
        assert_eq!(keys.len(), short.len(), "two short ids share a slot key");
        assert!(keys.keys().all(|key| !key.is_long()));
        for long in [vec![0_u8; 9], vec![0xff; 9], vec![b'a'; 20]] {
            for hash in [0, u64::MAX, 7 << 56, 0x1234_5678_9abc_def0] {
                let key = SlotKey::of(&long, hash);
                assert!(
                    !keys.contains_key(&key),
                    "{long:?} shares a short id's slot key"
                );
                assert!(key.is_long());
            }
        }
    }

    #[test]
    fn index_memory_is_about_twenty_bytes_per_id() {
        let ids: Vec<String> = (0..100_000).map(|row| format!("i{row:07}")).collect();
        let index = IdIndex::build(ids.len(), |row| ids[row].as_bytes())
            .unwrap_or_else(|error| panic!("{error:?}"));
        let per_id = index.heap_bytes() as f64 / ids.len() as f64;
        assert!((19.0..20.0).contains(&per_id), "{per_id} bytes per id");
        // A clone's storage starts elsewhere: its buckets are found at its own boundary.
        let clone = index.clone();
        assert_eq!(clone.buckets(), index.buckets());
        assert_eq!(index.buckets().len(), index.bucket_count);
        for (row, id) in ids.iter().enumerate().step_by(997) {
            assert_eq!(
                clone.get(id.as_bytes(), |r| ids[r].as_bytes()),
                Some(row as u32)
            );
            assert_eq!(
                index.get(id.as_bytes(), |r| ids[r].as_bytes()),
                Some(row as u32)
            );
        }
    }

    proptest! {
        #[test]
        fn slots_with_word_match_a_slot_by_slot_comparison(
            words in prop::array::uniform5(prop_oneof![Just(0_u64), Just(7), any::<u64>()]),
            pick in 0..7_usize,
            other in any::<u64>(),
        ) {
            let bucket = Bucket { words, rows: [1; BUCKET_SLOTS], _padding: 0 };
            // A word of the bucket (several slots may hold it), 0, or (likely) none.
            let word = words.get(pick).copied().unwrap_or(if pick == 5 { 0 } else { other });
            let expected = (0..BUCKET_SLOTS)
                .filter(|&slot| words[slot] == word)
                .fold(0_u32, |slots, slot| slots | 1 << slot);
            prop_assert_eq!(bucket.slots_with_word(word), expected);
        }

        #[test]
        fn eight_byte_fast_path_keys_ids_like_the_general_one(
            id in prop::collection::vec(any::<u8>(), 0..=12),
        ) {
            // `index_key` takes a shortcut for 8-byte ids: same slot key and hash as the
            // general encoding of any id of at most 8 bytes.
            let keys = HashKeys::random();
            let (key, hash) = index_key(&keys, false, &id);
            let general = SlotKey::of(&id, hash);
            prop_assert_eq!(key, general);
            if SlotKey::is_exact(id.len()) {
                prop_assert_eq!(hash, short_hash(&keys, general));
            } else {
                prop_assert_eq!(hash, xxh3_64_with_seed(&id, keys.long_seed));
            }
        }

        #[test]
        fn short_hash_depends_on_the_keys_and_tells_flags_apart(word in any::<u64>()) {
            let keys = HashKeys::random();
            let other = HashKeys::random();
            let exact = SlotKey { word, flag: EXACT_EIGHT };
            let short = SlotKey { word, flag: 0 };
            // Equal keys hash equally; other random keys (or the other flag) give another
            // hash but for a 2^-64 chance.
            prop_assert_eq!(short_hash(&keys, exact), short_hash(&keys, exact));
            prop_assert_ne!(short_hash(&keys, exact), short_hash(&other, exact));
            prop_assert_ne!(short_hash(&keys, exact), short_hash(&keys, short));
        }
    }

    #[test]
    fn equal_words_of_different_flags_or_empty_slots_are_skipped() {
        // Slot words shared across flags: the empty id and 8 zero bytes (word 0, also the
        // word of every empty slot), "a" and the 8 bytes of its word, "ab\0" and "ab" (no
        // shared word: a length byte tells them apart). With the weak hash many of them share
        // a bucket, so a probe meets the same word in slots it must skip before the right one.
        let mut ids: Vec<Vec<u8>> = vec![
            Vec::new(),
            vec![0; 8],
            b"a".to_vec(),
            (0x61_u64 | 1 << 56).to_le_bytes().to_vec(),
            b"ab\0".to_vec(),
            b"ab".to_vec(),
        ];
        let absent: Vec<Vec<u8>> =
            vec![vec![0; 7], vec![0; 9], (2_u64 << 56).to_le_bytes().to_vec()];
        let probes: Vec<Vec<u8>> = ids.iter().chain(&absent).cloned().collect();
        for weak_hash in [false, true] {
            // Every prefix of every rotation: each id indexed alone, with some of the others
            // before it (in earlier slots) and absent.
            for _ in 0..ids.len() {
                ids.rotate_left(1);
                for count in 0..=ids.len() {
                    check_against_oracle(&ids[..count], &probes, weak_hash)
                        .unwrap_or_else(|error| panic!("{error}: {:?}", &ids[..count]));
                }
            }
        }
    }

    #[test]
    fn short_ids_spread_over_their_home_buckets() {
        // The T1 ids: about 7 % of them live past their home bucket at a load of 0.65 with a
        // uniform hash; a hash that kept low-entropy bits would put many more there.
        let ids: Vec<String> = (0..100_000).map(|row| format!("i{row:07}")).collect();
        let index = IdIndex::build(ids.len(), |row| ids[row].as_bytes())
            .unwrap_or_else(|error| panic!("{error:?}"));
        let buckets = index.buckets();
        let displaced = ids
            .iter()
            .enumerate()
            .filter(|(row, id)| {
                let (key, hash) = index.key(id.as_bytes());
                let home = &buckets[home(hash, buckets.len())];
                !(0..BUCKET_SLOTS).any(|slot| {
                    key.matches(home.words[slot], home.rows[slot])
                        && (home.rows[slot] & ROW_BITS) as usize == row + 1
                })
            })
            .count();
        assert!(
            displaced < ids.len() / 10,
            "{displaced} ids past their home bucket"
        );
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
    fn bucket_storage_is_zeroed_aligned_and_cloned_whole() {
        // Below half a huge page: heap words; from it on: a mapping (where it works) whose
        // buckets start at a 2 MiB boundary. Both zeroed, both 64-byte aligned, both with
        // room for every bucket, and a clone holds the same bytes at its own address.
        for count in [0, 1, 100, HUGE_PAGE / 128 - 1, HUGE_PAGE / 128, 40_000] {
            let mut storage = BucketStorage::zeroed(count);
            let need = count * std::mem::size_of::<Bucket>();
            let bytes = storage.bytes();
            assert!(
                bytes.len() >= need,
                "{count} buckets: {} bytes",
                bytes.len()
            );
            assert!(bytes.iter().all(|&byte| byte == 0));
            assert_eq!(bytes.as_ptr().align_offset(64), 0);
            let mapped = matches!(storage, BucketStorage::Mapped { .. });
            if cfg!(unix) {
                assert_eq!(mapped, need >= HUGE_PAGE / 2, "{count} buckets");
            }
            if mapped {
                assert_eq!(bytes.as_ptr().align_offset(HUGE_PAGE), 0);
            }
            assert!(storage.used_bytes(count) >= need);
            let writable = storage.bytes_mut();
            for (at, byte) in writable.iter_mut().take(need).enumerate().step_by(61) {
                *byte = at as u8 | 1;
            }
            let clone = storage.clone();
            assert_ne!(clone.bytes().as_ptr(), storage.bytes().as_ptr());
            assert_eq!(&clone.bytes()[..need], &storage.bytes()[..need]);
            assert_eq!(
                matches!(clone, BucketStorage::Mapped { .. }),
                mapped,
                "{count} buckets"
            );
        }
    }

    #[test]
    fn span_lookups_on_a_mapped_index_at_group_boundaries() {
        // The default table's shape (100 000 ids of 8 bytes: the index's buckets in a mapping
        // of their own), lists of 0, 1, 15, 16, 17, 31, 32, 33 and 1000 ids with an unknown
        // id, a repeated id or an id of another length at the first, last and group-boundary
        // positions, against a HashMap oracle.
        let ids: Vec<Vec<u8>> = (0..100_000)
            .map(|row| format!("i{row:07}").into_bytes())
            .collect();
        let index = IdIndex::build(ids.len(), |row| ids[row].as_slice())
            .unwrap_or_else(|error| panic!("{error:?}"));
        if cfg!(unix) {
            assert!(matches!(index.storage, BucketStorage::Mapped { .. }));
        }
        let others: [&[u8]; 4] = [b"i9999999", b"i0000003", b"i000000", b"i00000031"];
        for len in [0, 1, 15, 16, 17, 31, 32, 33, 1000] {
            let keys: Vec<Vec<u8>> = (0..len)
                .map(|at| ids[(at * 7919) % ids.len()].clone())
                .collect();
            let (buffer, spans) = spanned(&keys, 2);
            check_spans_against_oracle(&index, &ids, &buffer, &spans)
                .unwrap_or_else(|error| panic!("{error}: length {len}"));
            let positions = [0, 14, 15, 16, 17, 31, 32, len.saturating_sub(1)];
            for at in positions.into_iter().filter(|&at| at < len) {
                for other in others {
                    let mut keys = keys.clone();
                    keys[at] = other.to_vec();
                    let (buffer, spans) = spanned(&keys, at % 3);
                    check_spans_against_oracle(&index, &ids, &buffer, &spans)
                        .unwrap_or_else(|error| panic!("{error}: length {len}, at {at}"));
                }
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
