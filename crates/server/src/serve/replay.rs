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
//! Content is compared by a 128-bit digest of the request's content: SipHash-1-3 with a
//! 128-bit output ([`super::siphash`]) under a key drawn at random per process, so nobody
//! outside the process can construct a different request with the same digest. The digest
//! is taken over an unambiguous serialization of the request (its protobuf encoding without
//! the candidate ids, then the ids' lengths, then their bytes), not over a re-encoding of
//! the whole request, and only when the store will use it (a non-empty request id, store on).
//! Keyed BLAKE3 was measured as the alternative and is slower here (BENCHMARKS.md, branch
//! `srvcpu`; `cargo bench -p benches --bench replay_digest`).

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use api::fairrank::v1::{RankRequest, RankResponse};
use engine::CandidateIds;
use prost::Message;
use prost::bytes::Bytes;

use super::answer::{WireRankResponse, timings_len};
use super::siphash::SipHasher13;

/// Largest encoding buffer a thread keeps between digests.
const MAX_KEPT_BUFFER_BYTES: usize = 1 << 20;

thread_local! {
    /// Reused encoding buffer of [`ReplayStore::digest_rank`] (no allocation per request).
    static ENCODE_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Appends each id's length (from the ids' end offsets) as a varint.
///
/// Every length is first written as one byte, saturated at `0xff` (a tight loop without
/// branches); if all of them are below `0x80`, those bytes are the one-byte varints. Only
/// otherwise (some id of 128 bytes or more) are the lengths written again, one varint each.
fn push_id_lengths(buffer: &mut Vec<u8>, ends: &[usize]) {
    let lengths_start = buffer.len();
    let mut start = 0;
    buffer.extend(ends.iter().map(|&end| {
        let len = end.wrapping_sub(start);
        start = end;
        u8::try_from(len).unwrap_or(u8::MAX)
    }));
    if buffer.get(lengths_start..).is_some_and(<[u8]>::is_ascii) {
        return;
    }
    buffer.truncate(lengths_start);
    let mut start = 0;
    for &end in ends {
        prost::encoding::encode_varint((end - start) as u64, &mut *buffer);
        start = end;
    }
}

/// A 128-bit keyed digest of a request's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest(u64, u64);

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
    /// The SipHash key.
    key: (u64, u64),
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// By request id (shared with `order` and the running request's [`Ticket`]).
    entries: HashMap<Arc<str>, Entry>,
    /// Stored answers, oldest first: (id, sequence number). A sequence number that no
    /// longer matches the entry marks a stale position.
    order: VecDeque<(Arc<str>, u64)>,
    stored: usize,
    bytes: usize,
    next_sequence: u64,
}

#[derive(Debug)]
enum Entry {
    Running {
        digest: Digest,
    },
    Done {
        digest: Digest,
        /// The answer's encoding without its timings.
        response: Bytes,
        stored_at: Instant,
        sequence: u64,
        bytes: usize,
    },
}

impl ReplayStore {
    /// A store with the given bounds; `max_entries == 0` turns it off (every request runs).
    pub fn new(window: Duration, max_entries: usize, max_bytes: usize) -> Arc<ReplayStore> {
        Arc::new(ReplayStore {
            window,
            max_entries,
            max_bytes,
            // Each `RandomState` is keyed from the operating system's randomness.
            key: (
                RandomState::new().hash_one(0x7265_706c_6179_5f30_u64),
                RandomState::new().hash_one(0x7265_706c_6179_5f31_u64),
            ),
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
        self.digest_rank(&message, &ids)
    }

    /// The digest of a Rank request whose candidate ids travel separately (the request's
    /// own `candidate_ids` are empty). It is only needed by [`ReplayStore::begin`] for a
    /// non-empty request id while the store is on; otherwise this returns a constant
    /// without hashing anything.
    ///
    /// The hashed bytes are: the length of the message's encoding (varint), the encoding
    /// (prost writes it deterministically: fields in number order, map entries sorted),
    /// the number of ids and each id's length (varints), then the ids' bytes back to back.
    /// Each part's length is known before it, so different requests give different bytes,
    /// and equal requests equal bytes.
    pub fn digest_rank(&self, request: &RankRequest, candidate_ids: &CandidateIds) -> Digest {
        if !self.enabled() || request.request_id.is_empty() {
            return Digest(0, 0);
        }
        ENCODE_BUFFER.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            buffer.clear();
            let message_len = request.encoded_len();
            buffer.reserve(message_len + 2 * candidate_ids.len() + 20);
            prost::encoding::encode_varint(message_len as u64, &mut *buffer);
            // Encoding into a Vec cannot run out of space.
            let _ = request.encode(&mut *buffer);
            prost::encoding::encode_varint(candidate_ids.len() as u64, &mut *buffer);
            push_id_lengths(&mut buffer, candidate_ids.ends());
            let mut hasher = SipHasher13::new_128(self.key.0, self.key.1);
            hasher.write(&buffer);
            hasher.write(candidate_ids.text().as_bytes());
            if buffer.capacity() > MAX_KEPT_BUFFER_BYTES {
                *buffer = Vec::new();
            }
            let (first, second) = hasher.finish_128();
            Digest(first, second)
        })
    }

