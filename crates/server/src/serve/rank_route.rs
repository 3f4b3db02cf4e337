//! The `fairrank.v1.Ranker` route with a faster `Rank` request decoder: candidate ids are
//! cut from the request's body ([`engine::CandidateIds::from_shared`]) instead of copied
//! into one `String` each.
//!
//! A 1000-candidate Rank request decoded by prost allocates (and later frees) 1000 strings;
//! measured with callgrind, that decode was over half of the server's instructions per
//! request. [`RankerRoutes`] serves `Ranker.Rank` through [`RankCodec`], whose message type
//! [`WireRankRequest`] takes field 10 (`candidate_ids`) itself and hands every other field
//! to prost's generated code, and refuses more ids than `ranking.max_candidates` as it goes;
//! `RankBatch` goes through [`BatchCodec`], prost after a count of the body's entries and
//! ids against the batch limits (no allocation before the limits hold). On both, a body
//! that does not decode is INVALID_ARGUMENT (tonic's codec says INTERNAL).
//!
//! The decoder keeps the body (tonic hands it over as one `Bytes` without copying) and
//! records each id as its byte range in it: no id is copied, nothing is zeroed, and the ids'
//! UTF-8 check is one ASCII pass over the bytes from the first id to the last. Accepted
//! input, decoded values and errors are exactly prost's: the decoder's checks are prost's
//! (key, wire type, length varint, length within the body, UTF-8), and whenever any of them
//! fails the body is decoded again by prost's own code, whose error is the answer (so a
//! refused request always gets prost's first error, in prost's order).

use std::convert::Infallible;
use std::sync::Arc;

use api::fairrank::v1 as pb;
use api::fairrank::v1::ranker_server::{Ranker, RankerServer};
use engine::CandidateIds;
use prost::Message;
use prost::bytes::{Buf, Bytes};
use prost::encoding::{DecodeContext, WireType};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, StdError, http};

use super::answer::WireRankResponse;
use super::convert;
use super::errors;
use super::ranker::{RankerService, refused_before_handler};
use super::replay::{CANDIDATE_IDS_FIELD, CANDIDATE_IDS_KEY, IdEntries, IdRun};
use super::routes::{self, OwnRoutes, Routes};

/// Initial size of the buffer tonic gathers a request's body in (its default is 8 KiB): a
/// 1000-candidate request is about 10 KB, so the default buffer was grown, by a `realloc`
/// that copies, on every call. Requests of up to the inline limit (2048 candidates of
/// 8-byte ids) fit.
const REQUEST_BUFFER_BYTES: usize = 32 * 1024;

/// Path of the `Rank` method.
const RANK_PATH: &str = "/fairrank.v1.Ranker/Rank";

/// Path of the `RankBatch` method.
const RANK_BATCH_PATH: &str = "/fairrank.v1.Ranker/RankBatch";

/// A decoded `RankRequest`: every field but the candidate ids in `message` (whose
/// `candidate_ids` stays empty), the ids cut from the body, and where the body holds their
/// entries as the replay digest hashes them.
#[derive(Debug, Clone)]
pub struct WireRankRequest {
    /// Every field but the candidate ids.
    pub message: pb::RankRequest,
    /// The candidate ids, in order.
    ids: CandidateIds,
    /// Runs of the ids' entries in the body, for the replay digest.
    entries: IdEntries,
}

/// Why a body did not decode.
#[derive(Debug)]
pub enum DecodeFailure {
    /// The body is not a `RankRequest`: prost's error.
    Malformed(prost::DecodeError),
    /// The fast decoder refused a body that prost accepts: a bug.
    Inconsistent,
    /// More candidate ids than the server's `max_candidates`.
    TooManyIds { limit: usize },
    /// A `fairness` policy above [`convert::MAX_FAIRNESS_WIRE_BYTES`] on the wire (all its
    /// occurrences together, as prost merges them): `bytes` counted when refused, and the
    /// policy's string that is above its own limit, if one is.
    FairnessTooLarge {
        bytes: usize,
        oversized: Option<OversizedString>,
    },
}

/// A string field of a `fairness` policy above its own limit, found on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OversizedString {
    /// Its path in the request (`fairness.exposure_scope`, ...).
    pub field: &'static str,
    /// Its length.
    pub bytes: usize,
    /// Its limit.
    pub limit: usize,
}

impl OversizedString {
    /// The refusal the engine gives the same string in a smaller policy, for the field
    /// `prefix` + its path (`requests[3].` in a batch).
    pub fn status(&self, prefix: &str) -> Status {
        errors::limit_exceeded(
            &format!("{prefix}{}", self.field),
            format!(
                "is {} bytes long; at most {} are allowed",
                self.bytes, self.limit
            ),
        )
    }
}

/// The string fields of `FairnessPolicy` with their limits, in the order the engine checks
/// them: (tag, path, limit).
const POLICY_STRINGS: [(u32, &str, usize); 3] = [
    (1, "fairness.constraint", engine::MAX_CONSTRAINT_NAME_BYTES),
    (
        3,
        "fairness.group_attribute",
        engine::MAX_GROUP_ATTRIBUTE_BYTES,
    ),
    (
        4,
        "fairness.exposure_scope",
        engine::MAX_EXPOSURE_SCOPE_BYTES,
    ),
];

