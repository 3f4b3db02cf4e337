//! The cryptographically secure random generator every mechanism draws from.
//!
//! Differential privacy assumes the noise is unpredictable to the adversary. `SecureRng` is
//! ChaCha20 (256-bit key) seeded from the operating system; create one per worker thread
//! with [`SecureRng::from_os`] and never share or clone it. Fixed seeds exist only for tests
//! and, behind the `seeded` cargo feature, for reproducible offline runs (e.g. the CLI's
//! `--seed` flag): a seeded generator provides no privacy at all.

use rand::{CryptoRng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::{PrivacyError, Result};

/// ChaCha20 generator seeded from the operating system (one per worker).
///
/// Implements [`RngCore`] and [`CryptoRng`], so it can be passed to every sampler in this
/// crate. It is deliberately not `Clone`: two copies would produce the same noise twice.
pub struct SecureRng {
    inner: ChaCha20Rng,
}

impl std::fmt::Debug for SecureRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key or the stream position.
        f.write_str("SecureRng { .. }")
    }
}

impl SecureRng {
    /// Seeds a fresh ChaCha20 generator with 256 bits from the operating system.
    ///
    /// # Errors
    /// [`PrivacyError::OsRandomness`] if the OS random source is unavailable.
    pub fn from_os() -> Result<Self> {
        let inner = ChaCha20Rng::try_from_os_rng()
            .map_err(|error| PrivacyError::OsRandomness(error.to_string()))?;
        Ok(Self { inner })
    }

    /// A deterministic generator for tests and reproducible offline runs.
    ///
    /// Only compiled in tests or with the `seeded` feature. Output is predictable from the
    /// seed, so anything released with it has **no** privacy.
    #[cfg(any(test, feature = "seeded"))]
    pub fn from_seed(seed: u64) -> Self {
        Self {
            inner: ChaCha20Rng::seed_from_u64(seed),
        }
    }
}

impl RngCore for SecureRng {
    fn next_u32(&mut self) -> u32 {
        self.inner.next_u32()
    }

    fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        self.inner.fill_bytes(dst);
    }
}

impl CryptoRng for SecureRng {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_seeded_generators_differ() -> Result<()> {
        let mut first = SecureRng::from_os()?;
        let mut second = SecureRng::from_os()?;
        let a: Vec<u64> = (0..4).map(|_| first.next_u64()).collect();
        let b: Vec<u64> = (0..4).map(|_| second.next_u64()).collect();
        assert_ne!(a, b);
        Ok(())
    }

    #[test]
    fn seeded_generators_are_reproducible_and_seed_dependent() {
        let mut first = SecureRng::from_seed(7);
        let mut again = SecureRng::from_seed(7);
        let mut other = SecureRng::from_seed(8);
        let a: Vec<u64> = (0..4).map(|_| first.next_u64()).collect();
        let b: Vec<u64> = (0..4).map(|_| again.next_u64()).collect();
        let c: Vec<u64> = (0..4).map(|_| other.next_u64()).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn debug_output_hides_state() {
        let rng = SecureRng::from_seed(1);
        assert_eq!(format!("{rng:?}"), "SecureRng { .. }");
    }
}
