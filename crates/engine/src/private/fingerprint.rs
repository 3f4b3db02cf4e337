//! The request digest: a stable hash of the fields of a Rank request that determine its
//! answer, stored with each DP release so that a retry with the same request id but other
//! content is refused instead of replayed.
//!
//! # Definition
//!
//! `digest = XXH3-128(DOMAIN || encoding)`, where [`DOMAIN`] is the ASCII string
//! `fairrank/rank-request-digest/v1` followed by one zero byte, and the encoding is the
//! fields below in this order, with these primitive encodings:
//!
//! - `u8`: one byte; `bool`: one byte, 0 or 1; `u64` (and counts, `usize` values): 8 bytes
//!   little-endian; `f32` / `f64`: the IEEE 754 bit pattern, 4 / 8 bytes little-endian (so
//!   `-0.0` and `0.0` differ, and a NaN is taken as its bits);
//! - a string: its UTF-8 length as `u64`, then its bytes;
//! - an option: `0` for none, or `1` followed by the value;
//! - a list: its length as `u64`, then each element.
//!
//! Fields:
//!
//! 1. the user: `u8` 0 for a user-table id (nothing follows: the id is the privacy subject,
//!    which keys the ledger record already), or `u8` 1 for an inline embedding followed by
//!    the embedding as a list of `f32` (the subject id, which keys the ledger, is not
//!    encoded);
//! 2. `fallback_for_unknown_user` (bool);
//! 3. `candidate_ids` (list of strings);
//! 4. `skip_unknown_candidates` (bool);
//! 5. `k` (u64);
//! 6. `pool_size` (option of u64);
//! 7. the fairness policy: `constraint` (string), `params` (count as u64, then each key as a
//!    string and its value in ascending key order), `group_attribute` (string),
//!    `exposure_scope` (string), `on_infeasible` (u8: 0 unspecified, 1 best effort, 2
//!    unconstrained, 3 reject), `seed` (option of u64). A parameter value is a `u8` tag then
//!    its content: 0 null; 1 bool; 2 number (f64); 3 string; 4 list of values; 5 map (count,
//!    then key string and value, ascending keys);
//! 8. the privacy policy: `mechanism` (u8: 0 unspecified, 1 none, 2 gumbel-top-k), `budget`
//!    (option of: u8 0 rho, 1 epsilon, 2 epsilon per pick, then the f64), `delta` (option of
//!    f64), `release_noisy_scores` (bool), `on_budget_exhausted` (u8: 0 unspecified, 1
//!    reject, 2 non-personalized);
//! 9. the personalization consent (u8: 0 unspecified, 1 granted, 2 denied);
//! 10. the explanation options: `level` (u8: 0 none, 1 reasons, 2 text, 3 dimensions),
//!     `max_dimensions` (u64).
//!
//! Not encoded, because they do not change the answer: the request id (it keys the record),
//! the deadline, and the consent reference (an opaque audit pointer). Requests the server
//! resolves identically (an unspecified field and the configured default) still digest
//! differently: the digest is over the request as sent.
//!
//! The subject's identity is deliberately left out: the ledger stores records per subject
//! pseudonym, so a record is only ever compared with a request of the same subject, and the
//! stored digest (an unkeyed hash) then reveals nothing about the raw user id. Any change to
//! this definition must change [`DOMAIN`] (and so every digest): stored records of the old
//! definition would otherwise be compared with a different encoding.
//!
//! XXH3 is not a cryptographic hash; a client can craft two requests of equal digest, which
//! only gets it the stored answer of its own earlier request (already charged). What the
//! digest must be is stable: the same bytes on every platform, Rust release and build,
//! which std's `DefaultHasher` does not promise.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use xxhash_rust::xxh3::Xxh3Default;

use crate::request::{
    BudgetExhaustedAction, ConsentDecision, ExplainLevel, InfeasibleAction, ParamValue,
    PrivacyBudget, PrivacyMechanism, RankRequest, UserRef,
};

/// Domain separation prefix of the digest (names the definition's version).
pub const DOMAIN: &[u8] = b"fairrank/rank-request-digest/v1\0";

/// The 128-bit digest of a request's answer-determining content (see the module docs).
///
/// Serialized as 32 lowercase hexadecimal digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestDigest(pub u128);

impl RequestDigest {
    /// The digest of `request`.
    pub fn of(request: &RankRequest) -> RequestDigest {
        let mut sink = DigestSink(Xxh3Default::new());
        sink.bytes(DOMAIN);
        encode_request(request, &mut sink);
        RequestDigest(sink.0.digest128())
    }
}

