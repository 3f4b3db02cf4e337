//! Every validation error, with the field it names.

use std::collections::BTreeMap;

use super::util::{DIM, fixture, fixture_with};
use crate::{
    Consent, EngineConfig, EngineError, ExplainLevel, ExplainOptions, FairnessPolicy,
    InvalidReason, NotFoundReason, ParamValue, PreconditionReason, PrivacyBudget, PrivacyMechanism,
    PrivacyPolicy, RankRequest, UserRef,
};

fn base() -> RankRequest {
    RankRequest::new("valid-id", UserRef::id("user-1"), 5)
}

/// A short name of the error's variant.
fn kind(error: &EngineError) -> &'static str {
    match error {
        EngineError::InvalidArgument {
            reason: InvalidReason::LimitExceeded,
            ..
        } => "limit",
        EngineError::InvalidArgument {
            reason: InvalidReason::DimensionMismatch,
            ..
        } => "dimension",
        EngineError::InvalidArgument {
            reason: InvalidReason::InvalidConstraintParams,
            ..
        } => "params",
        EngineError::InvalidArgument {
            reason: InvalidReason::UnknownConstraint,
            ..
        } => "unknown_constraint",
        EngineError::InvalidArgument { .. } => "invalid",
        EngineError::NotFound { .. } => "not_found",
        EngineError::FailedPrecondition { .. } => "precondition",
        EngineError::Unsupported { .. } => "unsupported",
        _ => "other",
    }
}

#[test]
fn each_invalid_field_is_named() {
    let config = EngineConfig {
        max_candidates: 4,
        ..EngineConfig::default()
    };
    let fixture = fixture_with(config.clone(), true);
    let with = |change: fn(&mut RankRequest)| {
        let mut request = base();
        change(&mut request);
        request
    };
    let cases: Vec<(RankRequest, &str, &str)> = vec![
        (with(|r| r.request_id.clear()), "request_id", "invalid"),
        (
            with(|r| r.request_id = "no spaces".into()),
            "request_id",
            "invalid",
        ),
        (
            with(|r| r.request_id = "x".repeat(129)),
            "request_id",
            "limit",
        ),
        (with(|r| r.user = UserRef::id("")), "user_id", "invalid"),
        (
            with(|r| r.user = UserRef::id("u".repeat(257))),
            "user_id",
            "limit",
        ),
        (
            with(|r| r.user = UserRef::embedding(vec![0.5; DIM - 1])),
            "inline_user.embedding",
            "dimension",
        ),
        (
            with(|r| r.user = UserRef::embedding(vec![0.5; DIM + 1])),
            "inline_user.embedding",
            "dimension",
        ),
        (with(|r| r.k = 0), "k", "invalid"),
        (with(|r| r.k = 1001), "k", "limit"),
        (with(|r| r.pool_size = Some(4)), "pool_size", "invalid"),
        (with(|r| r.pool_size = Some(10_001)), "pool_size", "limit"),
        (
            with(|r| r.candidate_ids = (0..5).map(|i| format!("item-00{i}")).collect()),
            "candidate_ids",
            "limit",
        ),
        (
            with(|r| r.fairness.constraint = "fa*ir".into()),
            "fairness.params.p",
            "params",
        ),
        (
            with(|r| r.fairness.constraint = "made-up".into()),
            "fairness.constraint",
            "unknown_constraint",
        ),
        (
            with(|r| {
                r.fairness = FairnessPolicy {
                    constraint: "det-greedy".into(),
                    params: BTreeMap::from([(
                        "targets".to_owned(),
                        ParamValue::Map(BTreeMap::from([(
                            "1".to_owned(),
                            ParamValue::Number(1.5),
                        )])),
                    )]),
                    ..FairnessPolicy::default()
                }
            }),
            "fairness.params.targets",
            "params",
        ),
        (
            with(|r| {
                r.fairness = FairnessPolicy {
                    constraint: "fairco".into(),
                    params: BTreeMap::from([("lambda".to_owned(), ParamValue::Number(-1.0))]),
                    ..FairnessPolicy::default()
                }
            }),
            "fairness.params.lambda",
            "params",
        ),
        (
            with(|r| {
                r.fairness = FairnessPolicy {
                    params: BTreeMap::from([("p".to_owned(), ParamValue::Number(0.5))]),
                    ..FairnessPolicy::none()
                }
            }),
            "fairness.params.p",
            "params",
        ),
        (
            with(|r| r.fairness.group_attribute = "colour".into()),
            "fairness.group_attribute",
            "precondition",
        ),
        (
            with(|r| r.fairness.exposure_scope = "s".repeat(129)),
            "fairness.exposure_scope",
            "limit",
        ),
        (
            with(|r| r.fairness.constraint = "c".repeat(65)),
            "fairness.constraint",
            "limit",
        ),
        (
            with(|r| r.fairness.group_attribute = "g".repeat(129)),
            "fairness.group_attribute",
            "limit",
        ),
        (
            with(|r| {
                r.user = UserRef::embedding(vec![0.5; DIM]);
                r.privacy = PrivacyPolicy {
                    mechanism: PrivacyMechanism::GumbelTopK,
                    ..PrivacyPolicy::default()
                }
            }),
            "inline_user.subject_id",
            "invalid",
        ),
        (
            with(|r| {
                r.privacy = PrivacyPolicy {
                    budget: Some(PrivacyBudget::Rho(-1.0)),
                    ..PrivacyPolicy::default()
                }
            }),
            "privacy.rho",
            "invalid",
        ),
        (
            with(|r| {
                r.consent = Consent {
                    reference: "c".repeat(257),
                    ..Consent::default()
                }
            }),
            "consent.consent_reference",
            "limit",
        ),
        (
            with(|r| {
                r.explain = ExplainOptions {
                    level: ExplainLevel::Dimensions,
                    max_dimensions: 33,
                }
            }),
            "explain.max_dimensions",
            "limit",
        ),
        (
            with(|r| r.user = UserRef::id("nobody")),
            "user_id",
            "not_found",
        ),
    ];
    for (request, field, expected_kind) in cases {
        let error = fixture.engine.rank_blocking(request).expect_err(field);
        assert_eq!(error.field(), Some(field), "{error}");
        assert_eq!(kind(&error), expected_kind, "{field}: {error}");
        assert!(
            error.to_string().contains(field),
            "message names the field: {error}"
        );
    }
}

