//! Every error status the server sends: the one mapping from [`EngineError`] to a gRPC
//! status, the statuses of the server's own checks (load shedding, deadlines, admin
//! authentication, idempotency, reload paths), and the reasons of the statuses the gRPC
//! layer makes itself ([`transport_reason`]). All carry the `fairrank-error-reason` and,
//! where one field is at fault, `fairrank-error-field` metadata (`api::status`).

use api::fairrank::v1::ErrorReason;
use api::status::{ERROR_REASON_METADATA_KEY, error_status};
use engine::{
    AbortReason, EngineError, InvalidReason, NotFoundReason, PreconditionReason, ReloadProblem,
};
use tonic::codegen::http::{self, HeaderMap, HeaderName, HeaderValue};
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// The gRPC status of an engine error. This is the only place engine errors become
/// statuses.
pub fn engine_status(error: &EngineError) -> Status {
    let message = match error {
        EngineError::AnswerTooLarge { bytes, limit, .. } => dp_answer_too_large(*bytes, *limit),
        _ => error.to_string(),
    };
    let field = error.field();
    let (code, reason) = match error {
        EngineError::InvalidArgument { reason, .. } => (
            Code::InvalidArgument,
            match reason {
                InvalidReason::InvalidField => ErrorReason::InvalidField,
                InvalidReason::LimitExceeded => ErrorReason::LimitExceeded,
                InvalidReason::DimensionMismatch => ErrorReason::DimensionMismatch,
                InvalidReason::InvalidConstraintParams => ErrorReason::InvalidConstraintParams,
                InvalidReason::UnknownConstraint => ErrorReason::UnknownConstraint,
            },
        ),
        EngineError::NotFound { reason, .. } => (
            Code::NotFound,
            match reason {
                NotFoundReason::User => ErrorReason::UserNotFound,
                NotFoundReason::Item => ErrorReason::ItemNotFound,
            },
        ),
        EngineError::FailedPrecondition { reason, .. } => (
            Code::FailedPrecondition,
            match reason {
                PreconditionReason::TableNotLoaded => ErrorReason::TableNotLoaded,
                PreconditionReason::GroupAttributeNotFound => ErrorReason::GroupAttributeNotFound,
                PreconditionReason::NoRollbackTarget => ErrorReason::NoRollbackTarget,
                PreconditionReason::FairnessInfeasible => ErrorReason::FairnessInfeasible,
                PreconditionReason::PrivacyPolicyNotAllowed => ErrorReason::PrivacyPolicyNotAllowed,
                PreconditionReason::RequestIdReused => ErrorReason::RequestIdReused,
            },
        ),
        // A constraint this server does not have is, to the client, not a registered
        // constraint (GetStatus lists the registered ones).
        EngineError::Unsupported { field, .. } if field.ends_with("fairness.constraint") => {
            (Code::InvalidArgument, ErrorReason::UnknownConstraint)
        }
        EngineError::Unsupported { .. } => (Code::Unimplemented, ErrorReason::NotSupported),
        EngineError::ResourceExhausted { .. } => (Code::ResourceExhausted, ErrorReason::Overloaded),
        EngineError::PrivacyBudgetExhausted { .. } => {
            (Code::ResourceExhausted, ErrorReason::PrivacyBudgetExhausted)
        }
        EngineError::LedgerUnavailable { .. } => {
            (Code::Unavailable, ErrorReason::LedgerUnavailable)
        }
        EngineError::AnswerTooLarge { .. } => (Code::ResourceExhausted, ErrorReason::LimitExceeded),
        EngineError::DeadlineExceeded { .. } => (Code::DeadlineExceeded, ErrorReason::Unspecified),
        EngineError::Aborted { reason, .. } => (
            Code::Aborted,
            match reason {
                AbortReason::TableChangeInProgress => ErrorReason::TableChangeInProgress,
                AbortReason::GenerationMismatch => ErrorReason::GenerationMismatch,
            },
        ),
        EngineError::Unavailable { .. } => (Code::Unavailable, ErrorReason::NotServing),
        EngineError::Reload { problem, .. } => match problem {
            ReloadProblem::FileNotFound => (Code::NotFound, ErrorReason::TableFileNotFound),
            ReloadProblem::InvalidFile
            | ReloadProblem::IncompatibleTables
            | ReloadProblem::WrongRole => (Code::FailedPrecondition, ErrorReason::TableInvalid),
        },
        EngineError::Internal { .. } | EngineError::InvalidConfig { .. } => {
            (Code::Internal, ErrorReason::Unspecified)
        }
        // A variant added to the engine after this server version.
        _ => (Code::Internal, ErrorReason::Unspecified),
    };
    // Configuration keys are not request fields.
    let field = match error {
        EngineError::InvalidConfig { .. } => None,
        _ => field,
    };
    error_status(code, message, reason, field)
}

