//! Conversions between `fairrank.v1` messages and the engine's native types, field for field.
//!
//! An enum number this server does not know is refused, never read as `UNSPECIFIED`
//! (`proto/README.md`): UNIMPLEMENTED for `privacy.mechanism`, INVALID_ARGUMENT otherwise.
//! Conversion errors name the proto field (`user`, `fairness.params.alpha`, ...).

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime};

use api::fairrank::v1 as pb;
use engine::ParamValue;
use tonic::Status;

use super::errors;

/// The engine request of a `RankRequest`, with its deadline. The candidate ids come
/// separately (the request's own `candidate_ids` are ignored; the Rank route decodes them
/// into one buffer).
pub fn rank_request(
    request: pb::RankRequest,
    candidate_ids: engine::CandidateIds,
    deadline: Option<Instant>,
) -> Result<engine::RankRequest, Status> {
    let user = match request.user {
        Some(pb::rank_request::User::UserId(id)) => engine::UserRef::Id(id),
        Some(pb::rank_request::User::InlineUser(inline)) => engine::UserRef::Inline {
            embedding: inline.embedding,
            subject_id: inline.subject_id,
        },
        None => {
            return Err(errors::invalid_field(
                "user",
                "exactly one of `user_id` and `inline_user` must be set",
            ));
        }
    };
    let fairness = match request.fairness {
        Some(policy) => fairness_policy(policy)?,
        None => engine::FairnessPolicy::default(),
    };
    Ok(engine::RankRequest {
        request_id: request.request_id,
        user,
        fallback_for_unknown_user: request.fallback_for_unknown_user,
        candidate_ids,
        skip_unknown_candidates: request.skip_unknown_candidates,
        k: request.k as usize,
        pool_size: request.pool_size.map(|pool| pool as usize),
        fairness,
        privacy: request
            .privacy
            .map(privacy_policy)
            .transpose()?
            .unwrap_or_default(),
        consent: request
            .consent
            .map(consent)
            .transpose()?
            .unwrap_or_default(),
        explain: request
            .explain
            .map(explain_options)
            .transpose()?
            .unwrap_or_default(),
        deadline,
    })
}

fn fairness_policy(policy: pb::FairnessPolicy) -> Result<engine::FairnessPolicy, Status> {
    let on_infeasible = match known(policy.on_infeasible, "fairness.on_infeasible")? {
        pb::InfeasibleAction::Unspecified => engine::InfeasibleAction::Unspecified,
        pb::InfeasibleAction::BestEffort => engine::InfeasibleAction::BestEffort,
        pb::InfeasibleAction::Unconstrained => engine::InfeasibleAction::Unconstrained,
        pb::InfeasibleAction::Reject => engine::InfeasibleAction::Reject,
    };
    let params = match &policy.params {
        Some(params) => constraint_params(params)?,
        None => BTreeMap::new(),
    };
    Ok(engine::FairnessPolicy {
        constraint: policy.constraint,
        params,
        group_attribute: policy.group_attribute,
        exposure_scope: policy.exposure_scope,
        on_infeasible,
        seed: policy.seed,
    })
}

/// Largest encoded `fairness.params`, in bytes: room for the most groups a constraint may
/// list (`fairness::MAX_LISTED_GROUPS`) many times over, while the engine's cache of built
/// re-rankers (keyed by the parameters) stays small.
pub(super) const MAX_PARAMS_BYTES: usize = 64 * 1024;

/// Largest `fairness` policy a Rank request (or a RankBatch entry) may carry on the wire,
/// in bytes, counted before it is decoded: [`MAX_PARAMS_BYTES`] of parameters and room for
/// the policy's other fields. prost builds a `Struct` at 16 to 32 times its wire size (an
/// empty `Value` is 2 bytes on the wire), so this bound must hold before decoding, not
/// after (the size check of [`constraint_params`] runs on the decoded message).
pub(super) const MAX_FAIRNESS_WIRE_BYTES: usize = MAX_PARAMS_BYTES + 4 * 1024;

