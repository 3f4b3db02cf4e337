//! End-to-end tests of `fairrank rerank`: hand-worked FA*IR re-ranking, metrics, amortized
//! state and malformed-line handling, through the binary.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

/// Runs `fairrank rerank` with `input` on standard input.
fn rerank(input: &str) -> (Output, Vec<Value>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fairrank"))
        .arg("rerank")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the fairrank binary runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("writes the input");
    let output = child.wait_with_output().expect("finishes");
    let lines = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("every output line is JSON"))
        .collect();
    (output, lines)
}

/// Twelve majority items (group 0, scores 20..9) and six protected items (group 1, scores
/// 6..1), listed protected first so that the command has to sort them.
fn fair_case_candidates() -> Vec<Value> {
    let mut candidates = Vec::new();
    for i in 0..6 {
        candidates.push(json!({"id": format!("p{i}"), "score": 6 - i, "group": 1}));
    }
    for i in 0..12 {
        candidates.push(json!({"id": format!("a{i}"), "score": 20 - i, "group": 0}));
    }
    candidates
}

#[test]
fn fa_ir_reranks_a_hand_worked_case_with_the_published_mtable() {
    // Unadjusted mtable for k = 12, p = 0.5, alpha = 0.1 (Zehlike et al. 2017, Table 2):
    // 0 0 0 1 1 1 2 2 3 3 3 4. A protected item enters exactly where the prefix falls short
    // (positions 4, 7, 9, 12); elsewhere the better head (always a majority item here) wins.
    let request = json!({
        "k": 12,
        "constraint": {"name": "fa*ir", "p": 0.5, "alpha": 0.1, "protected": 1, "adjust_alpha": false},
        "candidates": fair_case_candidates(),
        "id": "q1",
    });
    let (output, lines) = rerank(&format!("{request}\n"));
    assert!(output.status.success(), "{output:?}");
    assert_eq!(lines.len(), 1);
    let answer = &lines[0];
    assert_eq!(
        answer["ranking"],
        json!([
            "a0", "a1", "a2", "p0", "a3", "a4", "p1", "a5", "p2", "a6", "a7", "p3"
        ])
    );
    assert_eq!(answer["satisfied"], json!(true));
    assert_eq!(answer["report"]["satisfied"], json!(true));
    assert_eq!(answer["id"], json!("q1"));
    assert_eq!(answer["line"], json!(1));
    assert!(answer.get("state").is_none(), "fa*ir is not amortized");

    // Metrics from their definitions. Gains are the scores; the reference is the top 12 by score.
    let weight = |rank: usize| 1.0 / ((rank + 1) as f64).log2();
    let answer_scores = [
        20.0, 19.0, 18.0, 6.0, 17.0, 16.0, 5.0, 15.0, 4.0, 14.0, 13.0, 3.0,
    ];
    let dcg: f64 = answer_scores
        .iter()
        .enumerate()
        .map(|(i, s)| s * weight(i + 1))
        .sum();
    let ideal: f64 = (0..12).map(|i| (20 - i) as f64 * weight(i + 1)).sum();
    let metrics = &answer["metrics"];
    let ndcg = metrics["ndcg"].as_f64().expect("ndcg");
    assert!(
        (ndcg - dcg / ideal).abs() < 1e-9,
        "{ndcg} vs {}",
        dcg / ideal
    );
    let total: f64 = (1..=12).map(weight).sum();
    let protected: f64 = [4, 7, 9, 12].iter().map(|&r| weight(r)).sum();
    let share = metrics["exposure_share"]["1"].as_f64().expect("share");
    assert!((share - protected / total).abs() < 1e-9);
    let other = metrics["exposure_share"]["0"].as_f64().expect("share");
    assert!((share + other - 1.0).abs() < 1e-9);
    // Desired distribution defaults to the candidates' shares: 12/18 and 6/18.
    let skew = metrics["skew"]["1"].as_f64().expect("skew");
    assert!((skew - ((4.0 / 12.0) / (6.0 / 18.0_f64)).ln()).abs() < 1e-9);
    assert!(metrics["ndkl"].as_f64().expect("ndkl") >= 0.0);
}

