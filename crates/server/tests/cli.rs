//! End-to-end tests of the `fairrank` CLI's table, topk and bench commands on real files,
//! and of `serve` refusing bad tables and configuration.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use store::Table;

fn fairrank(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fairrank"))
        .args(args)
        .env("FAIRRANK_CACHE", cache)
        .output()
        .expect("the fairrank binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "failed: {}\n{}",
        stdout(output),
        stderr(output)
    );
}

/// Builds a small synthetic item table and user table in `dir`.
fn build_small_tables(dir: &Path) -> (PathBuf, PathBuf) {
    let items = dir.join("items.frt");
    let users = dir.join("users.frt");
    let output = fairrank(
        &[
            "table",
            "build",
            "--synthetic",
            "--items",
            "3000",
            "--dim",
            "24",
            "--users",
            "20",
            "--seed",
            "7",
            "-o",
            items.to_str().unwrap(),
            "--users-out",
            users.to_str().unwrap(),
        ],
        dir,
    );
    assert_success(&output);
    (items, users)
}

/// Exact top-k by the scalar reference, as (id, score) pairs.
fn reference_topk(table: &Table, query: &[f32], k: usize) -> Vec<(String, f32)> {
    let matrix =
        kernels::RowMatrix::new(table.rows(), table.len(), table.dim(), table.row_stride())
            .expect("valid matrix");
    kernels::scalar::scan_topk(matrix, query, k)
        .expect("k > 0")
        .iter()
        .map(|item| (table.id(item.index as usize).to_string(), item.score))
        .collect()
}

fn assert_matches_reference(line: &serde_json::Value, expected: &[(String, f32)]) {
    let ids: Vec<&str> = line["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap())
        .collect();
    let scores: Vec<f64> = line["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_f64().unwrap())
        .collect();
    assert_eq!(ids.len(), expected.len());
    for (position, (id, score)) in expected.iter().enumerate() {
        assert!(
            (scores[position] - f64::from(*score)).abs() < 1e-4,
            "score at {position}"
        );
        // Near-ties may swap under different rounding; exact ids must agree otherwise.
        if ids[position] != id {
            let other = expected
                .iter()
                .find(|(candidate, _)| candidate == ids[position]);
            let other =
                other.unwrap_or_else(|| panic!("unexpected id {} at {position}", ids[position]));
            assert!(
                (other.1 - score).abs() < 1e-4,
                "{} swapped with {id}",
                ids[position]
            );
        }
    }
}

#[test]
fn build_inspect_verify_and_topk_agree_with_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (items, users) = build_small_tables(dir.path());

    let output = fairrank(
        &["table", "inspect", items.to_str().unwrap(), "--json"],
        dir.path(),
    );
    assert_success(&output);
    let inspection: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(inspection["rows"], 3000);
    assert_eq!(inspection["dim"], 24);
    assert_eq!(inspection["header"]["dtype"], "f32");
    let groups = &inspection["group_attributes"]["provider_group"];
    assert!(
        groups["1"].as_u64().unwrap() > 0,
        "minority group present: {inspection}"
    );

    let output = fairrank(&["table", "inspect", items.to_str().unwrap()], dir.path());
    assert_success(&output);
    assert!(stdout(&output).contains("rows:           3000"));

    let output = fairrank(&["table", "verify", items.to_str().unwrap()], dir.path());
    assert_success(&output);
    assert!(stdout(&output).contains("ok"));

    // Queries: six user rows written as .npy (batched path) and one (scan path).
    let user_table = Table::open(&users).unwrap();
    let item_table = Table::open(&items).unwrap();
    for query_count in [6usize, 1] {
        let mut data = Vec::new();
        for row in 0..query_count {
            data.extend_from_slice(user_table.row(row));
        }
        let queries = dir.path().join(format!("queries-{query_count}.npy"));
        datasets::write_npy(&queries, query_count, 24, &data).unwrap();
        let output = fairrank(
            &[
                "topk",
                "--table",
                items.to_str().unwrap(),
                "--queries",
                queries.to_str().unwrap(),
                "--k",
                "15",
                "--format",
                "json",
            ],
            dir.path(),
        );
        assert_success(&output);
        let lines: Vec<serde_json::Value> = stdout(&output)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), query_count);
        for (query, line) in lines.iter().enumerate() {
            assert_eq!(line["query"], query);
            let expected = reference_topk(&item_table, user_table.row(query), 15);
            assert_matches_reference(line, &expected);
        }
    }

    let output = fairrank(
        &[
            "topk",
            "--table",
            items.to_str().unwrap(),
            "--users",
            users.to_str().unwrap(),
            "--limit",
            "2",
            "--k",
            "3",
            "--format",
            "table",
        ],
        dir.path(),
    );
    assert_success(&output);
    let text = stdout(&output);
    assert!(text.starts_with("query"), "{text}");
    assert_eq!(text.lines().count(), 1 + 2 * 3);
}

