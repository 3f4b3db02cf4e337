//! Tests of the generated code and the descriptor set: wire compatibility of a sample
//! request, the services reflection will expose, and the documentation and naming rules the
//! proto files promise.

use std::collections::{BTreeMap, HashSet};

use prost::Message;
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet,
    ServiceDescriptorProto,
};

use crate::fairrank::v1::{
    Consent, ConsentDecision, ExplainLevel, ExplainOptions, FairnessPolicy, InfeasibleAction,
    InlineUser, PrivacyMechanism, PrivacyPolicy, RankRequest, privacy_policy::Budget,
    rank_request::User,
};
use crate::params::json_to_struct;

fn descriptor_set() -> FileDescriptorSet {
    FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).expect("descriptor set decodes")
}

fn sample_request() -> RankRequest {
    let params = serde_json::json!({"targets": {"0": 0.6, "1": 0.4}});
    RankRequest {
        request_id: "req-7f3e".into(),
        user: Some(User::InlineUser(InlineUser {
            embedding: vec![0.25, -1.5, 3.0],
            subject_id: "subject-9".into(),
        })),
        fallback_for_unknown_user: true,
        candidate_ids: vec!["item-1".into(), "item-2".into(), "item-3".into()],
        skip_unknown_candidates: true,
        k: 2,
        pool_size: Some(3),
        fairness: Some(FairnessPolicy {
            constraint: "det-greedy".into(),
            params: params.as_object().map(json_to_struct).transpose().unwrap(),
            group_attribute: "provider_group".into(),
            exposure_scope: "home".into(),
            on_infeasible: InfeasibleAction::Reject as i32,
            seed: Some(7),
        }),
        privacy: Some(PrivacyPolicy {
            mechanism: PrivacyMechanism::GumbelTopK as i32,
            budget: Some(Budget::Rho(0.05)),
            delta: Some(1e-6),
            release_noisy_scores: true,
            on_budget_exhausted: 2,
        }),
        consent: Some(Consent {
            personalization: ConsentDecision::Granted as i32,
            consent_reference: "cmp-2024-11".into(),
        }),
        explain: Some(ExplainOptions {
            level: ExplainLevel::Dimensions as i32,
            max_dimensions: 5,
        }),
    }
}

#[test]
fn sample_request_round_trips() {
    let request = sample_request();
    let wire = request.encode_to_vec();
    assert_eq!(wire.len(), request.encoded_len());
    let decoded = RankRequest::decode(wire.as_slice()).unwrap();
    assert_eq!(decoded, request);
    assert_eq!(
        decoded.fairness.unwrap().on_infeasible(),
        InfeasibleAction::Reject
    );
}

#[test]
fn hand_encoded_request_decodes_to_documented_field_numbers() {
    // Written by hand from the field numbers in ranker.proto, so renumbering a field fails.
    let wire: &[u8] = &[
        0x0a, 3, b'r', b'-', b'1', // 1: request_id = "r-1"
        0x12, 2, b'u', b'7', // 2: user_id = "u7"
        0x52, 2, b'i', b'1', // 10: candidate_ids += "i1"
        0x52, 2, b'i', b'2', // 10: candidate_ids += "i2"
        0x60, 10, // 12: k = 10
        0x68, 100, // 13: pool_size = 100
        0xf2, 0x01, 2, 0x08, 3, // 30: explain { 1: level = TEXT }
    ];
    let request = RankRequest::decode(wire).unwrap();
    assert_eq!(request.request_id, "r-1");
    assert_eq!(request.user, Some(User::UserId("u7".into())));
    assert_eq!(request.candidate_ids, ["i1", "i2"]);
    assert_eq!(request.k, 10);
    assert_eq!(request.pool_size, Some(100));
    assert_eq!(request.explain.unwrap().level(), ExplainLevel::Text);
    assert_eq!(request.fairness, None);
    // And back: prost writes fields in number order, so the bytes are reproduced exactly.
    let reencoded = RankRequest::decode(wire).unwrap().encode_to_vec();
    assert_eq!(reencoded, wire);
}

#[test]
fn unset_and_zero_pool_size_stay_distinct() {
    let unset = RankRequest::default();
    let zero = RankRequest {
        pool_size: Some(0),
        ..Default::default()
    };
    assert_eq!(
        RankRequest::decode(unset.encode_to_vec().as_slice())
            .unwrap()
            .pool_size,
        None
    );
    assert_eq!(
        RankRequest::decode(zero.encode_to_vec().as_slice())
            .unwrap()
            .pool_size,
        Some(0)
    );
}

