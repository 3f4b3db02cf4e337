//! The `fairrank.v1.Ranker` route with a faster `Rank` request decoder: candidate ids are
//! collected into one buffer ([`engine::CandidateIds`]) instead of one `String` each.
//!
//! A 1000-candidate Rank request decoded by prost allocates (and later frees) 1000 strings;
//! measured with callgrind, that decode was over half of the server's instructions per
//! request. [`RankerRoutes`] serves `Ranker.Rank` through [`RankCodec`], whose message type
//! [`WireRankRequest`] takes field 10 (`candidate_ids`) itself and hands every other field
//! to prost's generated code; `RankBatch` is a [`routes::unary`] route. On both, a body
//! that does not decode is INVALID_ARGUMENT (tonic's codec says INTERNAL). Anything
//! unusual about an id (a multi-byte length, an id split across buffer chunks, non-ASCII
//! bytes, a malformed field) is decoded by prost's own code and then moved over, so
//! accepted input, decoded values and error messages are exactly prost's.

use std::convert::Infallible;
use std::sync::Arc;

use api::fairrank::v1 as pb;
use api::fairrank::v1::ranker_server::{Ranker, RankerServer};
use engine::CandidateIds;
use prost::Message;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, StdError, http};

use super::answer::WireRankResponse;
use super::errors;
use super::ranker::RankerService;
use super::routes::{self, OwnRoutes, Routes};

/// Field number of `fairrank.v1.RankRequest.candidate_ids`.
const CANDIDATE_IDS_FIELD: u32 = 10;

/// Ids up to this long are copied as one fixed-size block (no `memcpy` call per id).
const ID_COPY_BLOCK: usize = 16;

/// Bytes of an entry window of the fast loop of [`WireRankRequest::take_run`]: the id's
/// length byte, a copy block and the next entry's key.
const FAST_WINDOW: usize = ID_COPY_BLOCK + 2;

/// Ids whose ends the fast loop ([`take_fast_run`]) gathers before appending them (a power
/// of two).
const ENDS_BATCH: usize = 64;

/// The one-byte key of field 10 (`candidate_ids`) with wire type 2.
const KEY: u8 = ((CANDIDATE_IDS_FIELD as u8) << 3) | WireType::LengthDelimited as u8;

/// Initial size of the buffer tonic gathers a request's body in (its default is 8 KiB): a
/// 1000-candidate request is about 10 KB, so the default buffer was grown, by a `realloc`
/// that copies, on every call. Requests of up to the inline limit (2048 candidates of
/// 8-byte ids) fit.
const REQUEST_BUFFER_BYTES: usize = 32 * 1024;

/// Path of the `Rank` method.
const RANK_PATH: &str = "/fairrank.v1.Ranker/Rank";

/// Path of the `RankBatch` method.
const RANK_BATCH_PATH: &str = "/fairrank.v1.Ranker/RankBatch";

/// A decoded `RankRequest`: the candidate ids in one buffer, every other field in `message`
/// (whose `candidate_ids` stays empty).
#[derive(Debug, Default, Clone)]
pub struct WireRankRequest {
    /// Every field but the candidate ids.
    pub message: pb::RankRequest,
    /// The candidate ids, back to back, in `id_text[..id_text_len]` (valid UTF-8: every id
    /// appended is ASCII or came from prost's own `String`). The bytes past `id_text_len`
    /// are spare room that lets a short id be copied as one fixed 16-byte block.
    id_text: Vec<u8>,
    /// Length of the ids' text in `id_text`.
    id_text_len: usize,
    /// End offset in `id_text` of each id.
    id_ends: Vec<usize>,
}

impl WireRankRequest {
    /// The message (without candidate ids) and the candidate ids.
    pub fn into_parts(self) -> Result<(pb::RankRequest, CandidateIds), Status> {
        let WireRankRequest {
            message,
            mut id_text,
            id_text_len,
            id_ends,
        } = self;
        id_text.truncate(id_text_len);
        // Every id was appended whole and valid, so the parts always fit (one UTF-8 check
        // over the whole buffer, which is ASCII in the common case).
        let ids = String::from_utf8(id_text)
            .ok()
            .and_then(|text| CandidateIds::from_parts(text, id_ends))
            .ok_or_else(|| Status::internal("candidate ids decoded inconsistently"))?;
        Ok((message, ids))
    }

