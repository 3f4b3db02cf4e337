//! The error contract on the wire: a gRPC status whose metadata carries the stable
//! [`ErrorReason`] and the offending field, and its data form [`EntryError`] for RankBatch
//! entries. Servers build errors with [`error_status`]; clients read them with
//! [`error_reason`] and [`error_field`].

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::fairrank::v1::{EntryError, ErrorReason};

/// ASCII metadata key carrying the name of the [`ErrorReason`] of an error status, for
/// example `ERROR_REASON_PRIVACY_BUDGET_EXHAUSTED`.
pub const ERROR_REASON_METADATA_KEY: &str = "fairrank-error-reason";

/// ASCII metadata key carrying the path of the request field at fault, for example
/// `fairness.params.alpha`.
pub const ERROR_FIELD_METADATA_KEY: &str = "fairrank-error-field";

/// Longest status message sent, in bytes. A message travels in the `grpc-message`
/// trailer, and peers refuse header lists above 8 to 16 KiB (grpc-core, h2): a status
/// quoting a long client value would otherwise reach the client as a protocol error
/// instead of its own code.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 2048;

/// Builds an error status carrying `reason` (`ERROR_REASON_UNSPECIFIED` too, so that every
/// error names one) and, when given, the offending `field` in its metadata. A message above
/// [`MAX_STATUS_MESSAGE_BYTES`] is cut at a character boundary, saying so. A field path
/// that is not visible ASCII cannot travel as metadata and is left out (the message still
/// says it).
pub fn error_status(
    code: Code,
    message: impl Into<String>,
    reason: ErrorReason,
    field: Option<&str>,
) -> Status {
    let mut status = Status::new(code, clipped_message(message.into()));
    let metadata = status.metadata_mut();
    if let Ok(value) = MetadataValue::try_from(reason.as_str_name()) {
        metadata.insert(ERROR_REASON_METADATA_KEY, value);
    }
    if let Some(field) = field.filter(|field| {
        !field.is_empty()
            && field
                .bytes()
                .all(|byte| byte == b' ' || byte.is_ascii_graphic())
    }) && let Ok(value) = MetadataValue::try_from(field)
    {
        metadata.insert(ERROR_FIELD_METADATA_KEY, value);
    }
    status
}

/// `message`, or its first [`MAX_STATUS_MESSAGE_BYTES`] bytes or so (at a character
/// boundary) and how long it was.
fn clipped_message(mut message: String) -> String {
    if message.len() <= MAX_STATUS_MESSAGE_BYTES {
        return message;
    }
    let full = message.len();
    let end = (0..=MAX_STATUS_MESSAGE_BYTES - 64)
        .rev()
        .find(|&end| message.is_char_boundary(end))
        .unwrap_or(0);
    message.truncate(end);
    message.push_str(&format!("... (message cut: {full} bytes)"));
    message
}

/// The [`ErrorReason`] an error status carries; `Unspecified` when it carries none or one
/// this client version does not know.
pub fn error_reason(status: &Status) -> ErrorReason {
    status
        .metadata()
        .get(ERROR_REASON_METADATA_KEY)
        .and_then(|value| value.to_str().ok())
        .and_then(ErrorReason::from_str_name)
        .unwrap_or(ErrorReason::Unspecified)
}

/// The path of the request field at fault, if the status names one.
pub fn error_field(status: &Status) -> Option<&str> {
    status
        .metadata()
        .get(ERROR_FIELD_METADATA_KEY)
        .and_then(|value| value.to_str().ok())
        .filter(|field| !field.is_empty())
}

impl From<&Status> for EntryError {
    /// The batch-entry form of the error a single Rank call would have returned.
    fn from(status: &Status) -> Self {
        EntryError {
            code: status.code() as i32,
            message: status.message().to_owned(),
            reason: error_reason(status) as i32,
            field: error_field(status).unwrap_or_default().to_owned(),
        }
    }
}

