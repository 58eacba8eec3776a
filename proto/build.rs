//! Compiles the protobuf files with protox (pure Rust; no system `protoc`)
//! and generates prost messages + tonic clients/servers, plus a file
//! descriptor set for gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/trellis/admin/v1/admin.proto",
        "proto/trellis/raft/v1/raft.proto",
        "proto/trellis/sidecar/v1/sidecar.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("trellis_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
