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
//!
//! [`MessageLimit`] is the engine's [`engine::AnswerLimit`]: the bound of a DP answer's
//! encoding that the engine checks against `server.max_message_bytes` before it charges the
//! privacy ledger.

use api::fairrank::v1 as pb;
use prost::Message;
use prost::bytes::{BufMut, Bytes};

use super::convert;
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

/// What a Rank answer may take on the wire (`server.max_message_bytes`), as the engine asks
/// it of a DP answer before charging the ledger: the answer's encoding with every field the
/// charge or the call may still set at its widest, so that neither the fresh answer nor a
/// replay of it (a retry with the same request id) can exceed the bound.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimit {
    max_message_bytes: usize,
}

impl MessageLimit {
    /// The limit of answers of at most `max_message_bytes` bytes.
    pub fn new(max_message_bytes: usize) -> MessageLimit {
        MessageLimit { max_message_bytes }
    }
}

impl engine::AnswerLimit for MessageLimit {
    fn size_bound(&self, answer: &engine::RankResponse) -> usize {
        let mut response = convert::rank_response(answer.clone());
        widen(&mut response);
        response.encoded_len()
    }

    fn max_bytes(&self) -> usize {
        self.max_message_bytes
    }
}

/// Sets each field of `response` that is set after the engine's size check to the value of
/// longest encoding: the timings (each handler sets `total_us`), the flags of a replay
/// (the in-memory store's and the ledger's), and the privacy report's figures of the
/// subject's budget, known after the charge.
fn widen(response: &mut pb::RankResponse) {
    response.replayed = true;
    // Every field named: a new field of `StageTimings` must be added here.
    response.timings = Some(pb::StageTimings {
        total_us: u64::MAX,
        queue_us: u64::MAX,
        validate_us: u64::MAX,
        resolve_user_us: u64::MAX,
        score_us: u64::MAX,
        select_pool_us: u64::MAX,
        rerank_us: u64::MAX,
        explain_us: u64::MAX,
        report_us: u64::MAX,
        ledger_us: u64::MAX,
    });
    if let Some(privacy) = &mut response.privacy {
        privacy.rho_remaining = Some(f64::MAX);
        privacy.rho_budget = Some(f64::MAX);
        // Negative values take the longest varints (10 bytes each).
        privacy.budget_resets_at = Some(prost_types::Timestamp {
            seconds: i64::MIN,
            nanos: i32::MIN,
        });
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

    /// A DP answer as the engine measures it before the charge: `items` explained items
    /// with noisy scores, a fairness report, the privacy report without the spend.
    fn dp_answer(items: u32) -> engine::RankResponse {
        engine::RankResponse {
            request_id: "dp-1".into(),
            items: (0..items)
                .map(|i| engine::RankedItem {
                    id: format!("item-{i}"),
                    rank: i + 1,
                    score: Some(0.25),
                    unconstrained_rank: i + 1,
                    group_labels: vec![i % 2],
                    explanation: Some(engine::Explanation {
                        reasons: vec![engine::Reason {
                            code: engine::ReasonCode::PrivacyRandomized,
                            text: "Picked by a randomized selection.".into(),
                        }],
                        contributions: Vec::new(),
                    }),
                })
                .collect(),
            score_kind: engine::ScoreKind::NoisyDotProduct,
            group_attributes: vec!["provider_group".into()],
            personalized: true,
            non_personalized_reason: None,
            fairness: engine::FairnessReport {
                constraint: "none".into(),
                group_attribute: "provider_group".into(),
                satisfied: true,
                violations: Vec::new(),
                fallback: engine::FairnessFallback::None,
                fallback_reason: String::new(),
                ndcg_vs_unconstrained: 1.0,
                groups: Vec::new(),
                exposure_scope: String::new(),
                amortized: Vec::new(),
                amortized_disparity: None,
                optimality: None,
                seed: None,
                notes: Vec::new(),
            },
            privacy: engine::PrivacyReport {
                dp_applied: true,
                mechanism: engine::PrivacyMechanism::GumbelTopK,
                rho_charged: 0.05,
                epsilon: Some(1.5),
                delta: Some(1e-6),
                rho_remaining: None,
                rho_budget: None,
                budget_resets_at: None,
                scores_noised: true,
                score_noise_stddev: Some(0.1),
                user_norm_bound: Some(1.0),
                ledger_replay: false,
            },
            explain_level: engine::ExplainLevel::Text,
            items_table: engine::TableVersion {
                generation: 1,
                checksum: 7,
            },
            users_table: Some(engine::TableVersion {
                generation: 1,
                checksum: 8,
            }),
            scored_items: 1000,
            pool_size: 20,
            skipped_candidate_ids: Vec::new(),
            timings: engine::StageTimings::default(),
        }
    }

    /// The bound is the encoding of the widened answer: no looser than the fields widened.
    #[test]
    fn the_message_bound_is_close_to_the_fresh_answers_size() {
        use engine::AnswerLimit as _;
        let limit = MessageLimit::new(4096);
        assert_eq!(limit.max_bytes(), 4096);
        let answer = dp_answer(10);
        let bound = limit.size_bound(&answer);
        let fresh = convert::rank_response(answer).encoded_len();
        assert!(fresh < bound && bound < fresh + 200, "{fresh} -> {bound}");
    }

    proptest! {
        /// Whatever the charge sets (the spend, a ledger replay) and the call (timings, a
        /// replay from the in-memory store), the answer sent is within the bound the engine
        /// checked before the charge.
        #[test]
        fn answers_sent_stay_within_the_bound_checked_before_the_charge(
            items in 0_u32..20,
            remaining in any::<f64>(),
            budget in any::<f64>(),
            resets_at in proptest::option::of((0_u64..1 << 40, 0_u32..1_000_000_000)),
            ledger_replay in any::<bool>(),
            replayed in any::<bool>(),
            times in proptest::array::uniform10(any::<u64>()),
        ) {
            use engine::AnswerLimit as _;
            let answer = dp_answer(items);
            let bound = MessageLimit::new(1 << 20).size_bound(&answer);
            let mut sent = answer;
            sent.privacy.rho_remaining = Some(remaining);
            sent.privacy.rho_budget = Some(budget);
            sent.privacy.budget_resets_at = resets_at.map(|(seconds, nanos)| {
                std::time::UNIX_EPOCH
                    + std::time::Duration::new(seconds, nanos)
            });
            if ledger_replay {
                sent.privacy.ledger_replay = true;
                sent.privacy.rho_charged = 0.0;
            }
            let [total_us, queue_us, validate_us, resolve_user_us, score_us, select_pool_us,
                rerank_us, explain_us, report_us, ledger_us] = times;
            sent.timings = engine::StageTimings {
                total_us,
                queue_us,
                validate_us,
                resolve_user_us,
                score_us,
                select_pool_us,
                rerank_us,
                explain_us,
                report_us,
                ledger_us,
            };
            let mut wire = convert::rank_response(sent);
            wire.replayed |= replayed;
            prop_assert!(wire.encoded_len() <= bound, "{} > {bound}", wire.encoded_len());
        }

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
