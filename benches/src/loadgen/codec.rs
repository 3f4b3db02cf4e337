//! A tonic codec for pre-encoded protobuf messages: requests are copied from a shared buffer
//! (plus a per-call request id field), responses are measured and skipped, never decoded,
//! except for one optional small field (the server's stage timings of a Rank answer).
//!
//! This keeps the load generator's per-call work to one copy of the request into tonic's
//! send buffer and one scan over the response's top-level fields, so on a machine shared
//! with the server the client takes as little CPU as possible, and Rank and Echo cost the
//! client about the same.

use api::fairrank::v1::StageTimings;
use prost::Message;
use prost::bytes::{Buf, BufMut, Bytes};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Tag byte of field 1 with wire type 2 (length-delimited): `RankRequest.request_id`.
const REQUEST_ID_TAG: u8 = 0x0a;

/// Length of every request id the load generator writes: `lg-` + 16 hex digits of the step
/// nonce + `-` + 4 hex digits of the worker + `-` + 12 hex digits of the call sequence.
pub const REQUEST_ID_LEN: usize = 3 + 16 + 1 + 4 + 1 + 12;

/// Largest worker index a request id can carry.
pub const MAX_WORKER_INDEX: usize = 0xffff;

/// A request id of fixed length, built on the stack (no allocation per call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestId {
    bytes: [u8; REQUEST_ID_LEN],
}

impl RequestId {
    /// The id `lg-<nonce>-<worker>-<sequence>` in lower-case hex; `worker` keeps its low 16
    /// bits and `sequence` its low 48 bits (unique for 2^48 calls per worker and step).
    pub fn new(nonce: u64, worker: usize, sequence: u64) -> Self {
        let mut bytes = [0_u8; REQUEST_ID_LEN];
        bytes[..3].copy_from_slice(b"lg-");
        write_hex(&mut bytes[3..19], nonce);
        bytes[19] = b'-';
        write_hex(&mut bytes[20..24], (worker & MAX_WORKER_INDEX) as u64);
        bytes[24] = b'-';
        write_hex(&mut bytes[25..37], sequence & 0xffff_ffff_ffff);
        Self { bytes }
    }

    /// The id's ASCII bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits, `l`, `g` and `-` are ever written.
        std::str::from_utf8(&self.bytes).unwrap_or_default()
    }
}

/// Writes the low `4 * out.len()` bits of `value` as lower-case hex, most significant first.
fn write_hex(out: &mut [u8], mut value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
}

/// One outgoing message: an optional request id, written as field 1, followed by the
/// pre-encoded remaining fields. Protobuf decoders accept fields in any order, and the
/// body of a Rank template never contains field 1, so the result is the template with
/// this call's id.
#[derive(Debug, Clone)]
pub struct PreEncoded {
    /// Written first as field 1 when present.
    pub request_id: Option<RequestId>,
    /// The encoded message (or its fields other than the request id); cloning is a
    /// reference-count increment.
    pub body: Bytes,
}

impl PreEncoded {
    /// Encoded length of the message on the wire (without the 5-byte gRPC frame header).
    pub fn encoded_len(&self) -> usize {
        let id_len = if self.request_id.is_some() {
            1 + prost::encoding::encoded_len_varint(REQUEST_ID_LEN as u64) + REQUEST_ID_LEN
        } else {
            0
        };
        id_len + self.body.len()
    }

    /// Writes the message: the request id field (if any), then the body.
    pub fn write_to(&self, dst: &mut impl BufMut) {
        if let Some(id) = &self.request_id {
            dst.put_u8(REQUEST_ID_TAG);
            prost::encoding::encode_varint(REQUEST_ID_LEN as u64, dst);
            dst.put_slice(id.as_bytes());
        }
        dst.put_slice(&self.body);
    }
}

/// Field number of `RankResponse.timings`.
pub const RANK_RESPONSE_TIMINGS_FIELD: u32 = 40;

/// What the load generator keeps of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResponseInfo {
    /// Encoded length of the response message in bytes.
    pub encoded_len: usize,
    /// The server's stage timings, when asked for and present.
    pub timings: Option<StageTimings>,
}

/// The codec: encodes [`PreEncoded`] and decodes any response to a [`ResponseInfo`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec {
    /// Top-level field of the response holding a `StageTimings` message, if any
    /// ([`RANK_RESPONSE_TIMINGS_FIELD`] for Rank).
    pub timings_field: Option<u32>,
}

impl Codec for RawCodec {
    type Encode = PreEncoded;
    type Decode = ResponseInfo;
    type Encoder = RawEncoder;
    type Decoder = LengthDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        LengthDecoder {
            timings_field: self.timings_field,
        }
    }
}

/// Encoder half of [`RawCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = PreEncoded;
    type Error = Status;

    fn encode(&mut self, item: PreEncoded, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.write_to(dst);
        Ok(())
    }
}

/// Decoder half of [`RawCodec`]: yields the message length (and the stage timings, if
/// asked for) and discards the bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct LengthDecoder {
    timings_field: Option<u32>,
}

