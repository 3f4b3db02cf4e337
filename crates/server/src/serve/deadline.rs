//! Call deadlines: the `grpc-timeout` header (or the configured default) as an absolute
//! deadline in the request's extensions, taken when the call arrives.
//!
//! The server's front service ([`super::front`]) stamps it before the request body is
//! read, right after tonic starts its own timer for the same header; the deadline taken
//! here is therefore never later than tonic's, so the handlers' own timeout fires first and
//! the client sees `DEADLINE_EXCEEDED` with a message rather than tonic's bare `CANCELLED`.
//! A call whose deadline has already passed on arrival is refused at once.

use std::time::{Duration, Instant};

use tonic::Status;
use tonic::codegen::http;

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

/// Stamps `request` with its deadline: `grpc-timeout` when present and valid (an invalid
/// one is ignored, as tonic does), otherwise `default`. A deadline that has already passed
/// is refused (DEADLINE_EXCEEDED).
pub fn stamp<B>(request: &mut http::Request<B>, default: Duration) -> Result<(), Status> {
    let arrived = Instant::now();
    let timeout = request
        .headers()
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
    Ok(())
}

/// The deadline of a call: the one [`stamp`] put in its extensions, or `now + default`.
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

    /// A request as tonic hands it to the front, with `grpc-timeout` if given.
    fn request(timeout: Option<&str>) -> http::Request<()> {
        let mut request = http::Request::new(());
        if let Some(timeout) = timeout {
            request
                .headers_mut()
                .insert(GRPC_TIMEOUT, timeout.parse().unwrap());
        }
        request
    }

    /// The stamped request as a handler sees it.
    fn handed_over(request: http::Request<()>) -> tonic::Request<()> {
        tonic::Request::from_http(request)
    }

    #[test]
    fn the_header_or_the_default_is_stamped() {
        let default = Duration::from_secs(5);
        let before = Instant::now();
        let mut plain = request(None);
        stamp(&mut plain, default).unwrap();
        let CallDeadline(deadline) = *plain.extensions().get::<CallDeadline>().unwrap();
        assert!(deadline >= before + default);
        assert!(deadline <= Instant::now() + default);

        let mut with_header = request(Some("100m"));
        stamp(&mut with_header, default).unwrap();
        let CallDeadline(deadline) = *with_header.extensions().get::<CallDeadline>().unwrap();
        assert!(deadline >= before + Duration::from_millis(100));
        assert!(deadline < before + Duration::from_secs(1));
        assert_eq!(of(&handed_over(with_header), default), deadline);

        // An invalid header is ignored, as tonic ignores it.
        let mut invalid = request(Some("1.5S"));
        stamp(&mut invalid, default).unwrap();
        let CallDeadline(deadline) = *invalid.extensions().get::<CallDeadline>().unwrap();
        assert!(deadline >= before + default);
    }

    #[test]
    fn a_passed_deadline_is_refused_on_arrival() {
        let mut expired = request(Some("0n"));
        let status = stamp(&mut expired, Duration::from_secs(5)).unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(expired.extensions().get::<CallDeadline>().is_none());
    }

    #[test]
    fn an_unstamped_call_gets_the_default_from_now() {
        let before = Instant::now();
        let deadline = of(&tonic::Request::new(()), Duration::from_secs(2));
        assert!(deadline >= before + Duration::from_secs(2));
    }
}
