//! Differential-privacy calibration, samplers, DP top-k selection and zCDP accounting.
//!
//! This crate is the pure-math half of fairrank's privacy support: no I/O, no project
//! dependencies, randomness injected by the caller. Everything that draws noise takes a
//! `&mut R` with `R: CryptoRng`; in production that is a [`SecureRng`] (ChaCha20 seeded from
//! the OS) owned by each worker thread.
//!
//! # Overview
//!
//! - **Sensitivity** ([`clip_to_norm`], [`score_sensitivity`]): clip the user embedding to
//!   norm `C_u`; scores `<u, v>` with `||v|| <= C_v` then have sensitivity
//!   `(2 C_u C_v + n 2^-149) (1 + gamma_n)`, where `gamma_n` bounds the f32 dot-product
//!   rounding and `n 2^-149` the products that underflow to f32 subnormals.
//! - **Selection** ([`GumbelTopK`], [`gumbel_top_k`], [`position_counts`]): the DP pool is
//!   chosen by one-shot Gumbel top-k, equal in distribution to `k` rounds of the exponential
//!   mechanism (Durfee & Rogers 2019). Only an order of indices is released. Noise is
//!   pre-generated into a per-worker [`NoiseBuffer`].
//! - **Releasing numbers** ([`release_laplace`], [`release_gaussian`], [`LaplaceRelease`],
//!   [`GaussianRelease`]): round to a `2^-k` grid and add exact discrete Laplace or discrete
//!   Gaussian noise sampled with integer arithmetic only (Canonne, Kamath & Steinke 2020), so
//!   the floating-point attacks of Mironov 2012 do not apply.
//! - **Calibration** ([`calibrate_laplace`], [`calibrate_gaussian`]): Laplace scale and the
//!   analytic Gaussian mechanism (Balle & Wang 2018) with a certified `delta`.
//! - **Accounting** ([`rho_gaussian`], [`rho_pure_dp`], [`rho_exponential_pick`],
//!   [`rho_gumbel_top_k`], [`rho_to_epsilon`], [`zcdp_delta`], [`rho_for_epsilon`]): costs in
//!   zCDP, which add up, and the tight conversion to `(epsilon, delta)` of Canonne, Kamath &
//!   Steinke 2020 (the Bun–Steinke bound [`rho_to_epsilon_bun_steinke`] is kept as a
//!   documented upper bound).
//!
//! Each mechanism's documentation has a `# Privacy` section stating its guarantee.
//!
//! # Example
//!
//! ```
//! use privacy::{SecureRng, clip_to_norm, score_sensitivity, gumbel_top_k, rho_gumbel_top_k,
//!     rho_to_epsilon, release_laplace};
//!
//! # fn main() -> Result<(), privacy::PrivacyError> {
//! let mut rng = SecureRng::from_os()?;
//!
//! // Clip the user embedding and derive the score sensitivity.
//! let mut user = vec![0.6_f32, -0.8, 1.5];
//! clip_to_norm(&mut user, 1.0)?;
//! let sensitivity = score_sensitivity(1.0, 1.0, user.len())?;
//!
//! // Privately select an ordered pool of 2 out of 4 scored items.
//! let scores = [0.9_f32, 0.1, 0.5, -0.3];
//! let mut pool = Vec::new();
//! gumbel_top_k(&scores, 0.5, sensitivity, 2, &mut rng, &mut pool)?;
//! assert_eq!(pool.len(), 2);
//!
//! // Account for it and report (epsilon, delta).
//! let rho = rho_gumbel_top_k(0.5, pool.len())?;
//! let epsilon = rho_to_epsilon(rho, 1e-6)?;
//! assert!(epsilon > 0.0);
//!
//! // Release a count with discrete Laplace noise on the integer grid (k = 0).
//! let noisy = release_laplace(42.0, 2.0, 0, &mut rng)?;
//! assert_eq!(noisy, noisy.trunc());
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! `seeded` exposes `SecureRng::from_seed` outside tests for reproducible offline runs
//! (such as a CLI `--seed` flag). Seeded output carries no privacy; never enable it in a
//! serving build.

mod accounting;
mod calibration;
mod discrete;
mod error;
mod exact;
mod noise;
mod release;
mod rng;
mod sensitivity;
mod special;
#[cfg(test)]
mod test_stats;
mod topk;

pub use accounting::{
    rho_exponential_pick, rho_for_epsilon, rho_gaussian, rho_gumbel_top_k, rho_pure_dp,
    rho_to_epsilon, rho_to_epsilon_bun_steinke, sigma_for_rho, zcdp_delta,
};
pub use calibration::{
    calibrate_gaussian, calibrate_laplace, classic_gaussian_sigma, gaussian_delta, gaussian_epsilon,
};
pub use discrete::{
    DiscreteGaussian, DiscreteLaplace, MAX_GAUSSIAN_SIGMA, MAX_LAPLACE_SCALE, MAX_NOISE_MAGNITUDE,
    MIN_GAUSSIAN_SIGMA, MIN_LAPLACE_SCALE,
};
pub use error::{PrivacyError, Result};
pub use noise::{NoiseBuffer, NoiseSampler, StandardGumbel};
pub use release::{
    GaussianRelease, GridNoise, LaplaceRelease, MAX_GRID_K, MIN_GRID_K, grid_sensitivity,
    release_gaussian, release_laplace, round_to_grid,
};
pub use rng::SecureRng;
pub use sensitivity::{MAX_SCORE_DIMENSION, clip_to_norm, f32_dot_error_factor, score_sensitivity};
pub use topk::{ExponentialMechanism, GumbelTopK, Monotonicity, gumbel_top_k, position_counts};
