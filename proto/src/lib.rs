//! Generated protobuf types for Trellis.
//!
//! - [`admin`]: the admin API every `trellisd` serves (`KV` and `Cluster`
//!   services), used by `trellisctl`, the tests and the benchmarks.
//! - [`raft`]: Raft peer RPC between control nodes (opaque openraft payloads).
//! - [`sidecar`]: the sidecar <-> control plane protocol carried over QUIC,
//!   and [`frame`], its length-prefixed framing.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC reflection.
//!
//! Conversion into validated domain types happens at the edge, in the crate
//! that handles the request (`trellis-controlplane`), not here.

/// `trellis.admin.v1`: key-value store and cluster operations.
pub mod admin {
    tonic::include_proto!("trellis.admin.v1");
}

/// `trellis.raft.v1`: peer-to-peer Raft transport.
pub mod raft {
    tonic::include_proto!("trellis.raft.v1");
}

/// `trellis.sidecar.v1`: messages on the sidecars' QUIC streams.
pub mod sidecar {
    tonic::include_proto!("trellis.sidecar.v1");
}

pub mod frame;

/// Encoded `FileDescriptorSet` of every Trellis proto (for server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("trellis_descriptor");