/// A request field the server checks itself (before the engine) is malformed.
pub fn invalid_field(field: &str, message: impl std::fmt::Display) -> Status {
    error_status(
        Code::InvalidArgument,
        format!("invalid `{field}`: {message}"),
        ErrorReason::InvalidField,
        Some(field),
    )
}

/// A request exceeds a server limit the server checks itself.
pub fn limit_exceeded(field: &str, message: impl std::fmt::Display) -> Status {
    error_status(
        Code::InvalidArgument,
        format!("invalid `{field}`: {message}"),
        ErrorReason::LimitExceeded,
        Some(field),
    )
}

/// A batch whose answer exceeds the transport's message limit.
pub fn answer_too_large(bytes: usize, limit: usize) -> Status {
    error_status(
        Code::ResourceExhausted,
        format!(
            "the batch's answer is {bytes} bytes, above the server's limit of {limit} \
             (`server.max_message_bytes`); send fewer requests per batch, or smaller k or \
             explanations (answers that completed are kept: retries with the same request \
             ids return them)"
        ),
        ErrorReason::LimitExceeded,
        Some("requests"),
    )
}

/// A Rank answer that exceeds the transport's message limit.
pub fn rank_answer_too_large(bytes: usize, limit: usize) -> Status {
    error_status(
        Code::ResourceExhausted,
        format!(
            "the answer is {bytes} bytes, above the server's limit of {limit} \
             (`server.max_message_bytes`); ask for a smaller k or lighter explanations, with \
             a new request id (this one keeps the answer that was too large)"
        ),
        ErrorReason::LimitExceeded,
        Some("k"),
    )
}

/// The message of a DP answer (a Rank answer or a batch entry) whose size bound `bytes`
/// exceeds the transport's message limit, refused by the engine before the privacy ledger
/// was charged (`EngineError::AnswerTooLarge`: the code, reason and field of
/// [`rank_answer_too_large`], but nothing was charged or kept, so the id stays free).
fn dp_answer_too_large(bytes: usize, limit: usize) -> String {
    format!(
        "the answer would be up to {bytes} bytes, above the server's limit of {limit} \
         (`server.max_message_bytes`); ask for a smaller k or lighter explanations (nothing \
         was charged to the privacy budget, and the request id may be used again)"
    )
}

/// A request message of `bytes` (when known) above the transport's message limit `limit`,
/// refused before it was read whole.
pub fn request_too_large(bytes: Option<usize>, limit: usize) -> Status {
    let size = bytes.map_or_else(String::new, |bytes| format!(" of {bytes} bytes"));
    error_status(
        Code::ResourceExhausted,
        format!(
            "the request message{size} is above the server's limit of {limit} bytes \
             (`server.max_message_bytes`); send a smaller one (for Rank and RankBatch: fewer \
             candidate ids, or fewer requests per batch)"
        ),
        ErrorReason::LimitExceeded,
        None,
    )
}

/// An answer with no body that carries only `status` in its headers (trailers-only), as
/// tonic answers a call it refuses.
pub fn status_answer(status: Status) -> http::Response<tonic::body::Body> {
    let (parts, ()) = status.into_http::<()>().into_parts();
    http::Response::from_parts(parts, tonic::body::Body::empty())
}