#[test]
fn topk_refuses_bad_requests_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (items, _) = build_small_tables(dir.path());
    let queries = dir.path().join("q.npy");
    datasets::write_npy(&queries, 1, 5, &[1.0; 5]).unwrap();

    let output = fairrank(
        &[
            "topk",
            "--table",
            items.to_str().unwrap(),
            "--queries",
            queries.to_str().unwrap(),
            "--k",
            "0",
        ],
        dir.path(),
    );
    assert!(!output.status.success());
    assert!(stderr(&output).contains("--k"), "{}", stderr(&output));

    let output = fairrank(
        &[
            "topk",
            "--table",
            items.to_str().unwrap(),
            "--queries",
            queries.to_str().unwrap(),
            "--k",
            "3",
        ],
        dir.path(),
    );
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("q.npy") && message.contains("dimension 5"),
        "{message}"
    );
}

#[test]
fn corrupt_and_truncated_tables_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (items, _) = build_small_tables(dir.path());
    let bytes = std::fs::read(&items).unwrap();

    let truncated = dir.path().join("truncated.frt");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    for command in ["inspect", "verify"] {
        let output = fairrank(&["table", command, truncated.to_str().unwrap()], dir.path());
        assert!(!output.status.success());
        assert!(
            stderr(&output).contains("truncated.frt"),
            "{}",
            stderr(&output)
        );
    }

    // Flip one byte in the last section: open may accept it, the full checksum must not.
    let corrupt = dir.path().join("corrupt.frt");
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    std::fs::write(&corrupt, &flipped).unwrap();
    let output = fairrank(&["table", "verify", corrupt.to_str().unwrap()], dir.path());
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("corrupt.frt"),
        "{}",
        stderr(&output)
    );

    // `serve` refuses both at start, as a reload would (checksum included), naming the file.
    for (table, problem) in [(&truncated, "truncated.frt"), (&corrupt, "checksum")] {
        let message = serve_refusal(&[table.as_path()], dir.path());
        assert!(
            message.contains(table.file_name().unwrap().to_str().unwrap())
                && message.contains(problem),
            "{message}"
        );
    }
}

