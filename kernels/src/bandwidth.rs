//! Memory read bandwidth probe: a STREAM-like parallel SIMD sum, the yardstick for scan speed.
//!
//! A single-query scan reads every row once and is bound by memory bandwidth, so its speed is
//! judged against the fastest plain read of the same bytes on the same threads.

use std::time::Instant;

use rayon::prelude::*;
use wide::f32x8;

use crate::error::KernelError;
use crate::pool::ScoringPool;

/// Sum of `data` with eight independent f32x8 accumulators (a pure streaming read).
pub fn sum(data: &[f32]) -> f32 {
    let (blocks, rest) = data.as_chunks::<64>();
    let mut acc = [f32x8::ZERO; 8];
    for block in blocks {
        let (vectors, _) = block.as_chunks::<8>();
        for (a, v) in acc.iter_mut().zip(vectors) {
            *a += f32x8::new(*v);
        }
    }
    let total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    total.to_array().iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// [`sum`] split into one contiguous chunk per thread of the current rayon pool.
pub fn par_sum(data: &[f32]) -> f32 {
    let threads = rayon::current_num_threads().max(1);
    let chunk = data.len().div_ceil(threads).next_multiple_of(64).max(64);
    data.par_chunks(chunk).map(sum).sum()
}

/// Best read bandwidth, in GB/s (1e9 bytes per second), of [`par_sum`] over a fresh buffer of
/// `bytes` bytes (all pages touched first) on `threads` threads (`0` = all cores), best of
/// `repeats` runs (at least one).
///
/// Use a buffer several times larger than the last-level cache to measure DRAM bandwidth.
pub fn measure_read_bandwidth_gbps(
    bytes: usize,
    threads: usize,
    repeats: usize,
) -> Result<f64, KernelError> {
    let pool = ScoringPool::new(threads)?;
    let data = vec![1.0f32; bytes / std::mem::size_of::<f32>()];
    let payload = (data.len() * std::mem::size_of::<f32>()) as f64;
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        let total = pool.install(|| par_sum(&data));
        let seconds = start.elapsed().as_secs_f64();
        std::hint::black_box(total);
        best = best.min(seconds);
    }
    Ok(payload / best.max(1e-12) / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_match_a_plain_sum() {
        // Integers keep every partial sum exact.
        let data: Vec<f32> = (0..1000).map(|i| (i % 17) as f32).collect();
        let expected: f32 = data.iter().sum();
        assert_eq!(sum(&data), expected);
        assert_eq!(
            ScoringPool::new(3).unwrap().install(|| par_sum(&data)),
            expected
        );
        assert_eq!(par_sum(&[]), 0.0);
    }

    #[test]
    fn bandwidth_is_positive() {
        let gbps = measure_read_bandwidth_gbps(1 << 20, 2, 2).unwrap();
        assert!(gbps.is_finite() && gbps > 0.0);
    }
}
