//! `trellis-sidecar`: the data-plane proxy (not built yet).
//!
//! Planned (its own issues): outbound/inbound listeners, protocol detection,
//! routing, balancing, resilience and policy on the request path, fed by a
//! QUIC watch on the control plane. Until then this binary only says so.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("trellis-sidecar: not implemented yet (the control plane is; see README.md)");
    ExitCode::from(2)
}