    /// The ids' text.
    fn id_text(&self) -> &[u8] {
        self.id_text.get(..self.id_text_len).unwrap_or_default()
    }

    /// Appends the id `window[..len]`; `window` may extend past the id (up to
    /// [`ID_COPY_BLOCK`] bytes are copied at once, and only `len` count).
    #[inline(always)]
    fn push_id(&mut self, window: &[u8], len: usize) {
        let start = self.id_text_len;
        let end = start + len;
        // Zero room for a whole block past the end, grown geometrically (amortized O(1)).
        if self.id_text.len() < end + ID_COPY_BLOCK {
            let room = (end + ID_COPY_BLOCK).max(2 * self.id_text.len());
            self.id_text.resize(room, 0);
        }
        // Fixed-size arrays, so the copy is two register moves rather than a `memcpy` call.
        let block = window.first_chunk::<ID_COPY_BLOCK>();
        let target = self
            .id_text
            .get_mut(start..)
            .and_then(|rest| rest.first_chunk_mut::<ID_COPY_BLOCK>());
        match (block, target) {
            (Some(block), Some(target)) if len <= ID_COPY_BLOCK => *target = *block,
            _ => {
                if let (Some(id), Some(target)) =
                    (window.get(..len), self.id_text.get_mut(start..end))
                {
                    target.copy_from_slice(id);
                }
            }
        }
        self.id_text_len = end;
        self.id_ends.push(end);
    }

    /// Appends the simple ids at the start of `chunk` (its first byte is the first id's
    /// length; see [`WireRankRequest::take_simple_ids`]), checking each is ASCII when
    /// `check_ascii`, and returns the length of the bytes taken (0: none).
    #[inline(always)]
    fn take_run(&mut self, chunk: &[u8], check_ascii: bool) -> usize {
        // Room for every id of the chunk (they hold fewer bytes than it) and a block past
        // them, so the loop below only writes into a slice.
        let room = self.id_text_len + chunk.len() + ID_COPY_BLOCK;
        if self.id_text.len() < room {
            self.id_text.resize(room, 0);
        }
        // Locals rather than fields, so the loop keeps them in registers.
        let text = self.id_text.as_mut_slice();
        let ends = &mut self.id_ends;
        let mut text_len = self.id_text_len;
        // `next` is where the next entry's length byte is; `taken` ends the last id taken.
        let mut next = 0;
        let mut taken = 0;
        // The common case first: while a whole entry window (length byte, a block of id
        // bytes, the next key) lies in the chunk, one bounds check covers the entry. An id
        // longer than a block, or the chunk's last bytes, go on in the general loop below.
        if !check_ascii {
            let run = take_fast_run(chunk, text, ends, text_len);
            (next, taken, text_len) = (run.next, run.taken, run.text_len);
            if !run.key_follows {
                self.id_text_len = text_len;
                return taken;
            }
        }
        while let Some(&len) = chunk.get(next) {
            let len = usize::from(len);
            // A length byte below 0x80 is the whole varint.
            if len >= 0x80 {
                break;
            }
            let start = next + 1;
            let end = start + len;
            let Some(id) = chunk.get(start..end) else {
                break;
            };
            if check_ascii && !id.is_ascii() {
                break;
            }
            let block = chunk
                .get(start..)
                .and_then(<[u8]>::first_chunk::<ID_COPY_BLOCK>);
            let target = text
                .get_mut(text_len..)
                .and_then(<[u8]>::first_chunk_mut::<ID_COPY_BLOCK>);
            match (block, target) {
                // Fixed-size arrays: two register moves rather than a `memcpy` call.
                (Some(block), Some(target)) if len <= ID_COPY_BLOCK => *target = *block,
                _ => match text.get_mut(text_len..text_len + len) {
                    Some(target) => target.copy_from_slice(id),
                    None => break,
                },
            }
            text_len += len;
            ends.push(text_len);
            taken = end;
            if chunk.get(taken) != Some(&KEY) {
                break;
            }
            // Read the key ahead; if the id after it is not simple, prost reads it again.
            next = taken + 1;
        }
        self.id_text_len = text_len;
        taken
    }

