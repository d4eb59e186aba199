//! The committed gRPC code (`src/changes/cbt/pb.rs`, the client; `tests/it/cbt/pb.rs`, this suite's server) is
//! what `protoc` and tonic-prost-build make of `proto/snapshot_metadata.proto`: regenerated here and compared, so
//! that the build itself needs no protoc (the README's first command works on a machine without it) and the code
//! cannot drift from the `.proto`. `BLOCKMOVER_REGENERATE=1` rewrites the files instead of comparing. Skipped, with
//! the reason, where no protoc is installed (`.ci/run` installs it).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The lines the committed files start with, before the generated code.
const HEADER: &str = "// Generated from proto/snapshot_metadata.proto by tonic-prost-build (see tests/it/cbt/generated.rs, which checks
// that this file is what protoc and tonic-prost-build make of it, and rewrites it with BLOCKMOVER_REGENERATE=1).
// Committed so that building blockmover needs no protoc. Do not edit.
";

fn protoc() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PROTOC") {
        return Some(PathBuf::from(p));
    }
    let found = std::process::Command::new("protoc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    found.then(|| PathBuf::from("protoc"))
}

/// Generates the client (`server` false) or the server into `dir`; returns the generated text.
fn generate(dir: &Path, server: bool) -> Result<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    tonic_prost_build::configure()
        .build_client(!server)
        .build_server(server)
        .build_transport(false)
        .out_dir(dir)
        .compile_protos(
            &[root.join("proto/snapshot_metadata.proto")],
            &[root.join("proto")],
        )
        .context("tonic-prost-build")?;
    let file = dir.join("snapshotmetadata.rs");
    std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))
}

#[test]
fn the_committed_grpc_code_is_what_protoc_generates() -> Result<()> {
    let Some(protoc) = protoc() else {
        println!(
            "skipped: no protoc (apt package protobuf-compiler) to regenerate the gRPC code with"
        );
        return Ok(());
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (committed, server) in [
        ("src/changes/cbt/pb.rs", false),
        ("tests/it/cbt/pb.rs", true),
    ] {
        let dir = tempfile::tempdir()?;
        let fresh = format!("{HEADER}{}", generate(dir.path(), server)?);
        let path = root.join(committed);
        if std::env::var_os("BLOCKMOVER_REGENERATE").is_some() {
            std::fs::write(&path, &fresh)?;
            println!("rewrote {committed}");
            continue;
        }
        let old = std::fs::read_to_string(&path)?;
        assert!(
            old == fresh,
            "{committed} is not what {} and tonic-prost-build generate from proto/snapshot_metadata.proto: \
             run BLOCKMOVER_REGENERATE=1 cargo test --release --test it cbt::generated",
            protoc.display()
        );
    }
    Ok(())
}