/// The string of the `fairness` policy of the `RankRequest` `body` that is above its own
/// limit, if one is, as prost would decode the policy (the last occurrence of a string
/// wins; the first field over its limit in the engine's order). Read on the wire, keys and
/// lengths only, without decoding any policy (its `Struct` is what the wire bound keeps
/// prost from building); `None` where the body is malformed.
fn oversized_policy_string(body: &[u8]) -> Option<OversizedString> {
    let context = DecodeContext::default();
    let mut lengths = [None; POLICY_STRINGS.len()];
    let mut rest = body;
    while !rest.is_empty() {
        let (tag, wire_type) = prost::encoding::decode_key(&mut rest).ok()?;
        if tag != FAIRNESS_FIELD || wire_type != WireType::LengthDelimited {
            prost::encoding::skip_field(wire_type, tag, &mut rest, context.clone()).ok()?;
            continue;
        }
        let length = take_length(&mut rest)?;
        let (mut policy, after) = rest.split_at(length);
        rest = after;
        while !policy.is_empty() {
            let (tag, wire_type) = prost::encoding::decode_key(&mut policy).ok()?;
            let string = POLICY_STRINGS.iter().position(|&(known, ..)| known == tag);
            match string {
                Some(index) if wire_type == WireType::LengthDelimited => {
                    let length = take_length(&mut policy)?;
                    lengths[index] = Some(length);
                    policy = policy.get(length..)?;
                }
                _ => {
                    prost::encoding::skip_field(wire_type, tag, &mut policy, context.clone())
                        .ok()?;
                }
            }
        }
    }
    POLICY_STRINGS
        .iter()
        .zip(lengths)
        .find_map(|(&(_, field, limit), length)| {
            let bytes = length.filter(|&length| length > limit)?;
            Some(OversizedString {
                field,
                bytes,
                limit,
            })
        })
}

/// Why [`decode_fast`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FastFailure {
    /// A check failed: prost decides what is wrong.
    Refused,
    /// More than the limit of candidate ids.
    TooManyIds,
    /// A `fairness` policy of this many bytes or more (see [`DecodeFailure`]).
    FairnessTooLarge(usize),
}

impl WireRankRequest {
    /// The message (without candidate ids), the candidate ids, and where the body holds
    /// their entries.
    pub fn into_parts(self) -> (pb::RankRequest, CandidateIds, IdEntries) {
        (self.message, self.ids, self.entries)
    }

    /// Decodes the request in `buf` (a body in one chunk, as tonic's, is kept without
    /// copying; a body in several chunks is gathered first), refusing more than `max_ids`
    /// candidate ids as soon as the decoder has seen that many (memory for the ids' ranges
    /// stays bounded by the limit, not by the body: an empty id is 2 bytes of body).
    pub fn decode(mut buf: impl Buf, max_ids: usize) -> Result<WireRankRequest, DecodeFailure> {
        let body = buf.copy_to_bytes(buf.remaining());
        WireRankRequest::decode_body(body, max_ids)
    }

    /// Decodes the request in `body`, keeping `body` for the ids; see
    /// [`WireRankRequest::decode`].
    pub fn decode_body(body: Bytes, max_ids: usize) -> Result<WireRankRequest, DecodeFailure> {
        match decode_fast(&body, max_ids) {
            Err(FastFailure::TooManyIds) => Err(DecodeFailure::TooManyIds { limit: max_ids }),
            Err(FastFailure::FairnessTooLarge(bytes)) => Err(DecodeFailure::FairnessTooLarge {
                bytes,
                oversized: oversized_policy_string(&body),
            }),
            Err(FastFailure::Refused) => Err(prost_verdict(&body)),
            Ok((message, spans, runs)) => match CandidateIds::from_shared(body.clone(), spans) {
                Some(ids) => Ok(WireRankRequest {
                    message,
                    ids,
                    entries: IdEntries::new(body, runs),
                }),
                None => Err(prost_verdict(&body)),
            },
        }
    }
}

/// Prost's verdict on a body the fast decoder refused: prost's error (or, if prost accepts
/// it, the fast decoder's inconsistency).
#[cold]
fn prost_verdict(body: &[u8]) -> DecodeFailure {
    match pb::RankRequest::decode(body) {
        Err(error) => DecodeFailure::Malformed(error),
        Ok(_) => DecodeFailure::Inconsistent,
    }
}

/// Ids' byte ranges in the body, as [`CandidateIds::from_shared`] takes them.
type Spans = Vec<(usize, usize)>;

/// What [`decode_fast`] returns: every field but the ids, the ids' ranges, and their runs.
type FastDecoded = (pb::RankRequest, Spans, Vec<IdRun>);

/// Decodes `body` as prost's `RankRequest::decode` does, but for the candidate ids, which
/// are recorded as byte ranges of `body` (not yet checked for UTF-8), with the runs of
/// entries the digest can hash from the body. Stops at the first failed check, as soon as
/// it holds more than `max_ids` ids, or before decoding a `fairness` policy that would take
/// the request's policies above [`convert::MAX_FAIRNESS_WIRE_BYTES`].
fn decode_fast(body: &[u8], max_ids: usize) -> Result<FastDecoded, FastFailure> {
    decode_fast_checked(body, max_ids).ok_or(FastFailure::Refused)?
}

