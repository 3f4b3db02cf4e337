//! Pre-built request templates: Rank requests of each kind of the mix (user ids of the
//! default dataset or random inline embeddings, random candidate ids from the catalog id
//! range), and Echo requests whose encoded sizes equal them.

use api::fairrank::bench::v1::{EchoRequest, EchoResponse};
use api::fairrank::v1::rank_request::User;
use api::fairrank::v1::{InlineUser, RankRequest};
use prost::Message;
use prost::bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::error::LoadgenError;
use crate::loadgen::codec::{PreEncoded, RequestId};
use crate::loadgen::mix::{Mix, RequestKind};

/// Largest number of templates per request kind.
pub const MAX_TEMPLATES: usize = 4096;

/// Largest number of candidate ids over all templates of a run (about 10 bytes each).
pub const MAX_TEMPLATE_CANDIDATES: usize = 10_000_000;

/// Largest inline embedding dimension.
pub const MAX_INLINE_DIM: usize = 65_536;

/// Largest Echo response the Echo service serves (`EchoRequest.response_bytes`).
pub const MAX_ECHO_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Id of item row `index` in the synthetic datasets (`i0000000`, ...).
pub fn item_id(index: usize) -> String {
    format!("i{index:07}")
}

/// Id of user row `index` in the synthetic datasets (`u000000`, ...).
pub fn user_id(index: usize) -> String {
    format!("u{index:06}")
}

/// Who the requests rank for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserSource {
    /// User ids `u000000` .. of the user table, drawn uniformly from the first `count`.
    Ids {
        /// Number of users in the server's user table.
        count: usize,
    },
    /// Random inline embeddings of this dimension (Gaussian directions of unit norm).
    Inline {
        /// The item table's embedding dimension.
        dim: usize,
    },
}

/// What the Rank requests look like.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    /// Number of items to return.
    pub k: u32,
    /// Pool size for the fairness re-ranker; `None` uses the server default.
    pub pool_size: Option<u32>,
    /// Users to rank for.
    pub users: UserSource,
    /// Number of items in the server's catalog: candidates are drawn from `i0000000` to
    /// `item_id(items - 1)`.
    pub items: usize,
    /// Distinct pre-built requests per kind, cycled at random.
    pub templates_per_kind: usize,
    /// Seed of the template generator.
    pub seed: u64,
}

impl RequestSpec {
    /// Checks the spec against the mix: positive k, candidate lists no longer than the
    /// catalog, bounded template memory.
    pub fn validate(&self, mix: &Mix) -> Result<(), LoadgenError> {
        if self.k == 0 {
            return Err(LoadgenError::invalid("--k", "0", "must be at least 1"));
        }
        if let Some(pool) = self.pool_size
            && pool < self.k
        {
            return Err(LoadgenError::invalid(
                "--pool-size",
                pool.to_string(),
                "must be at least k",
            ));
        }
        if self.items == 0 {
            return Err(LoadgenError::invalid("--items", "0", "must be at least 1"));
        }
        if self.templates_per_kind == 0 || self.templates_per_kind > MAX_TEMPLATES {
            return Err(LoadgenError::invalid(
                "--templates",
                self.templates_per_kind.to_string(),
                format!("must be in 1..={MAX_TEMPLATES}"),
            ));
        }
        match self.users {
            UserSource::Ids { count: 0 } => {
                return Err(LoadgenError::invalid("--users", "0", "must be at least 1"));
            }
            UserSource::Inline { dim } if dim == 0 || dim > MAX_INLINE_DIM => {
                return Err(LoadgenError::invalid(
                    "--dim",
                    dim.to_string(),
                    format!("must be in 1..={MAX_INLINE_DIM}"),
                ));
            }
            _ => {}
        }
        let mut total_candidates = 0_usize;
        for kind in mix.kinds() {
            let count = kind.candidate_count();
            if count > self.items {
                return Err(LoadgenError::invalid(
                    "--mix",
                    kind.to_string(),
                    format!(
                        "more candidates than the catalog has ({} items)",
                        self.items
                    ),
                ));
            }
            total_candidates = total_candidates.saturating_add(count * self.templates_per_kind);
        }
        if total_candidates > MAX_TEMPLATE_CANDIDATES {
            return Err(LoadgenError::invalid(
                "--templates",
                self.templates_per_kind.to_string(),
                format!(
                    "{total_candidates} candidate ids over all templates exceed \
                     {MAX_TEMPLATE_CANDIDATES}: use fewer templates"
                ),
            ));
        }
        Ok(())
    }
}