#[test]
fn import_npy_with_metadata_then_topk() {
    let dir = tempfile::tempdir().unwrap();
    let npy = dir.path().join("items.npy");
    let rows: Vec<f32> = (0..4 * 3).map(|value| value as f32 * 0.5 - 2.0).collect();
    datasets::write_npy(&npy, 4, 3, &rows).unwrap();
    let meta = dir.path().join("items.csv");
    std::fs::write(
        &meta,
        "id,provider_group,prior\na,0,0.4\nb,1,0.3\nc,1,0.2\nd,0,0.1\n",
    )
    .unwrap();
    let table_path = dir.path().join("imported.frt");
    let output = fairrank(
        &[
            "table",
            "import",
            "--npy",
            npy.to_str().unwrap(),
            "--meta",
            meta.to_str().unwrap(),
            "-o",
            table_path.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_success(&output);
    let table = Table::open(&table_path).unwrap();
    assert_eq!(table.index_of("c"), Some(2));
    assert_eq!(table.prior().unwrap(), &[0.4, 0.3, 0.2, 0.1]);

    let queries = dir.path().join("q.npy");
    datasets::write_npy(&queries, 1, 3, &[1.0, 1.0, 1.0]).unwrap();
    let output = fairrank(
        &[
            "topk",
            "--table",
            table_path.to_str().unwrap(),
            "--queries",
            queries.to_str().unwrap(),
            "--k",
            "10",
        ],
        dir.path(),
    );
    assert_success(&output);
    let line: serde_json::Value = serde_json::from_str(stdout(&output).trim()).unwrap();
    // Row sums: a = -4.5, b = -1.5+... rows are (-2,-1.5,-1), (-0.5,0,0.5), (1,1.5,2), (2.5,3,3.5).
    assert_eq!(line["ids"], serde_json::json!(["d", "c", "b", "a"]));

    let bad_meta = dir.path().join("bad.csv");
    std::fs::write(&bad_meta, "id,provider_group\na,0\nb,x\nc,1\nd,0\n").unwrap();
    let output = fairrank(
        &[
            "table",
            "import",
            "--npy",
            npy.to_str().unwrap(),
            "--meta",
            bad_meta.to_str().unwrap(),
            "-o",
            dir.path().join("never.frt").to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(!output.status.success());
    assert!(stderr(&output).contains("bad.csv"), "{}", stderr(&output));
    assert!(!dir.path().join("never.frt").exists());
}

#[test]
fn bench_kernel_prints_every_figure() {
    let dir = tempfile::tempdir().unwrap();
    let output = fairrank(
        &[
            "bench", "kernel", "--rows", "4000", "--dim", "16", "--k", "10", "--batch", "4",
            "--repeat", "1",
        ],
        dir.path(),
    );
    assert_success(&output);
    let text = stdout(&output);
    for key in [
        "scan_ms",
        "scan_gbps",
        "read_gbps",
        "scan_bandwidth_ratio",
        "batch_ms",
        "batch_gflops",
        "batch_speedup_vs_serial",
        "candidates_ns_per_item",
    ] {
        let line = text
            .lines()
            .find(|line| line.starts_with(&format!("{key}: ")))
            .unwrap_or_else(|| panic!("{key} missing: {text}"));
        let value: f64 = line[key.len() + 2..].trim().parse().unwrap();
        assert!(value.is_finite() && value > 0.0, "{line}");
    }
}

#[test]
fn topk_without_a_table_uses_the_built_in_default_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let output = fairrank(&["topk", "--k", "3", "--limit", "2"], dir.path());
    assert_success(&output);
    let lines: Vec<serde_json::Value> = stdout(&output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["ids"].as_array().unwrap().len(), 3);
    // The second run reuses the cached files.
    let again = fairrank(&["topk", "--k", "3", "--limit", "2"], dir.path());
    assert_success(&again);
    assert_eq!(stdout(&output), stdout(&again));
}

#[test]
fn a_reader_that_stops_early_ends_the_output_quietly() {
    // `fairrank topk ... | head -1`: the rest of the output has nowhere to go; that is not
    // an error of ours.
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let (items, users) = build_small_tables(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_fairrank"))
        .args(["topk", "--table"])
        .arg(&items)
        .arg("--users")
        .arg(&users)
        .args(["--limit", "20", "--k", "3000", "--format", "json"])
        .env("FAIRRANK_CACHE", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(
        first.contains("\"query\":0"),
        "{}",
        &first[..first.len().min(200)]
    );
    // The pipe's read end is closed here; 19 more lines of ~60 KB each follow.
    let output = child.wait_with_output().unwrap();
    let message = stderr(&output);
    assert!(output.status.success(), "{:?}: {message}", output.status);
    assert!(!message.contains("Broken pipe"), "{message}");
}

#[test]
fn building_into_a_missing_folder_names_the_output_not_a_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("no-such-folder").join("items.frt");
    let output = fairrank(
        &[
            "table",
            "build",
            "--synthetic",
            "--items",
            "10",
            "--dim",
            "4",
            "-o",
            target.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains(target.to_str().unwrap()) && message.contains("folder"),
        "{message}"
    );
    assert!(!message.contains(".fr.tmp"), "{message}");
}

#[test]
fn a_reader_gone_before_a_println_ends_the_command_quietly_too() {
    // `println!` panics on a closed pipe; the reader here is gone before the command,
    // which first computes a 10 000-prefix mtable, writes its one line.
    let mut child = Command::new(env!("CARGO_BIN_EXE_fairrank"))
        .args([
            "fair", "mtable", "--k", "10000", "--p", "0.5", "--alpha", "0.1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let message = stderr(&output);
    assert!(output.status.success(), "{:?}: {message}", output.status);
    assert!(!message.contains("panicked"), "{message}");
}

/// Runs `fairrank serve` on the item table `args[0]` (and the user table `args[1]`, if
/// given) until it exits (it must: a table is refused) and returns its stderr.
fn serve_refusal(args: &[&Path], cache: &Path) -> String {
    let state = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_fairrank"));
    command.arg("serve").arg("--table").arg(args[0]);
    if let Some(users) = args.get(1) {
        command.arg("--users").arg(users);
    }
    let mut child = command
        .args(["--addr", "127.0.0.1:0", "--metrics-addr", "", "--state-dir"])
        .arg(state.path())
        .env("FAIRRANK_CACHE", cache)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("serve kept running on {args:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    stderr(&output)
}

#[test]
fn built_tables_are_marked_and_tables_in_swapped_roles_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (items, users) = build_small_tables(dir.path());
    assert_eq!(
        Table::open(&items).unwrap().role(),
        Some(store::TableRole::Items)
    );
    assert_eq!(
        Table::open(&users).unwrap().role(),
        Some(store::TableRole::Users)
    );

    // `inspect` shows the role: a JSON key, a text line.
    for (path, role) in [(&items, "items"), (&users, "users")] {
        let output = fairrank(
            &["table", "inspect", path.to_str().unwrap(), "--json"],
            dir.path(),
        );
        assert_success(&output);
        let inspection: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
        assert_eq!(inspection["role"], role);
        let output = fairrank(&["table", "inspect", path.to_str().unwrap()], dir.path());
        assert_success(&output);
        assert!(
            stdout(&output).contains(&format!("\nrole:           {role}\n")),
            "{}",
            stdout(&output)
        );
    }

    // `import` marks items by default; `--role` says users or leaves the file unmarked.
    let npy = dir.path().join("e.npy");
    datasets::write_npy(&npy, 2, 24, &[0.25; 48]).unwrap();
    for (flag, expected, shown) in [
        (None, Some(store::TableRole::Items), "items"),
        (Some("users"), Some(store::TableRole::Users), "users"),
        (Some("unmarked"), None, "unmarked"),
    ] {
        let out = dir.path().join(format!("imported-{shown}.frt"));
        let mut args = vec![
            "table",
            "import",
            "--npy",
            npy.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend(flag.iter().flat_map(|role| ["--role", *role]));
        assert_success(&fairrank(&args, dir.path()));
        assert_eq!(Table::open(&out).unwrap().role(), expected, "{flag:?}");
        let output = fairrank(
            &["table", "inspect", out.to_str().unwrap(), "--json"],
            dir.path(),
        );
        let inspection: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
        assert_eq!(inspection["role"], shown);
    }
    let unmarked = dir.path().join("imported-unmarked.frt");

    let user_as_item = format!(
        "`{}` is marked as a user table; the item table slot needs an item table",
        users.display()
    );
    let item_as_user = format!(
        "`{}` is marked as an item table; the user table slot needs a user table",
        items.display()
    );
    // `topk` refuses either table in the other's place, naming the file.
    let (items_arg, users_arg) = (items.to_str().unwrap(), users.to_str().unwrap());
    for (args, message) in [
        (["--table", users_arg, "--users", users_arg], &user_as_item),
        (["--table", items_arg, "--users", items_arg], &item_as_user),
    ] {
        let output = fairrank(&[&["topk"][..], &args[..]].concat(), dir.path());
        assert!(!output.status.success());
        assert!(
            stderr(&output).contains(message.as_str()),
            "{}",
            stderr(&output)
        );
    }
    // So does `eval`, before any scoring.
    let output = fairrank(
        &[
            "eval",
            "--table",
            users_arg,
            "--users",
            items_arg,
            "--constraints",
            "none",
        ],
        dir.path(),
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains(&user_as_item),
        "{}",
        stderr(&output)
    );
    // An unmarked table is accepted in either role.
    let output = fairrank(
        &[
            "topk",
            "--table",
            unmarked.to_str().unwrap(),
            "--users",
            unmarked.to_str().unwrap(),
            "--k",
            "1",
        ],
        dir.path(),
    );
    assert_success(&output);

    // `serve` refuses a user table given as the catalog, and an item table as the users.
    let message = serve_refusal(&[&users], dir.path());
    assert!(message.contains(&user_as_item), "{message}");
    let message = serve_refusal(&[&items, &items], dir.path());
    assert!(message.contains(&item_as_user), "{message}");
}

/// Configuration values echoed in a start-up refusal are clipped: a 100 KB default fairness
/// constraint (and a 100 KB line under a misspelt key, or of the wrong type) is refused
/// naming the file and the key, in a short message.
#[test]
fn config_values_in_start_up_refusals_are_clipped() {
    let dir = tempfile::tempdir().unwrap();
    let long = "y".repeat(100_000);
    for (text, key) in [
        (
            format!("[ranking]\ndefault_fairness_constraint = \"{long}\"\n"),
            "ranking.default_fairness_constraint",
        ),
        (
            format!("[ranking]\ndefault_fairness_constrant = \"{long}\"\n"),
            "default_fairness_constrant",
        ),
        (format!("[ranking]\nmax_k = \"{long}\"\n"), "max_k"),
    ] {
        let path = dir.path().join("long-value.toml");
        std::fs::write(&path, &text).unwrap();
        // Without a backtrace, as an operator sees the refusal.
        let output = Command::new(env!("CARGO_BIN_EXE_fairrank"))
            .args(["serve", "--print-config", "--config"])
            .arg(&path)
            .env("FAIRRANK_CACHE", dir.path())
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .output()
            .unwrap();
        assert!(!output.status.success(), "{key}: accepted");
        let refusal = stderr(&output);
        assert!(refusal.contains("long-value.toml"), "{key}: {refusal}");
        assert!(refusal.contains(key), "{key}: {refusal}");
        assert!(
            refusal.len() < 2048,
            "{key}: {} bytes: {}",
            refusal.len(),
            &refusal[..refusal.len().min(600)]
        );
    }
}
