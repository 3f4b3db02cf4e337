//! A `Rank` answer in its wire form, encoded once: the same bytes go to the client and into
//! the idempotency store.
//!
//! Before, each answer was converted to a `RankResponse`, cloned whole for the idempotency
//! store (about 40 small allocations), encoded by tonic, and the store's copy was freed
//! 10 000 requests later, from cold memory. Now the answer is encoded once, on the compute
//! thread, without its `timings` (field 40, the message's last field), into one buffer that
//! the store shares by reference count; the route's encoder writes that buffer, then this
//! call's timings. Because prost writes fields in field-number order and `timings` has the
//! highest number, the bytes are exactly prost's encoding of the whole message (checked by
//! the tests below).

use api::fairrank::v1 as pb;
use prost::Message;
use prost::bytes::{BufMut, Bytes};

use crate::metrics::AnswerFacts;

/// Field number of `fairrank.v1.RankResponse.timings`, the message's highest.
const TIMINGS_FIELD: u32 = 40;

/// A `RankResponse`, encoded except for its timings.
#[derive(Debug, Clone)]
pub struct WireRankResponse {
    /// The prost encoding of every field but `timings`.
    body: Bytes,
    /// The answer's `timings`, written after `body`.
    pub timings: Option<pb::StageTimings>,
    /// What the metrics count of the answer.
    pub facts: AnswerFacts,
}

impl WireRankResponse {
    /// Encodes `response` (all but its timings, which stay apart).
    pub fn encode(mut response: pb::RankResponse) -> WireRankResponse {
        let timings = response.timings.take();
        WireRankResponse {
            facts: AnswerFacts::of(&response),
            body: Bytes::from(response.encode_to_vec()),
            timings,
        }
    }

    /// The encoding of every field but `timings`.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Length of the whole message's encoding.
    pub fn encoded_len(&self) -> usize {
        self.body.len() + timings_len(self.timings.as_ref())
    }

    /// Writes the whole message's encoding: prost's encoding of the `RankResponse`.
    pub fn write(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.body);
        if let Some(timings) = &self.timings {
            prost::encoding::message::encode(TIMINGS_FIELD, timings, buf);
        }
    }

    /// The message itself (decoded; for the generated service and the tests).
    pub fn to_message(&self) -> Result<pb::RankResponse, prost::DecodeError> {
        let mut response = pb::RankResponse::decode(self.body.clone())?;
        response.timings = self.timings;
        Ok(response)
    }
}

/// Length of the encoding of field 40 holding `timings` (0 when absent).
pub fn timings_len(timings: Option<&pb::StageTimings>) -> usize {
    timings.map_or(0, |timings| {
        prost::encoding::message::encoded_len(TIMINGS_FIELD, timings)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A response with every field of `RankResponse` set (nested messages included), so a
    /// field numbered above `timings` or written out of order would show.
    fn full_response(seed: u32) -> pb::RankResponse {
        pb::RankResponse {
            request_id: format!("r-{seed}"),
            items: (0..3)
                .map(|i| pb::RankedItem {
                    item_id: format!("i{seed}-{i}"),
                    rank: i + 1,
                    score: Some(0.5 * f32::from(u16::try_from(i).unwrap_or(0))),
                    unconstrained_rank: i + 2,
                    group_labels: vec![1, 0, i],
                    explanation: Some(pb::Explanation {
                        reasons: vec![pb::Reason {
                            code: pb::ReasonCode::ProfileMatch as i32,
                            text: "match".into(),
                        }],
                        contributions: vec![pb::DimensionContribution {
                            dimension: 3,
                            name: "d3".into(),
                            contribution: -0.25,
                        }],
                    }),
                })
                .collect(),
            score_kind: pb::ScoreKind::DotProduct as i32,
            group_attributes: vec!["provider_group".into()],
            personalized: seed.is_multiple_of(2),
            non_personalized_reason: pb::NonPersonalizedReason::UserNotFound as i32,
            replayed: seed.is_multiple_of(3),
            fairness: Some(pb::FairnessReport {
                constraint: "det-cons".into(),
                group_attribute: "provider_group".into(),
                satisfied: true,
                groups: vec![pb::GroupExposure {
                    group: 1,
                    items_returned: 2,
                    items_in_pool: 9,
                    exposure_share: 0.4,
                    unconstrained_exposure_share: 0.3,
                    target_share: Some(0.5),
                }],
                ..Default::default()
            }),
            privacy: Some(pb::PrivacyReport {
                dp_applied: true,
                rho_charged: 0.5,
                epsilon: Some(1.0),
                ..Default::default()
            }),
            explain_level: pb::ExplainLevel::Dimensions as i32,
            items_table: Some(pb::TableVersion {
                generation: 7,
                checksum: 0xfeed,
            }),
            users_table: Some(pb::TableVersion::default()),
            scored_items: 1000,
            pool_size: 100,
            skipped_candidate_ids: vec!["gone".into()],
            audit_id: "audit".into(),
            timings: Some(pb::StageTimings {
                total_us: u64::from(seed) * 7 + 1,
                score_us: 23,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_wire_form_is_prosts_encoding_of_the_whole_message() {
        for seed in 0..6 {
            let response = full_response(seed);
            let wire = WireRankResponse::encode(response.clone());
            let mut bytes = Vec::new();
            wire.write(&mut bytes);
            assert_eq!(bytes, response.encode_to_vec(), "seed {seed}");
            assert_eq!(wire.encoded_len(), bytes.len());
            assert_eq!(wire.to_message().unwrap(), response);
            assert_eq!(wire.facts, AnswerFacts::of(&response));
        }
        // Without timings, and with the default (empty) timings.
        for timings in [None, Some(pb::StageTimings::default())] {
            let response = pb::RankResponse {
                timings,
                ..full_response(1)
            };
            let wire = WireRankResponse::encode(response.clone());
            let mut bytes = Vec::new();
            wire.write(&mut bytes);
            assert_eq!(bytes, response.encode_to_vec());
            assert_eq!(wire.encoded_len(), response.encoded_len());
        }
    }

    proptest! {
        /// Whatever the timings a handler sets after encoding, the bytes are prost's.
        #[test]
        fn timings_set_after_encoding_give_prosts_bytes(
            seed in 0_u32..50,
            total in any::<u64>(),
            queue in any::<u64>(),
            ledger in any::<u64>(),
        ) {
            let mut response = full_response(seed);
            let mut wire = WireRankResponse::encode(response.clone());
            let timings = pb::StageTimings {
                total_us: total,
                queue_us: queue,
                ledger_us: ledger,
                ..Default::default()
            };
            wire.timings = Some(timings);
            response.timings = Some(timings);
            let mut bytes = Vec::new();
            wire.write(&mut bytes);
            prop_assert_eq!(bytes, response.encode_to_vec());
            prop_assert_eq!(wire.encoded_len(), response.encoded_len());
        }
    }
}
