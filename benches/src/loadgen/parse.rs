//! Parsing and bounds of the load generator's scalar settings: durations, concurrency lists
//! and loopback-only server addresses.

use std::net::IpAddr;
use std::time::Duration;

use crate::error::LoadgenError;

/// Longest measured or warm-up phase of one step.
pub const MAX_PHASE: Duration = Duration::from_secs(600);

/// Largest number of concurrent callers of one step.
pub const MAX_CONCURRENCY: usize = 4096;

/// Largest number of HTTP/2 connections per target.
pub const MAX_CONNECTIONS: usize = 256;

/// Largest number of measured requests per step (each keeps an 8-byte latency sample).
pub const MAX_REQUESTS_PER_STEP: u64 = 20_000_000;

/// Parses a duration such as `10s`, `500ms`, `1.5s`, `2m` or `250us`, at most [`MAX_PHASE`].
/// `0s` is allowed (no warm-up).
pub fn parse_duration(text: &str) -> Result<Duration, LoadgenError> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|character: char| character.is_ascii_alphabetic())
        .ok_or_else(|| {
            LoadgenError::invalid("duration", text, "needs a unit: us, ms, s or m (e.g. 10s)")
        })?;
    let (number, unit) = trimmed.split_at(split);
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| LoadgenError::invalid("duration", text, "not a number before the unit"))?;
    let seconds_per_unit = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        _ => {
            return Err(LoadgenError::invalid(
                "duration",
                text,
                "unknown unit (use us, ms, s or m)",
            ));
        }
    };
    let seconds = value * seconds_per_unit;
    if !(seconds.is_finite() && seconds >= 0.0) {
        return Err(LoadgenError::invalid(
            "duration",
            text,
            "must be finite and not negative",
        ));
    }
    if seconds > MAX_PHASE.as_secs_f64() {
        return Err(LoadgenError::invalid(
            "duration",
            text,
            format!("at most {} s per phase", MAX_PHASE.as_secs()),
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses a comma-separated list of concurrencies such as `1,4,16,64`, each in
/// `1..=MAX_CONCURRENCY`.
pub fn parse_concurrency_list(text: &str) -> Result<Vec<usize>, LoadgenError> {
    text.split(',')
        .map(|part| {
            let value: usize = part.trim().parse().map_err(|_| {
                LoadgenError::invalid("--concurrency", text, format!("`{part}` is not a count"))
            })?;
            if value == 0 || value > MAX_CONCURRENCY {
                return Err(LoadgenError::invalid(
                    "--concurrency",
                    text,
                    format!("each value must be in 1..={MAX_CONCURRENCY}"),
                ));
            }
            Ok(value)
        })
        .collect()
}

/// Checks that `addr` is an `http://` URI whose host is a loopback address (127.0.0.0/8,
/// `[::1]` or `localhost`) with an explicit port, and returns it unchanged.
pub fn loopback_uri(addr: &str) -> Result<String, LoadgenError> {
    let uri: tonic::transport::Uri = addr
        .parse()
        .map_err(|_| LoadgenError::invalid("address", addr, "not a URI"))?;
    if uri.scheme_str() != Some("http") {
        return Err(LoadgenError::invalid(
            "address",
            addr,
            "must start with http:// (plaintext loopback)",
        ));
    }
    let Some(host) = uri.host() else {
        return Err(LoadgenError::invalid("address", addr, "has no host"));
    };
    if uri.port_u16().is_none() {
        return Err(LoadgenError::invalid(
            "address",
            addr,
            "needs an explicit port",
        ));
    }
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare_host.eq_ignore_ascii_case("localhost")
        || bare_host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(LoadgenError::NotLoopback(addr.to_owned()));
    }
    Ok(addr.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration(" 0s ").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("10m").unwrap(), MAX_PHASE);
    }

    #[test]
    fn bad_durations_are_refused() {
        for text in [
            "", "10", "s", "10h", "10 sec", "-1s", "1e400s", "11m", "NaNs",
        ] {
            assert!(parse_duration(text).is_err(), "{text} accepted");
        }
    }

    #[test]
    fn concurrency_lists_parse_and_are_bounded() {
        assert_eq!(parse_concurrency_list("1,4,16,64").unwrap(), [1, 4, 16, 64]);
        assert_eq!(parse_concurrency_list(" 8 ").unwrap(), [8]);
        for text in ["", "0", "1,,2", "4,x", "-1", "4097"] {
            assert!(parse_concurrency_list(text).is_err(), "{text} accepted");
        }
    }

    #[test]
    fn only_loopback_addresses_pass() {
        for addr in [
            "http://127.0.0.1:50051",
            "http://127.1.2.3:1",
            "http://localhost:50051",
            "http://[::1]:50051",
        ] {
            assert_eq!(loopback_uri(addr).unwrap(), addr);
        }
        for addr in [
            "http://10.0.0.1:50051",
            "http://example.com:50051",
            "http://[2001:db8::1]:50051",
            "http://0.0.0.0:50051",
        ] {
            assert!(
                matches!(loopback_uri(addr), Err(LoadgenError::NotLoopback(_))),
                "{addr} accepted"
            );
        }
        for addr in [
            "https://127.0.0.1:50051",
            "127.0.0.1:50051",
            "http://127.0.0.1",
            "not a uri",
        ] {
            assert!(
                matches!(
                    loopback_uri(addr),
                    Err(LoadgenError::InvalidArgument { .. })
                ),
                "{addr} accepted"
            );
        }
    }
}