    /// Looks the id up and, when it is new, reserves it for this request. `now` is the
    /// current time (the caller's clock read, e.g. the call's start: answers stored more
    /// than the window before it have expired).
    pub fn begin(self: &Arc<Self>, request_id: &str, digest: Digest, now: Instant) -> Begin {
        if !self.enabled() || request_id.is_empty() {
            return Begin::Run(Ticket::detached());
        }
        let mut state = self.lock();
        self.expire(&mut state, now);
        if let Some(entry) = state.entries.get(request_id) {
            return match entry {
                Entry::Running { digest: running } if *running == digest => Begin::InProgress,
                Entry::Done {
                    digest: stored,
                    response,
                    ..
                } if *stored == digest => Begin::Replay(response.clone()),
                _ => Begin::Reused,
            };
        }
        let request_id: Arc<str> = Arc::from(request_id);
        state
            .entries
            .insert(Arc::clone(&request_id), Entry::Running { digest });
        Begin::Run(Ticket {
            held: Some((Arc::clone(self), request_id)),
            digest,
        })
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
        while let Some((id, sequence)) = state.order.front() {
            let expired = match state.entries.get(id) {
                Some(Entry::Done {
                    stored_at,
                    sequence: current,
                    ..
                }) if current == sequence => now.duration_since(*stored_at) >= self.window,
                // A stale position: its entry was replaced or removed.
                _ => true,
            };
            if !expired {
                break;
            }
            self.pop_oldest(state);
        }
    }

    /// Removes the oldest position and, if it is current, its answer.
    fn pop_oldest(&self, state: &mut State) {
        let Some((id, sequence)) = state.order.pop_front() else {
            return;
        };
        if let Some(Entry::Done {
            sequence: current,
            bytes,
            ..
        }) = state.entries.get(&id)
            && *current == sequence
        {
            state.bytes -= bytes;
            state.stored -= 1;
            state.entries.remove(&id);
        }
    }

    /// Stores `response` (the encoding without timings) of `bytes` encoded bytes in all,
    /// as stored at `now`.
    fn complete(
        &self,
        request_id: &Arc<str>,
        digest: Digest,
        response: Bytes,
        bytes: usize,
        now: Instant,
    ) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(entry) = state.entries.get_mut(&**request_id).filter(
            |entry| matches!(entry, Entry::Running { digest: running } if *running == digest),
        ) else {
            return;
        };
        if bytes > self.max_bytes {
            state.entries.remove(&**request_id);
            return;
        }
        let sequence = state.next_sequence;
        state.next_sequence += 1;
        *entry = Entry::Done {
            digest,
            response,
            stored_at: now,
            sequence,
            bytes,
        };
        state.order.push_back((Arc::clone(request_id), sequence));
        state.stored += 1;
        state.bytes += bytes;
        while state.stored > self.max_entries || state.bytes > self.max_bytes {
            self.pop_oldest(state);
        }
        // Stale positions pile up only between expiries; keep the queue proportionate.
        if state.order.len() > 2 * self.max_entries.max(16) {
            state.order.retain(|(id, sequence)| {
                matches!(state.entries.get(id), Some(Entry::Done { sequence: s, .. }) if s == sequence)
            });
        }
    }

    fn release(&self, request_id: &str, digest: Digest) {
        let mut state = self.lock();
        if matches!(
            state.entries.get(request_id),
            Some(Entry::Running { digest: running }) if *running == digest
        ) {
            state.entries.remove(request_id);
        }
    }
}