    /// Takes `candidate_ids` entries from `buf` while they are simple: a one-byte length,
    /// the whole id in the current chunk, ASCII. The first entry's key has been read; each
    /// further entry is taken only when its key (one byte: field 10, length-delimited)
    /// comes next. Returns false (consuming nothing) when the first entry is not simple.
    ///
    /// Taking a run of ids here instead of returning to prost's field loop per id avoids a
    /// varint key decode, a buffer bounds check and a call per id.
    fn take_simple_ids(&mut self, buf: &mut impl Buf) -> bool {
        let chunk = buf.chunk();
        if self.id_ends.is_empty() {
            // Room for the rest of the message as ids of the first id's length (no regrowth
            // for lists of similar ids; bounded by the message size).
            let entry_len = chunk.first().map_or(1, |&len| usize::from(len) + 2);
            self.id_ends.reserve(chunk.len() / entry_len + 1);
        }
        // Take the run of ids without looking at their bytes, then check all of them at
        // once; only a run with a non-ASCII byte somewhere is taken again, id by id, up to the
        // id that holds it (which prost then decodes, or refuses).
        let (text_start, ends_start) = (self.id_text_len, self.id_ends.len());
        let mut taken = self.take_run(chunk, false);
        if !self
            .id_text
            .get(text_start..self.id_text_len)
            .is_some_and(<[u8]>::is_ascii)
        {
            self.id_text_len = text_start;
            self.id_ends.truncate(ends_start);
            taken = self.take_run(chunk, true);
        }
        if taken == 0 {
            return false;
        }
        buf.advance(taken);
        true
    }
}

/// Where the fast loop ([`take_fast_run`]) stopped.
struct FastRun {
    /// Where the next entry's length byte is.
    next: usize,
    /// The end of the last id taken (0: none).
    taken: usize,
    /// The ids' text length after the ids taken.
    text_len: usize,
    /// Whether the key of another `candidate_ids` entry follows the last id taken.
    key_follows: bool,
}

/// The common case of [`WireRankRequest::take_run`] (its first loop, without the ASCII
/// check): while a whole entry window (length byte, a block of id bytes, the next key) lies
/// in `chunk`, one bounds check covers the entry; it stops at an id longer than a block, at
/// the chunk's last bytes, or where no key follows an id. Appends the ids to `text` (from
/// `text_len`) and their ends to `ends`.
///
/// A function of its own, not inlined, so that its few variables stay in registers (inlined
/// into the decoder, they were kept on the stack); and the ends gather in a local array,
/// appended every `ENDS_BATCH` ids and when the loop stops, rather than one `Vec::push`
/// (capacity check, length store) per id.
#[inline(never)]
fn take_fast_run(
    chunk: &[u8],
    text: &mut [u8],
    ends: &mut Vec<usize>,
    mut text_len: usize,
) -> FastRun {
    let mut batch = [0_usize; ENDS_BATCH];
    let mut batched = 0;
    let mut next = 0;
    let mut taken = 0;
    let mut key_follows = true;
    while let Some(window) = chunk
        .get(next..)
        .and_then(<[u8]>::first_chunk::<FAST_WINDOW>)
    {
        let [length, block @ .., _] = window;
        let len = usize::from(*length);
        if len > ID_COPY_BLOCK {
            break;
        }
        let Some(target) = text
            .get_mut(text_len..)
            .and_then(<[u8]>::first_chunk_mut::<ID_COPY_BLOCK>)
        else {
            break;
        };
        *target = *block;
        text_len += len;
        // `batched` is below `ENDS_BATCH` here (the remainder only spares a check).
        batch[batched % ENDS_BATCH] = text_len;
        batched += 1;
        if batched == ENDS_BATCH {
            ends.extend_from_slice(&batch);
            batched = 0;
        }
        taken = next + 1 + len;
        // The key after the id is inside the window (`1 + len <= 1 + ID_COPY_BLOCK`).
        if window.get(1 + len) != Some(&KEY) {
            key_follows = false;
            break;
        }
        next = taken + 1;
    }
    ends.extend_from_slice(batch.get(..batched).unwrap_or_default());
    FastRun {
        next,
        taken,
        text_len,
        key_follows,
    }
}