/// [`decode_fast`] with `None` for a failed check.
fn decode_fast_checked(body: &[u8], max_ids: usize) -> Option<Result<FastDecoded, FastFailure>> {
    let mut message = pb::RankRequest::default();
    let mut spans: Spans = Vec::new();
    let mut runs = Vec::new();
    let mut rest = body;
    let ctx = DecodeContext::default();
    let mut fairness_bytes = 0usize;
    // prost's `Message::merge` loop, with field 10 taken here.
    while !rest.is_empty() {
        let (tag, wire_type) = prost::encoding::decode_key(&mut rest).ok()?;
        if tag == FAIRNESS_FIELD
            && wire_type == WireType::LengthDelimited
            && let Some(length) = length_ahead(rest)
        {
            fairness_bytes += length;
            if fairness_bytes > convert::MAX_FAIRNESS_WIRE_BYTES {
                return Some(Err(FastFailure::FairnessTooLarge(fairness_bytes)));
            }
        }
        if tag != CANDIDATE_IDS_FIELD {
            message
                .merge_field(tag, wire_type, &mut rest, ctx.clone())
                .ok()?;
            continue;
        }
        if wire_type != WireType::LengthDelimited {
            return None;
        }
        let at = body.len() - rest.len();
        if spans.is_empty() {
            // Room for the rest of the message as ids of the first id's length (no regrowth
            // for lists of similar ids; bounded by the message size).
            let entry_len = rest.first().map_or(1, |&len| usize::from(len) + 2);
            spans.reserve((rest.len() / entry_len + 1).min(max_ids.saturating_add(1)));
        }
        let first = spans.len();
        let taken = take_id_run(body, at, &mut spans, max_ids);
        if spans.len() > max_ids {
            return Some(Err(FastFailure::TooManyIds));
        }
        if spans.len() > first {
            runs.push(IdRun {
                ids: first..spans.len(),
                bytes: at..taken,
            });
            rest = body.get(taken..)?;
            continue;
        }
        // Any other id: a longer length varint (ids of 128 bytes or more, or a varint with
        // padding), read as prost reads it.
        let length = take_length(&mut rest)?;
        let start = body.len() - rest.len();
        spans.push((start, start + length));
        if spans.len() > max_ids {
            return Some(Err(FastFailure::TooManyIds));
        }
        rest = rest.get(length..)?;
    }
    Some(Ok((message, spans, runs)))
}

/// Tag of `RankRequest.fairness`.
const FAIRNESS_FIELD: u32 = 20;

/// Takes the length varint of a length-delimited field from the front of `rest`: the
/// field's length, or `None` when the varint is invalid or the field runs past `rest`
/// (prost then refuses the body and says why).
fn take_length(rest: &mut &[u8]) -> Option<usize> {
    let length = prost::encoding::decode_varint(rest).ok()?;
    usize::try_from(length)
        .ok()
        .filter(|&length| length <= rest.len())
}

/// [`take_length`] without taking it.
fn length_ahead(mut rest: &[u8]) -> Option<usize> {
    take_length(&mut rest)
}

/// Takes the run of simple `candidate_ids` entries starting with the length byte at
/// `body[at]` (the first entry's key has been read): entries with a one-byte length and the
/// whole id in the body, each further one taken only when the one-byte key of field 10
/// comes next. Appends each id's range to `spans` and returns the end of the last id taken
/// (`at`: none). Stops early once `spans` holds more than `max_ids` ranges.
///
/// One call per run instead of a return to the field loop per id spares a varint key
/// decode and a call per id; the bytes `body[at..end]` are then the run's entries but for
/// the first key, as the digest hashes them ([`IdRun`]). Where [`UNIFORM_BLOCK`] entries in
/// a row have ids of one length (a client's ids usually do), they are checked in one
/// branch-free pass and taken in a straight line ([`take_uniform_block`]); otherwise
/// entries are taken one by one, a block's worth at a time before the next try. A function
/// of its own, not inlined, so that its variables stay in registers. (A variant with one
/// bounds check per 129-byte window and the ranges gathered in a local array, as the
/// copying decoder did, was no faster: BENCHMARKS.md, branch `wire2`.)
#[inline(never)]
fn take_id_run(body: &[u8], at: usize, spans: &mut Spans, max_ids: usize) -> usize {
    let mut next = at;
    let mut taken = at;
    loop {
        while let Some(end) = take_uniform_block(body, next, spans) {
            taken = end;
            next = end + 1;
            if spans.len() > max_ids {
                return taken;
            }
        }
        if spans.len() > max_ids {
            return taken;
        }
        for _ in 0..UNIFORM_BLOCK {
            let Some(&length) = body.get(next) else {
                return taken;
            };
            // A length byte below 0x80 is the whole varint.
            if length >= 0x80 {
                return taken;
            }
            let start = next + 1;
            let end = start + usize::from(length);
            if end > body.len() {
                return taken;
            }
            spans.push((start, end));
            taken = end;
            if body.get(end) != Some(&CANDIDATE_IDS_KEY) {
                return taken;
            }
            // Read the key ahead; if the entry after it is not simple, the field loop
            // reads the key again.
            next = end + 1;
        }
    }
}

/// Entries in a block of [`take_uniform_block`].
const UNIFORM_BLOCK: usize = 16;

/// Takes the [`UNIFORM_BLOCK`] entries starting with the length byte at `body[next]` if
/// they are all simple, their ids all of that first length, and each followed by the key
/// of field 10 (the block's last key included, so the run goes on after it): appends their
/// ranges and returns the end of the block's last id (where that key is). `None`, taking
/// nothing, otherwise.
#[inline(always)]
fn take_uniform_block(body: &[u8], next: usize, spans: &mut Spans) -> Option<usize> {
    let length = *body.get(next)?;
    if length >= 0x80 {
        return None;
    }
    let id_len = usize::from(length);
    let stride = id_len + 2;
    let block = body.get(next..next + UNIFORM_BLOCK * stride)?;
    let uniform = block.chunks_exact(stride).fold(true, |uniform, entry| {
        uniform & (entry[0] == length) & (entry[stride - 1] == CANDIDATE_IDS_KEY)
    });
    if !uniform {
        return None;
    }
    spans.extend((0..UNIFORM_BLOCK).map(|entry| {
        let start = next + entry * stride + 1;
        (start, start + id_len)
    }));
    Some(next + UNIFORM_BLOCK * stride - 1)
}