impl fmt::Display for RequestDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl Serialize for RequestDigest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RequestDigest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HexVisitor;
        impl Visitor<'_> for HexVisitor {
            type Value = RequestDigest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("32 hexadecimal digits")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<RequestDigest, E> {
                if text.len() != 32 || !text.bytes().all(|byte| byte.is_ascii_hexdigit()) {
                    return Err(E::invalid_value(de::Unexpected::Str(text), &self));
                }
                u128::from_str_radix(text, 16)
                    .map(RequestDigest)
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(text), &self))
            }
        }
        deserializer.deserialize_str(HexVisitor)
    }
}

/// The content check stored in a ledger record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StoredFingerprint {
    /// A [`RequestDigest`] (records of format version 2 and later).
    Digest(RequestDigest),
    /// The 64-bit std `DefaultHasher` value of format version 1 records. It cannot be
    /// recomputed reliably (std does not promise its hash across releases), so it matches no
    /// request: a retry of such a record is refused as other content.
    Legacy(u64),
}

impl PartialEq<RequestDigest> for StoredFingerprint {
    fn eq(&self, other: &RequestDigest) -> bool {
        matches!(self, StoredFingerprint::Digest(digest) if digest == other)
    }
}

/// Where the encoding goes (the hasher; a byte vector in the tests).
trait Sink {
    fn bytes(&mut self, bytes: &[u8]);

    fn byte(&mut self, value: u8) {
        self.bytes(&[value]);
    }

    fn flag(&mut self, value: bool) {
        self.byte(u8::from(value));
    }

    fn number(&mut self, value: u64) {
        self.bytes(&value.to_le_bytes());
    }

    fn count(&mut self, value: usize) {
        self.number(value as u64);
    }

    fn float(&mut self, value: f64) {
        self.bytes(&value.to_bits().to_le_bytes());
    }

    fn text(&mut self, value: &str) {
        self.count(value.len());
        self.bytes(value.as_bytes());
    }

    fn optional<T>(&mut self, value: Option<T>, encode: impl FnOnce(&mut Self, T)) {
        match value {
            None => self.byte(0),
            Some(value) => {
                self.byte(1);
                encode(self, value);
            }
        }
    }
}

struct DigestSink(Xxh3Default);

