//! The idempotency store: recent Rank answers by request id, so a retry with the same id and
//! the same content gets the first answer again (`replayed = true`).
//!
//! Bounds: an answer stays replayable for `window` after it was stored, at most
//! `max_entries` answers and `max_bytes` encoded bytes are kept (the oldest go first), and an
//! answer larger than `max_bytes` is not kept. Errors are never stored: a retry of a failed
//! request runs again. While the first attempt runs, a retry gets `ABORTED`
//! (`ERROR_REASON_REQUEST_IN_PROGRESS`); the same id with different content gets
//! `FAILED_PRECONDITION` (`ERROR_REASON_REQUEST_ID_REUSED`), whether running or stored.
//!
//! Answers are kept encoded ([`super::answer::WireRankResponse`]: one buffer, shared with the
//! response that was sent, without its timings, which a replay replaces anyway), so storing
//! one copies nothing and dropping one frees one buffer.
//!
//! # The content digest
//!
//! Content is compared by a 128-bit digest of the request's content: XXH3-128 under a
//! 192-byte secret drawn per process from the operating system's randomness (through
//! `rand`'s thread generator). The digest is taken over an unambiguous serialization of the
//! request (the length of its protobuf encoding without the candidate ids, that encoding,
//! then each id's protobuf entry), only when the store will use it (a non-empty request id,
//! store on). The ids' entries are mostly hashed where the request's body holds them
//! ([`IdEntries`]: a T1 request's 1000 entries are one run of its body), so the ids are
//! neither copied nor re-encoded for the digest.
//!
//! Why a fast keyed hash is enough here, rather than a PRF (SipHash-1-3-128 until branch
//! `body`, keyed BLAKE3 before that): the digest only tells a retry (same id, same content:
//! replay) from a reused id (same id, other content: `FAILED_PRECONDITION`). It never leaves
//! the process, so nobody outside sees an output or the secret, and it is compared only
//! against the digest stored under the same request id. A collision would replay the stored
//! answer of that id's first request to a request with other content: whoever sends that
//! request must know the first request's content to aim at it, and could then send that
//! content and get the same replay anyway, so a collision reveals nothing and the digest
//! guards a client against its own mistakes, not against an attacker. What it needs is that
//! different contents practically never collide by accident: XXH3-128 under a random secret
//! has 128-bit output and passes SMHasher's collision and distribution tests. It is about
//! five times faster than SipHash-1-3 over a T1 request (about 9 KB: BENCHMARKS.md, branch
//! `body`; `cargo bench -p benches --bench replay_digest`).
//!
//! # The id table
//!
//! Entries live in one table under a mutex, found by the hash of their request id under
//! the standard library's `RandomState` (SipHash-1-3 under a random key, so clients cannot
//! aim ids at one bucket). That hash is computed once per call, before the lock, and kept in
//! the [`Ticket`] and in the queue of stored answers: every later lookup (storing the
//! answer, freeing the id, evicting the oldest answer) finds its entry by that hash and the
//! entry's unique sequence number, without hashing or comparing the id again.

use std::collections::VecDeque;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use api::fairrank::v1::{RankRequest, RankResponse};
use engine::CandidateIds;
use hashbrown::HashTable;
use prost::Message;
use prost::bytes::Bytes;
use rand::Rng;
use xxhash_rust::xxh3::Xxh3;

use super::answer::{WireRankResponse, timings_len};

/// Largest encoding buffer a thread keeps between digests.
const MAX_KEPT_BUFFER_BYTES: usize = 1 << 20;

/// Size of the XXH3 secret (the size of its default secret).
const SECRET_BYTES: usize = 192;

thread_local! {
    /// Reused encoding buffer of [`ReplayStore::digest_rank`] (no allocation per request).
    static ENCODE_BUFFER: std::cell::RefCell<Vec<u8>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Field number of `fairrank.v1.RankRequest.candidate_ids`.
pub(super) const CANDIDATE_IDS_FIELD: u32 = 10;

/// The one-byte key of field 10 (`candidate_ids`) with wire type 2 (length-delimited).
pub(super) const CANDIDATE_IDS_KEY: u8 = ((CANDIDATE_IDS_FIELD as u8) << 3) | 2;

/// A run of consecutive candidate ids whose entries a request's body holds as the digest
/// hashes them: `body[bytes]` is the entries of ids `ids` (key of field 10 as one byte, the
/// length as a one-byte varint, the id) without the first entry's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdRun {
    /// The ids of the run (indices into the request's candidate ids).
    pub ids: std::ops::Range<usize>,
    /// Where the body holds their entries, from the first id's length byte to the last id's
    /// end.
    pub bytes: std::ops::Range<usize>,
}

