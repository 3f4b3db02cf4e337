//! End-to-end tests of `fairrank privacy calibrate|convert|topk` against the formulas and the
//! privacy crate.

use std::process::{Command, Output};

use serde_json::Value;

fn fairrank(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fairrank"))
        .args(args)
        .output()
        .expect("the fairrank binary runs")
}

fn json(args: &[&str]) -> Value {
    let output = fairrank(args);
    assert!(output.status.success(), "{args:?}: {output:?}");
    serde_json::from_slice(&output.stdout).expect("one JSON object")
}

fn number(value: &Value, key: &str) -> f64 {
    value[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} in {value}"))
}

/// Standard normal CDF by composite Simpson integration of the density (independent of the
/// erfc the privacy crate uses); accurate to ~1e-13 absolute here.
fn normal_cdf(x: f64) -> f64 {
    let density = |t: f64| (-0.5 * t * t).exp() / (2.0 * std::f64::consts::PI).sqrt();
    let (low, steps) = (-40.0_f64, 200_000);
    if x <= low {
        return 0.0;
    }
    let h = (x - low) / steps as f64;
    let mut sum = density(low) + density(x);
    for i in 1..steps {
        let weight = if i % 2 == 1 { 4.0 } else { 2.0 };
        sum += weight * density(low + i as f64 * h);
    }
    sum * h / 3.0
}

/// delta of the Gaussian mechanism (Balle & Wang 2018, Theorem 8).
fn gaussian_delta(sigma: f64, epsilon: f64, sensitivity: f64) -> f64 {
    let a = sensitivity / (2.0 * sigma);
    let b = epsilon * sigma / sensitivity;
    normal_cdf(a - b) - epsilon.exp() * normal_cdf(-a - b)
}

#[test]
fn laplace_scale_is_sensitivity_over_epsilon() {
    let answer = json(&[
        "privacy",
        "calibrate",
        "--mechanism",
        "laplace",
        "--epsilon",
        "0.5",
        "--sensitivity",
        "2",
    ]);
    let scale = number(&answer, "scale");
    assert!((4.0..=4.0 * (1.0 + 1e-15)).contains(&scale), "{scale}");
    assert!(
        (number(&answer, "rho") - 0.125).abs() < 1e-15,
        "rho = eps^2 / 2"
    );
    let with_delta = fairrank(&[
        "privacy",
        "calibrate",
        "--mechanism",
        "laplace",
        "--epsilon",
        "0.5",
        "--delta",
        "1e-5",
        "--sensitivity",
        "2",
    ]);
    assert!(!with_delta.status.success());
}