/// Load shedding: the concurrency limit is reached.
pub fn overloaded(limit: usize, wanted: usize) -> Status {
    let message = if wanted > 1 {
        format!(
            "the server is at its limit of {limit} concurrent rank requests and cannot admit \
             {wanted} more now; retry with backoff and the same request ids"
        )
    } else {
        format!(
            "the server is at its limit of {limit} concurrent rank requests; retry with \
             backoff and the same request id"
        )
    };
    error_status(
        Code::ResourceExhausted,
        message,
        ErrorReason::Overloaded,
        None,
    )
}

/// The call's deadline passed.
pub fn deadline_exceeded(what: &str) -> Status {
    error_status(
        Code::DeadlineExceeded,
        format!("deadline exceeded {what}"),
        ErrorReason::Unspecified,
        None,
    )
}

/// The same request id was used with different content.
pub fn request_id_reused(request_id: &str) -> Status {
    error_status(
        Code::FailedPrecondition,
        format!(
            "request id {} was already used for a request with different content \
             within the replay window; use a fresh request id for a new request",
            engine::quote_clipped(request_id)
        ),
        ErrorReason::RequestIdReused,
        Some("request_id"),
    )
}

/// The first attempt with this request id still runs.
pub fn request_in_progress(request_id: &str) -> Status {
    error_status(
        Code::Aborted,
        format!(
            "a request with id {} is still running; retry later with the same \
             request id to receive its answer",
            engine::quote_clipped(request_id)
        ),
        ErrorReason::RequestInProgress,
        Some("request_id"),
    )
}

/// An Admin call without a valid bearer token.
pub fn unauthenticated(message: &str) -> Status {
    error_status(
        Code::Unauthenticated,
        message,
        ErrorReason::AdminTokenInvalid,
        None,
    )
}

/// The Admin service is off because no token is configured.
pub fn admin_disabled(token_env: &str) -> Status {
    error_status(
        Code::Unimplemented,
        format!(
            "the Admin service is disabled: the server has no admin token (set \
             server.admin_token or the environment variable {token_env:?})"
        ),
        ErrorReason::NotSupported,
        None,
    )
}

/// Bytes of a reload path quoted in an error message (a file system takes 4 KiB and more).
const QUOTED_PATH_BYTES: usize = 256;

/// A reload path for an error message: quoted, clipped to [`QUOTED_PATH_BYTES`].
fn quoted_path(path: &str) -> String {
    fairness::quote_clipped_to(path, QUOTED_PATH_BYTES)
}

/// A reload path outside the allowed folder.
pub fn path_not_allowed(path: &str, folder: &std::path::Path) -> Status {
    error_status(
        Code::PermissionDenied,
        format!(
            "path {} is outside the folder that reloads may read from ({})",
            quoted_path(path),
            folder.display()
        ),
        ErrorReason::PathNotAllowed,
        Some("path"),
    )
}

/// A reload path that does not exist.
pub fn table_file_not_found(path: &std::path::Path) -> Status {
    error_status(
        Code::NotFound,
        format!(
            "table file {} does not exist",
            quoted_path(&path.display().to_string())
        ),
        ErrorReason::TableFileNotFound,
        Some("path"),
    )
}

/// A reload path that exists (or may) but cannot be a table file: a name too long for the
/// file system, a file where a folder should be, a folder, a file the server may not read.
/// `TABLE_INVALID`, as the engine refuses a file it cannot open, but naming the field.
pub fn table_path_unusable(path: &str, problem: impl std::fmt::Display) -> Status {
    error_status(
        Code::FailedPrecondition,
        format!(
            "table file {} cannot be opened: {problem}",
            quoted_path(path)
        ),
        ErrorReason::TableInvalid,
        Some("path"),
    )
}

/// A request body that is not a valid protobuf message of the method's request type (a
/// malformed field, a string that is not UTF-8, a truncated message): INVALID_ARGUMENT, since
/// those bytes are the client's input, with prost's message, which names the message and
/// field at fault (`RankRequest.candidate_ids: invalid string value: data is not UTF-8
/// encoded`). tonic's own codec would answer INTERNAL.
pub fn undecodable_request(error: &prost::DecodeError) -> Status {
    error_status(
        Code::InvalidArgument,
        format!("the request could not be decoded: {error}"),
        ErrorReason::InvalidField,
        None,
    )
}