impl Message for WireRankRequest {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        self.message.encode_raw(buf);
        let mut start = 0;
        for &end in &self.id_ends {
            let id = self.id_text().get(start..end).unwrap_or_default();
            prost::encoding::encode_key(CANDIDATE_IDS_FIELD, WireType::LengthDelimited, buf);
            prost::encoding::encode_varint(id.len() as u64, buf);
            buf.put_slice(id);
            start = end;
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        if tag == CANDIDATE_IDS_FIELD
            && wire_type == WireType::LengthDelimited
            && self.take_simple_ids(buf)
        {
            return Ok(());
        }
        self.message.merge_field(tag, wire_type, buf, ctx)?;
        // prost appended the id (if the field was an id): move it over, keeping the order.
        if tag == CANDIDATE_IDS_FIELD
            && let Some(id) = self.message.candidate_ids.pop()
        {
            self.push_id(id.as_bytes(), id.len());
        }
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        let mut start = 0;
        let ids: usize = self
            .id_ends
            .iter()
            .map(|&end| {
                let len = end - start;
                start = end;
                prost::encoding::key_len(CANDIDATE_IDS_FIELD)
                    + prost::encoding::encoded_len_varint(len as u64)
                    + len
            })
            .sum();
        self.message.encoded_len() + ids
    }

    fn clear(&mut self) {
        self.message.clear();
        self.id_text.clear();
        self.id_text_len = 0;
        self.id_ends.clear();
    }
}

/// The codec of the `Rank` route: [`WireRankRequest`] in, `RankResponse` out (encoded
/// once, as a [`WireRankResponse`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct RankCodec;

/// Writes [`WireRankResponse`]s: prost's encoding of the `RankResponse`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResponseEncoder;

/// Decodes [`WireRankRequest`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestDecoder;

impl Codec for RankCodec {
    type Encode = WireRankResponse;
    type Decode = WireRankRequest;
    type Encoder = ResponseEncoder;
    type Decoder = RequestDecoder;

    fn encoder(&mut self) -> ResponseEncoder {
        ResponseEncoder
    }

    fn decoder(&mut self) -> RequestDecoder {
        RequestDecoder
    }
}

impl Encoder for ResponseEncoder {
    type Item = WireRankResponse;
    type Error = Status;

    fn encode(&mut self, item: WireRankResponse, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // The buffer grows as needed, so writing cannot run out of space.
        buf.reserve(item.encoded_len());
        item.write(buf);
        Ok(())
    }
}

impl Decoder for RequestDecoder {
    type Item = WireRankRequest;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<WireRankRequest>, Status> {
        // tonic hands over each message in one contiguous buffer: decode from the slice,
        // which is much cheaper per field than through `DecodeBuf`'s `Buf` methods (same
        // decoder, same results and errors).
        let len = buf.remaining();
        let chunk = buf.chunk();
        let decoded = if chunk.len() == len {
            let decoded = WireRankRequest::decode(chunk);
            buf.advance(len);
            decoded
        } else {
            WireRankRequest::decode(&mut *buf)
        };
        decoded
            .map(Some)
            .map_err(|error| errors::undecodable_request(&error))
    }

    fn buffer_settings(&self) -> BufferSettings {
        // The yield threshold only matters when encoding streams: tonic's default, 32 KiB.
        BufferSettings::new(REQUEST_BUFFER_BYTES, 32 * 1024)
    }
}

/// The Ranker service: `Rank` with [`RankCodec`], `RankBatch` as a [`routes::unary`] route,
/// anything else (an unknown method) by the generated server.
pub type RankerRoutes = Routes<RankerService, RankerServer<RankerService>>;

