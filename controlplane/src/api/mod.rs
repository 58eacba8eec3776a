//! The admin gRPC API (`trellis.admin.v1`): what operators, `trellisctl`
//! and tests call.
//!
//! - [`convert`]: protobuf ⇄ validated domain types (the only place
//!   requests are checked).
//! - [`kv`]: `KV` — put, get, list, delete, txn, compact, watch.
//! - [`watch`]: the watch stream task (reads the store's change feed).
//! - [`cluster`]: `Cluster` — initialize, status, members, leader
//!   transfer, snapshot.
//!
//! Writes and linearizable reads go through [`crate::node::Node::route`]:
//! served here if this node leads, else forwarded once to the leader
//! (marked with the [`FORWARDED`] header so they never bounce).

pub mod cluster;
pub mod convert;
pub mod kv;
pub mod watch;

use std::sync::Arc;

use trellis_proto::admin::cluster_server::ClusterServer;
use trellis_proto::admin::kv_server::KvServer;

use crate::node::{Node, MAX_ADMIN_MESSAGE_BYTES};

/// Metadata key set on requests a follower forwards to the leader.
pub const FORWARDED: &str = "x-trellis-forwarded";

/// Was this request forwarded by another node?
pub fn is_forwarded<T>(req: &tonic::Request<T>) -> bool {
    req.metadata().contains_key(FORWARDED)
}

/// Wrap `msg` for forwarding to the leader.
pub fn forward_request<T>(msg: T, timeout: std::time::Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    req.set_timeout(timeout);
    req
}

/// The `KV` service of `node`.
pub fn kv_service(node: Arc<Node>) -> KvServer<kv::KvService> {
    KvServer::new(kv::KvService::new(node))
        .max_decoding_message_size(MAX_ADMIN_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_ADMIN_MESSAGE_BYTES)
}

/// The `Cluster` service of `node`.
pub fn cluster_service(node: Arc<Node>) -> ClusterServer<cluster::ClusterService> {
    ClusterServer::new(cluster::ClusterService::new(node))
}
