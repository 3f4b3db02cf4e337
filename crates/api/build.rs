//! Build script: compiles `proto/` with `protox` (pure Rust, no system `protoc`), generates
//! the prost messages and tonic services, and writes the encoded descriptor set for reflection.

use std::env;
use std::error::Error;
use std::path::PathBuf;

/// Every proto file of the API, relative to the `proto/` folder at the workspace root.
const PROTO_FILES: &[&str] = &[
    "fairrank/v1/common.proto",
    "fairrank/v1/fairness.proto",
    "fairrank/v1/privacy.proto",
    "fairrank/v1/ranker.proto",
    "fairrank/v1/admin.proto",
    "fairrank/bench/v1/echo.proto",
];

/// File stem (in `OUT_DIR`) of the encoded `FileDescriptorSet`, read back by
/// `tonic::include_file_descriptor_set!` in `lib.rs`.
const DESCRIPTOR_SET_STEM: &str = "fairrank_descriptor";

fn main() -> Result<(), Box<dyn Error>> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("..").join("..").join("proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", proto_root.display());
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={}", proto_root.join(file).display());
    }

    // Imports (google/protobuf/*.proto) are kept so reflection clients can resolve every
    // type; source info is kept so they also see the field documentation.
    let mut compiler = protox::Compiler::new([&proto_root])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTO_FILES)?;

    std::fs::write(
        out_dir.join(format!("{DESCRIPTOR_SET_STEM}.bin")),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        // Echo payloads decode as reference-counted slices of the receive buffer: the
        // transport-floor baseline should not pay for a copy that Rank does not make.
        .bytes(".fairrank.bench.v1")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