/// The pre-built Rank requests of one kind.
#[derive(Debug, Clone)]
pub struct KindTemplates {
    /// The kind.
    pub kind: RequestKind,
    /// Encoded requests without their request id (the caller adds a fresh one per call).
    pub bodies: Vec<Bytes>,
    /// The first template as a message (with a request id), to probe the server.
    pub probe: RankRequest,
    /// Mean encoded size of a request of this kind on the wire, request id included.
    pub mean_request_bytes: f64,
}

/// Builds `spec.templates_per_kind` requests for every kind of the mix (same order).
pub fn build_rank_templates(
    spec: &RequestSpec,
    mix: &Mix,
) -> Result<Vec<KindTemplates>, LoadgenError> {
    spec.validate(mix)?;
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut embedding = Vec::new();
    mix.kinds()
        .iter()
        .map(|&kind| {
            let mut bodies = Vec::with_capacity(spec.templates_per_kind);
            let mut probe = None;
            let mut total_bytes = 0_usize;
            for _ in 0..spec.templates_per_kind {
                let request = rank_template(spec, kind, &mut rng, &mut embedding);
                let body = Bytes::from(request.encode_to_vec());
                total_bytes += PreEncoded {
                    request_id: Some(RequestId::new(0, 0, 0)),
                    body: body.clone(),
                }
                .encoded_len();
                bodies.push(body);
                if probe.is_none() {
                    probe = Some(request);
                }
            }
            let mut probe = probe.unwrap_or_default();
            // A fresh nonce per run: a replayed id would be answered from the server's store.
            probe.request_id = RequestId::new(rand::random(), 0, 0).as_str().to_owned();
            Ok(KindTemplates {
                kind,
                mean_request_bytes: total_bytes as f64 / bodies.len().max(1) as f64,
                bodies,
                probe,
            })
        })
        .collect()
}

/// One Rank request of `kind` without a request id.
fn rank_template(
    spec: &RequestSpec,
    kind: RequestKind,
    rng: &mut ChaCha8Rng,
    embedding: &mut Vec<f32>,
) -> RankRequest {
    let user = match spec.users {
        UserSource::Ids { count } => User::UserId(user_id(rng.random_range(0..count))),
        UserSource::Inline { dim } => {
            random_unit_vector(rng, dim, embedding);
            User::InlineUser(InlineUser {
                embedding: embedding.clone(),
                subject_id: String::new(),
            })
        }
    };
    let candidate_ids = match kind {
        RequestKind::Catalog => Vec::new(),
        RequestKind::Candidates(count) => rand::seq::index::sample(rng, spec.items, count)
            .into_iter()
            .map(item_id)
            .collect(),
    };
    RankRequest {
        user: Some(user),
        candidate_ids,
        k: spec.k,
        pool_size: spec.pool_size,
        ..Default::default()
    }
}

/// Fills `out` with a direction drawn uniformly from the unit sphere of dimension `dim`.
fn random_unit_vector(rng: &mut ChaCha8Rng, dim: usize, out: &mut Vec<f32>) {
    out.clear();
    out.extend((0..dim).map(|_| rng.sample::<f32, _>(StandardNormal)));
    let norm = out.iter().map(|value| value * value).sum::<f32>().sqrt();
    if norm > 0.0 {
        out.iter_mut().for_each(|value| *value /= norm);
    }
}

