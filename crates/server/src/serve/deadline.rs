//! Call deadlines: the `grpc-timeout` header (or the configured default) as an absolute
//! deadline in the request's extensions, taken when the call arrives.
//!
//! The interceptor runs before the request body is read, right after tonic starts its own
//! timer for the same header; the deadline taken here is therefore never later than
//! tonic's, so the handlers' own timeout fires first and the client sees
//! `DEADLINE_EXCEEDED` with a message rather than tonic's bare `CANCELLED`. A call whose
//! deadline has already passed on arrival is refused at once.

use std::time::{Duration, Instant};

use tonic::Status;

use super::errors;

/// Name of the gRPC timeout header.
const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Most digits the gRPC protocol allows in a timeout value.
const MAX_TIMEOUT_DIGITS: usize = 8;

/// The absolute deadline of a call, stored in its extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallDeadline(pub Instant);

/// Parses a `grpc-timeout` value: 1 to 8 ASCII digits and a unit (`H`, `M`, `S`, `m`, `u`,
/// `n`). `None` for anything else.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit = value.chars().last()?;
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty()
        || digits.len() > MAX_TIMEOUT_DIGITS
        || !digits.bytes().all(|byte| byte.is_ascii_digit())
    {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(amount * 3600),
        'M' => Duration::from_secs(amount * 60),
        'S' => Duration::from_secs(amount),
        'm' => Duration::from_millis(amount),
        'u' => Duration::from_micros(amount),
        'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The interceptor that stamps every call with its deadline: `grpc-timeout` when present
/// and valid (an invalid one is ignored, as tonic does), otherwise `default`.
pub fn interceptor(
    default: Duration,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, Status> + Clone + Send + Sync {
    move |mut request: tonic::Request<()>| {
        let arrived = Instant::now();
        let timeout = request
            .metadata()
            .get(GRPC_TIMEOUT)
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout)
            .unwrap_or(default);
        // Far-future timeouts (8 digits of hours) still fit an Instant on every platform
        // we run on; saturate rather than overflow anyway.
        let deadline = arrived
            .checked_add(timeout)
            .unwrap_or_else(|| arrived + Duration::from_secs(86_400 * 365));
        if deadline <= Instant::now() {
            return Err(errors::deadline_exceeded("on arrival"));
        }
        request.extensions_mut().insert(CallDeadline(deadline));
        Ok(request)
    }
}

/// The deadline of a call: the one the interceptor stamped, or `now + default`.
pub fn of<T>(request: &tonic::Request<T>, default: Duration) -> Instant {
    request
        .extensions()
        .get::<CallDeadline>()
        .map_or_else(|| Instant::now() + default, |deadline| deadline.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_parses() {
        assert_eq!(
            parse_grpc_timeout("3H"),
            Some(Duration::from_secs(3 * 3600))
        );
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("7S"), Some(Duration::from_secs(7)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("0n"), Some(Duration::ZERO));
    }

    #[test]
    fn malformed_values_are_rejected() {
        for bad in [
            "",
            "S",
            "123456789S",
            "10x",
            "-5S",
            "1.5S",
            "+5S",
            "5 S",
            "١S",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_interceptor_stamps_the_header_or_the_default() {
        let mut stamp = interceptor(Duration::from_secs(5));
        let before = Instant::now();
        let request = stamp(tonic::Request::new(())).unwrap();
        let CallDeadline(deadline) = *request.extensions().get::<CallDeadline>().unwrap();
        assert!(deadline >= before + Duration::from_secs(5));

        let mut with_header = tonic::Request::new(());
        with_header
            .metadata_mut()
            .insert(GRPC_TIMEOUT, "100m".parse().unwrap());
        let request = stamp(with_header).unwrap();
        let CallDeadline(deadline) = *request.extensions().get::<CallDeadline>().unwrap();
        assert!(deadline < before + Duration::from_secs(1));
        assert_eq!(of(&request, Duration::from_secs(5)), deadline);
    }

    #[test]
    fn a_passed_deadline_is_refused_on_arrival() {
        let mut stamp = interceptor(Duration::from_secs(5));
        let mut request = tonic::Request::new(());
        request
            .metadata_mut()
            .insert(GRPC_TIMEOUT, "0n".parse().unwrap());
        let status = stamp(request).unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    }
}