impl Decoder for LengthDecoder {
    type Item = ResponseInfo;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<ResponseInfo>, Status> {
        let length = src.remaining();
        // tonic hands over each message in one contiguous buffer; if it ever did not, the
        // timings are simply not reported.
        let chunk = src.chunk();
        let timings = self
            .timings_field
            .filter(|_| chunk.len() == length)
            .and_then(|field| find_length_delimited_field(chunk, field))
            .and_then(|bytes| StageTimings::decode(bytes).ok());
        src.advance(length);
        Ok(Some(ResponseInfo {
            encoded_len: length,
            timings,
        }))
    }
}

/// The payload of the last top-level length-delimited occurrence of `field` in an encoded
/// message (protobuf merges repeated occurrences of a message field, and the servers here
/// write it once). `None` when absent or when the message is malformed.
pub fn find_length_delimited_field(mut message: &[u8], field: u32) -> Option<&[u8]> {
    let mut found = None;
    while !message.is_empty() {
        let key = prost::encoding::decode_varint(&mut message).ok()?;
        let number = u32::try_from(key >> 3).ok()?;
        let skip = match key & 0x7 {
            0 => {
                prost::encoding::decode_varint(&mut message).ok()?;
                0
            }
            1 => 8,
            2 => {
                let length =
                    usize::try_from(prost::encoding::decode_varint(&mut message).ok()?).ok()?;
                if length > message.len() {
                    return None;
                }
                if number == field {
                    found = Some(&message[..length]);
                }
                length
            }
            5 => 4,
            // Groups (3, 4) are not used by proto3 messages.
            _ => return None,
        };
        if skip > message.len() {
            return None;
        }
        message = &message[skip..];
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::fairrank::v1::rank_request::User;
    use api::fairrank::v1::{RankRequest, RankResponse, RankedItem, TableVersion};

    #[test]
    fn request_ids_have_the_documented_shape() {
        let id = RequestId::new(0x0123_4567_89ab_cdef, 0x2a, 0x1_0000_0001);
        assert_eq!(id.as_str(), "lg-0123456789abcdef-002a-000100000001");
        assert_eq!(id.as_str().len(), REQUEST_ID_LEN);
        assert_ne!(
            RequestId::new(1, 0, 0).as_bytes(),
            RequestId::new(1, 0, 1).as_bytes()
        );
        assert_ne!(
            RequestId::new(1, 0, 0).as_bytes(),
            RequestId::new(1, 1, 0).as_bytes()
        );
    }

    #[test]
    fn prefixing_the_id_gives_the_template_with_that_id() {
        let template = RankRequest {
            user: Some(User::UserId("u000007".into())),
            candidate_ids: vec!["i0000001".into(), "i0000002".into()],
            k: 10,
            ..Default::default()
        };
        let message = PreEncoded {
            request_id: Some(RequestId::new(7, 3, 99)),
            body: template.encode_to_vec().into(),
        };
        let mut wire = Vec::new();
        message.write_to(&mut wire);
        assert_eq!(wire.len(), message.encoded_len());

        let decoded = RankRequest::decode(wire.as_slice()).unwrap();
        let expected = RankRequest {
            request_id: RequestId::new(7, 3, 99).as_str().to_owned(),
            ..template
        };
        assert_eq!(decoded, expected);
        assert_eq!(expected.encoded_len(), message.encoded_len());
    }

    #[test]
    fn timings_are_found_among_the_other_fields() {
        let timings = StageTimings {
            total_us: 321,
            queue_us: 12,
            score_us: 200,
            ledger_us: 7,
            ..Default::default()
        };
        let response = RankResponse {
            request_id: "r".into(),
            items: vec![
                RankedItem {
                    item_id: "i0000001".into(),
                    rank: 1,
                    score: Some(0.5),
                    ..Default::default()
                };
                3
            ],
            personalized: true,
            items_table: Some(TableVersion {
                generation: 1,
                ..Default::default()
            }),
            scored_items: 1_000,
            timings: Some(timings),
            ..Default::default()
        };
        let wire = response.encode_to_vec();
        let field = find_length_delimited_field(&wire, RANK_RESPONSE_TIMINGS_FIELD).unwrap();
        assert_eq!(StageTimings::decode(field).unwrap(), timings);
        // Absent field, other field numbers, truncated and malformed input.
        let without = RankResponse {
            timings: None,
            ..response.clone()
        }
        .encode_to_vec();
        assert_eq!(
            find_length_delimited_field(&without, RANK_RESPONSE_TIMINGS_FIELD),
            None
        );
        assert_eq!(find_length_delimited_field(&wire, 99), None);
        assert_eq!(
            find_length_delimited_field(&wire[..wire.len() - 1], RANK_RESPONSE_TIMINGS_FIELD),
            None
        );
        assert_eq!(find_length_delimited_field(&[0x0b], 1), None);
        assert_eq!(find_length_delimited_field(&[0xff; 11], 1), None);
        assert_eq!(find_length_delimited_field(&[], 1), None);
    }
}