/// Length of a protobuf `bytes` field 1 holding `payload` bytes (0 when empty: proto3 omits
/// it).
fn bytes_field_len(payload: usize) -> usize {
    if payload == 0 {
        0
    } else {
        1 + prost::encoding::encoded_len_varint(payload as u64) + payload
    }
}

/// The largest payload whose `bytes` field 1 encodes to at most `target` bytes (so the
/// field is exactly `target` bytes whenever that size is reachable).
fn payload_for_field_len(target: usize) -> usize {
    // The field is 1 tag byte + 1..=10 length bytes + the payload.
    (2..=11)
        .filter_map(|overhead| target.checked_sub(overhead))
        .filter(|&payload| bytes_field_len(payload) <= target)
        .max()
        .unwrap_or(0)
}

/// An Echo request whose encoded size is `request_bytes` (exactly, except for the few sizes
/// a varint boundary makes unreachable, where it is one byte smaller) and whose response,
/// `EchoResponse { payload: response_payload zero bytes }`, encodes to `response_bytes`
/// the same way.
pub fn echo_template(
    request_bytes: usize,
    response_bytes: usize,
) -> Result<EchoRequest, LoadgenError> {
    let response_payload = payload_for_field_len(response_bytes);
    if response_payload > MAX_ECHO_RESPONSE_BYTES {
        return Err(LoadgenError::invalid(
            "Echo response size",
            response_bytes.to_string(),
            format!("the Echo service answers at most {MAX_ECHO_RESPONSE_BYTES} bytes"),
        ));
    }
    // `response_bytes` is a proto3 optional uint32: tag 0x10 + varint, always present.
    let response_field = 1 + prost::encoding::encoded_len_varint(response_payload as u64);
    let payload = payload_for_field_len(request_bytes.saturating_sub(response_field));
    Ok(EchoRequest {
        payload: Bytes::from(vec![0x5a_u8; payload]),
        response_bytes: Some(response_payload as u32),
    })
}