#[test]
fn a_long_unknown_candidate_id_is_quoted_clipped() {
    // 20 KB in a message would exceed the trailer limits of gRPC peers (8 to 16 KiB).
    let fixture = fixture();
    let mut request = base();
    request.candidate_ids = vec!["z".repeat(20_000)].into();
    let error = fixture.engine.rank_blocking(request).unwrap_err();
    assert_eq!(error.field(), Some("candidate_ids"), "{error}");
    let message = error.to_string();
    assert!(message.len() < 400, "{message}");
    assert!(message.contains("(20000 bytes)"), "{message}");
}

#[test]
fn non_finite_embeddings_name_the_index() {
    let fixture = fixture();
    for (index, value, word) in [(0, f32::NAN, "NaN"), (DIM - 1, f32::INFINITY, "infinite")] {
        let mut embedding = vec![1.0; DIM];
        embedding[index] = value;
        let mut request = base();
        request.user = UserRef::embedding(embedding);
        let error = fixture.engine.rank_blocking(request).unwrap_err();
        assert_eq!(error.field(), Some("inline_user.embedding"));
        assert!(
            error
                .to_string()
                .contains(&format!("index {index} is {word}")),
            "{error}"
        );
    }
}

#[test]
fn unknown_and_duplicate_candidates_are_listed_up_to_five_with_the_total() {
    let fixture = fixture();
    let mut request = base();
    request.candidate_ids = (0..8).map(|i| format!("missing-{i}")).collect();
    request.candidate_ids.push("item-001");
    let error = fixture.engine.rank_blocking(request).unwrap_err();
    assert!(
        matches!(
            error,
            EngineError::NotFound {
                reason: NotFoundReason::Item,
                ..
            }
        ),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains("8 ids are not in the item table"),
        "{message}"
    );
    assert!(
        message.contains("\"missing-4\"") && !message.contains("\"missing-5\""),
        "{message}"
    );
    assert!(message.contains("and 3 more"), "{message}");

    let mut request = base();
    request.candidate_ids = [
        "item-001", "item-002", "item-001", "item-003", "item-002", "item-001",
    ]
    .into_iter()
    .collect();
    let error = fixture.engine.rank_blocking(request).unwrap_err();
    assert_eq!(error.field(), Some("candidate_ids"));
    assert_eq!(kind(&error), "invalid");
    let message = error.to_string();
    assert!(message.contains("3 duplicate entries"), "{message}");
    assert!(message.contains("\"item-001\" at position 2"), "{message}");

    // Duplicates among unknown ids are duplicates too, even when unknown ids are skipped.
    let mut request = base();
    request.candidate_ids = ["ghost", "item-001", "ghost"].into_iter().collect();
    request.skip_unknown_candidates = true;
    let error = fixture.engine.rank_blocking(request).unwrap_err();
    assert!(error.to_string().contains("1 duplicate entry"), "{error}");
}