/// Largest sum of the entries' `fairness` policies a RankBatch may carry on the wire, in
/// bytes (1 024 entries of 1 KiB each), for the same reason.
pub(super) const MAX_BATCH_FAIRNESS_WIRE_BYTES: usize = 1024 * 1024;

/// The refusal of a `fairness` policy above `limit` bytes on the wire (`bytes` counted so
/// far), for `field` (`fairness`, or a batch's `requests`).
pub(super) fn fairness_too_large(field: &str, bytes: usize, limit: usize) -> Status {
    errors::limit_exceeded(
        field,
        format!(
            "fairness policies of {bytes} bytes or more on the wire; at most {limit} are \
             allowed (`fairness.params` at most {MAX_PARAMS_BYTES})"
        ),
    )
}

/// Longest key at any depth of `fairness.params` (parameter names, group labels), in bytes:
/// keys are quoted in error messages and field names.
const MAX_PARAMS_KEY_BYTES: usize = 64;

/// The longest key of `params` at any depth.
fn longest_key(params: &prost_types::Struct) -> Option<&str> {
    fn of_value(value: &prost_types::Value) -> Option<&str> {
        match &value.kind {
            Some(prost_types::value::Kind::StructValue(inner)) => longest_key(inner),
            Some(prost_types::value::Kind::ListValue(list)) => list
                .values
                .iter()
                .filter_map(of_value)
                .max_by_key(|key| key.len()),
            _ => None,
        }
    }
    params
        .fields
        .iter()
        .flat_map(|(key, value)| [Some(key.as_str()), of_value(value)])
        .flatten()
        .max_by_key(|key| key.len())
}

/// Constraint parameters as engine values. Parameters above [`MAX_PARAMS_BYTES`], values
/// without a kind, non-finite numbers and nesting beyond `api::params::MAX_PARAMS_DEPTH`
/// are refused, naming the parameter.
fn constraint_params(params: &prost_types::Struct) -> Result<BTreeMap<String, ParamValue>, Status> {
    let bytes = prost::Message::encoded_len(params);
    if bytes > MAX_PARAMS_BYTES {
        return Err(errors::limit_exceeded(
            "fairness.params",
            format!("is {bytes} bytes encoded; at most {MAX_PARAMS_BYTES} are allowed"),
        ));
    }
    if let Some(key) = longest_key(params).filter(|key| key.len() > MAX_PARAMS_KEY_BYTES) {
        return Err(errors::limit_exceeded(
            "fairness.params",
            format!(
                "has a key of {} bytes ({}); at most {MAX_PARAMS_KEY_BYTES} are allowed",
                key.len(),
                engine::quote_clipped(key)
            ),
        ));
    }
    let json = api::params::struct_to_json(params).map_err(|error| {
        let path = match &error {
            api::ApiError::MissingValueKind { path }
            | api::ApiError::NonFiniteNumber { path }
            | api::ApiError::InexactInteger { path, .. }
            | api::ApiError::TooDeep { path, .. } => path.clone(),
        };
        let field = if path.is_empty() {
            "fairness.params".to_owned()
        } else {
            format!("fairness.params.{path}")
        };
        api::status::error_status(
            tonic::Code::InvalidArgument,
            format!("invalid `{field}`: {error}"),
            pb::ErrorReason::InvalidConstraintParams,
            Some(&field),
        )
    })?;
    Ok(json
        .into_iter()
        .map(|(key, value)| (key, param_value(value)))
        .collect())
}