/// The codec of the `Rank` route: [`WireRankRequest`] in, `RankResponse` out (encoded
/// once, as a [`WireRankResponse`]).
#[derive(Debug, Clone)]
pub struct RankCodec {
    /// The engine's `max_candidates`: the decoder refuses a request with more ids.
    max_ids: usize,
}

/// Writes [`WireRankResponse`]s: prost's encoding of the `RankResponse`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResponseEncoder;

/// Decodes [`WireRankRequest`]s of at most `max_ids` candidate ids.
#[derive(Debug, Clone, Copy)]
pub struct RequestDecoder {
    max_ids: usize,
}

impl Codec for RankCodec {
    type Encode = WireRankResponse;
    type Decode = WireRankRequest;
    type Encoder = ResponseEncoder;
    type Decoder = RequestDecoder;

    fn encoder(&mut self) -> ResponseEncoder {
        ResponseEncoder
    }

    fn decoder(&mut self) -> RequestDecoder {
        RequestDecoder {
            max_ids: self.max_ids,
        }
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
        // tonic gathers each message in one `BytesMut`: taking it as `Bytes` does not copy.
        // A refusal is counted by the route (`refused_before_handler`).
        match WireRankRequest::decode(&mut *buf, self.max_ids) {
            Ok(request) => Ok(Some(request)),
            Err(DecodeFailure::Malformed(error)) => Err(errors::undecodable_request(&error)),
            Err(DecodeFailure::TooManyIds { limit }) => Err(errors::limit_exceeded(
                "candidate_ids",
                format!("more than {limit} ids; at most {limit} are allowed"),
            )),
            Err(DecodeFailure::FairnessTooLarge { bytes, oversized }) => Err(match oversized {
                Some(oversized) => oversized.status(""),
                None => {
                    convert::fairness_too_large("fairness", bytes, convert::MAX_FAIRNESS_WIRE_BYTES)
                }
            }),
            Err(DecodeFailure::Inconsistent) => {
                Err(errors::internal("candidate ids decoded inconsistently"))
            }
        }
    }

    fn buffer_settings(&self) -> BufferSettings {
        // The yield threshold only matters when encoding streams: tonic's default, 32 KiB.
        BufferSettings::new(REQUEST_BUFFER_BYTES, 32 * 1024)
    }
}

/// Limits a `RankBatch` body is held to before prost decodes it (each candidate id becomes
/// a `String`, about 12 times the 2 to 3 bytes an empty or 1-byte id takes on the wire;
/// fairness policies are held to [`convert::MAX_FAIRNESS_WIRE_BYTES`] per entry and
/// [`convert::MAX_BATCH_FAIRNESS_WIRE_BYTES`] in all, for their `Struct`s).
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// `ranking.max_batch_requests`.
    pub max_entries: usize,
    /// `ranking.max_batch_candidates`: candidate ids of all entries together.
    pub max_ids: usize,
}

/// The codec of the `RankBatch` route: prost both ways, the body first counted against
/// [`BatchLimits`] without allocating.
#[derive(Debug, Clone)]
pub struct BatchCodec {
    limits: BatchLimits,
}

/// Decodes `RankBatchRequest`s within [`BatchLimits`].
#[derive(Debug, Clone, Copy)]
pub struct BatchDecoder {
    limits: BatchLimits,
}

impl Codec for BatchCodec {
    type Encode = pb::RankBatchResponse;
    type Decode = pb::RankBatchRequest;
    type Encoder = routes::ResponseEncoder<pb::RankBatchResponse>;
    type Decoder = BatchDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        routes::ProstRouteCodec::<pb::RankBatchRequest, pb::RankBatchResponse>::default().encoder()
    }

    fn decoder(&mut self) -> BatchDecoder {
        BatchDecoder {
            limits: self.limits,
        }
    }
}

impl Decoder for BatchDecoder {
    type Item = pb::RankBatchRequest;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<pb::RankBatchRequest>, Status> {
        // A refusal is counted by the route (`refused_before_handler`).
        let body = buf.copy_to_bytes(buf.remaining());
        if let Some(refusal) = batch_over_limits(&body, self.limits) {
            return Err(refusal);
        }
        pb::RankBatchRequest::decode(body)
            .map(Some)
            .map_err(|error| errors::undecodable_request(&error))
    }
}

/// Tag of `RankBatchRequest.requests`.
const BATCH_REQUESTS_FIELD: u32 = 1;