/// The messages of unknown and duplicate candidates, in full, for a list long enough to cross
/// several groups of the store's lookup pipeline (the lookups prefetch the rows they find).
#[test]
fn unknown_and_duplicate_candidate_messages_are_exact_for_long_lists() {
    let fixture = fixture();
    let mut request = base();
    let mut ids: Vec<String> = (0..40).map(|i| format!("item-{:03}", i % 30)).collect();
    ids[33] = "ghost-a".to_owned();
    ids.push("ghost-b".to_owned());
    request.candidate_ids = ids.iter().map(String::as_str).collect();
    let error = fixture.engine.rank_blocking(request).unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid `candidate_ids`: 9 duplicate entries (\"item-000\" at position 30, \"item-001\" at \
         position 31, \"item-002\" at position 32, \"item-004\" at position 34, \"item-005\" \
         at position 35, and 4 more); each id may appear once"
    );

    let mut request = base();
    let mut ids: Vec<String> = (0..30).map(|i| format!("item-{i:03}")).collect();
    ids.insert(9, "ghost-a".to_owned());
    ids.push("ghost-b".to_owned());
    request.candidate_ids = ids.iter().map(String::as_str).collect();
    let error = fixture.engine.rank_blocking(request).unwrap_err();
    assert_eq!(
        error.to_string(),
        "not found (`candidate_ids`): 2 ids are not in the item table: \"ghost-a\" at position 9, \
         \"ghost-b\" at position 31"
    );
}

#[test]
fn user_ids_need_a_user_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = super::util::write(
        dir.path(),
        "items.frt",
        &super::util::items_data(1, 20, true),
    );
    let engine = crate::Engine::new(
        EngineConfig::default(),
        store::Table::open(&path).expect("opens"),
        None,
    )
    .expect("starts");
    let error = engine.rank_blocking(base()).unwrap_err();
    assert!(matches!(
        error,
        EngineError::FailedPrecondition {
            reason: PreconditionReason::TableNotLoaded,
            ..
        }
    ));
    assert_eq!(error.field(), Some("user_id"));
}

#[test]
fn a_default_group_attribute_the_table_lacks_gives_an_empty_report() {
    let config = EngineConfig {
        default_group_attribute: "absent".into(),
        ..EngineConfig::default()
    };
    let fixture = fixture_with(config, true);
    let response = fixture.engine.rank_blocking(base()).expect("ranks");
    assert_eq!(response.fairness.group_attribute, "");
    assert!(response.fairness.groups.is_empty());
}

#[test]
fn k_above_the_catalog_returns_what_exists() {
    let fixture = fixture();
    let mut request = base();
    request.k = 1000;
    request.candidate_ids = ["item-005", "item-006"].into_iter().collect();
    let response = fixture.engine.rank_blocking(request).expect("ranks");
    assert_eq!(response.items.len(), 2);
    assert_eq!(response.pool_size, 2);
}