fn param_value(value: serde_json::Value) -> ParamValue {
    match value {
        serde_json::Value::Null => ParamValue::Null,
        serde_json::Value::Bool(flag) => ParamValue::Bool(flag),
        // `struct_to_json` only produces finite numbers, all representable as f64.
        serde_json::Value::Number(number) => ParamValue::Number(number.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(text) => ParamValue::String(text),
        serde_json::Value::Array(items) => {
            ParamValue::List(items.into_iter().map(param_value).collect())
        }
        serde_json::Value::Object(map) => ParamValue::Map(
            map.into_iter()
                .map(|(key, value)| (key, param_value(value)))
                .collect(),
        ),
    }
}

/// An enum field's value, or INVALID_ARGUMENT naming `field` for a number this server's
/// proto does not define (never silently the default: a newer client's value may ask for
/// something stricter).
fn known<E: TryFrom<i32>>(value: i32, field: &str) -> Result<E, Status> {
    E::try_from(value).map_err(|_| {
        errors::invalid_field(field, format!("{value} is not a value this server knows"))
    })
}

fn privacy_policy(policy: pb::PrivacyPolicy) -> Result<engine::PrivacyPolicy, Status> {
    // A mechanism added after this server version is a protection it cannot give:
    // UNIMPLEMENTED, never an answer without it.
    let mechanism = pb::PrivacyMechanism::try_from(policy.mechanism).map_err(|_| {
        api::status::error_status(
            tonic::Code::Unimplemented,
            format!(
                "`privacy.mechanism` {} is not supported by this server version",
                policy.mechanism
            ),
            pb::ErrorReason::NotSupported,
            Some("privacy.mechanism"),
        )
    })?;
    let mechanism = match mechanism {
        pb::PrivacyMechanism::Unspecified => engine::PrivacyMechanism::Unspecified,
        pb::PrivacyMechanism::None => engine::PrivacyMechanism::None,
        pb::PrivacyMechanism::GumbelTopK => engine::PrivacyMechanism::GumbelTopK,
    };
    let on_budget_exhausted =
        match known(policy.on_budget_exhausted, "privacy.on_budget_exhausted")? {
            pb::BudgetExhaustedAction::Unspecified => engine::BudgetExhaustedAction::Unspecified,
            pb::BudgetExhaustedAction::Reject => engine::BudgetExhaustedAction::Reject,
            pb::BudgetExhaustedAction::NonPersonalized => {
                engine::BudgetExhaustedAction::NonPersonalized
            }
        };
    Ok(engine::PrivacyPolicy {
        mechanism,
        budget: policy.budget.map(|budget| match budget {
            pb::privacy_policy::Budget::Rho(rho) => engine::PrivacyBudget::Rho(rho),
            pb::privacy_policy::Budget::Epsilon(epsilon) => engine::PrivacyBudget::Epsilon(epsilon),
            pb::privacy_policy::Budget::EpsilonPerPick(epsilon) => {
                engine::PrivacyBudget::EpsilonPerPick(epsilon)
            }
        }),
        delta: policy.delta,
        release_noisy_scores: policy.release_noisy_scores,
        on_budget_exhausted,
    })
}

fn consent(consent: pb::Consent) -> Result<engine::Consent, Status> {
    let personalization = match known(consent.personalization, "consent.personalization")? {
        pb::ConsentDecision::Unspecified => engine::ConsentDecision::Unspecified,
        pb::ConsentDecision::Granted => engine::ConsentDecision::Granted,
        pb::ConsentDecision::Denied => engine::ConsentDecision::Denied,
    };
    Ok(engine::Consent {
        personalization,
        reference: consent.consent_reference,
    })
}

fn explain_options(options: pb::ExplainOptions) -> Result<engine::ExplainOptions, Status> {
    let level = match known(options.level, "explain.level")? {
        pb::ExplainLevel::Unspecified | pb::ExplainLevel::None => engine::ExplainLevel::None,
        pb::ExplainLevel::Reasons => engine::ExplainLevel::Reasons,
        pb::ExplainLevel::Text => engine::ExplainLevel::Text,
        pb::ExplainLevel::Dimensions => engine::ExplainLevel::Dimensions,
    };
    Ok(engine::ExplainOptions {
        level,
        max_dimensions: options.max_dimensions as usize,
    })
}

/// The wire form of an engine answer. `replayed` is set for answers the privacy ledger
/// stored for the same request id; the in-memory replay store sets it for its own replays.
pub fn rank_response(response: engine::RankResponse) -> pb::RankResponse {
    let score_kind = match response.score_kind {
        engine::ScoreKind::DotProduct => pb::ScoreKind::DotProduct,
        engine::ScoreKind::NoisyDotProduct => pb::ScoreKind::NoisyDotProduct,
        engine::ScoreKind::Prior => pb::ScoreKind::Prior,
        engine::ScoreKind::Withheld => pb::ScoreKind::Withheld,
    };
    let non_personalized_reason = match response.non_personalized_reason {
        None => pb::NonPersonalizedReason::Unspecified,
        Some(engine::NonPersonalizedReason::ConsentDenied) => {
            pb::NonPersonalizedReason::ConsentDenied
        }
        Some(engine::NonPersonalizedReason::PersonalizationPaused) => {
            pb::NonPersonalizedReason::PersonalizationPaused
        }
        Some(engine::NonPersonalizedReason::UserNotFound) => {
            pb::NonPersonalizedReason::UserNotFound
        }
        Some(engine::NonPersonalizedReason::PrivacyBudgetExhausted) => {
            pb::NonPersonalizedReason::PrivacyBudgetExhausted
        }
    };
    // An answer the privacy ledger stored for this request id is a replay too.
    let replayed = response.privacy.ledger_replay;
    pb::RankResponse {
        request_id: response.request_id,
        items: response.items.into_iter().map(ranked_item).collect(),
        score_kind: score_kind as i32,
        group_attributes: response.group_attributes,
        personalized: response.personalized,
        non_personalized_reason: non_personalized_reason as i32,
        replayed,
        fairness: Some(fairness_report(response.fairness)),
        privacy: Some(privacy_report(&response.privacy)),
        explain_level: explain_level(response.explain_level) as i32,
        items_table: Some(table_version(response.items_table)),
        users_table: response.users_table.map(table_version),
        scored_items: saturating_u32(response.scored_items),
        pool_size: saturating_u32(response.pool_size),
        skipped_candidate_ids: response.skipped_candidate_ids,
        audit_id: String::new(),
        timings: Some(stage_timings(&response.timings)),
    }
}

fn ranked_item(item: engine::RankedItem) -> pb::RankedItem {
    pb::RankedItem {
        item_id: item.id,
        rank: item.rank,
        score: item.score,
        unconstrained_rank: item.unconstrained_rank,
        group_labels: item.group_labels,
        explanation: item.explanation.map(|explanation| pb::Explanation {
            reasons: explanation
                .reasons
                .into_iter()
                .map(|reason| pb::Reason {
                    code: reason_code(reason.code) as i32,
                    text: reason.text,
                })
                .collect(),
            contributions: explanation
                .contributions
                .into_iter()
                .map(|contribution| pb::DimensionContribution {
                    dimension: contribution.dimension,
                    name: contribution.name.unwrap_or_default(),
                    contribution: contribution.contribution,
                })
                .collect(),
        }),
    }
}

fn reason_code(code: engine::ReasonCode) -> pb::ReasonCode {
    match code {
        engine::ReasonCode::ProfileMatch => pb::ReasonCode::ProfileMatch,
        engine::ReasonCode::ItemPrior => pb::ReasonCode::ItemPrior,
        // Row order of a table without a prior has no code of its own in fairrank.v1; the
        // reason text (level TEXT) says what happened.
        engine::ReasonCode::CatalogOrder => pb::ReasonCode::Unspecified,
        engine::ReasonCode::FairnessPromoted => pb::ReasonCode::FairnessPromoted,
        engine::ReasonCode::FairnessDemoted => pb::ReasonCode::FairnessDemoted,
        engine::ReasonCode::PrivacyRandomized => pb::ReasonCode::PrivacyRandomized,
    }
}

fn fairness_report(report: engine::FairnessReport) -> pb::FairnessReport {
    // A non-personalized answer applies the constraint to the prior ranking as requested:
    // no fairness fallback (the answer's `non_personalized_reason` says why).
    let (fallback, fallback_reason) = match report.fallback {
        engine::FairnessFallback::None | engine::FairnessFallback::NonPersonalized => {
            (pb::FairnessFallback::None, String::new())
        }
        engine::FairnessFallback::BestEffort => {
            (pb::FairnessFallback::BestEffort, report.fallback_reason)
        }
        engine::FairnessFallback::Unconstrained => {
            (pb::FairnessFallback::Unconstrained, report.fallback_reason)
        }
    };
    pb::FairnessReport {
        constraint: report.constraint,
        group_attribute: report.group_attribute,
        satisfied: report.satisfied,
        violations: report
            .violations
            .into_iter()
            .map(|violation| pb::FairnessViolation {
                kind: match violation.kind {
                    engine::ViolationKind::BelowMinCount => pb::ViolationKind::BelowMinCount,
                    engine::ViolationKind::AboveMaxCount => pb::ViolationKind::AboveMaxCount,
                    engine::ViolationKind::BelowMinExposure => pb::ViolationKind::BelowMinExposure,
                } as i32,
                position: violation.position,
                group: violation.group,
                required: violation.required,
                actual: violation.actual,
                description: violation.description,
            })
            .collect(),
        fallback: fallback as i32,
        fallback_reason,
        ndcg_vs_unconstrained: report.ndcg_vs_unconstrained,
        groups: report
            .groups
            .into_iter()
            .map(|group| pb::GroupExposure {
                group: group.group,
                items_returned: group.items_returned,
                items_in_pool: group.items_in_pool,
                exposure_share: group.exposure_share,
                unconstrained_exposure_share: group.unconstrained_exposure_share,
                target_share: group.target_share,
            })
            .collect(),
        amortized: report
            .amortized
            .into_iter()
            .map(|group| pb::AmortizedGroupExposure {
                group: group.group,
                exposure_share: group.exposure_share,
                merit_share: group.merit_share,
            })
            .collect(),
        exposure_scope: report.exposure_scope,
        amortized_disparity: report.amortized_disparity,
        optimality: report.optimality.map(|optimality| pb::FairnessOptimality {
            utility: optimality.utility,
            upper_bound: optimality.upper_bound,
            gap: optimality.gap,
            exact: optimality.exact,
        }),
        seed: report.seed,
        notes: report.notes,
    }
}

/// A registered fairness constraint for `GetStatus`.
pub fn constraint_info(info: &fairness::ConstraintInfo) -> pb::FairnessConstraintInfo {
    pb::FairnessConstraintInfo {
        name: info.name.clone(),
        summary: info.summary.clone(),
        params: info
            .params
            .iter()
            .map(|param| pb::FairnessParamInfo {
                name: param.name.clone(),
                required: param.required,
                default_value: param.default.clone(),
                description: param.description.clone(),
            })
            .collect(),
    }
}

fn privacy_mechanism(mechanism: engine::PrivacyMechanism) -> pb::PrivacyMechanism {
    match mechanism {
        engine::PrivacyMechanism::Unspecified | engine::PrivacyMechanism::None => {
            pb::PrivacyMechanism::None
        }
        engine::PrivacyMechanism::GumbelTopK => pb::PrivacyMechanism::GumbelTopK,
    }
}

fn privacy_report(report: &engine::PrivacyReport) -> pb::PrivacyReport {
    pb::PrivacyReport {
        dp_applied: report.dp_applied,
        mechanism: privacy_mechanism(report.mechanism) as i32,
        rho_charged: report.rho_charged,
        epsilon: report.epsilon,
        delta: report.delta,
        rho_remaining: report.rho_remaining,
        rho_budget: report.rho_budget,
        budget_resets_at: report.budget_resets_at.map(timestamp),
        scores_noised: report.scores_noised,
        score_noise_stddev: report.score_noise_stddev,
        user_norm_bound: report.user_norm_bound,
    }
}

fn explain_level(level: engine::ExplainLevel) -> pb::ExplainLevel {
    match level {
        engine::ExplainLevel::None => pb::ExplainLevel::None,
        engine::ExplainLevel::Reasons => pb::ExplainLevel::Reasons,
        engine::ExplainLevel::Text => pb::ExplainLevel::Text,
        engine::ExplainLevel::Dimensions => pb::ExplainLevel::Dimensions,
    }
}

/// The wire form of a table version.
pub fn table_version(version: engine::TableVersion) -> pb::TableVersion {
    pb::TableVersion {
        generation: version.generation,
        checksum: version.checksum,
    }
}

/// The wire form of stage timings.
pub fn stage_timings(timings: &engine::StageTimings) -> pb::StageTimings {
    pb::StageTimings {
        total_us: timings.total_us,
        queue_us: timings.queue_us,
        validate_us: timings.validate_us,
        resolve_user_us: timings.resolve_user_us,
        score_us: timings.score_us,
        select_pool_us: timings.select_pool_us,
        rerank_us: timings.rerank_us,
        explain_us: timings.explain_us,
        report_us: timings.report_us,
        ledger_us: timings.ledger_us,
    }
}

/// The engine table kind of a proto `TableKind` (`None` for unspecified or unknown).
pub fn table_kind(kind: i32) -> Option<engine::TableKind> {
    match pb::TableKind::try_from(kind).unwrap_or(pb::TableKind::Unspecified) {
        pb::TableKind::Unspecified => None,
        pb::TableKind::Items => Some(engine::TableKind::Items),
        pb::TableKind::Users => Some(engine::TableKind::Users),
    }
}

/// The metric label of a table kind.
pub fn table_label(kind: engine::TableKind) -> &'static str {
    match kind {
        engine::TableKind::Items => "items",
        engine::TableKind::Users => "users",
    }
}