impl RankerRoutes {
    /// Routes over `service`, with `max_message_bytes` as the decoding and encoding limit.
    pub fn new(service: RankerService, max_message_bytes: usize) -> RankerRoutes {
        let service = Arc::new(service);
        let generated = RankerServer::from_arc(Arc::clone(&service))
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        Routes::from_parts(service, generated, max_message_bytes)
    }
}

impl OwnRoutes for RankerService {
    fn route<B>(
        service: &Arc<Self>,
        request: http::Request<B>,
        limit: usize,
    ) -> Result<BoxFuture<http::Response<tonic::body::Body>, Infallible>, http::Request<B>>
    where
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        let service = Arc::clone(service);
        match request.uri().path() {
            RANK_PATH => Ok(routes::unary_with_codec(
                RankCodec,
                request,
                limit,
                move |request| {
                    let service = Arc::clone(&service);
                    Box::pin(async move { service.rank_wire(request).await })
                },
            )),
            RANK_BATCH_PATH => Ok(routes::unary(request, limit, move |request| {
                let service = Arc::clone(&service);
                Box::pin(async move { Ranker::rank_batch(&*service, request).await })
            })),
            _ => Err(request),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use proptest::test_runner::TestCaseError;
    use prost::bytes::Bytes;

    fn request(ids: &[&str]) -> pb::RankRequest {
        pb::RankRequest {
            request_id: "r-1".into(),
            user: Some(pb::rank_request::User::UserId("u1".into())),
            candidate_ids: ids.iter().map(|id| (*id).to_owned()).collect(),
            k: 3,
            ..Default::default()
        }
    }

    /// Decodes `bytes` as a [`WireRankRequest`] fed in chunks of `chunk` bytes.
    fn decode_chunked(bytes: &[u8], chunk: usize) -> Result<WireRankRequest, prost::DecodeError> {
        let chunks: Vec<Bytes> = bytes
            .chunks(chunk.max(1))
            .map(Bytes::copy_from_slice)
            .collect();
        let mut buf = chunks
            .into_iter()
            .fold(Box::new(Bytes::new()) as Box<dyn Buf>, |buf, next| {
                Box::new(buf.chain(next))
            });
        WireRankRequest::decode(&mut buf)
    }

    #[test]
    fn decodes_like_prost_whatever_the_ids_and_chunking() {
        let long = "x".repeat(200);
        // Around the 16-byte copy block: ids of 15, 16 and 17 bytes, and short ids last in
        // the message (fewer than 16 bytes left after them).
        let (fifteen, sixteen, seventeen) = ("f".repeat(15), "s".repeat(16), "v".repeat(17));
        let ids = [
            "i0000001",
            "",
            "ümlaut",
            long.as_str(),
            fifteen.as_str(),
            sixteen.as_str(),
            seventeen.as_str(),
            "i0000002",
            "i0000001",
            "z",
        ];
        let original = request(&ids);
        let bytes = original.encode_to_vec();
        for chunk in [1, 2, 3, 7, 64, bytes.len()] {
            let decoded = decode_chunked(&bytes, chunk).unwrap();
            let (message, candidates) = decoded.clone().into_parts().unwrap();
            assert!(message.candidate_ids.is_empty());
            assert_eq!(candidates.to_vec(), original.candidate_ids, "chunk {chunk}");
            let mut rebuilt = message;
            rebuilt.candidate_ids = candidates.to_vec();
            assert_eq!(rebuilt, original);
            // Its own encoding (ids last) decodes to the same request.
            assert_eq!(decoded.encoded_len(), decoded.encode_to_vec().len());
            assert_eq!(
                pb::RankRequest::decode(&decoded.encode_to_vec()[..]).unwrap(),
                original
            );
        }
    }

    #[test]
    fn the_fast_loop_hands_over_at_long_ids_other_fields_and_the_chunk_end() {
        // Runs of 8-byte ids broken by ids of 16 (the block) and 17 bytes (past it) and an
        // empty id, a non-ASCII id, other fields after the ids, and every chunk size:
        // always prost's request.
        let (block, past) = ("b".repeat(ID_COPY_BLOCK), "p".repeat(ID_COPY_BLOCK + 1));
        let mut ids: Vec<String> = (0..40).map(|i| format!("i{i:07}")).collect();
        ids.insert(5, block);
        ids.insert(11, past);
        ids.insert(20, String::new());
        ids.insert(30, "é".to_owned());
        let mut original = request(&ids.iter().map(String::as_str).collect::<Vec<_>>());
        original.pool_size = Some(7);
        original.explain = Some(pb::ExplainOptions {
            level: pb::ExplainLevel::Reasons as i32,
            max_dimensions: 3,
        });
        let bytes = original.encode_to_vec();
        for chunk in 1..=FAST_WINDOW + 2 {
            assert_decodes_like_prost(&bytes, chunk).unwrap();
        }
        assert_decodes_like_prost(&bytes, bytes.len()).unwrap();
        // Cut anywhere: the same error as prost (or the same shorter request).
        for cut in 0..bytes.len() {
            assert_decodes_like_prost(&bytes[..cut], bytes.len()).unwrap();
        }
    }

    #[test]
    fn invalid_input_fails_with_prosts_error() {
        let mut bytes = request(&["ok", "bad"]).encode_to_vec();
        // Make the last id invalid UTF-8 (it is the message's last field).
        let last = bytes.len() - 1;
        bytes[last] = 0xff;
        let ours = WireRankRequest::decode(&bytes[..]).unwrap_err();
        let prosts = pb::RankRequest::decode(&bytes[..]).unwrap_err();
        assert_eq!(ours.to_string(), prosts.to_string());
        // A truncated message.
        let bytes = request(&["i0000001"]).encode_to_vec();
        let cut = &bytes[..bytes.len() - 3];
        assert_eq!(
            WireRankRequest::decode(cut).unwrap_err().to_string(),
            pb::RankRequest::decode(cut).unwrap_err().to_string()
        );
        // Field 10 with the wrong wire type.
        let wrong = [0x50_u8, 0x01];
        assert_eq!(
            WireRankRequest::decode(&wrong[..]).unwrap_err().to_string(),
            pb::RankRequest::decode(&wrong[..]).unwrap_err().to_string()
        );
    }

    /// What `bytes` decode to by our decoder (fed in chunks of `chunk` bytes) and by prost:
    /// the same request, or the same error message.
    fn assert_decodes_like_prost(bytes: &[u8], chunk: usize) -> Result<(), TestCaseError> {
        let prosts = pb::RankRequest::decode(bytes);
        match (decode_chunked(bytes, chunk), prosts) {
            (Ok(ours), Ok(prosts)) => {
                let (mut message, candidates) = ours.into_parts().map_err(|status| {
                    TestCaseError::fail(format!("into_parts failed: {status:?}"))
                })?;
                message.candidate_ids = candidates.to_vec();
                prop_assert_eq!(message, prosts);
            }
            (Err(ours), Err(prosts)) => prop_assert_eq!(ours.to_string(), prosts.to_string()),
            (ours, prosts) => prop_assert!(
                false,
                "ours {:?}, prost's {:?}",
                ours.map(|_| ()),
                prosts.map(|_| ())
            ),
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// Untrusted bytes: a valid request with a few bytes overwritten and possibly cut
        /// short, fed in random chunk sizes. Never a panic, and always prost's verdict.
        #[test]
        fn a_damaged_request_decodes_exactly_as_prost_decodes_it(
            ids in proptest::collection::vec("[a-z0-9]{0,20}|\\PC{0,4}", 0..40),
            edits in proptest::collection::vec((any::<Index>(), any::<u8>()), 0..4),
            cut in proptest::option::of(any::<Index>()),
            chunk in 1_usize..80,
        ) {
            let mut bytes = request(&ids.iter().map(String::as_str).collect::<Vec<_>>())
                .encode_to_vec();
            for (at, byte) in edits {
                let at = at.index(bytes.len());
                bytes[at] = byte;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            assert_decodes_like_prost(&bytes, chunk)?;
        }

        /// Arbitrary bytes, mostly not a request at all.
        #[test]
        fn arbitrary_bytes_decode_exactly_as_prost_decodes_them(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            chunk in 1_usize..80,
        ) {
            assert_decodes_like_prost(&bytes, chunk)?;
        }
    }
}