/// The reservation of a running request id. [`Ticket::complete`] stores the answer; dropping
/// the ticket without completing it frees the id (a failed request can be retried).
#[derive(Debug)]
pub struct Ticket {
    /// The store and the request id it holds for this request (`None`: detached, or
    /// already completed).
    held: Option<(Arc<ReplayStore>, Arc<str>)>,
    digest: Digest,
}

impl Ticket {
    /// A ticket that stores nothing (store off, or no id).
    fn detached() -> Ticket {
        Ticket {
            held: None,
            digest: Digest(0, 0),
        }
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
        if let Some((store, request_id)) = self.held.take() {
            store.complete(&request_id, self.digest, body, size, now);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some((store, request_id)) = self.held.take() {
            store.release(&request_id, self.digest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::fairrank::v1::RankedItem;

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
        let digest = store.digest_rank(&request("r-1", 5), &ids(&["a", "bc"]));
        assert_eq!(
            digest,
            store.digest_rank(&request("r-1", 5), &ids(&["a", "bc"]))
        );
        for other in [
            store.digest_rank(&request("r-1", 5), &ids(&["ab", "c"])),
            store.digest_rank(&request("r-1", 5), &ids(&["bc", "a"])),
            store.digest_rank(&request("r-1", 5), &ids(&["a"])),
            store.digest_rank(&request("r-1", 6), &ids(&["a", "bc"])),
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
            store.digest_rank(&moved, &ids(&["bc"])),
            store.digest_rank(&request("r-1", 5), &ids(&["a", "bc"]))
        );
        // Without a request id, or with the store off, nothing is hashed.
        assert_eq!(
            store.digest_rank(&request("", 5), &ids(&["a"])),
            store.digest_rank(&request("", 6), &ids(&["b"]))
        );
        let off = ReplayStore::new(Duration::from_secs(60), 0, 1 << 20);
        assert_eq!(
            off.digest_rank(&request("r-1", 5), &ids(&["a"])),
            off.digest_rank(&request("r-1", 6), &ids(&["b"]))
        );
    }

    /// The digest is keyed SipHash-1-3-128 of the documented serialization (built here the
    /// plain way: one buffer, every varint through prost, one write).
    fn oracle_digest(store: &ReplayStore, request: &RankRequest, ids: &[String]) -> Digest {
        let mut bytes = Vec::new();
        prost::encoding::encode_varint(request.encoded_len() as u64, &mut bytes);
        request.encode(&mut bytes).unwrap();
        prost::encoding::encode_varint(ids.len() as u64, &mut bytes);
        for id in ids {
            prost::encoding::encode_varint(id.len() as u64, &mut bytes);
        }
        for id in ids {
            bytes.extend_from_slice(id.as_bytes());
        }
        let mut hasher = SipHasher13::new_128(store.key.0, store.key.1);
        hasher.write(&bytes);
        let (first, second) = hasher.finish_128();
        Digest(first, second)
    }

    #[test]
    fn id_lengths_around_the_one_byte_varint_limit_digest_as_documented() {
        let store = ReplayStore::new(Duration::from_secs(60), 10, 1 << 20);
        let message = request("r-1", 5);
        // One-byte lengths saturate at 0xff before the check, so lengths of 255, 256 and
        // more (and 128: the first two-byte varint) must take the varint path.
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
                store.digest_rank(&message, &candidates),
                oracle_digest(&store, &message, &ids),
                "{lengths:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn digests_are_keyed_siphash_of_the_documented_bytes(
            request_id in "[a-z0-9-]{1,40}",
            k in 0_u32..1000,
            ids in proptest::collection::vec("[a-z0-9]{0,20}|\\PC{0,200}", 0..300),
        ) {
            let store = ReplayStore::new(Duration::from_secs(60), 10, 1 << 20);
            let message = request(&request_id, k);
            let candidates: CandidateIds = ids.iter().collect();
            proptest::prop_assert_eq!(
                store.digest_rank(&message, &candidates),
                oracle_digest(&store, &message, &ids)
            );
        }
    }

    #[test]
    fn digests_depend_on_the_per_process_key() {
        let first = ReplayStore::new(Duration::from_secs(60), 10, 1 << 20);
        let second = ReplayStore::new(Duration::from_secs(60), 10, 1 << 20);
        assert_ne!(first.key, second.key);
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
}