/// Encoded size of the Echo response to `request`.
pub fn echo_response_len(request: &EchoRequest) -> usize {
    let payload = request
        .response_bytes
        .map_or(request.payload.len(), |bytes| bytes as usize);
    EchoResponse {
        payload: Bytes::from(vec![0_u8; payload]),
    }
    .encoded_len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::codec::REQUEST_ID_LEN;

    fn spec(users: UserSource) -> RequestSpec {
        RequestSpec {
            k: 10,
            pool_size: None,
            users,
            items: 5_000,
            templates_per_kind: 4,
            seed: 7,
        }
    }

    #[test]
    fn ids_match_the_synthetic_dataset() {
        let params = datasets::SyntheticParams {
            items: 12,
            users: 11,
            dim: 4,
            ..Default::default()
        };
        let dataset = datasets::generate(&params).unwrap();
        let items: Vec<String> = (0..12).map(item_id).collect();
        let users: Vec<String> = (0..11).map(user_id).collect();
        assert_eq!(dataset.items.ids, items);
        assert_eq!(dataset.users.ids, users);
    }

    #[test]
    fn templates_have_the_kind_distinct_candidates_and_users() {
        let mix = Mix::parse("candidates100:1,catalog:1").unwrap();
        let templates = build_rank_templates(&spec(UserSource::Ids { count: 50 }), &mix).unwrap();
        assert_eq!(templates.len(), 2);
        for kind_templates in &templates {
            assert_eq!(kind_templates.bodies.len(), 4);
            for body in &kind_templates.bodies {
                let request = RankRequest::decode(body.as_ref()).unwrap();
                assert!(request.request_id.is_empty());
                assert_eq!(request.k, 10);
                assert_eq!(
                    request.candidate_ids.len(),
                    kind_templates.kind.candidate_count()
                );
                let mut unique = request.candidate_ids.clone();
                unique.sort();
                unique.dedup();
                assert_eq!(unique.len(), request.candidate_ids.len());
                for id in &request.candidate_ids {
                    let index: usize = id[1..].parse().unwrap();
                    assert!(id.starts_with('i') && id.len() == 8 && index < 5_000);
                }
                let Some(User::UserId(user)) = &request.user else {
                    panic!("expected a user id");
                };
                assert!(user.starts_with('u') && user[1..].parse::<usize>().unwrap() < 50);
            }
            assert!(!kind_templates.probe.request_id.is_empty());
            let probe_len = kind_templates.probe.encoded_len() as f64;
            assert!(kind_templates.mean_request_bytes > 0.0);
            // The probe's id has the same length as the per-call ids.
            assert_eq!(kind_templates.probe.request_id.len(), REQUEST_ID_LEN);
            if kind_templates.kind == RequestKind::Catalog {
                assert_eq!(probe_len, kind_templates.mean_request_bytes);
            }
        }
        // The templates are deterministic in the seed.
        let again = build_rank_templates(&spec(UserSource::Ids { count: 50 }), &mix).unwrap();
        assert_eq!(again[0].bodies, templates[0].bodies);
    }

    #[test]
    fn inline_users_are_unit_vectors_of_the_dimension() {
        let mix = Mix::parse("candidates10").unwrap();
        let templates = build_rank_templates(&spec(UserSource::Inline { dim: 32 }), &mix).unwrap();
        for body in &templates[0].bodies {
            let request = RankRequest::decode(body.as_ref()).unwrap();
            let Some(User::InlineUser(user)) = request.user else {
                panic!("expected an inline user");
            };
            assert_eq!(user.embedding.len(), 32);
            let norm: f32 = user.embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        }
    }

    #[test]
    fn specs_out_of_range_are_refused() {
        let mix = Mix::parse("candidates1000").unwrap();
        let good = spec(UserSource::Ids { count: 10 });
        assert!(good.validate(&mix).is_ok());
        let cases = [
            RequestSpec {
                k: 0,
                ..good.clone()
            },
            RequestSpec {
                pool_size: Some(5),
                ..good.clone()
            },
            RequestSpec {
                items: 999,
                ..good.clone()
            },
            RequestSpec {
                templates_per_kind: 0,
                ..good.clone()
            },
            RequestSpec {
                templates_per_kind: MAX_TEMPLATES + 1,
                ..good.clone()
            },
            RequestSpec {
                users: UserSource::Ids { count: 0 },
                ..good.clone()
            },
            RequestSpec {
                users: UserSource::Inline { dim: 0 },
                ..good.clone()
            },
        ];
        for case in cases {
            assert!(case.validate(&mix).is_err(), "{case:?} accepted");
        }
        // Template memory is bounded over all kinds: 101 x 100000 ids > 10M.
        let big_mix = Mix::parse("candidates100000,catalog").unwrap();
        let big = RequestSpec {
            items: 100_000,
            templates_per_kind: 100,
            ..good.clone()
        };
        assert!(big.validate(&big_mix).is_ok());
        let too_big = RequestSpec {
            templates_per_kind: 101,
            ..big
        };
        let message = too_big.validate(&big_mix).unwrap_err().to_string();
        assert!(message.contains("fewer templates"), "{message}");
    }

    #[test]
    fn echo_templates_reproduce_the_sizes() {
        for (request_bytes, response_bytes) in [
            (10_500, 700),
            (60, 300),
            (129, 130),
            (131, 131),
            (100_040, 16_400),
            (1_200_000, 2_000_000),
        ] {
            let echo = echo_template(request_bytes, response_bytes).unwrap();
            let request_len = echo.encoded_len();
            let response_len = echo_response_len(&echo);
            assert!(
                request_len <= request_bytes && request_len + 1 >= request_bytes,
                "{request_bytes}: {request_len}"
            );
            assert!(
                response_len <= response_bytes && response_len + 1 >= response_bytes,
                "{response_bytes}: {response_len}"
            );
        }
        // Sizes away from varint boundaries are exact.
        let echo = echo_template(10_500, 700).unwrap();
        assert_eq!(echo.encoded_len(), 10_500);
        assert_eq!(echo_response_len(&echo), 700);
        assert!(echo_template(100, MAX_ECHO_RESPONSE_BYTES + 100).is_err());
    }
}
