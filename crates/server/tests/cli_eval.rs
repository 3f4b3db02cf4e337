//! End-to-end test of `fairrank eval` on small tables written with the store writer.

use std::path::Path;
use std::process::Command;

use store::{GroupAttribute, TableData, write_table};

/// A deterministic pseudo-random number in [0, 1) (SplitMix64).
fn unit(state: &mut u64) -> f32 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
}

/// 300 items in dimension 6 (one in four in group 1, with shrunk embeddings so that the
/// unconstrained order under-exposes it) and 12 users, all with positive components.
fn write_tables(dir: &Path) -> (String, String) {
    let dim = 6;
    let mut state = 5u64;
    let items = 300;
    let labels: Vec<u32> = (0..items).map(|i| u32::from(i % 4 == 0)).collect();
    let mut rows = Vec::with_capacity(items * dim);
    for &label in &labels {
        let scale = if label == 1 { 0.6 } else { 1.0 };
        rows.extend((0..dim).map(|_| scale * (0.1 + unit(&mut state))));
    }
    let item_data = TableData {
        dim,
        rows,
        ids: (0..items).map(|i| format!("item-{i}")).collect(),
        groups: vec![GroupAttribute {
            name: "provider_group".to_string(),
            labels,
        }],
        prior: None,
        dim_names: None,
    };
    let users = 12;
    let user_data = TableData {
        dim,
        rows: (0..users * dim).map(|_| 0.1 + unit(&mut state)).collect(),
        ids: (0..users).map(|u| format!("user-{u}")).collect(),
        groups: Vec::new(),
        prior: None,
        dim_names: None,
    };
    let item_path = dir.join("items.frt");
    let user_path = dir.join("users.frt");
    write_table(&item_path, &item_data).expect("writes the item table");
    write_table(&user_path, &user_data).expect("writes the user table");
    (
        item_path.display().to_string(),
        user_path.display().to_string(),
    )
}

#[test]
fn eval_writes_a_table_a_csv_and_a_plot_with_one_entry_per_constraint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (items, users) = write_tables(dir.path());
    let out_dir = dir.path().join("report");
    let constraints = [
        "none",
        "fa*ir:p=0.5,alpha=0.1,protected=1",
        r#"{"name": "det-greedy", "targets": {"1": 0.4}}"#,
        "det-const-sort:targets=0:0.5,1:0.5",
        "fairco:lambda=0.05",
    ];
    let mut args = vec![
        "eval",
        "--table",
        &items,
        "--users",
        &users,
        "--queries",
        "8",
        "--pool",
        "40",
        "--k",
        "10",
        "--seed",
        "3",
        "--true-items",
        &items,
        "--out-dir",
    ];
    let out_dir_text = out_dir.display().to_string();
    args.push(&out_dir_text);
    args.push("--constraints");
    args.extend(constraints);
    let output = Command::new(env!("CARGO_BIN_EXE_fairrank"))
        .args(&args)
        .env("FAIRRANK_CACHE", dir.path())
        .output()
        .expect("the fairrank binary runs");
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let markdown = std::fs::read_to_string(out_dir.join("eval.md")).expect("eval.md");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        markdown,
        "also printed"
    );
    let table_rows: Vec<&str> = markdown
        .lines()
        .filter(|line| line.starts_with("| `"))
        .collect();
    assert_eq!(table_rows.len(), constraints.len(), "{markdown}");
    assert!(table_rows[1].contains("fa*ir"));

    let csv = std::fs::read_to_string(out_dir.join("eval.csv")).expect("eval.csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 1 + constraints.len(), "{csv}");
    let header: Vec<&str> = lines[0].split(',').collect();
    let column = |name: &str| header.iter().position(|h| *h == name).expect(name);
    // The unconstrained setting loses nothing and always holds.
    let first: Vec<&str> = lines[1].split(',').collect();
    assert_eq!(first[0], "none");
    let ndcg: f64 = first[column("ndcg")].parse().expect("ndcg");
    assert!((ndcg - 1.0).abs() < 1e-12);
    assert_eq!(first[column("satisfied_rate")], "1");
    // With the item table as its own "true" table, true relevance equals the score, so the
    // true NDCG equals the NDCG (up to the rounding of two scoring kernels).
    assert!(markdown.contains("true NDCG@10"), "{markdown}");
    for line in &lines[1..] {
        // Quoted label and spec fields contain commas; the numbers are the last columns.
        let from_right = |name: &str| header.len() - column(name);
        let tail = from_right("ndcg");
        let fields: Vec<&str> = line.rsplitn(tail + 1, ',').collect();
        let value = |name: &str| -> f64 { fields[from_right(name) - 1].parse().expect(name) };
        let ndcg = value("ndcg");
        assert!(ndcg > 0.0 && ndcg <= 1.0 + 1e-12, "{line}");
        assert!((value("true_ndcg") - ndcg).abs() < 1e-4, "{line}");
        let ratio = value("exposure_ratio");
        assert!((0.0..=1.0).contains(&ratio), "{line}");
    }

    let svg = std::fs::read_to_string(out_dir.join("eval.svg")).expect("eval.svg");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<circle").count(), constraints.len());
    assert!(
        svg.contains("fa*ir(alpha=0.1, p=0.5, protected=1)"),
        "labeled points"
    );
}

#[test]
fn eval_refuses_unknown_constraints_and_attributes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (items, users) = write_tables(dir.path());
    let run = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--table",
            &items,
            "--users",
            &users,
            "--queries",
            "2",
        ];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_fairrank"))
            .args(&args)
            .current_dir(dir.path())
            .output()
            .expect("runs")
    };
    let output = run(&["--constraints", "nope"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("nope"));
    let output = run(&["--constraints", "none", "--group-attribute", "gender"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("provider_group"));
}