/// Why a `RankBatchRequest` body passes `limits`, counted field by field without decoding
/// (stopping at the first limit passed); `None` when it is within them, or malformed
/// (prost then says how).
fn batch_over_limits(body: &[u8], limits: BatchLimits) -> Option<Status> {
    let over = |what: &str, limit: usize| {
        errors::limit_exceeded(
            "requests",
            format!("more than {limit} {what}; the batch limit is {limit}"),
        )
    };
    let context = DecodeContext::default();
    let (mut rest, mut entries, mut ids) = (body, 0usize, 0usize);
    let mut batch_fairness_bytes = 0usize;
    while !rest.is_empty() {
        let (tag, wire_type) = prost::encoding::decode_key(&mut rest).ok()?;
        if tag != BATCH_REQUESTS_FIELD || wire_type != WireType::LengthDelimited {
            prost::encoding::skip_field(wire_type, tag, &mut rest, context.clone()).ok()?;
            continue;
        }
        let length = take_length(&mut rest)?;
        let (mut entry, after) = rest.split_at(length);
        let whole_entry = entry;
        rest = after;
        entries += 1;
        if entries > limits.max_entries {
            return Some(over("requests", limits.max_entries));
        }
        let mut fairness_bytes = 0usize;
        while !entry.is_empty() {
            let (tag, wire_type) = prost::encoding::decode_key(&mut entry).ok()?;
            if tag == CANDIDATE_IDS_FIELD {
                ids += 1;
                if ids > limits.max_ids {
                    return Some(over("candidate ids in all", limits.max_ids));
                }
            }
            if tag == FAIRNESS_FIELD
                && wire_type == WireType::LengthDelimited
                && let Some(length) = length_ahead(entry)
            {
                fairness_bytes += length;
                batch_fairness_bytes += length;
                if fairness_bytes > convert::MAX_FAIRNESS_WIRE_BYTES {
                    let prefix = format!("requests[{}].", entries - 1);
                    return Some(match oversized_policy_string(whole_entry) {
                        Some(oversized) => oversized.status(&prefix),
                        None => convert::fairness_too_large(
                            &format!("{prefix}fairness"),
                            fairness_bytes,
                            convert::MAX_FAIRNESS_WIRE_BYTES,
                        ),
                    });
                }
                if batch_fairness_bytes > convert::MAX_BATCH_FAIRNESS_WIRE_BYTES {
                    return Some(convert::fairness_too_large(
                        "requests",
                        batch_fairness_bytes,
                        convert::MAX_BATCH_FAIRNESS_WIRE_BYTES,
                    ));
                }
            }
            prost::encoding::skip_field(wire_type, tag, &mut entry, context.clone()).ok()?;
        }
    }
    None
}