#[test]
fn score_order_is_score_descending_with_ties_in_input_order() {
    let request = json!({
        "k": 3,
        "candidates": [
            {"id": "x", "score": 1.0, "group": 0},
            {"id": "y", "score": 2.0, "group": 0},
            {"id": 7, "score": 1.0, "group": 0},
            {"id": "z", "score": 0.5, "group": 1},
        ],
    });
    let (output, lines) = rerank(&format!("{request}\n"));
    assert!(output.status.success());
    assert_eq!(lines[0]["ranking"], json!(["y", "x", 7]));
    assert_eq!(lines[0]["metrics"]["ndcg"], json!(1.0));
    // Group 1 is absent from the answer: its skew is -infinity, written as null.
    assert_eq!(lines[0]["metrics"]["skew"]["1"], Value::Null);
    assert_eq!(lines[0]["metrics"]["exposure_share"]["1"], json!(0.0));
}

#[test]
fn malformed_lines_get_error_lines_naming_line_and_field_and_the_rest_go_on() {
    let good = json!({"k": 2, "constraint": "none", "candidates": [
        {"id": "a", "score": 1, "group": 0}, {"id": "b", "score": 2, "group": 1}]});
    let bad_score = json!({"k": 2, "candidates": [
        {"id": "a", "score": 1, "group": 0}, {"id": "b", "score": 2, "group": 1},
        {"id": "c", "score": "high", "group": 1}]});
    let bad_group = json!({"k": 2, "candidates": [{"id": "a", "score": 1, "group": -1}]});
    let bad_param = json!({"k": 2, "constraint": {"name": "fa*ir", "p": 0.5, "protected": 1, "alhpa": 0.1},
        "candidates": []});
    let input = format!("{good}\n{{not json\n{bad_score}\n\n{bad_group}\n{bad_param}\n{good}\n");
    let (output, lines) = rerank(&input);
    assert_eq!(
        output.status.code(),
        Some(1),
        "any failed line makes the exit status 1"
    );
    let numbers: Vec<u64> = lines
        .iter()
        .map(|line| line["line"].as_u64().expect("line"))
        .collect();
    assert_eq!(numbers, vec![1, 2, 3, 5, 6, 7], "blank line 4 is skipped");
    assert_eq!(lines[0]["ranking"], json!(["b", "a"]));
    assert!(lines[1]["error"].as_str().expect("error").contains("JSON"));
    assert_eq!(lines[1]["field"], Value::Null);
    assert_eq!(lines[2]["field"], json!("candidates[2].score"));
    assert_eq!(lines[3]["field"], json!("candidates[0].group"));
    assert_eq!(lines[4]["field"], json!("constraint.alhpa"));
    assert!(lines[4]["error"].as_str().expect("error").contains("alpha"));
    assert_eq!(lines[5]["ranking"], json!(["b", "a"]));
}

#[test]
fn fairco_returns_the_updated_state_for_the_next_line() {
    let candidates = json!([
        {"id": "a", "score": 0.9, "group": 0}, {"id": "b", "score": 0.8, "group": 0},
        {"id": "c", "score": 0.7, "group": 1}, {"id": "d", "score": 0.6, "group": 1}]);
    let first = json!({"k": 2, "constraint": "fairco:lambda=0.5", "candidates": candidates,
        "state": {"group_exposure": {"0": 25.0, "1": 6.5}, "group_relevance": {"0": 2.4, "1": 1.5},
            "rankings": 10}});
    let (output, lines) = rerank(&format!("{first}\n"));
    assert!(output.status.success(), "{lines:?}");
    let state = &lines[0]["state"];
    assert_eq!(state["rankings"], json!(11));
    // Per ranking, a group adds its items' mean DCG exposure and mean relevance (Morik et al.).
    let value = |map: &str, group: &str| state[map][group].as_f64().expect("number");
    let exposure_c_d = (1.0 + 1.0 / 3f64.log2()) / 2.0;
    assert!((value("group_exposure", "1") - (6.5 + exposure_c_d)).abs() < 1e-9);
    assert!((value("group_exposure", "0") - 25.0).abs() < 1e-12);
    assert!((value("group_relevance", "0") - (2.4 + 0.85)).abs() < 1e-6);
    assert!((value("group_relevance", "1") - (1.5 + 0.65)).abs() < 1e-6);
    assert!(lines[0]["report"]["amortized_disparity"].is_number());
    // Group 1 is far behind its merit, so the controller lifts it to the top.
    assert_eq!(lines[0]["ranking"][0], json!("c"));
    // The returned state is accepted back as input.
    let second = json!({"k": 2, "constraint": "fairco:lambda=0.5", "candidates": candidates,
        "state": state});
    let (output, lines) = rerank(&format!("{second}\n"));
    assert!(output.status.success(), "{lines:?}");
    assert_eq!(lines[0]["state"]["rankings"], json!(12));
}
