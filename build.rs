//! Generates the SnapshotMetadata gRPC code (CSI changed block tracking) from `proto/snapshot_metadata.proto`
//! with `protoc` (apt package `protobuf-compiler`; `PROTOC` names another one): the client for the library,
//! and, in a directory of its own, the server that the integration tests run (`tests/it/cbt/`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/snapshot_metadata.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-env-changed=PROTOC");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    for (dir, server) in [("cbt-client", false), ("cbt-server", true)] {
        let dir = out.join(dir);
        std::fs::create_dir_all(&dir)?;
        tonic_prost_build::configure()
            .build_client(!server)
            .build_server(server)
            .build_transport(false)
            .out_dir(&dir)
            .compile_protos(&[proto], &["proto"])?;
    }
    Ok(())
}