/// The wire form of a table's status.
pub fn table_status(status: &engine::TableStatus) -> pb::TableStatus {
    let kind = |kind| match kind {
        engine::TableKind::Items => pb::TableKind::Items,
        engine::TableKind::Users => pb::TableKind::Users,
    };
    pb::TableStatus {
        kind: kind(status.kind) as i32,
        marked_role: status.marked_role.map_or(pb::TableKind::Unspecified, kind) as i32,
        version: Some(table_version(status.version)),
        path: status.path.display().to_string(),
        rows: status.rows as u64,
        dim: saturating_u32(status.dim),
        file_bytes: status.file_bytes,
        loaded_at: Some(timestamp(status.loaded_at)),
        group_attributes: status.group_attributes.clone(),
        has_prior: status.has_prior,
        has_dim_names: status.has_dim_names,
        max_row_norm: status.max_row_norm,
        rollback_target: status.rollback_target.map(table_version),
        quantized_copy_bytes: status.quantized_copy_bytes,
    }
}

/// A protobuf timestamp.
pub fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

fn saturating_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::status::{error_field, error_reason};
    use prost_types::value::Kind;

    fn request(user: Option<pb::rank_request::User>) -> pb::RankRequest {
        pb::RankRequest {
            request_id: "r-1".into(),
            user,
            k: 5,
            ..Default::default()
        }
    }

    #[test]
    fn a_request_without_user_names_the_oneof() {
        let status = rank_request(request(None), engine::CandidateIds::new(), None).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(error_field(&status), Some("user"));
    }

    #[test]
    fn fields_and_enums_convert() {
        let mut wire = request(Some(pb::rank_request::User::InlineUser(pb::InlineUser {
            embedding: vec![1.0, 2.0],
            subject_id: "s".into(),
        })));
        wire.pool_size = Some(9);
        wire.explain = Some(pb::ExplainOptions {
            level: pb::ExplainLevel::Unspecified as i32,
            max_dimensions: 4,
        });
        wire.consent = Some(pb::Consent {
            personalization: pb::ConsentDecision::Denied as i32,
            consent_reference: "c-1".into(),
        });
        wire.privacy = Some(pb::PrivacyPolicy {
            budget: Some(pb::privacy_policy::Budget::Rho(0.5)),
            delta: Some(1e-6),
            ..Default::default()
        });
        let candidates = vec!["a".to_owned(), "b".to_owned()].into();
        let native = rank_request(wire, candidates, None).unwrap();
        assert_eq!(
            native.user,
            engine::UserRef::Inline {
                embedding: vec![1.0, 2.0],
                subject_id: "s".into()
            }
        );
        assert_eq!(native.k, 5);
        assert_eq!(native.pool_size, Some(9));
        assert_eq!(native.candidate_ids.len(), 2);
        assert_eq!(native.explain.level, engine::ExplainLevel::None);
        assert_eq!(native.explain.max_dimensions, 4);
        assert_eq!(
            native.consent.personalization,
            engine::ConsentDecision::Denied
        );
        assert_eq!(native.privacy.budget, Some(engine::PrivacyBudget::Rho(0.5)));
    }

    #[test]
    fn enum_values_this_server_does_not_know_are_refused_never_read_as_the_default() {
        let inline = || {
            request(Some(pb::rank_request::User::InlineUser(pb::InlineUser {
                embedding: vec![1.0],
                subject_id: "s".into(),
            })))
        };
        // A privacy mechanism from a newer proto: a protection this server cannot give.
        let mut wire = inline();
        wire.privacy = Some(pb::PrivacyPolicy {
            mechanism: 7,
            ..Default::default()
        });
        let status = rank_request(wire, engine::CandidateIds::new(), None).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert_eq!(error_field(&status), Some("privacy.mechanism"));
        assert_eq!(
            api::status::error_reason(&status),
            pb::ErrorReason::NotSupported
        );
        assert!(status.message().contains('7'), "{}", status.message());

        type SetField = fn(&mut pb::RankRequest);
        let cases: [(&str, SetField); 4] = [
            ("consent.personalization", |r| {
                r.consent = Some(pb::Consent {
                    personalization: 9,
                    ..Default::default()
                })
            }),
            ("privacy.on_budget_exhausted", |r| {
                r.privacy = Some(pb::PrivacyPolicy {
                    on_budget_exhausted: 5,
                    ..Default::default()
                })
            }),
            ("explain.level", |r| {
                r.explain = Some(pb::ExplainOptions {
                    level: 99,
                    max_dimensions: 0,
                })
            }),
            ("fairness.on_infeasible", |r| {
                r.fairness = Some(pb::FairnessPolicy {
                    on_infeasible: -1,
                    ..Default::default()
                })
            }),
        ];
        for (field, set) in cases {
            let mut wire = inline();
            set(&mut wire);
            let status = rank_request(wire, engine::CandidateIds::new(), None).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{field}");
            assert_eq!(error_field(&status), Some(field));
        }
    }

    #[test]
    fn oversized_constraint_params_are_refused_before_conversion() {
        let mut params = prost_types::Struct::default();
        params.fields.insert(
            "targets".into(),
            prost_types::Value {
                kind: Some(Kind::StringValue("0:0,".repeat(MAX_PARAMS_BYTES / 4))),
            },
        );
        let status = constraint_params(&params).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(error_field(&status), Some("fairness.params"));
        assert!(
            status.message().contains("at most 65536"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn constraint_params_convert_and_bad_ones_name_their_key() {
        let params = serde_json::json!({"targets": {"0": 0.6, "1": 0.4}, "protected": 1});
        let wire = api::params::json_to_struct(params.as_object().unwrap()).unwrap();
        let converted = constraint_params(&wire).unwrap();
        assert_eq!(converted["protected"], ParamValue::Number(1.0));
        let ParamValue::Map(targets) = &converted["targets"] else {
            panic!("targets must stay a map: {converted:?}");
        };
        assert_eq!(targets["1"], ParamValue::Number(0.4));

        let mut bad = prost_types::Struct::default();
        bad.fields.insert(
            "alpha".into(),
            prost_types::Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        );
        let status = constraint_params(&bad).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(error_field(&status), Some("fairness.params.alpha"));
        assert_eq!(
            error_reason(&status),
            pb::ErrorReason::InvalidConstraintParams
        );
    }

    #[test]
    fn table_kinds_reject_unspecified_and_unknown() {
        assert_eq!(table_kind(1), Some(engine::TableKind::Items));
        assert_eq!(table_kind(2), Some(engine::TableKind::Users));
        assert_eq!(table_kind(0), None);
        assert_eq!(table_kind(7), None);
    }
}
