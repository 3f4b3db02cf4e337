//! A rayon thread pool for the parallel kernels, so callers need not depend on rayon.

use crate::error::KernelError;

/// A dedicated thread pool on which [`crate::par_scan_topk`] and [`crate::batch_topk`] run
/// when called inside [`ScoringPool::install`].
#[derive(Debug)]
pub struct ScoringPool {
    pool: rayon::ThreadPool,
}

impl ScoringPool {
    /// A pool of `threads` threads; `0` means one per available core.
    pub fn new(threads: usize) -> Result<Self, KernelError> {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("fairrank-score-{i}"))
            .build()
            .map(|pool| Self { pool })
            .map_err(|e| KernelError::ThreadPool {
                threads,
                reason: e.to_string(),
            })
    }

    /// Number of threads in the pool.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Runs `op` inside the pool: parallel kernels called from `op` use this pool's threads.
    pub fn install<R: Send>(&self, op: impl FnOnce() -> R + Send) -> R {
        self.pool.install(op)
    }
}

/// Number of threads of the rayon pool the calling code runs in (the global pool outside
/// [`ScoringPool::install`]).
pub fn current_threads() -> usize {
    rayon::current_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_runs_on_the_pool() {
        let pool = ScoringPool::new(3).unwrap();
        assert_eq!(pool.threads(), 3);
        assert_eq!(pool.install(current_threads), 3);
    }
}