/// A bug in the server (a lost answer, a failed task).
pub fn internal(message: impl Into<String>) -> Status {
    error_status(Code::Internal, message, ErrorReason::Unspecified, None)
}

/// How tonic's refusal of a request message above the decoding limit begins (its code is
/// OUT_OF_RANGE; the text goes on "N bytes, the limit is: M bytes").
const TONIC_BODY_TOO_LARGE: &str = "Error, decoded message length too large: found ";

/// Where tonic's refusal names the limit, after the message's size.
const TONIC_LIMIT_IS: &str = " bytes, the limit is: ";

/// When `status` is tonic's refusal of a request message above the decoding limit
/// (OUT_OF_RANGE), the message's size and the limit as it names them (`None` for a number
/// it does not give); `None` for any other status.
pub fn tonic_too_large(status: &Status) -> Option<(Option<usize>, Option<usize>)> {
    if status.code() != Code::OutOfRange {
        return None;
    }
    let rest = status.message().strip_prefix(TONIC_BODY_TOO_LARGE)?;
    let leading_number = |text: &str| {
        let digits = text.bytes().take_while(u8::is_ascii_digit).count();
        text[..digits].parse().ok()
    };
    let limit = rest
        .split_once(TONIC_LIMIT_IS)
        .and_then(|(_, limit)| leading_number(limit));
    Some((leading_number(rest), limit))
}

/// `status` as the client should see it when the gRPC layer made it: tonic's refusal of a
/// request message above the limit it names becomes [`request_too_large`]
/// (RESOURCE_EXHAUSTED, as every fairrank service and gRPC's own implementations answer
/// it); any other status gets its reason from [`with_reason`].
pub fn uniform_transport_status(status: Status) -> Status {
    match tonic_too_large(&status) {
        Some((size, Some(limit))) => request_too_large(size, limit),
        _ => with_reason(status),
    }
}

/// How tonic's messages for a request body that is not a message of the method's type
/// begin: prost's decoding error, a unary call without a message, a body that ends inside
/// a message, a message whose compression flag the call does not allow.
const TONIC_UNDECODABLE: [&str; 4] = [
    "failed to decode Protobuf message",
    "Missing request message",
    "Unexpected EOF decoding stream",
    "protocol error: received message with",
];

/// The reason of an error status the gRPC layer made itself, outside the server's
/// handlers (tonic's generated servers, its codecs, `tonic-health`), which carries none.
/// There each of these codes has one cause: UNIMPLEMENTED a method the service lacks or
/// a request compressed with an encoding the server does not accept (it accepts none),
/// NOT_FOUND a health check of a service this server does not serve (both
/// [`ErrorReason::NotSupported`], as for a path that names no service), OUT_OF_RANGE a
/// request message above `server.max_message_bytes` ([`ErrorReason::LimitExceeded`]);
/// INTERNAL with one of tonic's messages for a body that does not decode is
/// [`ErrorReason::InvalidField`]. Anything else (a failed transport) is
/// [`ErrorReason::Unspecified`]. Codes and messages stay tonic's, but for the refusal of
/// a message above the limit, which the front and reflection turn into RESOURCE_EXHAUSTED
/// ([`uniform_transport_status`]).
pub fn transport_reason(code: Code, message: &str) -> ErrorReason {
    match code {
        Code::Unimplemented | Code::NotFound => ErrorReason::NotSupported,
        Code::OutOfRange => ErrorReason::LimitExceeded,
        Code::Internal
            if TONIC_UNDECODABLE
                .iter()
                .any(|start| message.starts_with(start)) =>
        {
            ErrorReason::InvalidField
        }
        _ => ErrorReason::Unspecified,
    }
}

/// `status` with the reason of [`transport_reason`] when it is an error that carries none
/// (one the gRPC layer made); otherwise `status` unchanged.
pub fn with_reason(mut status: Status) -> Status {
    if status.code() != Code::Ok && !status.metadata().contains_key(ERROR_REASON_METADATA_KEY) {
        let reason = transport_reason(status.code(), status.message());
        status.metadata_mut().insert(
            ERROR_REASON_METADATA_KEY,
            MetadataValue::from_static(reason.as_str_name()),
        );
    }
    status
}