#[test]
fn gaussian_scale_is_the_smallest_sigma_meeting_delta() {
    for (epsilon, delta, sensitivity) in [(1.0, 1e-5, 1.0), (0.3, 1e-6, 2.5), (4.0, 1e-3, 0.5)] {
        let args = [
            "privacy".to_string(),
            "calibrate".to_string(),
            "--mechanism".to_string(),
            "gaussian".to_string(),
            "--epsilon".to_string(),
            epsilon.to_string(),
            "--delta".to_string(),
            delta.to_string(),
            "--sensitivity".to_string(),
            sensitivity.to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let answer = json(&args);
        let sigma = number(&answer, "scale");
        assert!(gaussian_delta(sigma, epsilon, sensitivity) <= delta * (1.0 + 1e-6));
        assert!(
            gaussian_delta(sigma * 0.999, epsilon, sensitivity) > delta,
            "not minimal"
        );
        if epsilon < 1.0 {
            let classic = (2.0 * (1.25 / delta).ln()).sqrt() * sensitivity / epsilon;
            assert!(sigma < classic, "analytic beats the classic formula");
        }
        let rho = sensitivity * sensitivity / (2.0 * sigma * sigma);
        assert!((number(&answer, "rho") - rho).abs() <= 1e-12 * rho);
    }
    let missing = fairrank(&[
        "privacy",
        "calibrate",
        "--mechanism",
        "gaussian",
        "--epsilon",
        "1",
        "--sensitivity",
        "1",
    ]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--delta"));
}

#[test]
fn convert_matches_the_privacy_crate_and_is_monotone() {
    let mut previous = 0.0;
    for rho in [0.001, 0.01, 0.1, 0.5, 1.0, 3.0] {
        let answer = json(&[
            "privacy",
            "convert",
            "--rho",
            &rho.to_string(),
            "--delta",
            "1e-6",
        ]);
        let epsilon = number(&answer, "epsilon");
        // serde_json's float parsing may differ from the printed value in the last bit.
        let expected = privacy::rho_to_epsilon(rho, 1e-6).expect("valid");
        assert!((epsilon - expected).abs() <= 4.0 * f64::EPSILON * expected);
        assert!(epsilon > previous, "epsilon grows with rho");
        let bun_steinke = rho + 2.0 * (rho * (1e6_f64).ln()).sqrt();
        assert!(epsilon <= bun_steinke * (1.0 + 1e-12));
        previous = epsilon;
    }
    let looser = json(&["privacy", "convert", "--rho", "0.5", "--delta", "1e-3"]);
    let tighter = json(&["privacy", "convert", "--rho", "0.5", "--delta", "1e-9"]);
    assert!(number(&looser, "epsilon") < number(&tighter, "epsilon"));
    assert!(
        !fairrank(&["privacy", "convert", "--rho", "0.5", "--delta", "2"])
            .status
            .success()
    );
}

#[test]
fn topk_counts_sum_to_repeat_and_favor_the_top_score() {
    let args = [
        "privacy",
        "topk",
        "--scores",
        "3,2,1,0",
        "--epsilon",
        "1",
        "--sensitivity",
        "1",
        "--k",
        "2",
        "--repeat",
        "4000",
        "--seed",
        "11",
    ];
    let answer = json(&args);
    let counts: Vec<Vec<u64>> =
        serde_json::from_value(answer["position_counts"].clone()).expect("counts");
    assert_eq!(counts.len(), 2);
    for row in &counts {
        assert_eq!(row.len(), 4);
        assert_eq!(row.iter().sum::<u64>(), 4000);
    }
    assert!(counts[0][0] > counts[0][1] && counts[0][1] > counts[0][2]);
    assert!(counts[0][2] > counts[0][3]);
    // First pick ~ softmax(score / (2 sensitivity / epsilon)): compare within 5 standard errors.
    let weights: Vec<f64> = [3.0_f64, 2.0, 1.0, 0.0]
        .iter()
        .map(|s| (s / 2.0).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    for (index, weight) in weights.iter().enumerate() {
        let p = weight / total;
        let expected = 4000.0 * p;
        let tolerance = 5.0 * (4000.0 * p * (1.0 - p)).sqrt();
        assert!(
            (counts[0][index] as f64 - expected).abs() < tolerance,
            "{index}: {counts:?}"
        );
    }
    assert_eq!(json(&args), answer, "the same seed gives the same counts");
    let negative = json(&[
        "privacy",
        "topk",
        "--scores",
        "-1,2,-3.5",
        "--epsilon",
        "2",
        "--sensitivity",
        "1",
        "--k",
        "3",
        "--repeat",
        "500",
        "--seed",
        "2",
    ]);
    let counts: Vec<Vec<u64>> =
        serde_json::from_value(negative["position_counts"].clone()).expect("counts");
    assert_eq!(counts.len(), 3);
    assert!(
        counts[0][1] > counts[0][0] && counts[0][0] > counts[0][2],
        "{counts:?}"
    );
    let bad = fairrank(&[
        "privacy",
        "topk",
        "--scores",
        "3,x",
        "--epsilon",
        "1",
        "--sensitivity",
        "1",
        "--k",
        "1",
    ]);
    assert!(!bad.status.success());
}
