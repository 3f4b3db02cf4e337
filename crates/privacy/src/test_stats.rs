//! Test-only statistics: chi-square goodness of fit with exact critical values, binomial and
//! mean z-tests, and the Kolmogorov–Smirnov statistic with the DKW critical value.
//!
//! All tests run at tiny significance levels (around `1e-6`) with fixed seeds, so they do not
//! flake, while a wrong distribution still fails them by a wide margin.

/// Regularized upper incomplete gamma function `Q(a, x)` (series for `x < a + 1`, Lentz
/// continued fraction otherwise; Numerical Recipes §6.2).
pub(crate) fn regularized_gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let log_prefactor = -x + a * x.ln() - libm::lgamma(a);
    if x < a + 1.0 {
        let mut term = 1.0 / a;
        let mut sum = term;
        let mut denominator = a;
        for _ in 0..10_000 {
            denominator += 1.0;
            term *= x / denominator;
            sum += term;
            if term.abs() < sum.abs() * 1e-17 {
                break;
            }
        }
        1.0 - sum * log_prefactor.exp()
    } else {
        const TINY: f64 = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / TINY;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -f64::from(i) * (f64::from(i) - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < TINY {
                d = TINY;
            }
            c = b + an / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        log_prefactor.exp() * h
    }
}

/// `P[X > statistic]` for a chi-square variable with `degrees` degrees of freedom.
pub(crate) fn chi_square_survival(statistic: f64, degrees: usize) -> f64 {
    regularized_gamma_q(0.5 * degrees as f64, 0.5 * statistic)
}

/// The exact critical value `x` with `P[X > x] = alpha` (bisection on the survival function).
pub(crate) fn chi_square_critical(degrees: usize, alpha: f64) -> f64 {
    let mut lo = 0.0;
    let mut hi = degrees as f64 + 10.0;
    while chi_square_survival(hi, degrees) > alpha {
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if chi_square_survival(mid, degrees) > alpha {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

/// Chi-square goodness-of-fit test of `observed` counts against `probabilities` (same order;
/// they must sum to 1). Adjacent cells are merged until each expects at least 5 hits.
pub(crate) fn assert_chi_square(observed: &[u64], probabilities: &[f64], alpha: f64) {
    assert_eq!(observed.len(), probabilities.len());
    let total_probability: f64 = probabilities.iter().sum();
    assert!(
        (total_probability - 1.0).abs() < 1e-9,
        "probabilities sum to {total_probability}"
    );
    let draws: u64 = observed.iter().sum();
    let n = draws as f64;
    let mut cells: Vec<(f64, f64)> = Vec::new();
    let (mut pending_observed, mut pending_expected) = (0.0, 0.0);
    for (&count, &probability) in observed.iter().zip(probabilities) {
        assert!(
            count == 0 || probability > 0.0,
            "observed {count} hits in a cell of probability 0"
        );
        pending_observed += count as f64;
        pending_expected += probability * n;
        if pending_expected >= 5.0 {
            cells.push((pending_observed, pending_expected));
            (pending_observed, pending_expected) = (0.0, 0.0);
        }
    }
    if let Some(last) = cells.last_mut() {
        last.0 += pending_observed;
        last.1 += pending_expected;
    }
    assert!(cells.len() >= 2, "too few cells for a chi-square test");
    let statistic: f64 = cells
        .iter()
        .map(|(observed, expected)| (observed - expected).powi(2) / expected)
        .sum();
    let degrees = cells.len() - 1;
    let critical = chi_square_critical(degrees, alpha);
    assert!(
        statistic <= critical,
        "chi-square {statistic:.2} exceeds the critical value {critical:.2} \
         (df {degrees}, alpha {alpha:e}, p = {:e})",
        chi_square_survival(statistic, degrees)
    );
}

/// Binomial z-test: `successes` out of `trials` against success probability `probability`.
pub(crate) fn assert_z_within(successes: f64, trials: f64, probability: f64, max_z: f64) {
    let mean = trials * probability;
    let deviation = (trials * probability * (1.0 - probability)).sqrt();
    let z = (successes - mean) / deviation;
    assert!(
        z.abs() <= max_z,
        "z = {z:.2}: {successes} successes of {trials}, expected {mean:.1}"
    );
}

/// z-test of a sample mean against the exact mean and variance of the distribution.
pub(crate) fn assert_mean_within(samples: &[f64], mean: f64, variance: f64, max_z: f64) {
    let n = samples.len() as f64;
    let sample_mean = samples.iter().sum::<f64>() / n;
    let z = (sample_mean - mean) / (variance / n).sqrt();
    assert!(
        z.abs() <= max_z,
        "z = {z:.2}: sample mean {sample_mean}, expected {mean}"
    );
}

/// Kolmogorov–Smirnov test against a continuous CDF, with the Dvoretzky–Kiefer–Wolfowitz
/// (Massart) critical value `sqrt(ln(2/alpha) / (2n))`, valid for every `n`.
pub(crate) fn assert_kolmogorov_smirnov(samples: &mut [f64], cdf: impl Fn(f64) -> f64, alpha: f64) {
    samples.sort_by(f64::total_cmp);
    let n = samples.len() as f64;
    let mut statistic: f64 = 0.0;
    for (index, &x) in samples.iter().enumerate() {
        let value = cdf(x);
        let below = index as f64 / n;
        let above = (index + 1) as f64 / n;
        statistic = statistic
            .max((value - below).abs())
            .max((above - value).abs());
    }
    let critical = ((2.0 / alpha).ln() / (2.0 * n)).sqrt();
    assert!(
        statistic <= critical,
        "KS statistic {statistic:.5} exceeds {critical:.5}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chi_square_critical_values_match_tables() {
        // df = 2 has the closed form P[X > x] = exp(-x/2).
        assert!((chi_square_critical(2, 1e-6) - (-2.0 * 1e-6_f64.ln())).abs() < 1e-9);
        assert!((chi_square_critical(1, 0.05) - 3.841_458_820_694_124).abs() < 1e-9);
        assert!((chi_square_critical(10, 0.01) - 23.209_251_158_954_356).abs() < 1e-8);
        assert!((chi_square_critical(100, 0.001) - 149.449_252_779_307_5).abs() < 1e-7);
    }

    #[test]
    #[should_panic(expected = "chi-square")]
    fn chi_square_rejects_a_wrong_distribution() {
        assert_chi_square(&[600, 400], &[0.5, 0.5], 1e-6);
    }

    #[test]
    #[should_panic(expected = "KS statistic")]
    fn kolmogorov_smirnov_rejects_a_wrong_distribution() {
        let mut samples: Vec<f64> = (0..1000).map(|i| f64::from(i) / 2000.0).collect();
        assert_kolmogorov_smirnov(&mut samples, |x| x.clamp(0.0, 1.0), 1e-6);
    }
}
