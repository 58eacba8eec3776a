//! Compiles, with protox (pure Rust; no system `protoc`) and
//! tonic-prost-build: the etcd v3 API subset in `proto/etcd.proto` (clients
//! only), and the test echo service in `proto/echo.proto` (client and
//! server, for the gRPC data-path tests).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in ["proto/etcd.proto", "proto/echo.proto"] {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(["proto/etcd.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    let fds = protox::compile(["proto/echo.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