/// The header of a gRPC status code.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The header of the error reason.
const ERROR_REASON: HeaderName = HeaderName::from_static(ERROR_REASON_METADATA_KEY);

/// Adds the reason of [`transport_reason`] to `headers` (the headers of a trailers-only
/// answer, or an answer's trailers) when they carry an error status without one: an answer
/// tonic made itself. Headers without a status (an answer whose status comes in its
/// trailers), with status OK or with a reason are left as they are, at the cost of a
/// lookup or two.
pub fn stamp_reason(headers: &mut HeaderMap) {
    let Some(code) = headers.get(&GRPC_STATUS) else {
        return;
    };
    if code.as_bytes() == b"0" || headers.contains_key(&ERROR_REASON) {
        return;
    }
    let code = Code::from_bytes(code.as_bytes());
    // Only INTERNAL needs the message (its percent-encoding undone).
    let reason = match code {
        Code::Internal => Status::from_header_map(headers)
            .map_or(ErrorReason::Unspecified, |status| {
                transport_reason(status.code(), status.message())
            }),
        code => transport_reason(code, ""),
    };
    headers.insert(ERROR_REASON, HeaderValue::from_static(reason.as_str_name()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::status::{error_field, error_reason};
    use engine::DeadlineStage;

    fn invalid(reason: InvalidReason) -> EngineError {
        EngineError::InvalidArgument {
            field: "inline_user.embedding".into(),
            reason,
            message: "has 3 values; the item table's dimension is 16".into(),
        }
    }

    #[test]
    fn invalid_arguments_keep_reason_field_and_message() {
        let status = engine_status(&invalid(InvalidReason::DimensionMismatch));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(error_reason(&status), ErrorReason::DimensionMismatch);
        assert_eq!(error_field(&status), Some("inline_user.embedding"));
        assert!(
            status.message().contains("inline_user.embedding"),
            "{}",
            status.message()
        );
        let status = engine_status(&invalid(InvalidReason::LimitExceeded));
        assert_eq!(error_reason(&status), ErrorReason::LimitExceeded);
    }

    #[test]
    fn each_engine_error_has_its_code_and_reason() {
        let cases = [
            (
                EngineError::NotFound {
                    field: "user_id".into(),
                    reason: NotFoundReason::User,
                    message: "unknown".into(),
                },
                Code::NotFound,
                ErrorReason::UserNotFound,
            ),
            (
                EngineError::NotFound {
                    field: "candidate_ids".into(),
                    reason: NotFoundReason::Item,
                    message: "unknown".into(),
                },
                Code::NotFound,
                ErrorReason::ItemNotFound,
            ),
            (
                EngineError::FailedPrecondition {
                    field: None,
                    reason: PreconditionReason::NoRollbackTarget,
                    message: "none".into(),
                },
                Code::FailedPrecondition,
                ErrorReason::NoRollbackTarget,
            ),
            (
                EngineError::Unsupported {
                    field: "fairness.constraint".into(),
                    message: "not registered".into(),
                },
                Code::InvalidArgument,
                ErrorReason::UnknownConstraint,
            ),
            (
                EngineError::Unsupported {
                    field: "privacy.mechanism".into(),
                    message: "not yet".into(),
                },
                Code::Unimplemented,
                ErrorReason::NotSupported,
            ),
            (
                EngineError::ResourceExhausted {
                    message: "queue full".into(),
                },
                Code::ResourceExhausted,
                ErrorReason::Overloaded,
            ),
            (
                EngineError::DeadlineExceeded {
                    stage: DeadlineStage::Queued,
                },
                Code::DeadlineExceeded,
                ErrorReason::Unspecified,
            ),
            (
                EngineError::Aborted {
                    reason: AbortReason::GenerationMismatch,
                    message: "generation 2, not 1".into(),
                },
                Code::Aborted,
                ErrorReason::GenerationMismatch,
            ),
            (
                EngineError::Reload {
                    table: engine::TableKind::Items,
                    path: "/x.frt".into(),
                    problem: ReloadProblem::FileNotFound,
                    message: "missing".into(),
                },
                Code::NotFound,
                ErrorReason::TableFileNotFound,
            ),
            (
                EngineError::Reload {
                    table: engine::TableKind::Items,
                    path: "/x.frt".into(),
                    problem: ReloadProblem::InvalidFile,
                    message: "bad magic".into(),
                },
                Code::FailedPrecondition,
                ErrorReason::TableInvalid,
            ),
            (
                EngineError::Internal {
                    message: "bug".into(),
                },
                Code::Internal,
                ErrorReason::Unspecified,
            ),
        ];
        for (error, code, reason) in cases {
            let status = engine_status(&error);
            assert_eq!(status.code(), code, "{error}");
            assert_eq!(error_reason(&status), reason, "{error}");
            assert_eq!(status.message(), error.to_string());
        }
    }

    /// A DP answer refused before its charge: what a Rank answer refused after it says
    /// (code, reason, field `k`, the configuration key), and that nothing was charged.
    #[test]
    fn a_dp_answer_too_large_to_deliver_is_refused_like_any_answer_too_large() {
        let error = EngineError::AnswerTooLarge {
            field: "k".into(),
            bytes: 5000,
            limit: 4096,
        };
        let status = engine_status(&error);
        let after = rank_answer_too_large(5000, 4096);
        assert_eq!(status.code(), after.code());
        assert_eq!(error_reason(&status), error_reason(&after));
        assert_eq!(error_field(&status), Some("k"));
        for words in [
            "5000 bytes",
            "4096",
            "`server.max_message_bytes`",
            "nothing",
        ] {
            assert!(status.message().contains(words), "{}", status.message());
        }
        let entry = engine_status(&error.with_field_prefix("requests[1]."));
        assert_eq!(error_field(&entry), Some("requests[1].k"));
    }

    #[test]
    fn server_side_statuses_carry_their_reasons() {
        assert_eq!(error_reason(&overloaded(4, 1)), ErrorReason::Overloaded);
        assert_eq!(
            error_reason(&request_id_reused("r-1")),
            ErrorReason::RequestIdReused
        );
        assert_eq!(request_in_progress("r-1").code(), Code::Aborted);
        assert_eq!(
            error_reason(&unauthenticated("missing")),
            ErrorReason::AdminTokenInvalid
        );
        let status = invalid_field("user", "exactly one of user_id and inline_user must be set");
        assert_eq!(error_field(&status), Some("user"));
        assert!(status.message().contains("`user`"));
    }

    /// Statuses as tonic makes them, and the reason each gets.
    fn tonic_statuses() -> Vec<(Status, ErrorReason)> {
        use prost::Message as _;
        let undecodable = prost_types::Duration::decode(&[0xff_u8; 4][..]).unwrap_err();
        vec![
            (Status::unimplemented(""), ErrorReason::NotSupported),
            (
                Status::unimplemented("Content is compressed with `gzip` which isn't supported"),
                ErrorReason::NotSupported,
            ),
            (
                Status::not_found("service not registered"),
                ErrorReason::NotSupported,
            ),
            (
                Status::out_of_range(
                    "Error, decoded message length too large: found 9 bytes, the limit is: 8 bytes",
                ),
                ErrorReason::LimitExceeded,
            ),
            // tonic-prost's mapping of a decoding error.
            (
                Status::internal(undecodable.to_string()),
                ErrorReason::InvalidField,
            ),
            (
                Status::internal("Missing request message."),
                ErrorReason::InvalidField,
            ),
            (
                Status::internal("Unexpected EOF decoding stream."),
                ErrorReason::InvalidField,
            ),
            (
                Status::internal("h2 protocol error: stream reset"),
                ErrorReason::Unspecified,
            ),
            (Status::unknown("transport"), ErrorReason::Unspecified),
        ]
    }

    #[test]
    fn statuses_of_the_grpc_layer_get_a_reason_and_keep_code_and_message() {
        for (status, reason) in tonic_statuses() {
            let (code, message) = (status.code(), status.message().to_owned());
            assert_eq!(transport_reason(code, &message), reason, "{status:?}");
            let stamped = with_reason(status);
            assert_eq!(error_reason(&stamped), reason, "{stamped:?}");
            assert_eq!(
                (stamped.code(), stamped.message()),
                (code, message.as_str())
            );
        }
        // A reason already there stays; OK gets none.
        let ours = with_reason(overloaded(4, 1));
        assert_eq!(error_reason(&ours), ErrorReason::Overloaded);
        let ok = with_reason(Status::ok(""));
        assert!(!ok.metadata().contains_key(ERROR_REASON_METADATA_KEY));
    }

    #[test]
    fn tonics_refusal_of_a_large_message_reads_as_every_services() {
        let tonic = Status::out_of_range(
            "Error, decoded message length too large: found 5000 bytes, the limit is: 4096 bytes",
        );
        assert_eq!(tonic_too_large(&tonic), Some((Some(5000), Some(4096))));
        let uniform = uniform_transport_status(tonic);
        let expected = request_too_large(Some(5000), 4096);
        assert_eq!(
            (uniform.code(), uniform.message()),
            (expected.code(), expected.message())
        );
        assert_eq!(uniform.code(), Code::ResourceExhausted);
        assert_eq!(error_reason(&uniform), ErrorReason::LimitExceeded);
        // Numbers it does not give are unknown; without the limit the status stays tonic's.
        let no_limit = Status::out_of_range("Error, decoded message length too large: found ");
        assert_eq!(tonic_too_large(&no_limit), Some((None, None)));
        let kept = uniform_transport_status(no_limit);
        assert_eq!(kept.code(), Code::OutOfRange);
        assert_eq!(error_reason(&kept), ErrorReason::LimitExceeded);
        // Other statuses are not tonic's refusal, and keep code and message.
        for status in [
            Status::out_of_range("the index is out of range"),
            Status::internal(
                "Error, decoded message length too large: found 5000 bytes, the limit is: 4096 bytes",
            ),
        ] {
            assert_eq!(tonic_too_large(&status), None, "{status:?}");
            let (code, message) = (status.code(), status.message().to_owned());
            let kept = uniform_transport_status(status);
            assert_eq!((kept.code(), kept.message()), (code, message.as_str()));
        }
    }

    #[test]
    fn headers_carrying_an_error_without_a_reason_get_one() {
        let reason_in = |headers: &HeaderMap| {
            headers
                .get(ERROR_REASON_METADATA_KEY)
                .map(|value| value.to_str().unwrap().to_owned())
        };
        // Trailers-only answers as tonic's servers make them from a status.
        for (status, reason) in tonic_statuses() {
            let mut answer = status.clone().into_http::<()>();
            stamp_reason(answer.headers_mut());
            assert_eq!(
                reason_in(answer.headers()).as_deref(),
                Some(reason.as_str_name()),
                "{status:?}"
            );
            // Code and message as they were.
            let sent = Status::from_header_map(answer.headers()).unwrap();
            assert_eq!(
                (sent.code(), sent.message()),
                (status.code(), status.message())
            );
        }
        // A generated server's answer to an unknown method: a bare `grpc-status: 12`.
        let mut unknown = HeaderMap::new();
        unknown.insert(GRPC_STATUS, HeaderValue::from_static("12"));
        stamp_reason(&mut unknown);
        assert_eq!(
            reason_in(&unknown).as_deref(),
            Some("ERROR_REASON_NOT_SUPPORTED")
        );
        // Left alone: no status (it comes in the trailers), OK, a reason already there.
        let mut answer = HeaderMap::new();
        answer.insert("content-type", HeaderValue::from_static("application/grpc"));
        let before = answer.clone();
        stamp_reason(&mut answer);
        assert_eq!(answer, before);
        let mut ok = HeaderMap::new();
        ok.insert(GRPC_STATUS, HeaderValue::from_static("0"));
        stamp_reason(&mut ok);
        assert_eq!(reason_in(&ok), None);
        let mut ours = overloaded(4, 1).into_http::<()>();
        stamp_reason(ours.headers_mut());
        assert_eq!(
            reason_in(ours.headers()).as_deref(),
            Some("ERROR_REASON_OVERLOADED")
        );
        assert_eq!(
            ours.headers()
                .get_all(ERROR_REASON_METADATA_KEY)
                .iter()
                .count(),
            1
        );
    }
}