impl Sink for DigestSink {
    fn bytes(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

fn encode_request(request: &RankRequest, sink: &mut impl Sink) {
    match &request.user {
        UserRef::Id(_) => sink.byte(0),
        UserRef::Inline { embedding, .. } => {
            sink.byte(1);
            sink.count(embedding.len());
            for value in embedding {
                sink.bytes(&value.to_bits().to_le_bytes());
            }
        }
    }
    sink.flag(request.fallback_for_unknown_user);
    sink.count(request.candidate_ids.len());
    for id in request.candidate_ids.iter() {
        sink.text(id);
    }
    sink.flag(request.skip_unknown_candidates);
    sink.count(request.k);
    sink.optional(request.pool_size, |sink, pool| sink.count(pool));

    let fairness = &request.fairness;
    sink.text(&fairness.constraint);
    sink.count(fairness.params.len());
    for (key, value) in &fairness.params {
        sink.text(key);
        encode_param(value, sink);
    }
    sink.text(&fairness.group_attribute);
    sink.text(&fairness.exposure_scope);
    sink.byte(match fairness.on_infeasible {
        InfeasibleAction::Unspecified => 0,
        InfeasibleAction::BestEffort => 1,
        InfeasibleAction::Unconstrained => 2,
        InfeasibleAction::Reject => 3,
    });
    sink.optional(fairness.seed, Sink::number);

    let privacy = &request.privacy;
    sink.byte(match privacy.mechanism {
        PrivacyMechanism::Unspecified => 0,
        PrivacyMechanism::None => 1,
        PrivacyMechanism::GumbelTopK => 2,
    });
    sink.optional(privacy.budget, |sink, budget| {
        let (tag, value) = match budget {
            PrivacyBudget::Rho(rho) => (0, rho),
            PrivacyBudget::Epsilon(epsilon) => (1, epsilon),
            PrivacyBudget::EpsilonPerPick(epsilon) => (2, epsilon),
        };
        sink.byte(tag);
        sink.float(value);
    });
    sink.optional(privacy.delta, Sink::float);
    sink.flag(privacy.release_noisy_scores);
    sink.byte(match privacy.on_budget_exhausted {
        BudgetExhaustedAction::Unspecified => 0,
        BudgetExhaustedAction::Reject => 1,
        BudgetExhaustedAction::NonPersonalized => 2,
    });

    sink.byte(match request.consent.personalization {
        ConsentDecision::Unspecified => 0,
        ConsentDecision::Granted => 1,
        ConsentDecision::Denied => 2,
    });

    sink.byte(match request.explain.level {
        ExplainLevel::None => 0,
        ExplainLevel::Reasons => 1,
        ExplainLevel::Text => 2,
        ExplainLevel::Dimensions => 3,
    });
    sink.count(request.explain.max_dimensions);
}

fn encode_param(value: &ParamValue, sink: &mut impl Sink) {
    match value {
        ParamValue::Null => sink.byte(0),
        ParamValue::Bool(flag) => {
            sink.byte(1);
            sink.flag(*flag);
        }
        ParamValue::Number(number) => {
            sink.byte(2);
            sink.float(*number);
        }
        ParamValue::String(text) => {
            sink.byte(3);
            sink.text(text);
        }
        ParamValue::List(values) => {
            sink.byte(4);
            sink.count(values.len());
            for value in values {
                encode_param(value, sink);
            }
        }
        ParamValue::Map(map) => {
            sink.byte(5);
            sink.count(map.len());
            for (key, value) in map {
                sink.text(key);
                encode_param(value, sink);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use xxhash_rust::xxh3::xxh3_128;

    use super::*;
    use crate::candidate_ids::CandidateIds;
    use crate::request::{Consent, ExplainOptions, FairnessPolicy, PrivacyPolicy};

    /// A named edit of a request.
    type Change = Box<dyn Fn(&mut RankRequest)>;

    /// A request with every field away from its default.
    fn full_request() -> RankRequest {
        let mut params = BTreeMap::new();
        params.insert("p".to_owned(), ParamValue::Number(0.5));
        params.insert(
            "groups".to_owned(),
            ParamValue::List(vec![ParamValue::Bool(true), ParamValue::Null]),
        );
        RankRequest {
            request_id: "req-1".to_owned(),
            user: UserRef::Inline {
                embedding: vec![1.0, -0.5],
                subject_id: "subject-9".to_owned(),
            },
            fallback_for_unknown_user: true,
            candidate_ids: ["a", "bc"].into_iter().collect::<CandidateIds>(),
            skip_unknown_candidates: true,
            k: 7,
            pool_size: Some(20),
            fairness: FairnessPolicy {
                constraint: "fa*ir".to_owned(),
                params,
                group_attribute: "provider".to_owned(),
                exposure_scope: "home".to_owned(),
                on_infeasible: InfeasibleAction::Reject,
                seed: Some(3),
            },
            privacy: PrivacyPolicy {
                mechanism: PrivacyMechanism::GumbelTopK,
                budget: Some(PrivacyBudget::Rho(0.25)),
                delta: Some(1e-6),
                release_noisy_scores: true,
                on_budget_exhausted: BudgetExhaustedAction::NonPersonalized,
            },
            consent: Consent {
                personalization: ConsentDecision::Granted,
                reference: "consent-record-4".to_owned(),
            },
            explain: ExplainOptions {
                level: ExplainLevel::Text,
                max_dimensions: 5,
            },
            deadline: None,
        }
    }

    /// The documented encoding of [`full_request`], written out byte by byte.
    fn full_request_encoding() -> Vec<u8> {
        fn text(out: &mut Vec<u8>, value: &str) {
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        let mut out = DOMAIN.to_vec();
        // User: inline, two f32 values.
        out.push(1);
        out.extend_from_slice(&2_u64.to_le_bytes());
        out.extend_from_slice(&1.0_f32.to_bits().to_le_bytes());
        out.extend_from_slice(&(-0.5_f32).to_bits().to_le_bytes());
        out.push(1); // fallback_for_unknown_user
        out.extend_from_slice(&2_u64.to_le_bytes());
        text(&mut out, "a");
        text(&mut out, "bc");
        out.push(1); // skip_unknown_candidates
        out.extend_from_slice(&7_u64.to_le_bytes());
        out.push(1);
        out.extend_from_slice(&20_u64.to_le_bytes());
        // Fairness.
        text(&mut out, "fa*ir");
        out.extend_from_slice(&2_u64.to_le_bytes());
        text(&mut out, "groups");
        out.push(4);
        out.extend_from_slice(&2_u64.to_le_bytes());
        out.extend_from_slice(&[1, 1, 0]);
        text(&mut out, "p");
        out.push(2);
        out.extend_from_slice(&0.5_f64.to_bits().to_le_bytes());
        text(&mut out, "provider");
        text(&mut out, "home");
        out.push(3);
        out.push(1);
        out.extend_from_slice(&3_u64.to_le_bytes());
        // Privacy.
        out.push(2);
        out.push(1);
        out.push(0);
        out.extend_from_slice(&0.25_f64.to_bits().to_le_bytes());
        out.push(1);
        out.extend_from_slice(&1e-6_f64.to_bits().to_le_bytes());
        out.push(1);
        out.push(2);
        // Consent, explanation.
        out.push(1);
        out.push(2);
        out.extend_from_slice(&5_u64.to_le_bytes());
        out
    }

    #[test]
    fn the_digest_is_xxh3_128_of_the_documented_encoding() {
        let expected = xxh3_128(&full_request_encoding());
        assert_eq!(RequestDigest::of(&full_request()), RequestDigest(expected));

        // The smallest request: a user-table id and every default.
        let mut minimal = DOMAIN.to_vec();
        minimal.push(0); // user id
        minimal.push(0); // fallback
        minimal.extend_from_slice(&0_u64.to_le_bytes()); // no candidates
        minimal.push(0); // skip unknown
        minimal.extend_from_slice(&10_u64.to_le_bytes()); // k
        minimal.push(0); // pool size
        minimal.extend_from_slice(&0_u64.to_le_bytes()); // constraint ""
        minimal.extend_from_slice(&0_u64.to_le_bytes()); // no params
        minimal.extend_from_slice(&0_u64.to_le_bytes()); // group attribute ""
        minimal.extend_from_slice(&0_u64.to_le_bytes()); // exposure scope ""
        minimal.extend_from_slice(&[0, 0]); // on infeasible, seed
        minimal.extend_from_slice(&[0, 0, 0, 0, 0]); // privacy
        minimal.push(0); // consent
        minimal.push(0); // explain level
        minimal.extend_from_slice(&0_u64.to_le_bytes()); // max dimensions
        let request = RankRequest::new("r", UserRef::id("alice"), 10);
        assert_eq!(
            RequestDigest::of(&request),
            RequestDigest(xxh3_128(&minimal))
        );
    }

    #[test]
    fn every_answer_determining_field_changes_the_digest() {
        let base = full_request();
        let digest = RequestDigest::of(&base);
        let changes: Vec<(&str, Change)> = vec![
            (
                "user kind",
                Box::new(|r: &mut RankRequest| r.user = UserRef::id("subject-9")),
            ),
            (
                "embedding",
                Box::new(|r: &mut RankRequest| {
                    r.user = UserRef::Inline {
                        embedding: vec![1.0, -0.25],
                        subject_id: "subject-9".to_owned(),
                    }
                }),
            ),
            (
                "embedding length",
                Box::new(|r: &mut RankRequest| {
                    r.user = UserRef::Inline {
                        embedding: vec![1.0, -0.5, -0.0],
                        subject_id: "subject-9".to_owned(),
                    }
                }),
            ),
            (
                "fallback",
                Box::new(|r: &mut RankRequest| r.fallback_for_unknown_user = false),
            ),
            (
                "candidates",
                Box::new(|r: &mut RankRequest| r.candidate_ids = ["ab", "c"].into_iter().collect()),
            ),
            (
                "candidate order",
                Box::new(|r: &mut RankRequest| r.candidate_ids = ["bc", "a"].into_iter().collect()),
            ),
            (
                "skip unknown",
                Box::new(|r: &mut RankRequest| r.skip_unknown_candidates = false),
            ),
            ("k", Box::new(|r: &mut RankRequest| r.k = 8)),
            (
                "pool size",
                Box::new(|r: &mut RankRequest| r.pool_size = None),
            ),
            (
                "constraint",
                Box::new(|r: &mut RankRequest| r.fairness.constraint = "none".to_owned()),
            ),
            (
                "param value",
                Box::new(|r: &mut RankRequest| {
                    r.fairness
                        .params
                        .insert("p".to_owned(), ParamValue::Number(0.6));
                }),
            ),
            (
                "param type",
                Box::new(|r: &mut RankRequest| {
                    r.fairness
                        .params
                        .insert("p".to_owned(), ParamValue::String("0.5".to_owned()));
                }),
            ),
            (
                "param removed",
                Box::new(|r: &mut RankRequest| {
                    r.fairness.params.remove("groups");
                }),
            ),
            (
                "group attribute",
                Box::new(|r: &mut RankRequest| r.fairness.group_attribute = "genre".to_owned()),
            ),
            (
                "exposure scope",
                Box::new(|r: &mut RankRequest| r.fairness.exposure_scope = "search".to_owned()),
            ),
            (
                "on infeasible",
                Box::new(|r: &mut RankRequest| {
                    r.fairness.on_infeasible = InfeasibleAction::BestEffort
                }),
            ),
            (
                "seed",
                Box::new(|r: &mut RankRequest| r.fairness.seed = Some(4)),
            ),
            (
                "no seed",
                Box::new(|r: &mut RankRequest| r.fairness.seed = None),
            ),
            (
                "mechanism",
                Box::new(|r: &mut RankRequest| r.privacy.mechanism = PrivacyMechanism::None),
            ),
            (
                "budget kind",
                Box::new(|r: &mut RankRequest| {
                    r.privacy.budget = Some(PrivacyBudget::Epsilon(0.25))
                }),
            ),
            (
                "budget value",
                Box::new(|r: &mut RankRequest| r.privacy.budget = Some(PrivacyBudget::Rho(0.5))),
            ),
            (
                "no budget",
                Box::new(|r: &mut RankRequest| r.privacy.budget = None),
            ),
            (
                "delta",
                Box::new(|r: &mut RankRequest| r.privacy.delta = Some(1e-7)),
            ),
            (
                "noisy scores",
                Box::new(|r: &mut RankRequest| r.privacy.release_noisy_scores = false),
            ),
            (
                "on exhausted",
                Box::new(|r: &mut RankRequest| {
                    r.privacy.on_budget_exhausted = BudgetExhaustedAction::Reject
                }),
            ),
            (
                "consent",
                Box::new(|r: &mut RankRequest| r.consent.personalization = ConsentDecision::Denied),
            ),
            (
                "explain level",
                Box::new(|r: &mut RankRequest| r.explain.level = ExplainLevel::Reasons),
            ),
            (
                "max dimensions",
                Box::new(|r: &mut RankRequest| r.explain.max_dimensions = 6),
            ),
        ];
        let mut seen = vec![digest];
        for (name, change) in &changes {
            let mut changed = base.clone();
            change(&mut changed);
            let other = RequestDigest::of(&changed);
            assert!(!seen.contains(&other), "{name} left the digest unchanged");
            seen.push(other);
        }
    }

    #[test]
    fn fields_that_do_not_shape_the_answer_leave_the_digest_unchanged() {
        let base = full_request();
        let digest = RequestDigest::of(&base);
        let mut other = base.clone();
        other.request_id = "req-2".to_owned();
        other.deadline = Some(Instant::now() + Duration::from_secs(5));
        other.consent.reference = "another-record".to_owned();
        other.user = UserRef::Inline {
            embedding: vec![1.0, -0.5],
            subject_id: "keyed-by-the-ledger".to_owned(),
        };
        assert_eq!(RequestDigest::of(&other), digest);
    }

    #[test]
    fn candidate_boundaries_are_part_of_the_digest() {
        let mut joined = full_request();
        joined.candidate_ids = ["abc"].into_iter().collect();
        let mut split = full_request();
        split.candidate_ids = ["a", "bc"].into_iter().collect();
        assert_ne!(RequestDigest::of(&joined), RequestDigest::of(&split));
    }

    #[test]
    fn stored_fingerprints_round_trip_and_legacy_ones_match_nothing() {
        let digest = RequestDigest(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let json = serde_json::to_string(&StoredFingerprint::Digest(digest)).unwrap();
        assert_eq!(json, "\"0123456789abcdef0011223344556677\"");
        let parsed: StoredFingerprint = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed, digest);
        let legacy: StoredFingerprint = serde_json::from_str("12345").unwrap();
        assert_eq!(legacy, StoredFingerprint::Legacy(12345));
        assert!(legacy != digest);
        for bad in [
            "\"0123\"",
            "\"0123456789abcdef0011223344556677aa\"",
            "\"+123456789abcdef0011223344556677\"",
        ] {
            assert!(
                serde_json::from_str::<StoredFingerprint>(bad).is_err(),
                "{bad}"
            );
        }
    }
}
