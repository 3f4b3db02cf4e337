//! Criterion benchmarks for the `privacy` crate: DP top-k selection, exact discrete samplers,
//! grid releases, calibration and accounting.
//!
//! Targets (issue 5): Gumbel top-10 of 1000 under 15 us per request with pre-generated noise,
//! discrete Laplace under 1 us per sample. The "fresh noise" variant shows what the noise
//! buffer saves; `gumbel_noise/refill_1000` is the off-path cost of generating that noise.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use privacy::{
    DiscreteGaussian, DiscreteLaplace, ExponentialMechanism, GumbelTopK, LaplaceRelease,
    NoiseBuffer, SecureRng, StandardGumbel, calibrate_gaussian, clip_to_norm, gumbel_top_k,
    rho_to_epsilon, zcdp_delta,
};
use rand::RngCore;

/// Candidates per request and pool size of the headline benchmark.
const CANDIDATES: usize = 1_000;
const POOL: usize = 10;

/// Requests served from one buffer fill in the pre-generated-noise benchmark.
const REQUESTS_PER_FILL: u64 = 256;

fn rng() -> SecureRng {
    SecureRng::from_os().expect("the OS random source is available")
}

/// Deterministic, spread-out scores (no randomness needed for the input).
fn scores(count: usize) -> Vec<f32> {
    (0..count)
        .map(|i| ((i * 7_919) % 1_000) as f32 / 1_000.0)
        .collect()
}

fn bench_gumbel_top_k(c: &mut Criterion) {
    let scores = scores(CANDIDATES);
    let mechanism = ExponentialMechanism::new(0.5, 2.0).expect("valid mechanism");
    let mut group = c.benchmark_group("gumbel_top10_of_1000");

    group.bench_function("pre_generated_noise", |b| {
        let mut rng = rng();
        let capacity = CANDIDATES * REQUESTS_PER_FILL as usize;
        let mut selector = GumbelTopK::with_noise(capacity, &mut rng);
        let mut out = Vec::with_capacity(POOL);
        // Refills happen between timed batches, as a worker would do between requests.
        b.iter_custom(|iterations| {
            let mut elapsed = Duration::ZERO;
            let mut remaining = iterations;
            while remaining > 0 {
                selector.refill(&mut rng);
                let batch = remaining.min(REQUESTS_PER_FILL);
                let start = Instant::now();
                for _ in 0..batch {
                    selector
                        .select(black_box(&scores), &mechanism, POOL, &mut rng, &mut out)
                        .expect("finite scores");
                    black_box(&out);
                }
                elapsed += start.elapsed();
                remaining -= batch;
            }
            elapsed
        });
    });

    group.bench_function("fresh_noise", |b| {
        let mut rng = rng();
        let mut out = Vec::with_capacity(POOL);
        b.iter(|| {
            gumbel_top_k(black_box(&scores), 0.5, 2.0, POOL, &mut rng, &mut out)
                .expect("finite scores");
            black_box(&out);
        });
    });

    group.bench_function("pre_generated_noise_pool_100", |b| {
        let mut rng = rng();
        let capacity = CANDIDATES * REQUESTS_PER_FILL as usize;
        let mut selector = GumbelTopK::with_noise(capacity, &mut rng);
        let mut out = Vec::with_capacity(100);
        b.iter_custom(|iterations| {
            let mut elapsed = Duration::ZERO;
            let mut remaining = iterations;
            while remaining > 0 {
                selector.refill(&mut rng);
                let batch = remaining.min(REQUESTS_PER_FILL);
                let start = Instant::now();
                for _ in 0..batch {
                    selector
                        .select(black_box(&scores), &mechanism, 100, &mut rng, &mut out)
                        .expect("finite scores");
                    black_box(&out);
                }
                elapsed += start.elapsed();
                remaining -= batch;
            }
            elapsed
        });
    });
    group.finish();

    c.bench_function("gumbel_noise/refill_1000", |b| {
        let mut rng = rng();
        let mut buffer = NoiseBuffer::new(StandardGumbel, CANDIDATES);
        b.iter(|| {
            buffer.refill(&mut rng);
            black_box(buffer.take(CANDIDATES, &mut rng).len());
        });
    });
    // The reference inversion method `-ln(-ln U)` (two logarithms per sample) against the
    // sampler's ziggurat exponential and one logarithm, in the same run.
    c.bench_function("gumbel_noise/inversion_1000", |b| {
        let mut rng = rng();
        let mut out = Vec::with_capacity(CANDIDATES);
        b.iter(|| {
            out.clear();
            while out.len() < CANDIDATES {
                if let Some(sample) = StandardGumbel::from_bits(rng.next_u64()) {
                    out.push(sample);
                }
            }
            black_box(out.len());
        });
    });
}