/// Where a Rank request's body already holds its candidate ids' entries as the digest hashes
/// them (none: every entry is written out), so that [`ReplayStore::digest_rank`] hashes
/// those bytes where they are instead of writing them again.
#[derive(Debug, Clone, Default)]
pub struct IdEntries {
    body: Bytes,
    /// In order of their ids, which do not overlap.
    runs: Vec<IdRun>,
}

impl IdEntries {
    /// The runs `runs` of `body` (see [`IdRun`]; in order of their ids, not overlapping).
    pub fn new(body: Bytes, runs: Vec<IdRun>) -> IdEntries {
        IdEntries { body, runs }
    }

    /// The runs.
    #[cfg(test)]
    pub fn runs(&self) -> &[IdRun] {
        &self.runs
    }
}

/// Appends the entries (one-byte key of field 10, varint length, bytes) of the ids at
/// `indices`.
fn push_id_entries(buffer: &mut Vec<u8>, ids: &CandidateIds, indices: std::ops::Range<usize>) {
    for index in indices {
        let id = ids.get_bytes(index).unwrap_or_default();
        buffer.push(CANDIDATE_IDS_KEY);
        prost::encoding::encode_varint(id.len() as u64, &mut *buffer);
        buffer.extend_from_slice(id);
    }
}

/// A 128-bit keyed digest of a request's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest(u128);

/// What a request with a given id and content should do.
#[derive(Debug)]
pub enum Begin {
    /// Run it; the ticket stores its answer (or forgets the id if it fails).
    Run(Ticket),
    /// Answer with this stored answer: the encoding of every field but `timings`.
    Replay(Bytes),
    /// The id was used with different content.
    Reused,
    /// The first attempt with this id and content still runs.
    InProgress,
}

/// The idempotency store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct ReplayStore {
    window: Duration,
    max_entries: usize,
    max_bytes: usize,
    /// The XXH3 secret of the content digests.
    secret: [u8; SECRET_BYTES],
    /// Hashes request ids for the table.
    id_hasher: RandomState,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Running requests and stored answers, one per request id, by [`Entry::id_hash`].
    entries: HashTable<Entry>,
    /// Stored answers, oldest first: (id hash, sequence number). A position whose entry is
    /// gone or no longer stored with that sequence number is stale.
    order: VecDeque<(u64, u64)>,
    stored: usize,
    bytes: usize,
    next_sequence: u64,
}

/// A request id's entry.
#[derive(Debug)]
struct Entry {
    /// The hash of `request_id` under [`ReplayStore::id_hasher`].
    id_hash: u64,
    request_id: Box<str>,
    /// Unique in the store's life: given when the id is reserved, kept when the answer is
    /// stored. It identifies this entry for the ticket and the order queue.
    sequence: u64,
    digest: Digest,
    /// `None` while the request runs.
    answer: Option<StoredAnswer>,
}

#[derive(Debug)]
struct StoredAnswer {
    /// The answer's encoding without its timings.
    response: Bytes,
    stored_at: Instant,
    /// The whole answer's encoded size (the bytes it counts against `max_bytes`).
    bytes: usize,
}

impl Entry {
    /// Whether this is the stored answer with this sequence number.
    fn is_stored(&self, sequence: u64) -> bool {
        self.sequence == sequence && self.answer.is_some()
    }

    /// Whether this is the running request with this sequence number.
    fn is_running(&self, sequence: u64) -> bool {
        self.sequence == sequence && self.answer.is_none()
    }
}

impl ReplayStore {
    /// A store with the given bounds; `max_entries == 0` turns it off (every request runs).
    pub fn new(window: Duration, max_entries: usize, max_bytes: usize) -> Arc<ReplayStore> {
        let mut secret = [0_u8; SECRET_BYTES];
        rand::rng().fill(&mut secret[..]);
        Arc::new(ReplayStore {
            window,
            max_entries,
            max_bytes,
            secret,
            id_hasher: RandomState::new(),
            state: Mutex::new(State::default()),
        })
    }

    /// Whether the store keeps anything.
    pub fn enabled(&self) -> bool {
        self.max_entries > 0
    }

    /// The digest of a whole Rank request (ids inside the message), as
    /// [`ReplayStore::digest_rank`] computes it for the same request with its ids apart.
    #[cfg(test)]
    pub fn digest(&self, request: &RankRequest) -> Digest {
        let mut message = request.clone();
        let ids = CandidateIds::from(std::mem::take(&mut message.candidate_ids));
        self.digest_rank(&message, &ids, &IdEntries::default())
    }

