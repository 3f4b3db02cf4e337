//! Deterministic random streams of the synthetic generator: ChaCha20 keyed by the seed, one
//! stream per purpose and row, and samplers written here so output never depends on `rand`'s
//! distribution code (which has changed between versions) or on the platform's `libm`.

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

use crate::portable_math;

/// Fills bytes 8..32 of the ChaCha20 key (bytes 0..8 are the seed), separating our streams from
/// any other use of the same seed.
const KEY_DOMAIN: &[u8; 24] = b"fairrank/synthetic/v1\0\0\0";

/// Largest row index a per-row stream can address (the top 8 bits of the stream id hold the
/// purpose).
pub(crate) const MAX_STREAM_INDEX: u64 = (1 << 56) - 1;

/// What a random stream is used for; each purpose has its own independent ChaCha20 streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamPurpose {
    /// Shuffle assigning group labels to items.
    GroupShuffle = 1,
    /// Shuffle assigning popularity ranks to items.
    PopularityShuffle = 2,
    /// True latent vector of one item.
    ItemLatent = 3,
    /// Observation noise of one item's embedding.
    ItemNoise = 4,
    /// Latent vector of one user.
    UserVector = 5,
}

/// The ChaCha20 stream of `purpose` and row `index` under `seed`.
///
/// `index` must not exceed [`MAX_STREAM_INDEX`]; larger values are masked (callers validate).
pub(crate) fn stream(seed: u64, purpose: StreamPurpose, index: u64) -> ChaCha20Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..].copy_from_slice(KEY_DOMAIN);
    let mut rng = ChaCha20Rng::from_seed(key);
    rng.set_stream(((purpose as u64) << 56) | (index & MAX_STREAM_INDEX));
    rng
}

/// A uniform value in [-1, 1) on a grid of 2^-52, from the top 53 bits of one `u64`.
fn uniform_symmetric(rng: &mut impl RngCore) -> f64 {
    let bits = rng.next_u64() >> 11;
    bits as f64 * (1.0 / (1u64 << 52) as f64) - 1.0
}

/// Fills `out` with independent normal values of mean 0 and standard deviation `std_dev`
/// (Marsaglia's polar method, scaled and rounded to f32).
///
/// Values are produced in pairs; for an odd length the last pair's second value is dropped, so
/// the output for a given stream depends only on `out.len()` and `std_dev`.
pub(crate) fn fill_normal(rng: &mut impl RngCore, std_dev: f64, out: &mut [f32]) {
    for pair in out.chunks_mut(2) {
        let (first, second) = standard_normal_pair(rng);
        pair[0] = (first * std_dev) as f32;
        if let Some(slot) = pair.get_mut(1) {
            *slot = (second * std_dev) as f32;
        }
    }
}

/// Two independent standard normal values (Marsaglia's polar method).
fn standard_normal_pair(rng: &mut impl RngCore) -> (f64, f64) {
    loop {
        let u = uniform_symmetric(rng);
        let v = uniform_symmetric(rng);
        let s = u * u + v * v;
        if s > 0.0 && s < 1.0 {
            let factor = (-2.0 * portable_math::ln(s) / s).sqrt();
            return (u * factor, v * factor);
        }
    }
}

/// A uniform integer in `0..bound` (Lemire's multiply-and-reject; a zero bound acts as 1).
pub(crate) fn uniform_below(rng: &mut impl RngCore, bound: u64) -> u64 {
    let bound = bound.max(1);
    let mut product = u128::from(rng.next_u64()) * u128::from(bound);
    let mut low = product as u64;
    if low < bound {
        let threshold = bound.wrapping_neg() % bound;
        while low < threshold {
            product = u128::from(rng.next_u64()) * u128::from(bound);
            low = product as u64;
        }
    }
    (product >> 64) as u64
}

/// Uniform random permutation of `values` (Fisher-Yates, from the last position down).
pub(crate) fn shuffle<T>(rng: &mut impl RngCore, values: &mut [T]) {
    for position in (1..values.len()).rev() {
        let other = uniform_below(rng, position as u64 + 1) as usize;
        values.swap(position, other);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_independent() {
        let mut a = stream(7, StreamPurpose::ItemLatent, 3);
        let mut b = stream(7, StreamPurpose::ItemLatent, 3);
        let first: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let second: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        assert_eq!(first, second);
        for other in [
            stream(8, StreamPurpose::ItemLatent, 3),
            stream(7, StreamPurpose::ItemNoise, 3),
            stream(7, StreamPurpose::ItemLatent, 4),
        ] {
            let mut other = other;
            let values: Vec<u64> = (0..8).map(|_| other.next_u64()).collect();
            assert_ne!(first, values);
        }
    }

    #[test]
    fn normal_sampler_has_standard_moments() {
        let mut rng = stream(1, StreamPurpose::UserVector, 0);
        let mut samples = vec![0.0_f32; 200_001];
        fill_normal(&mut rng, 1.0, &mut samples);
        let values: Vec<f64> = samples.iter().map(|&v| f64::from(v)).collect();
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let fourth = values.iter().map(|v| (v - mean).powi(4)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((variance - 1.0).abs() < 0.02, "variance {variance}");
        assert!(
            (fourth / (variance * variance) - 3.0).abs() < 0.1,
            "kurtosis"
        );
        let beyond_two = values.iter().filter(|v| v.abs() > 2.0).count() as f64 / n;
        assert!(
            (beyond_two - 0.0455).abs() < 0.003,
            "tail mass {beyond_two}"
        );
    }

    #[test]
    fn uniform_below_is_in_range_and_unbiased() {
        let mut rng = stream(2, StreamPurpose::GroupShuffle, 0);
        let mut counts = [0usize; 7];
        for _ in 0..70_000 {
            let value = uniform_below(&mut rng, 7);
            counts[value as usize] += 1;
        }
        for count in counts {
            assert!((9_400..10_600).contains(&count), "{counts:?}");
        }
        assert_eq!(uniform_below(&mut rng, 1), 0);
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut rng = stream(3, StreamPurpose::PopularityShuffle, 0);
        let mut values: Vec<u32> = (0..1000).collect();
        shuffle(&mut rng, &mut values);
        assert_ne!(values, (0..1000).collect::<Vec<_>>());
        values.sort_unstable();
        assert_eq!(values, (0..1000).collect::<Vec<_>>());
    }
}
