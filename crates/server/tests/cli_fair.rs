//! End-to-end tests of `fairrank fair mtable` against published FA*IR mtables and its
//! argument checks.

use std::process::{Command, Output};

use serde_json::{Value, json};

fn fairrank(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fairrank"))
        .args(args)
        .output()
        .expect("the fairrank binary runs")
}

fn mtable(args: &[&str]) -> Value {
    let mut full = vec!["fair", "mtable"];
    full.extend_from_slice(args);
    let output = fairrank(&full);
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("one JSON object")
}

#[test]
fn unadjusted_mtables_match_published_tables() {
    // Zehlike et al., CIKM 2017, Table 2: alpha = 0.1, p = 0.5, k = 1..12.
    let answer = mtable(&["--k", "12", "--p", "0.5", "--alpha", "0.1", "--no-adjust"]);
    assert_eq!(
        answer["mtable"],
        json!([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4])
    );
    assert_eq!(answer["alpha"], json!(0.1));
    assert_eq!(
        answer["adjusted_alpha"],
        json!(0.1),
        "--no-adjust keeps alpha"
    );
    assert_eq!(answer["adjusted"], json!(false));
    // Testing 12 prefixes at level 0.1 fails a fair ranking more often than 0.1.
    assert!(answer["failure_probability"].as_f64().expect("number") > 0.1);
    // fairsearch-fair-python test case (k = 10, p = 0.2, alpha = 0.15).
    let answer = mtable(&["--k", "10", "--p", "0.2", "--alpha", "0.15", "--no-adjust"]);
    assert_eq!(answer["mtable"], json!([0, 0, 0, 0, 0, 0, 0, 0, 1, 1]));
}

#[test]
fn adjusted_mtable_keeps_the_exact_failure_probability_below_alpha() {
    let adjusted = mtable(&["--k", "12", "--p", "0.5", "--alpha", "0.1"]);
    let plain = mtable(&["--k", "12", "--p", "0.5", "--alpha", "0.1", "--no-adjust"]);
    assert_eq!(adjusted["adjusted"], json!(true));
    let failure = adjusted["failure_probability"].as_f64().expect("number");
    let level = adjusted["adjusted_alpha"].as_f64().expect("number");
    assert!(failure <= 0.1, "{failure}");
    assert!(level > 0.0 && level <= 0.1, "{level}");
    let (adjusted, plain) = (
        adjusted["mtable"].as_array().expect("array").clone(),
        plain["mtable"].as_array().expect("array").clone(),
    );
    assert_eq!(adjusted.len(), 12);
    for (a, p) in adjusted.iter().zip(&plain) {
        assert!(
            a.as_u64() <= p.as_u64(),
            "a lower level never requires more"
        );
    }
}

#[test]
fn bad_arguments_exit_with_status_2_and_say_why() {
    for (args, needle) in [
        (
            vec!["--k", "10", "--p", "1.5", "--alpha", "0.1"],
            "between 0 and 1",
        ),
        (
            vec!["--k", "10", "--p", "0.5", "--alpha", "0"],
            "between 0 and 1",
        ),
        (vec!["--k", "10", "--p", "0.5", "--alpha", "0.7"], "alpha"),
        (vec!["--k", "0", "--p", "0.5", "--alpha", "0.1"], "0"),
        (
            vec!["--k", "10001", "--p", "0.5", "--alpha", "0.1"],
            "10001",
        ),
        (vec!["--k", "10", "--p", "abc", "--alpha", "0.1"], "abc"),
    ] {
        let mut full = vec!["fair", "mtable"];
        full.extend_from_slice(&args);
        let output = fairrank(&full);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty());
    }
}