/// The Ranker service: `Rank` with [`RankCodec`], `RankBatch` with [`BatchCodec`],
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
        // Calls refused before their handler ran (their body) are counted by the route.
        let metrics = service.metrics();
        match request.uri().path() {
            RANK_PATH => Ok(routes::unary_with_codec(
                RankCodec {
                    max_ids: service.max_candidates(),
                },
                request,
                limit,
                Some(limit),
                move |request| {
                    let service = Arc::clone(&service);
                    Box::pin(async move { service.rank_wire(request).await })
                },
                move |status| refused_before_handler(&metrics, "Rank", status),
            )),
            RANK_BATCH_PATH => Ok(routes::unary_with_codec(
                BatchCodec {
                    limits: service.batch_limits(),
                },
                request,
                limit,
                Some(limit),
                move |request| {
                    let service = Arc::clone(&service);
                    Box::pin(async move { Ranker::rank_batch(&*service, request).await })
                },
                move |status| refused_before_handler(&metrics, "RankBatch", status),
            )),
            _ => Err(request),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::serve::replay::ReplayStore;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use proptest::test_runner::TestCaseError;

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
    fn decode_chunked(bytes: &[u8], chunk: usize) -> Result<WireRankRequest, DecodeFailure> {
        let chunks: Vec<Bytes> = bytes
            .chunks(chunk.max(1))
            .map(Bytes::copy_from_slice)
            .collect();
        let buf = chunks
            .into_iter()
            .fold(Box::new(Bytes::new()) as Box<dyn Buf>, |buf, next| {
                Box::new(buf.chain(next))
            });
        WireRankRequest::decode(buf, usize::MAX)
    }

    /// The request `decoded` stands for, as prost's message (ids inside).
    fn rebuilt(decoded: WireRankRequest) -> pb::RankRequest {
        let (mut message, ids, _) = decoded.into_parts();
        assert!(message.candidate_ids.is_empty());
        message.candidate_ids = ids.to_vec();
        message
    }

    /// The digest of `decoded` (ids' entries hashed from its body where it holds them) is
    /// the digest of prost's request (every entry written out).
    fn assert_digest_matches(
        decoded: &WireRankRequest,
        prosts: &pb::RankRequest,
    ) -> Result<(), TestCaseError> {
        let store = ReplayStore::new(Duration::from_secs(60), 10, 1 << 20);
        let mut with_id = decoded.clone();
        with_id.message.request_id = "digest".into();
        let mut prosts = prosts.clone();
        prosts.request_id = "digest".into();
        prop_assert_eq!(
            store.digest_rank(&with_id.message, &with_id.ids, &with_id.entries),
            store.digest(&prosts)
        );
        Ok(())
    }

    /// What `bytes` decode to by our decoder (fed in chunks of `chunk` bytes) and by prost:
    /// the same request (and digest), or the same error message.
    fn assert_decodes_like_prost(bytes: &[u8], chunk: usize) -> Result<(), TestCaseError> {
        let prosts = pb::RankRequest::decode(bytes);
        match (decode_chunked(bytes, chunk), prosts) {
            (Ok(ours), Ok(prosts)) => {
                assert_digest_matches(&ours, &prosts)?;
                prop_assert_eq!(rebuilt(ours), prosts);
            }
            (Err(DecodeFailure::Malformed(ours)), Err(prosts)) => {
                prop_assert_eq!(ours.to_string(), prosts.to_string())
            }
            (ours, prosts) => prop_assert!(
                false,
                "ours {:?}, prost's {:?}",
                ours.map(|_| ()),
                prosts.map(|_| ())
            ),
        }
        Ok(())
    }

    #[test]
    fn decodes_like_prost_whatever_the_ids_and_chunking() {
        let long = "x".repeat(200);
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
            assert_eq!(rebuilt(decoded), original, "chunk {chunk}");
            assert_decodes_like_prost(&bytes, chunk).unwrap();
        }
    }

    #[test]
    fn ids_are_cut_from_the_body_without_copying() {
        let ids: Vec<String> = (0..100).map(|i| format!("i{i:07}")).collect();
        let mut original = request(&ids.iter().map(String::as_str).collect::<Vec<_>>());
        original.candidate_ids.insert(50, "é".repeat(70));
        let body = Bytes::from(original.encode_to_vec());
        let range = body.as_ptr_range();
        let decoded = WireRankRequest::decode_body(body.clone(), usize::MAX).unwrap();
        for id in decoded.ids.iter_bytes() {
            assert!(range.contains(&id.as_ptr()), "an id was copied");
        }
        // Two runs around the 140-byte id (a two-byte length), hashed from the body.
        let runs: Vec<_> = decoded
            .entries
            .runs()
            .iter()
            .map(|run| run.ids.clone())
            .collect();
        assert_eq!(runs, [0..50, 51..101]);
        assert_eq!(rebuilt(decoded), original);
    }

    #[test]
    fn runs_hand_over_at_long_ids_other_fields_and_the_body_end() {
        // Runs of 8-byte ids broken by ids of 127, 128 (a two-byte length) and 300 bytes,
        // an empty id, a non-ASCII id, and other fields after the ids; every cut of it.
        let (short_long, two_byte, longer) = ("b".repeat(127), "p".repeat(128), "q".repeat(300));
        let mut ids: Vec<String> = (0..40).map(|i| format!("i{i:07}")).collect();
        ids.insert(5, short_long);
        ids.insert(11, two_byte);
        ids.insert(15, longer);
        ids.insert(20, String::new());
        ids.insert(30, "é".to_owned());
        let mut original = request(&ids.iter().map(String::as_str).collect::<Vec<_>>());
        original.pool_size = Some(7);
        original.explain = Some(pb::ExplainOptions {
            level: pb::ExplainLevel::Reasons as i32,
            max_dimensions: 3,
        });
        let bytes = original.encode_to_vec();
        for chunk in [1, 2, 17, 18, 19, bytes.len()] {
            assert_decodes_like_prost(&bytes, chunk).unwrap();
        }
        // Cut anywhere: the same error as prost (or the same shorter request).
        for cut in 0..bytes.len() {
            assert_decodes_like_prost(&bytes[..cut], bytes.len()).unwrap();
        }
    }

    #[test]
    fn invalid_input_fails_with_prosts_error() {
        let mut bytes = request(&["ok", "bad"]).encode_to_vec();
        // Make the last id invalid UTF-8.
        let at = bytes
            .windows(3)
            .position(|window| window == b"bad")
            .unwrap();
        bytes[at] = 0xff;
        assert_decodes_like_prost(&bytes, bytes.len()).unwrap();
        let Err(DecodeFailure::Malformed(error)) = WireRankRequest::decode(&bytes[..], usize::MAX)
        else {
            panic!("an id that is not UTF-8 was accepted");
        };
        assert!(
            error
                .to_string()
                .contains("candidate_ids: invalid string value"),
            "{error}"
        );
        // An invalid id before a malformed field (a key without its value): prost's first
        // error is the id's.
        let mut bad_then_cut = bytes.clone();
        bad_then_cut.push(0x60);
        assert_decodes_like_prost(&bad_then_cut, bad_then_cut.len()).unwrap();
        let Err(DecodeFailure::Malformed(error)) =
            WireRankRequest::decode(&bad_then_cut[..], usize::MAX)
        else {
            panic!("a malformed request was accepted");
        };
        assert!(
            error
                .to_string()
                .contains("candidate_ids: invalid string value"),
            "{error}"
        );
        // A truncated message.
        let bytes = request(&["i0000001"]).encode_to_vec();
        assert_decodes_like_prost(&bytes[..bytes.len() - 3], 5).unwrap();
        // Field 10 with the wrong wire type.
        assert_decodes_like_prost(&[0x50, 0x01], 2).unwrap();
        // A length past the end, and a length varint too long.
        assert_decodes_like_prost(&[0x52, 0x05, b'a'], 3).unwrap();
        assert_decodes_like_prost(
            &[
                0x52, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
            11,
        )
        .unwrap();
    }

    /// How one id's entry is written in [`encoded_oddly`].
    #[derive(Debug, Clone, Copy)]
    enum EntryStyle {
        /// As prost writes it.
        Plain,
        /// The key as a two-byte varint (0xD2 0x00).
        PaddedKey,
        /// The length as one byte more than needed.
        PaddedLength,
        /// After an unknown varint field (number 99).
        AfterUnknownField,
        /// After the `k` field again (a later value replaces the earlier).
        AfterKnownField,
    }

    /// `message` with `ids` appended, each entry written in its style.
    fn encoded_oddly(message: &pb::RankRequest, ids: &[(String, EntryStyle)]) -> Vec<u8> {
        let mut bytes = message.encode_to_vec();
        for (id, style) in ids {
            match style {
                EntryStyle::AfterUnknownField => bytes.extend_from_slice(&[0x98, 0x06, 0x01]),
                EntryStyle::AfterKnownField => bytes.extend_from_slice(&[0x60, 0x07]),
                _ => {}
            }
            match style {
                EntryStyle::PaddedKey => bytes.extend_from_slice(&[0xd2, 0x00]),
                _ => bytes.push(CANDIDATE_IDS_KEY),
            }
            match style {
                EntryStyle::PaddedLength => {
                    let mut length = Vec::new();
                    prost::encoding::encode_varint(id.len() as u64, &mut length);
                    if let Some(last) = length.last_mut() {
                        *last |= 0x80;
                    }
                    length.push(0x00);
                    bytes.extend_from_slice(&length);
                }
                _ => prost::encoding::encode_varint(id.len() as u64, &mut bytes),
            }
            bytes.extend_from_slice(id.as_bytes());
        }
        bytes
    }

    fn entry_style() -> impl Strategy<Value = EntryStyle> {
        prop_oneof![
            6 => Just(EntryStyle::Plain),
            1 => Just(EntryStyle::PaddedKey),
            1 => Just(EntryStyle::PaddedLength),
            1 => Just(EntryStyle::AfterUnknownField),
            1 => Just(EntryStyle::AfterKnownField),
        ]
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

        /// Ids written in every way prost accepts (padded keys and lengths, other fields
        /// between them), maybe damaged: prost's verdict, and prost's request's digest.
        #[test]
        fn oddly_written_ids_decode_and_digest_as_prosts_request(
            ids in proptest::collection::vec(
                ("[a-z0-9]{0,20}|\\PC{0,4}|[a-z]{120,140}", entry_style()), 0..30),
            edit in proptest::option::of((any::<Index>(), any::<u8>())),
        ) {
            let mut bytes = encoded_oddly(&request(&[]), &ids);
            if let Some((at, byte)) = edit
                && !bytes.is_empty()
            {
                let at = at.index(bytes.len());
                bytes[at] = byte;
            }
            assert_decodes_like_prost(&bytes, bytes.len())?;
        }

        /// Runs of ids of one length (the uniform blocks), between ids of other lengths,
        /// maybe damaged or cut short, fed in random chunk sizes: prost's verdict.
        #[test]
        fn uniform_runs_decode_exactly_as_prost_decodes_them(
            runs in proptest::collection::vec((0_usize..20, 0_usize..40, "[a-z]{0,3}"), 1..4),
            edit in proptest::option::of((any::<Index>(), any::<u8>())),
            cut in proptest::option::of(any::<Index>()),
            chunk in prop_oneof![Just(usize::MAX), 1_usize..80],
        ) {
            let mut ids = Vec::new();
            for (length, count, between) in runs {
                ids.extend((0..count).map(|id| format!("{id:0length$}")[..length].to_owned()));
                ids.push(between);
            }
            let mut bytes = request(&ids.iter().map(String::as_str).collect::<Vec<_>>())
                .encode_to_vec();
            if let Some((at, byte)) = edit {
                let at = at.index(bytes.len());
                bytes[at] = byte;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            let chunk = chunk.min(bytes.len().max(1));
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

    #[test]
    fn more_ids_than_the_limit_are_refused_before_their_ranges_are_held() {
        // 40 000 empty ids (2 bytes each, in uniform blocks), then ids of 200 bytes (a
        // two-byte length: the one-by-one path).
        let empty: Vec<&str> = vec![""; 40_000];
        let bytes = request(&empty).encode_to_vec();
        for limit in [0, 1, 15, 16, 17, 39_999] {
            let Err(DecodeFailure::TooManyIds { limit: said }) =
                WireRankRequest::decode(&bytes[..], limit)
            else {
                panic!("{limit}: more ids than the limit must be refused");
            };
            assert_eq!(said, limit);
        }
        let decoded = WireRankRequest::decode(&bytes[..], 40_000).expect("at the limit");
        assert_eq!(decoded.into_parts().1.len(), 40_000);

        let long = "x".repeat(200);
        let bytes = request(&[long.as_str(); 3]).encode_to_vec();
        assert!(matches!(
            WireRankRequest::decode(&bytes[..], 2),
            Err(DecodeFailure::TooManyIds { limit: 2 })
        ));
        assert!(WireRankRequest::decode(&bytes[..], 3).is_ok());
    }

    /// A request whose fairness policy holds `values` empty parameter values (2 bytes each
    /// on the wire, about 32 once prost has built them), in `parts` occurrences of the
    /// field (prost merges them).
    fn fairness_heavy(values: usize, parts: usize) -> Vec<u8> {
        use prost_types::{ListValue, Struct, Value, value::Kind};
        let mut body = request(&["a", "b"]).encode_to_vec();
        for part in 0..parts {
            let list = Value {
                kind: Some(Kind::ListValue(ListValue {
                    values: vec![Value::default(); values / parts],
                })),
            };
            let policy = pb::FairnessPolicy {
                constraint: "none".into(),
                params: Some(Struct {
                    fields: [(format!("p{part}"), list)].into(),
                }),
                ..Default::default()
            };
            pb::RankRequest {
                fairness: Some(policy),
                ..Default::default()
            }
            .encode(&mut body)
            .expect("encodes");
        }
        body
    }

    #[test]
    fn fairness_policies_beyond_the_wire_limit_are_refused_before_decoding() {
        let limit = convert::MAX_FAIRNESS_WIRE_BYTES;
        // Within the limit: decoded (the engine's conversion checks the params' size).
        let within = fairness_heavy(limit / 2 - 100, 1);
        let decoded = WireRankRequest::decode(&within[..], 10).expect("within the limit");
        assert!(decoded.message.fairness.is_some());
        // One policy over the limit, or several that are over it together.
        for parts in [1, 2, 7] {
            let body = fairness_heavy(limit / 2 + 100, parts);
            let Err(DecodeFailure::FairnessTooLarge { bytes, oversized }) =
                WireRankRequest::decode(&body[..], 10)
            else {
                panic!("{parts} parts over the limit must be refused");
            };
            assert!(bytes > limit, "{bytes}");
            assert_eq!(oversized, None, "no string is over its own limit");
            // prost itself would have decoded it.
            assert!(pb::RankRequest::decode(&body[..]).is_ok());
        }
        // A length past the body's end is prost's to refuse, as before.
        let mut cut = fairness_heavy(limit, 1);
        cut.truncate(cut.len() - 1);
        assert!(matches!(
            WireRankRequest::decode(&cut[..], 10),
            Err(DecodeFailure::Malformed(_))
        ));
    }

    /// A request body with each of `policies` in an occurrence of its own (prost merges
    /// them: the last occurrence of a string wins).
    fn with_policies(policies: &[pb::FairnessPolicy]) -> Vec<u8> {
        let mut body = request(&["a"]).encode_to_vec();
        for policy in policies {
            pb::RankRequest {
                fairness: Some(policy.clone()),
                ..Default::default()
            }
            .encode(&mut body)
            .expect("encodes");
        }
        body
    }

    #[test]
    fn strings_above_the_wire_limit_are_named_as_prost_would_decode_them() {
        let long = "s".repeat(convert::MAX_FAIRNESS_WIRE_BYTES + 10);
        let scope = |scope: &str| pb::FairnessPolicy {
            exposure_scope: scope.to_owned(),
            ..Default::default()
        };
        let refusal = |policies: &[pb::FairnessPolicy]| {
            let body = with_policies(policies);
            assert!(
                pb::RankRequest::decode(&body[..]).is_ok(),
                "prost decodes it"
            );
            match WireRankRequest::decode(&body[..], 10) {
                Err(DecodeFailure::FairnessTooLarge { oversized, .. }) => oversized,
                other => panic!("expected a refusal, got {other:?}"),
            }
        };
        assert_eq!(
            refusal(&[scope(&long)]),
            Some(OversizedString {
                field: "fairness.exposure_scope",
                bytes: long.len(),
                limit: engine::MAX_EXPOSURE_SCOPE_BYTES,
            })
        );
        // The engine's order: the constraint's name before the scope.
        let both = pb::FairnessPolicy {
            constraint: "c".repeat(100),
            ..scope(&long)
        };
        assert_eq!(
            refusal(&[both]).map(|oversized| oversized.field),
            Some("fairness.constraint")
        );
        let attribute = pb::FairnessPolicy {
            group_attribute: long.clone(),
            ..Default::default()
        };
        let status = refusal(&[attribute])
            .expect("the attribute is named")
            .status("");
        assert_eq!(
            api::status::error_field(&status),
            Some("fairness.group_attribute")
        );
        assert_eq!(
            api::status::error_reason(&status),
            pb::ErrorReason::LimitExceeded
        );
        assert!(status.message().contains("at most 128"), "{status:?}");
        // A later occurrence replaces the long scope: no string is over its limit, and the
        // whole policy is refused as before.
        assert_eq!(refusal(&[scope(&long), scope("home")]), None);
        assert_eq!(
            refusal(&[scope("home"), scope(&long)]).map(|oversized| oversized.bytes),
            Some(long.len())
        );
    }

    #[test]
    fn batch_fairness_policies_are_held_to_their_limits_before_decoding() {
        let limits = BatchLimits {
            max_entries: 1024,
            max_ids: 1_000_000,
        };
        let entry = |values: usize| {
            pb::RankRequest::decode(&fairness_heavy(values, 1)[..]).expect("decodes")
        };
        let batch = |entries: Vec<pb::RankRequest>| {
            pb::RankBatchRequest { requests: entries }.encode_to_vec()
        };
        let per_entry = convert::MAX_FAIRNESS_WIRE_BYTES;
        assert!(batch_over_limits(&batch(vec![entry(per_entry / 2 - 100); 2]), limits).is_none());
        let one_heavy =
            batch_over_limits(&batch(vec![entry(10), entry(per_entry / 2 + 100)]), limits)
                .expect("one entry over the limit");
        assert_eq!(
            api::status::error_field(&one_heavy),
            Some("requests[1].fairness")
        );
        // Each entry within its limit, too many together.
        let count = convert::MAX_BATCH_FAIRNESS_WIRE_BYTES / (per_entry - 1000) + 1;
        let all = batch_over_limits(&batch(vec![entry(per_entry / 2 - 500); count]), limits)
            .expect("over the batch's limit");
        assert_eq!(api::status::error_field(&all), Some("requests"));
        assert!(all.message().contains("fairness"), "{all:?}");
        // An entry's string above the limit is named in the entry.
        let mut long_scope = entry(10);
        if let Some(policy) = long_scope.fairness.as_mut() {
            policy.exposure_scope = "s".repeat(per_entry + 10);
        }
        let named = batch_over_limits(&batch(vec![entry(10), long_scope]), limits)
            .expect("the entry is over the limit");
        assert_eq!(
            api::status::error_field(&named),
            Some("requests[1].fairness.exposure_scope")
        );
    }

    #[test]
    fn batch_bodies_are_counted_against_the_limits_before_decoding() {
        let limits = BatchLimits {
            max_entries: 3,
            max_ids: 5,
        };
        let batch = |sizes: &[usize]| {
            pb::RankBatchRequest {
                requests: sizes
                    .iter()
                    .map(|&size| request(&vec!["i"; size]))
                    .collect(),
            }
            .encode_to_vec()
        };
        assert!(batch_over_limits(&batch(&[3, 2]), limits).is_none());
        assert!(batch_over_limits(&batch(&[0, 0, 0]), limits).is_none());
        let too_many_ids = batch_over_limits(&batch(&[3, 3]), limits).expect("6 ids > 5");
        assert_eq!(too_many_ids.code(), tonic::Code::InvalidArgument);
        assert!(
            too_many_ids.message().contains("candidate ids"),
            "{too_many_ids:?}"
        );
        let too_many_entries = batch_over_limits(&batch(&[0; 4]), limits).expect("4 > 3");
        assert!(
            too_many_entries.message().contains("requests"),
            "{too_many_entries:?}"
        );
        // A malformed body is left to prost, which names what is wrong.
        let mut cut = batch(&[3, 2]);
        cut.truncate(cut.len() - 1);
        assert!(batch_over_limits(&cut, limits).is_none());
        assert!(pb::RankBatchRequest::decode(cut.as_slice()).is_err());
    }
}
