//! The calling thread's CPU time, for benches that time CPU work rather than wall time (a
//! shared, loaded machine stretches wall time, not a thread's own CPU time).

/// CPU time used so far by the calling thread, in nanoseconds.
pub fn thread_cpu_nanos() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` writes one `timespec` through the valid, exclusive pointer it is
    // given and reads nothing else; `CLOCK_THREAD_CPUTIME_ID` exists on every Linux.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut now) };
    assert_eq!(status, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::thread_cpu_nanos;

    #[test]
    fn thread_cpu_time_advances_with_work() {
        let started = thread_cpu_nanos();
        let mut sum = 0u64;
        let mut spins = 0u64;
        while thread_cpu_nanos() == started {
            for value in 0..10_000u64 {
                sum = std::hint::black_box(sum.wrapping_add(value));
            }
            spins += 1;
            assert!(spins < 10_000_000, "thread CPU time never advanced");
        }
        assert!(thread_cpu_nanos() > started);
    }
}