#[test]
fn descriptor_set_contains_the_services_and_their_imports() {
    let set = descriptor_set();
    let files: BTreeMap<&str, &FileDescriptorProto> =
        set.file.iter().map(|file| (file.name(), file)).collect();
    for name in [
        "fairrank/v1/common.proto",
        "fairrank/v1/fairness.proto",
        "fairrank/v1/privacy.proto",
        "fairrank/v1/ranker.proto",
        "fairrank/v1/admin.proto",
        "fairrank/bench/v1/echo.proto",
        "google/protobuf/struct.proto",
        "google/protobuf/timestamp.proto",
        "google/protobuf/duration.proto",
    ] {
        assert!(
            files.contains_key(name),
            "{name} missing from {:?}",
            files.keys()
        );
    }

    let mut methods = BTreeMap::new();
    for file in &set.file {
        for service in &file.service {
            let full_name = format!("{}.{}", file.package(), service.name());
            let names: Vec<&str> = service.method.iter().map(|method| method.name()).collect();
            methods.insert(full_name, names);
        }
    }
    assert_eq!(methods["fairrank.v1.Ranker"], ["Rank", "RankBatch"]);
    assert_eq!(
        methods["fairrank.v1.Admin"],
        [
            "ReloadTable",
            "RollbackTable",
            "SetPersonalization",
            "GetStatus"
        ]
    );
    assert_eq!(methods["fairrank.bench.v1.Echo"], ["Echo"]);
    for service in crate::SERVICE_NAMES {
        assert!(
            methods.contains_key(service),
            "{service} not in the descriptor set"
        );
    }
    assert_eq!(methods.len(), crate::SERVICE_NAMES.len());
}

#[test]
fn rpc_messages_follow_the_request_response_naming() {
    for file in descriptor_set().file.iter().filter(|file| is_ours(file)) {
        let package = file.package();
        for service in &file.service {
            for method in &service.method {
                assert!(!method.client_streaming() && !method.server_streaming());
                assert_eq!(
                    method.input_type(),
                    format!(".{package}.{}Request", method.name())
                );
                assert_eq!(
                    method.output_type(),
                    format!(".{package}.{}Response", method.name())
                );
            }
        }
    }
}

fn is_ours(file: &FileDescriptorProto) -> bool {
    file.package().starts_with("fairrank.")
}

/// Collects the descriptor paths that have a non-empty leading comment.
fn commented_paths(file: &FileDescriptorProto) -> HashSet<Vec<i32>> {
    file.source_code_info
        .iter()
        .flat_map(|info| &info.location)
        .filter(|location| !location.leading_comments().trim().is_empty())
        .map(|location| location.path.clone())
        .collect()
}

// Field numbers of descriptor.proto, which make up source-code-info paths.
const FILE_MESSAGE_TYPE: i32 = 4;
const FILE_ENUM_TYPE: i32 = 5;
const FILE_SERVICE: i32 = 6;
const MESSAGE_FIELD: i32 = 2;
const MESSAGE_NESTED_TYPE: i32 = 3;
const MESSAGE_ENUM_TYPE: i32 = 4;
const MESSAGE_ONEOF: i32 = 8;
const ENUM_VALUE: i32 = 2;
const SERVICE_METHOD: i32 = 2;

fn child(path: &[i32], kind: i32, index: usize) -> Vec<i32> {
    let mut child = path.to_vec();
    child.extend([kind, i32::try_from(index).unwrap()]);
    child
}

/// Lists every documentable element of a message (recursively) with its path.
fn message_elements(
    message: &DescriptorProto,
    name: &str,
    path: &[i32],
    out: &mut Vec<(String, Vec<i32>)>,
) {
    out.push((name.to_owned(), path.to_vec()));
    for (index, field) in message.field.iter().enumerate() {
        // proto3 `optional` fields live in synthetic oneofs that carry no comment.
        out.push((
            format!("{name}.{}", field.name()),
            child(path, MESSAGE_FIELD, index),
        ));
    }
    for (index, oneof) in message.oneof_decl.iter().enumerate() {
        if !oneof.name().starts_with('_') {
            out.push((
                format!("{name}.{}", oneof.name()),
                child(path, MESSAGE_ONEOF, index),
            ));
        }
    }
    for (index, nested) in message.nested_type.iter().enumerate() {
        let nested_name = format!("{name}.{}", nested.name());
        message_elements(
            nested,
            &nested_name,
            &child(path, MESSAGE_NESTED_TYPE, index),
            out,
        );
    }
    for (index, nested) in message.enum_type.iter().enumerate() {
        let enum_name = format!("{name}.{}", nested.name());
        enum_elements(
            nested,
            &enum_name,
            &child(path, MESSAGE_ENUM_TYPE, index),
            out,
        );
    }
}