    /// The digest of a Rank request whose candidate ids travel separately (the request's
    /// own `candidate_ids` are empty); `entries` says where the request's body holds some
    /// of the ids' entries (the default: nowhere). It is only needed by
    /// [`ReplayStore::begin`] for a non-empty request id while the store is on; otherwise
    /// this returns a constant without hashing anything.
    ///
    /// The hashed bytes are: the length of the message's encoding (varint), the encoding
    /// (prost writes it deterministically: fields in number order, map entries sorted),
    /// then each id's protobuf entry (the one-byte key of field 10, the id's length as a
    /// varint, the id's bytes). The message's length is known before it and each entry is
    /// self-delimiting, so different requests give different bytes, and equal requests
    /// equal bytes (whatever their encoding on the wire). The runs of entries that the
    /// body holds exactly so are hashed from the body, the others written out.
    pub fn digest_rank(
        &self,
        request: &RankRequest,
        candidate_ids: &CandidateIds,
        entries: &IdEntries,
    ) -> Digest {
        if !self.enabled() || request.request_id.is_empty() {
            return Digest(0);
        }
        ENCODE_BUFFER.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            buffer.clear();
            let message_len = request.encoded_len();
            buffer.reserve(message_len + 20);
            prost::encoding::encode_varint(message_len as u64, &mut *buffer);
            // Encoding into a Vec cannot run out of space.
            let _ = request.encode(&mut *buffer);
            let mut hasher = Xxh3::with_secret(self.secret);
            let mut next = 0;
            for run in &entries.runs {
                push_id_entries(&mut buffer, candidate_ids, next..run.ids.start);
                buffer.push(CANDIDATE_IDS_KEY);
                hasher.update(&buffer);
                buffer.clear();
                hasher.update(entries.body.get(run.bytes.clone()).unwrap_or_default());
                next = run.ids.end;
            }
            push_id_entries(&mut buffer, candidate_ids, next..candidate_ids.len());
            hasher.update(&buffer);
            if buffer.capacity() > MAX_KEPT_BUFFER_BYTES {
                *buffer = Vec::new();
            }
            Digest(hasher.digest128())
        })
    }

    /// Looks the id up and, when it is new, reserves it for this request. `now` is the
    /// current time (the caller's clock read, e.g. the call's start: answers stored more
    /// than the window before it have expired).
    pub fn begin(self: &Arc<Self>, request_id: &str, digest: Digest, now: Instant) -> Begin {
        if !self.enabled() || request_id.is_empty() {
            return Begin::Run(Ticket::detached());
        }
        let id_hash = self.id_hasher.hash_one(request_id);
        let mut guard = self.lock();
        let state = &mut *guard;
        self.expire(state, now);
        let sequence = state.next_sequence;
        match state.entries.entry(
            id_hash,
            |entry| *entry.request_id == *request_id,
            |entry| entry.id_hash,
        ) {
            hashbrown::hash_table::Entry::Occupied(occupied) => {
                let entry = occupied.get();
                if entry.digest != digest {
                    return Begin::Reused;
                }
                match &entry.answer {
                    None => Begin::InProgress,
                    Some(answer) => Begin::Replay(answer.response.clone()),
                }
            }
            hashbrown::hash_table::Entry::Vacant(vacant) => {
                vacant.insert(Entry {
                    id_hash,
                    request_id: request_id.into(),
                    sequence,
                    digest,
                    answer: None,
                });
                state.next_sequence += 1;
                Begin::Run(Ticket {
                    held: Some(Held {
                        store: Arc::clone(self),
                        id_hash,
                        sequence,
                    }),
                })
            }
        }
    }

    /// Number of stored answers (not counting running requests).
    #[cfg(test)]
    fn stored(&self) -> usize {
        self.lock().stored
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops answers older than the window.
    fn expire(&self, state: &mut State, now: Instant) {
        while let Some(&(id_hash, sequence)) = state.order.front() {
            let expired = match state
                .entries
                .find(id_hash, |entry| entry.is_stored(sequence))
                .and_then(|entry| entry.answer.as_ref())
            {
                Some(answer) => now.duration_since(answer.stored_at) >= self.window,
                // A stale position: its entry was replaced or removed.
                None => true,
            };
            if !expired {
                break;
            }
            Self::pop_oldest(state);
        }
    }

    /// Removes the oldest position and, if it is current, its answer.
    fn pop_oldest(state: &mut State) {
        let Some((id_hash, sequence)) = state.order.pop_front() else {
            return;
        };
        if let Ok(occupied) = state
            .entries
            .find_entry(id_hash, |entry| entry.is_stored(sequence))
        {
            let (entry, _) = occupied.remove();
            if let Some(answer) = entry.answer {
                state.bytes -= answer.bytes;
                state.stored -= 1;
            }
        }
    }

    /// Stores `response` (the encoding without timings) of `bytes` encoded bytes in all,
    /// as stored at `now`, for the running request `(id_hash, sequence)`.
    fn complete(&self, id_hash: u64, sequence: u64, response: Bytes, bytes: usize, now: Instant) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Ok(occupied) = state
            .entries
            .find_entry(id_hash, |entry| entry.is_running(sequence))
        else {
            return;
        };
        if bytes > self.max_bytes {
            occupied.remove();
            return;
        }
        occupied.into_mut().answer = Some(StoredAnswer {
            response,
            stored_at: now,
            bytes,
        });
        state.order.push_back((id_hash, sequence));
        state.stored += 1;
        state.bytes += bytes;
        while state.stored > self.max_entries || state.bytes > self.max_bytes {
            Self::pop_oldest(state);
        }
        // Stale positions pile up only between expiries; keep the queue proportionate.
        if state.order.len() > 2 * self.max_entries.max(16) {
            let State { entries, order, .. } = state;
            order.retain(|&(id_hash, sequence)| {
                entries
                    .find(id_hash, |entry| entry.is_stored(sequence))
                    .is_some()
            });
        }
    }

    /// Frees the id of the running request `(id_hash, sequence)`.
    fn release(&self, id_hash: u64, sequence: u64) {
        let mut state = self.lock();
        if let Ok(occupied) = state
            .entries
            .find_entry(id_hash, |entry| entry.is_running(sequence))
        {
            occupied.remove();
        }
    }
}

