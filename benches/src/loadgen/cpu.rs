//! CPU time per call: the load generator's own process and, when its pid is given, the
//! server's, sampled at the edges of a measured window, so a run shows where a call's CPU
//! goes and how much of the machine Rank needs per call next to Echo.
//!
//! On a machine where client and server share the cores (the load test's setting), the
//! throughput ratio of Rank to Echo is bounded by the ratio of their CPU per call:
//! `ratio <= echo total / rank total` once the cores are busy. The figures are process CPU
//! (user + system, all threads, including threads that exited during the window) divided
//! by the calls completed in the window; calls in flight at the window's edges make them
//! approximate by at most `concurrency` calls' worth, a fraction of a percent at the
//! window lengths the load tests use.

use std::time::Duration;

use serde::Serialize;

use crate::error::LoadgenError;

/// CPU time consumed so far by the processes being measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuSample {
    /// The load generator's process (user + system).
    pub load_generator: Duration,
    /// The server's process (user + system), when its pid is known.
    pub server: Option<Duration>,
}

/// Reads the CPU time of the load generator and, optionally, of a server process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuMeter {
    server_pid: Option<u32>,
    clock_ticks_per_second: u64,
}

impl CpuMeter {
    /// A meter of this process and, if `server_pid` is given, of that process (read from
    /// `/proc/<pid>/stat`; checked now, so a wrong pid is refused before any load is sent).
    pub fn new(server_pid: Option<u32>) -> Result<Self, LoadgenError> {
        // SAFETY: `sysconf` only reads a configuration value; `_SC_CLK_TCK` is always valid.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let meter = Self {
            server_pid,
            clock_ticks_per_second: u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100),
        };
        if let Some(pid) = server_pid {
            meter
                .server_cpu(pid)
                .map_err(|reason| LoadgenError::invalid("--server-pid", pid.to_string(), reason))?;
        }
        Ok(meter)
    }

    /// The same meter without the server (for a target served by another process).
    pub fn without_server(self) -> Self {
        Self {
            server_pid: None,
            ..self
        }
    }

    /// CPU time used so far. A server that has exited reads as absent.
    pub fn sample(&self) -> CpuSample {
        CpuSample {
            load_generator: own_cpu(),
            server: self.server_pid.and_then(|pid| self.server_cpu(pid).ok()),
        }
    }

    fn server_cpu(&self, pid: u32) -> Result<Duration, String> {
        let path = format!("/proc/{pid}/stat");
        let text = std::fs::read_to_string(&path)
            .map_err(|error| format!("cannot read {path}: {error}"))?;
        let ticks = parse_stat_cpu_ticks(&text)
            .ok_or_else(|| format!("{path} does not have the utime and stime fields"))?;
        Ok(Duration::from_nanos(
            ticks.saturating_mul(1_000_000_000) / self.clock_ticks_per_second,
        ))
    }
}

/// This process's user + system CPU time (`getrusage(RUSAGE_SELF)`, microsecond resolution).
fn own_cpu() -> Duration {
    // SAFETY: `rusage` is plain old data, for which all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `getrusage` writes one `rusage` through the valid, exclusive pointer it is given.
    let status = unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) };
    if status != 0 {
        return Duration::ZERO;
    }
    let micros = |time: libc::timeval| {
        u64::try_from(time.tv_sec).unwrap_or(0) * 1_000_000
            + u64::try_from(time.tv_usec).unwrap_or(0)
    };
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

/// `utime + stime` in clock ticks from the text of `/proc/<pid>/stat` (fields 14 and 15;
/// the command name in field 2 may hold spaces and parentheses, so fields are counted
/// after its last `)`).
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU per call of one target over one measured window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CpuPerCall {
    /// The load generator's CPU per call, in microseconds (with the in-process Echo server,
    /// this includes that server's work).
    pub load_generator_us_per_call: f64,
    /// The server's CPU per call, in microseconds; absent when it is not measured
    /// separately (no `--server-pid`, or the in-process Echo server).
    pub server_us_per_call: Option<f64>,
    /// Client and server together, in microseconds; absent when the server is not measured.
    pub total_us_per_call: Option<f64>,
}

impl CpuPerCall {
    /// The CPU used between `start` and `end` over `calls` calls; `server_in_process`
    /// says the server runs inside the load generator (its CPU is already counted there).
    /// `None` without calls.
    pub fn between(
        start: CpuSample,
        end: CpuSample,
        calls: u64,
        server_in_process: bool,
    ) -> Option<Self> {
        if calls == 0 {
            return None;
        }
        let per_call = |used: Duration| used.as_secs_f64() * 1e6 / calls as f64;
        let load_generator = per_call(end.load_generator.saturating_sub(start.load_generator));
        let server = match (start.server, end.server) {
            (Some(start), Some(end)) if !server_in_process => {
                Some(per_call(end.saturating_sub(start)))
            }
            _ => None,
        };
        let total = if server_in_process {
            Some(load_generator)
        } else {
            server.map(|server| server + load_generator)
        };
        Some(Self {
            load_generator_us_per_call: load_generator,
            server_us_per_call: server,
            total_us_per_call: total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // Field 2 with spaces and a parenthesis; utime = 1234, stime = 56.
        let stat = "4242 (fair rank) serve) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 56 0 0 \
                    20 0 9 0 12345 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(1290));
        assert_eq!(parse_stat_cpu_ticks("4242 (cut short) S 1 2"), None);
        assert_eq!(parse_stat_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn this_process_reads_as_its_own_server_and_its_cpu_grows() {
        let meter = CpuMeter::new(Some(std::process::id())).unwrap();
        let start = meter.sample();
        let mut spin = 0_u64;
        let begun = std::time::Instant::now();
        while begun.elapsed() < Duration::from_millis(60) {
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        let end = meter.sample();
        assert!(end.load_generator > start.load_generator);
        // The tick-resolution reading moved too (60 ms of spinning is several ticks).
        assert!(end.server.unwrap() > start.server.unwrap());
    }

    #[test]
    fn a_pid_that_does_not_exist_is_refused_naming_the_flag() {
        let error = CpuMeter::new(Some(u32::MAX)).unwrap_err().to_string();
        assert!(error.contains("--server-pid"), "{error}");
        assert!(error.contains("/proc/4294967295/stat"), "{error}");
    }

    #[test]
    fn per_call_figures_divide_by_the_calls() {
        let at = |client_ms, server_ms| CpuSample {
            load_generator: Duration::from_millis(client_ms),
            server: Some(Duration::from_millis(server_ms)),
        };
        let use_ = CpuPerCall::between(at(100, 1_000), at(300, 1_500), 10_000, false).unwrap();
        assert!((use_.load_generator_us_per_call - 20.0).abs() < 1e-9);
        assert!((use_.server_us_per_call.unwrap() - 50.0).abs() < 1e-9);
        assert!((use_.total_us_per_call.unwrap() - 70.0).abs() < 1e-9);

        let in_process = CpuPerCall::between(at(100, 1_000), at(300, 1_500), 10_000, true).unwrap();
        assert_eq!(in_process.server_us_per_call, None);
        assert_eq!(
            in_process.total_us_per_call,
            Some(in_process.load_generator_us_per_call)
        );

        let unknown_server = CpuSample {
            load_generator: Duration::from_millis(300),
            server: None,
        };
        let client_only = CpuPerCall::between(at(100, 1_000), unknown_server, 100, false).unwrap();
        assert_eq!(client_only.server_us_per_call, None);
        assert_eq!(client_only.total_us_per_call, None);
        assert_eq!(CpuPerCall::between(at(0, 0), at(1, 1), 0, false), None);
    }
}
