//! Architecture invariants from ARCHITECTURE.md, checked over `cargo metadata` and the source tree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One workspace member as `cargo metadata` describes it.
struct Member {
    name: String,
    manifest_dir: PathBuf,
    publishable: bool,
    /// Names of all normal and build dependencies (dev-dependencies excluded).
    dependencies: BTreeSet<String>,
}

fn workspace_members() -> (PathBuf, Vec<Member>) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("metadata is JSON");
    let root = PathBuf::from(metadata["workspace_root"].as_str().expect("workspace_root"));
    let members = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|package| {
            let manifest = PathBuf::from(package["manifest_path"].as_str().expect("manifest_path"));
            let dependencies = package["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|dependency| dependency["kind"].as_str() != Some("dev"))
                .map(|dependency| dependency["name"].as_str().expect("name").to_string())
                .collect();
            Member {
                name: package["name"].as_str().expect("name").to_string(),
                manifest_dir: manifest.parent().expect("manifest dir").to_path_buf(),
                publishable: !package["publish"]
                    .as_array()
                    .is_some_and(|registries| registries.is_empty()),
                dependencies,
            }
        })
        .collect();
    (root, members)
}

/// Project crates each crate may depend on (DESIGN.md section 2). A crate missing here is new:
/// add it to this table and to ARCHITECTURE.md.
fn allowed_project_dependencies() -> BTreeMap<&'static str, &'static [&'static str]> {
    BTreeMap::from([
        ("kernels", &[][..]),
        ("store", &[][..]),
        ("fairness", &[][..]),
        ("privacy", &[][..]),
        ("api", &[][..]),
        ("state", &["privacy", "fairness"][..]),
        ("datasets", &["store", "kernels"][..]),
        (
            "engine",
            &["kernels", "store", "fairness", "privacy", "state"][..],
        ),
        (
            "server",
            &[
                "kernels", "store", "fairness", "privacy", "state", "engine", "api", "datasets",
            ][..],
        ),
        (
            "benches",
            &[
                "kernels", "store", "fairness", "privacy", "state", "engine", "api", "datasets",
            ][..],
        ),
    ])
}

/// Crates that speak gRPC; no other crate may depend on these.
const GRPC_CRATES: &[&str] = &[
    "tonic",
    "prost",
    "tonic-prost",
    "tonic-health",
    "tonic-reflection",
];

#[test]
fn project_crates_depend_only_in_the_allowed_direction() {
    let (_, members) = workspace_members();
    let allowed = allowed_project_dependencies();
    let names: BTreeSet<&str> = members.iter().map(|member| member.name.as_str()).collect();
    for member in &members {
        let permitted = allowed
            .get(member.name.as_str())
            .unwrap_or_else(|| panic!("crate `{}` is not in the architecture table", member.name));
        for dependency in &member.dependencies {
            if names.contains(dependency.as_str()) {
                assert!(
                    permitted.contains(&dependency.as_str()),
                    "architecture invariant: `{}` must not depend on `{}`",
                    member.name,
                    dependency
                );
            }
        }
    }
}

#[test]
fn nothing_depends_on_server_or_benches() {
    let (_, members) = workspace_members();
    for member in &members {
        for forbidden in ["server", "benches"] {
            assert!(
                !member.dependencies.contains(forbidden),
                "architecture invariant: `{}` depends on `{forbidden}`",
                member.name
            );
        }
    }
}

#[test]
fn only_api_server_and_benches_know_grpc() {
    let (_, members) = workspace_members();
    for member in &members {
        if ["api", "server", "benches"].contains(&member.name.as_str()) {
            continue;
        }
        for grpc in GRPC_CRATES {
            assert!(
                !member.dependencies.contains(*grpc),
                "architecture invariant: `{}` depends on `{grpc}`; only api, server and benches know gRPC",
                member.name
            );
        }
    }
}

#[test]
fn crate_names_equal_folder_names_and_nothing_is_published() {
    let (_, members) = workspace_members();
    for member in &members {
        let folder = member
            .manifest_dir
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default();
        assert_eq!(folder, member.name, "crate name must equal its folder name");
        assert!(
            !member.publishable,
            "crate `{}` must set publish = false",
            member.name
        );
    }
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            found.push(path);
        }
    }
}

#[test]
fn every_source_file_starts_with_a_module_doc_line() {
    let (_, members) = workspace_members();
    let mut files = Vec::new();
    for member in &members {
        for folder in ["src", "tests", "benches", "examples"] {
            rust_files(&member.manifest_dir.join(folder), &mut files);
        }
    }
    assert!(!files.is_empty());
    let missing: Vec<String> = files
        .iter()
        .filter(|file| {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            !text.trim_start().starts_with("//!")
        })
        .map(|file| file.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "files without a leading `//!` line: {missing:?}"
    );
}