/// What a [`Ticket`] holds: the store and its running entry.
#[derive(Debug)]
struct Held {
    store: Arc<ReplayStore>,
    id_hash: u64,
    sequence: u64,
}

/// The reservation of a running request id. [`Ticket::complete`] stores the answer; dropping
/// the ticket without completing it frees the id (a failed request can be retried).
#[derive(Debug)]
pub struct Ticket {
    /// The store and the entry this request holds (`None`: detached, or already
    /// completed).
    held: Option<Held>,
}

impl Ticket {
    /// A ticket that stores nothing (store off, or no id).
    fn detached() -> Ticket {
        Ticket { held: None }
    }

    /// Stores the answer for replay (encoding it), as stored at `now` (the current time).
    pub fn complete(self, response: &RankResponse, now: Instant) {
        if self.held.is_some() {
            // `timings` is the last field, so the encoding without it is a prefix.
            let mut body = response.encode_to_vec();
            let size = body.len();
            body.truncate(size - timings_len(response.timings.as_ref()));
            self.store_encoded(Bytes::from(body), size, now);
        }
    }

    /// Stores the encoded answer for replay (shares its buffer, copies nothing), as stored
    /// at `now` (the current time).
    pub fn complete_wire(self, response: &WireRankResponse, now: Instant) {
        if self.held.is_some() {
            self.store_encoded(response.body().clone(), response.encoded_len(), now);
        }
    }