impl From<&EntryError> for Status {
    /// The status a single Rank call returns for this error. An unknown code number
    /// becomes `UNKNOWN`, an unknown reason number is left out.
    fn from(error: &EntryError) -> Self {
        let reason = ErrorReason::try_from(error.reason).unwrap_or(ErrorReason::Unspecified);
        error_status(
            Code::from(error.code),
            error.message.clone(),
            reason,
            Some(error.field.as_str()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_and_field_travel_in_metadata() {
        let status = error_status(
            Code::InvalidArgument,
            "fairness.params.alpha must be in (0, 1), got 2",
            ErrorReason::InvalidConstraintParams,
            Some("fairness.params.alpha"),
        );
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status
                .metadata()
                .get(ERROR_REASON_METADATA_KEY)
                .and_then(|value| value.to_str().ok()),
            Some("ERROR_REASON_INVALID_CONSTRAINT_PARAMS")
        );
        assert_eq!(error_reason(&status), ErrorReason::InvalidConstraintParams);
        assert_eq!(error_field(&status), Some("fairness.params.alpha"));
    }

    #[test]
    fn missing_or_unknown_metadata_reads_as_unspecified() {
        let plain = Status::internal("bug");
        assert_eq!(error_reason(&plain), ErrorReason::Unspecified);
        assert_eq!(error_field(&plain), None);

        let unspecified = error_status(Code::Internal, "bug", ErrorReason::Unspecified, None);
        assert_eq!(
            unspecified
                .metadata()
                .get(ERROR_REASON_METADATA_KEY)
                .and_then(|value| value.to_str().ok()),
            Some("ERROR_REASON_UNSPECIFIED"),
            "every error names its reason"
        );
        assert_eq!(error_reason(&unspecified), ErrorReason::Unspecified);

        let mut future = Status::internal("from a newer server");
        future.metadata_mut().insert(
            ERROR_REASON_METADATA_KEY,
            MetadataValue::from_static("ERROR_REASON_FROM_THE_FUTURE"),
        );
        assert_eq!(error_reason(&future), ErrorReason::Unspecified);
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let short = "x".repeat(MAX_STATUS_MESSAGE_BYTES);
        let status = error_status(
            Code::InvalidArgument,
            short.clone(),
            ErrorReason::InvalidField,
            None,
        );
        assert_eq!(status.message(), short);
        for filler in ["x", "é", "\u{1F600}"] {
            let long = filler.repeat(100_000);
            let status = error_status(
                Code::InvalidArgument,
                long.clone(),
                ErrorReason::InvalidField,
                None,
            );
            assert!(
                status.message().len() <= MAX_STATUS_MESSAGE_BYTES,
                "{}",
                status.message().len()
            );
            assert!(status.message().starts_with(&filler.repeat(10)));
            assert!(
                status
                    .message()
                    .ends_with(&format!("(message cut: {} bytes)", long.len())),
                "{}",
                status.message()
            );
        }
    }

    #[test]
    fn non_ascii_field_is_left_out_without_panicking() {
        let status = error_status(
            Code::InvalidArgument,
            "fairness.params.größe is unknown",
            ErrorReason::InvalidConstraintParams,
            Some("fairness.params.größe\n"),
        );
        assert_eq!(error_field(&status), None);
        assert_eq!(error_reason(&status), ErrorReason::InvalidConstraintParams);
        // Bytes a header value may carry but that are not visible ASCII are left out too.
        for field in [
            "fairness.params.café",
            "fairness.params.a\tb",
            "fairness.params.\u{7f}",
        ] {
            let status = error_status(
                Code::InvalidArgument,
                "bad",
                ErrorReason::InvalidConstraintParams,
                Some(field),
            );
            assert_eq!(error_field(&status), None, "{field:?}");
            assert!(
                status.metadata().get(ERROR_FIELD_METADATA_KEY).is_none(),
                "{field:?}"
            );
        }
        let spaced = error_status(
            Code::InvalidArgument,
            "bad",
            ErrorReason::InvalidConstraintParams,
            Some("fairness.params.my key"),
        );
        assert_eq!(error_field(&spaced), Some("fairness.params.my key"));
    }

    #[test]
    fn entry_error_and_status_convert_both_ways() {
        let status = error_status(
            Code::ResourceExhausted,
            "privacy budget of subject s-1 exhausted",
            ErrorReason::PrivacyBudgetExhausted,
            None,
        );
        let entry = EntryError::from(&status);
        assert_eq!(entry.code, 8);
        assert_eq!(entry.reason(), ErrorReason::PrivacyBudgetExhausted);
        assert!(entry.field.is_empty());

        let back = Status::from(&entry);
        assert_eq!(back.code(), Code::ResourceExhausted);
        assert_eq!(back.message(), status.message());
        assert_eq!(error_reason(&back), ErrorReason::PrivacyBudgetExhausted);
        assert_eq!(error_field(&back), None);
    }

    #[test]
    fn unknown_numbers_in_entry_errors_degrade_gracefully() {
        let entry = EntryError {
            code: 99,
            message: "odd".into(),
            reason: 12_345,
            field: "k".into(),
        };
        let status = Status::from(&entry);
        assert_eq!(status.code(), Code::Unknown);
        assert_eq!(error_reason(&status), ErrorReason::Unspecified);
        assert_eq!(error_field(&status), Some("k"));
    }
}