fn enum_elements(
    enumeration: &EnumDescriptorProto,
    name: &str,
    path: &[i32],
    out: &mut Vec<(String, Vec<i32>)>,
) {
    out.push((name.to_owned(), path.to_vec()));
    for (index, value) in enumeration.value.iter().enumerate() {
        out.push((
            format!("{name}.{}", value.name()),
            child(path, ENUM_VALUE, index),
        ));
    }
}

fn service_elements(
    service: &ServiceDescriptorProto,
    name: &str,
    path: &[i32],
    out: &mut Vec<(String, Vec<i32>)>,
) {
    out.push((name.to_owned(), path.to_vec()));
    for (index, method) in service.method.iter().enumerate() {
        out.push((
            format!("{name}.{}", method.name()),
            child(path, SERVICE_METHOD, index),
        ));
    }
}

#[test]
fn every_element_of_the_api_is_documented() {
    let mut undocumented = Vec::new();
    let mut checked = 0;
    for file in descriptor_set().file.iter().filter(|file| is_ours(file)) {
        let commented = commented_paths(file);
        let mut elements = Vec::new();
        for (index, message) in file.message_type.iter().enumerate() {
            message_elements(
                message,
                message.name(),
                &[FILE_MESSAGE_TYPE, index as i32],
                &mut elements,
            );
        }
        for (index, enumeration) in file.enum_type.iter().enumerate() {
            enum_elements(
                enumeration,
                enumeration.name(),
                &[FILE_ENUM_TYPE, index as i32],
                &mut elements,
            );
        }
        for (index, service) in file.service.iter().enumerate() {
            service_elements(
                service,
                service.name(),
                &[FILE_SERVICE, index as i32],
                &mut elements,
            );
        }
        checked += elements.len();
        undocumented.extend(
            elements
                .into_iter()
                .filter(|(_, path)| !commented.contains(path))
                .map(|(name, _)| format!("{}: {name}", file.name())),
        );
    }
    assert!(
        checked > 200,
        "only {checked} elements found: is source info missing?"
    );
    assert!(undocumented.is_empty(), "undocumented: {undocumented:#?}");
}

/// `TableKind` -> `TABLE_KIND`.
fn screaming_snake(camel: &str) -> String {
    let mut out = String::new();
    for (index, character) in camel.chars().enumerate() {
        if character.is_ascii_uppercase() && index > 0 {
            out.push('_');
        }
        out.push(character.to_ascii_uppercase());
    }
    out
}

fn check_enum(enumeration: &EnumDescriptorProto, problems: &mut Vec<String>) {
    let prefix = format!("{}_", screaming_snake(enumeration.name()));
    for value in &enumeration.value {
        if !value.name().starts_with(&prefix) {
            problems.push(format!("{} lacks the prefix {prefix}", value.name()));
        }
    }
    match enumeration.value.iter().find(|value| value.number() == 0) {
        Some(zero) if zero.name() == format!("{prefix}UNSPECIFIED") => {}
        _ => problems.push(format!(
            "{}: zero value must be {prefix}UNSPECIFIED",
            enumeration.name()
        )),
    }
}

fn check_message(message: &DescriptorProto, problems: &mut Vec<String>) {
    for field in &message.field {
        let name = field.name();
        let lower_snake = name.chars().all(|character| {
            character.is_ascii_lowercase() || character.is_ascii_digit() || character == '_'
        });
        if !lower_snake {
            problems.push(format!("{}.{name} is not lower_snake_case", message.name()));
        }
    }
    message
        .nested_type
        .iter()
        .for_each(|nested| check_message(nested, problems));
    message
        .enum_type
        .iter()
        .for_each(|nested| check_enum(nested, problems));
}

#[test]
fn names_follow_the_protobuf_style_guide() {
    let mut problems = Vec::new();
    for file in descriptor_set().file.iter().filter(|file| is_ours(file)) {
        // Package fairrank.v1 lives in fairrank/v1/.
        let folder = file
            .name()
            .rsplit_once('/')
            .map(|(folder, _)| folder)
            .unwrap_or("");
        if folder.replace('/', ".") != file.package() {
            problems.push(format!(
                "{} is not in the folder of package {}",
                file.name(),
                file.package()
            ));
        }
        if file.syntax() != "proto3" {
            problems.push(format!("{} is not proto3", file.name()));
        }
        file.enum_type
            .iter()
            .for_each(|enumeration| check_enum(enumeration, &mut problems));
        file.message_type
            .iter()
            .for_each(|message| check_message(message, &mut problems));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn error_reason_names_are_what_the_metadata_carries() {
    use crate::fairrank::v1::ErrorReason;
    let reason = ErrorReason::PrivacyBudgetExhausted;
    assert_eq!(
        reason.as_str_name(),
        "ERROR_REASON_PRIVACY_BUDGET_EXHAUSTED"
    );
    assert_eq!(
        ErrorReason::from_str_name(reason.as_str_name()),
        Some(reason)
    );
}