    fn store_encoded(mut self, body: Bytes, size: usize, now: Instant) {
        if let Some(held) = self.held.take() {
            held.store
                .complete(held.id_hash, held.sequence, body, size, now);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            held.store.release(held.id_hash, held.sequence);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::fairrank::v1 as pb;
    use api::fairrank::v1::RankedItem;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use xxhash_rust::xxh3::xxh3_128_with_secret;

    fn request(id: &str, k: u32) -> RankRequest {
        RankRequest {
            request_id: id.into(),
            k,
            ..Default::default()
        }
    }

    #[test]
    fn rank_digests_cover_the_separate_candidate_ids() {
        let store = ReplayStore::new(Duration::from_secs(60), 10, 1 << 20);
        let ids = |list: &[&str]| CandidateIds::from(list);
        let digest = store.digest_rank(
            &request("r-1", 5),
            &ids(&["a", "bc"]),
            &IdEntries::default(),
        );
        assert_eq!(
            digest,
            store.digest_rank(
                &request("r-1", 5),
                &ids(&["a", "bc"]),
                &IdEntries::default()
            )
        );
        for other in [
            store.digest_rank(
                &request("r-1", 5),
                &ids(&["ab", "c"]),
                &IdEntries::default(),
            ),
            store.digest_rank(
                &request("r-1", 5),
                &ids(&["bc", "a"]),
                &IdEntries::default(),
            ),
            store.digest_rank(&request("r-1", 5), &ids(&["a"]), &IdEntries::default()),
            store.digest_rank(
                &request("r-1", 6),
                &ids(&["a", "bc"]),
                &IdEntries::default(),
            ),
        ] {
            assert_ne!(digest, other);
        }
        // The ids inside the message give the same digest as the ids apart.
        let mut whole = request("r-1", 5);
        whole.candidate_ids = vec!["a".into(), "bc".into()];
        assert_eq!(store.digest(&whole), digest);
        // An id's bytes cannot move into the message or the lengths undetected.
        let mut moved = request("r-1", 5);
        moved.request_id = "r-1a".into();
        assert_ne!(
            store.digest_rank(&moved, &ids(&["bc"]), &IdEntries::default()),
            store.digest_rank(
                &request("r-1", 5),
                &ids(&["a", "bc"]),
                &IdEntries::default()
            )
        );
        // Without a request id, or with the store off, nothing is hashed.
        assert_eq!(
            store.digest_rank(&request("", 5), &ids(&["a"]), &IdEntries::default()),
            store.digest_rank(&request("", 6), &ids(&["b"]), &IdEntries::default())
        );
        let off = ReplayStore::new(Duration::from_secs(60), 0, 1 << 20);
        assert_eq!(
            off.digest_rank(&request("r-1", 5), &ids(&["a"]), &IdEntries::default()),
            off.digest_rank(&request("r-1", 6), &ids(&["b"]), &IdEntries::default())
        );
    }

    /// The digest is XXH3-128 under the store's secret of the documented serialization
    /// (built here the plain way: one buffer, every varint through prost, one-shot hash).
    fn oracle_digest(store: &ReplayStore, request: &RankRequest, ids: &[String]) -> Digest {
        let mut bytes = Vec::new();
        prost::encoding::encode_varint(request.encoded_len() as u64, &mut bytes);
        request.encode(&mut bytes).unwrap();
        for id in ids {
            // The entry of a repeated string, as prost writes it.
            prost::encoding::string::encode(CANDIDATE_IDS_FIELD, id, &mut bytes);
        }
        Digest(xxh3_128_with_secret(&bytes, &store.secret))
    }

    #[test]
    fn id_lengths_around_the_one_byte_varint_limit_digest_as_documented() {
        let store = ReplayStore::new(Duration::from_secs(60), 10, 1 << 20);
        let message = request("r-1", 5);
        // Lengths around the one-byte varint limit (127, 128) and longer ones.
        for lengths in [
            vec![0, 1, 127],
            vec![128],
            vec![8, 127, 128, 8],
            vec![255, 8],
            vec![8, 256],
            vec![300, 0, 16_384],
        ] {
            let ids: Vec<String> = lengths.iter().map(|&len| "x".repeat(len)).collect();
            let candidates: CandidateIds = ids.iter().collect();
            assert_eq!(
                store.digest_rank(&message, &candidates, &IdEntries::default()),
                oracle_digest(&store, &message, &ids),
                "{lengths:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn digests_are_keyed_xxh3_of_the_documented_bytes(
            request_id in "[a-z0-9-]{1,40}",
            k in 0_u32..1000,
            ids in proptest::collection::vec("[a-z0-9]{0,20}|\\PC{0,200}", 0..300),
        ) {
            let store = ReplayStore::new(Duration::from_secs(60), 10, 1 << 20);
            let message = request(&request_id, k);
            let candidates: CandidateIds = ids.iter().collect();
            proptest::prop_assert_eq!(
                store.digest_rank(&message, &candidates, &IdEntries::default()),
                oracle_digest(&store, &message, &ids)
            );
        }
    }

    #[test]
    fn digests_depend_on_the_per_process_key() {
        let first = ReplayStore::new(Duration::from_secs(60), 10, 1 << 20);
        let second = ReplayStore::new(Duration::from_secs(60), 10, 1 << 20);
        assert_ne!(first.secret, second.secret);
        let message = request("r-1", 5);
        assert_ne!(first.digest(&message), second.digest(&message));
    }

    fn answer(id: &str, items: usize) -> RankResponse {
        RankResponse {
            request_id: id.into(),
            items: (0..items)
                .map(|i| RankedItem {
                    item_id: format!("item-{i}"),
                    rank: i as u32 + 1,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn run(store: &Arc<ReplayStore>, id: &str, digest: Digest) -> Ticket {
        match store.begin(id, digest, Instant::now()) {
            Begin::Run(ticket) => ticket,
            other => panic!("{id}: expected to run, got {other:?}"),
        }
    }

    #[test]
    fn same_id_and_content_replays_different_content_is_refused() {
        let store = ReplayStore::new(Duration::from_secs(60), 10, 1 << 20);
        let digest = store.digest(&request("r-1", 5));
        assert_eq!(digest, store.digest(&request("r-1", 5)));
        let other = store.digest(&request("r-1", 6));
        assert_ne!(digest, other);

        let ticket = run(&store, "r-1", digest);
        assert!(matches!(
            store.begin("r-1", digest, Instant::now()),
            Begin::InProgress
        ));
        assert!(matches!(
            store.begin("r-1", other, Instant::now()),
            Begin::Reused
        ));
        ticket.complete(&answer("r-1", 3), Instant::now());

        match store.begin("r-1", digest, Instant::now()) {
            Begin::Replay(response) => {
                assert_eq!(RankResponse::decode(response).unwrap(), answer("r-1", 3))
            }
            other => panic!("expected a replay, got {other:?}"),
        }
        assert!(matches!(
            store.begin("r-1", other, Instant::now()),
            Begin::Reused
        ));
    }

    #[test]
    fn a_failed_request_frees_its_id() {
        let store = ReplayStore::new(Duration::from_secs(60), 10, 1 << 20);
        let digest = store.digest(&request("r-2", 5));
        drop(run(&store, "r-2", digest));
        let ticket = run(&store, "r-2", digest);
        ticket.complete(&answer("r-2", 1), Instant::now());
        assert_eq!(store.stored(), 1);
    }

    #[test]
    fn answers_expire_after_the_window() {
        let store = ReplayStore::new(Duration::from_millis(1), 10, 1 << 20);
        let digest = store.digest(&request("r-3", 5));
        run(&store, "r-3", digest).complete(&answer("r-3", 1), Instant::now());
        std::thread::sleep(Duration::from_millis(5));
        // Expired: the id runs again.
        let ticket = run(&store, "r-3", digest);
        assert_eq!(store.stored(), 0);
        drop(ticket);
    }

    #[test]
    fn the_oldest_answers_go_first_beyond_the_entry_and_byte_bounds() {
        let store = ReplayStore::new(Duration::from_secs(60), 3, 1 << 20);
        let ids: Vec<String> = (0..5).map(|i| format!("r-{i}")).collect();
        for id in &ids {
            let digest = store.digest(&request(id, 1));
            run(&store, id, digest).complete(&answer(id, 1), Instant::now());
        }
        assert_eq!(store.stored(), 3);
        for (position, id) in ids.iter().enumerate() {
            let digest = store.digest(&request(id, 1));
            let replayed = matches!(store.begin(id, digest, Instant::now()), Begin::Replay(_));
            assert_eq!(replayed, position >= 2, "{id}");
        }

        let one = answer("b-0", 10).encoded_len();
        let store = ReplayStore::new(Duration::from_secs(60), 100, 2 * one + one / 2);
        for id in ["b-0", "b-1", "b-2"] {
            let digest = store.digest(&request(id, 1));
            run(&store, id, digest).complete(&answer(id, 10), Instant::now());
        }
        assert_eq!(store.stored(), 2);
        let digest = store.digest(&request("b-0", 1));
        assert!(matches!(
            store.begin("b-0", digest, Instant::now()),
            Begin::Run(_)
        ));

        // Larger than the whole budget: not kept at all.
        let store = ReplayStore::new(Duration::from_secs(60), 100, one / 2);
        let digest = store.digest(&request("big", 1));
        run(&store, "big", digest).complete(&answer("big", 10), Instant::now());
        assert_eq!(store.stored(), 0);
        assert!(matches!(
            store.begin("big", digest, Instant::now()),
            Begin::Run(_)
        ));
    }

    #[test]
    fn a_disabled_store_runs_everything() {
        let store = ReplayStore::new(Duration::from_secs(60), 0, 1 << 20);
        let digest = store.digest(&request("r", 1));
        run(&store, "r", digest).complete(&answer("r", 1), Instant::now());
        let _first = run(&store, "r", digest);
        let _second = run(&store, "r", digest);
    }

    /// A request with every field set.
    fn full_request() -> pb::RankRequest {
        pb::RankRequest {
            request_id: "r-full".into(),
            user: Some(pb::rank_request::User::UserId("u-1".into())),
            fallback_for_unknown_user: true,
            candidate_ids: vec!["i0000001".into(), "i0000002".into(), "i0000003".into()],
            skip_unknown_candidates: true,
            k: 2,
            pool_size: Some(3),
            fairness: Some(pb::FairnessPolicy {
                constraint: "fa*ir".into(),
                group_attribute: "group".into(),
                exposure_scope: "pool".into(),
                on_infeasible: 1,
                seed: Some(7),
                ..Default::default()
            }),
            privacy: Some(pb::PrivacyPolicy {
                mechanism: 1,
                delta: Some(1e-6),
                release_noisy_scores: true,
                on_budget_exhausted: 1,
                budget: Some(pb::privacy_policy::Budget::Rho(0.5)),
            }),
            consent: Some(pb::Consent {
                personalization: 1,
                consent_reference: "c-1".into(),
            }),
            explain: Some(pb::ExplainOptions {
                level: 1,
                max_dimensions: 4,
            }),
        }
    }

    #[test]
    fn every_field_of_the_request_enters_the_digest() {
        let store = ReplayStore::new(Duration::from_secs(60), 10, 1 << 20);
        let base = full_request();
        assert_eq!(store.digest(&base), store.digest(&base.clone()));
        type Edit = fn(&mut pb::RankRequest);
        let edits: [(&str, Edit); 23] = [
            ("request_id", |r| r.request_id.push('x')),
            ("user id", |r| {
                r.user = Some(pb::rank_request::User::UserId("u-2".into()))
            }),
            ("inline user", |r| {
                r.user = Some(pb::rank_request::User::InlineUser(pb::InlineUser {
                    embedding: vec![0.5],
                    subject_id: "u-1".into(),
                }))
            }),
            ("no user", |r| r.user = None),
            ("fallback", |r| r.fallback_for_unknown_user = false),
            ("one id changed", |r| r.candidate_ids[1] = "i0000009".into()),
            ("ids reordered", |r| r.candidate_ids.swap(0, 2)),
            ("an id more", |r| r.candidate_ids.push(String::new())),
            ("an id less", |r| {
                r.candidate_ids.pop();
            }),
            ("skip unknown", |r| r.skip_unknown_candidates = false),
            ("k", |r| r.k = 3),
            ("pool size", |r| r.pool_size = Some(4)),
            ("pool size unset", |r| r.pool_size = None),
            ("fairness constraint", |r| {
                r.fairness.as_mut().unwrap().constraint = "none".into()
            }),
            ("fairness seed", |r| {
                r.fairness.as_mut().unwrap().seed = None
            }),
            ("no fairness", |r| r.fairness = None),
            ("privacy budget", |r| {
                r.privacy.as_mut().unwrap().budget = Some(pb::privacy_policy::Budget::Epsilon(0.5))
            }),
            ("privacy delta", |r| {
                r.privacy.as_mut().unwrap().delta = Some(2e-6)
            }),
            ("consent", |r| {
                r.consent.as_mut().unwrap().personalization = 2
            }),
            ("consent reference", |r| {
                r.consent.as_mut().unwrap().consent_reference.clear()
            }),
            ("explain level", |r| r.explain.as_mut().unwrap().level = 2),
            ("explain dimensions", |r| {
                r.explain.as_mut().unwrap().max_dimensions = 5
            }),
            ("no explain", |r| r.explain = None),
        ];
        let mut seen = vec![("base", store.digest(&base))];
        for (name, edit) in edits {
            let mut edited = base.clone();
            edit(&mut edited);
            assert_ne!(edited, base, "{name} changes nothing");
            let digest = store.digest(&edited);
            assert_eq!(digest, store.digest(&edited.clone()), "{name}");
            if let Some((other, _)) = seen.iter().find(|(_, seen)| *seen == digest) {
                panic!("{name} digests as {other}");
            }
            seen.push((name, digest));
        }
    }

    #[test]
    fn many_ids_replay_the_newest_and_drop_the_oldest() {
        let store = ReplayStore::new(Duration::from_secs(60), 1000, 1 << 30);
        let ids: Vec<String> = (0..3000).map(|i| format!("r-{i:05}")).collect();
        for id in &ids {
            let digest = store.digest(&request(id, 1));
            run(&store, id, digest).complete(&answer(id, 1), Instant::now());
        }
        assert_eq!(store.stored(), 1000);
        for (position, id) in ids.iter().enumerate() {
            let digest = store.digest(&request(id, 1));
            match store.begin(id, digest, Instant::now()) {
                Begin::Replay(response) => {
                    assert!(position >= 2000, "{id}");
                    assert_eq!(RankResponse::decode(response).unwrap(), answer(id, 1));
                }
                Begin::Run(ticket) => {
                    assert!(position < 2000, "{id}");
                    drop(ticket);
                }
                other => panic!("{id}: {other:?}"),
            }
            let other = store.digest(&request(id, 2));
            let reused = matches!(store.begin(id, other, Instant::now()), Begin::Reused);
            assert_eq!(reused, position >= 2000, "{id}");
        }
    }

    /// What a [`ReplayStore::begin`] answered, comparable.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Run,
        Replay(Bytes),
        Reused,
        InProgress,
    }

    /// The store's documented behaviour, the plain way: lists searched by id.
    struct Model {
        window: Duration,
        max_entries: usize,
        max_bytes: usize,
        /// (request id, digest, ticket number).
        running: Vec<(String, Digest, usize)>,
        /// (request id, digest, answer, stored at, bytes), oldest first.
        stored: VecDeque<(String, Digest, Bytes, Instant, usize)>,
    }

    impl Model {
        fn begin(&mut self, id: &str, digest: Digest, now: Instant, ticket: usize) -> Seen {
            if id.is_empty() {
                return Seen::Run;
            }
            while let Some((.., stored_at, _)) = self.stored.front() {
                if now.duration_since(*stored_at) < self.window {
                    break;
                }
                self.stored.pop_front();
            }
            if let Some((_, running, _)) = self.running.iter().find(|(r, ..)| r == id) {
                return if *running == digest {
                    Seen::InProgress
                } else {
                    Seen::Reused
                };
            }
            if let Some((_, stored, answer, ..)) = self.stored.iter().find(|(s, ..)| s == id) {
                return if *stored == digest {
                    Seen::Replay(answer.clone())
                } else {
                    Seen::Reused
                };
            }
            self.running.push((id.to_owned(), digest, ticket));
            Seen::Run
        }

        fn complete(&mut self, ticket: usize, answer: Bytes, bytes: usize, now: Instant) {
            let Some(at) = self.running.iter().position(|(.., t)| *t == ticket) else {
                return;
            };
            let (id, digest, _) = self.running.remove(at);
            if bytes > self.max_bytes {
                return;
            }
            self.stored.push_back((id, digest, answer, now, bytes));
            while self.stored.len() > self.max_entries
                || self.stored.iter().map(|(.., bytes)| bytes).sum::<usize>() > self.max_bytes
            {
                self.stored.pop_front();
            }
        }

        fn release(&mut self, ticket: usize) {
            self.running.retain(|(.., t)| *t != ticket);
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Begin { id: usize, content: u32 },
        Complete { ticket: Index, bytes: usize },
        Drop { ticket: Index },
        Wait { millis: u64 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0_usize..5, 0_u32..2).prop_map(|(id, content)| Step::Begin { id, content }),
            2 => (any::<Index>(), 1_usize..60)
                .prop_map(|(ticket, bytes)| Step::Complete { ticket, bytes }),
            1 => any::<Index>().prop_map(|ticket| Step::Drop { ticket }),
            1 => (0_u64..4).prop_map(|millis| Step::Wait { millis }),
        ]
    }

    proptest! {
        /// Any interleaving of requests (five ids, one of them empty; two contents each),
        /// completions, failures and waits: the store answers as the model does and keeps
        /// as many answers.
        #[test]
        fn the_store_behaves_as_the_plain_model(
            steps in proptest::collection::vec(step(), 1..120),
            max_entries in 1_usize..5,
            max_bytes in 30_usize..150,
        ) {
            let window = Duration::from_millis(5);
            let store = ReplayStore::new(window, max_entries, max_bytes);
            let mut model = Model {
                window,
                max_entries,
                max_bytes,
                running: Vec::new(),
                stored: VecDeque::new(),
            };
            let ids = ["r-0", "r-1", "r-2", "r-3", ""];
            let start = Instant::now();
            let mut clock = Duration::ZERO;
            let mut tickets: Vec<(Ticket, usize)> = Vec::new();
            for (number, step) in steps.into_iter().enumerate() {
                let now = start + clock;
                match step {
                    Step::Begin { id, content } => {
                        let id = ids[id];
                        let digest = store.digest(&request(id, content));
                        let expected = model.begin(id, digest, now, number);
                        let seen = match store.begin(id, digest, now) {
                            Begin::Run(ticket) => {
                                tickets.push((ticket, number));
                                Seen::Run
                            }
                            Begin::Replay(answer) => Seen::Replay(answer),
                            Begin::Reused => Seen::Reused,
                            Begin::InProgress => Seen::InProgress,
                        };
                        prop_assert_eq!(seen, expected, "step {}", number);
                    }
                    Step::Complete { ticket, bytes } if !tickets.is_empty() => {
                        let (ticket, number) = tickets.remove(ticket.index(tickets.len()));
                        let answer = Bytes::from(vec![number as u8; bytes / 2]);
                        model.complete(number, answer.clone(), bytes, now);
                        ticket.store_encoded(answer, bytes, now);
                    }
                    Step::Drop { ticket } if !tickets.is_empty() => {
                        let (ticket, number) = tickets.remove(ticket.index(tickets.len()));
                        model.release(number);
                        drop(ticket);
                    }
                    Step::Wait { millis } => clock += Duration::from_millis(millis),
                    Step::Complete { .. } | Step::Drop { .. } => {}
                }
                prop_assert_eq!(store.stored(), model.stored.len());
            }
        }
    }
}