fn bench_discrete_samplers(c: &mut Criterion) {
    let mut group = c.benchmark_group("discrete_laplace");
    for scale in [1.0, 100.0, 1e6] {
        let sampler = DiscreteLaplace::from_scale(scale).expect("valid scale");
        group.bench_with_input(BenchmarkId::new("sample", scale), &sampler, |b, sampler| {
            let mut rng = rng();
            b.iter(|| black_box(sampler.sample(&mut rng)));
        });
    }
    let rational = DiscreteLaplace::new(1_000_003, 7).expect("valid rational scale");
    group.bench_function("sample/rational_1000003_over_7", |b| {
        let mut rng = rng();
        b.iter(|| black_box(rational.sample(&mut rng)));
    });
    group.finish();

    let mut group = c.benchmark_group("discrete_gaussian");
    for sigma in [1.0, 100.0, 1e6] {
        let sampler = DiscreteGaussian::from_sigma(sigma).expect("valid sigma");
        group.bench_with_input(BenchmarkId::new("sample", sigma), &sampler, |b, sampler| {
            let mut rng = rng();
            b.iter(|| black_box(sampler.sample(&mut rng)));
        });
    }
    group.finish();

    let mut group = c.benchmark_group("release");
    let release = LaplaceRelease::new(2.0, 10).expect("valid release");
    group.bench_function("laplace_grid_2^-10", |b| {
        let mut rng = rng();
        b.iter(|| black_box(release.release(black_box(1234.5678), &mut rng)));
    });
    group.bench_function("laplace_grid_2^-10_buffered", |b| {
        let mut rng = rng();
        let mut buffer = NoiseBuffer::filled(release, 4_096, &mut rng);
        b.iter_custom(|iterations| {
            let mut elapsed = Duration::ZERO;
            let mut remaining = iterations;
            while remaining > 0 {
                buffer.refill(&mut rng);
                let batch = remaining.min(4_096);
                let start = Instant::now();
                for _ in 0..batch {
                    black_box(buffer.release(black_box(1234.5678), &mut rng)).ok();
                }
                elapsed += start.elapsed();
                remaining -= batch;
            }
            elapsed
        });
    });
    group.finish();
}

fn bench_calibration_and_accounting(c: &mut Criterion) {
    let mut group = c.benchmark_group("calibration");
    group.bench_function("analytic_gaussian_eps1_delta1e-6", |b| {
        b.iter(|| black_box(calibrate_gaussian(black_box(1.0), 1e-6, 1.0)));
    });
    group.bench_function("rho_to_epsilon_cks20", |b| {
        b.iter(|| black_box(rho_to_epsilon(black_box(0.5), 1e-6)));
    });
    group.bench_function("zcdp_delta_cks20", |b| {
        b.iter(|| black_box(zcdp_delta(black_box(0.5), 4.0)));
    });
    group.finish();

    c.bench_function("clip_to_norm/dim_128", |b| {
        let original: Vec<f32> = (0..128).map(|i| (i as f32 - 60.0) / 10.0).collect();
        let mut embedding = original.clone();
        b.iter(|| {
            embedding.copy_from_slice(&original);
            black_box(clip_to_norm(black_box(&mut embedding), 1.0)).ok();
        });
    });
}

criterion_group!(
    benches,
    bench_gumbel_top_k,
    bench_discrete_samplers,
    bench_calibration_and_accounting
);
criterion_main!(benches);
