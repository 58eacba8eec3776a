//! The admin gRPC API (`trellis.admin.v1`): what operators, `trellisctl`
//! and tests call.
//!
//! - [`convert`]: protobuf ⇄ validated domain types (the only place
//!   requests are checked).
//! - [`kv`]: `KV` — put, get, list, delete, txn, compact, watch.
//! - [`watch`]: the watch stream task (reads the store's change feed).
//! - [`cluster`]: `Cluster` — initialize, status, members, leader
//!   transfer, snapshot.
//! - [`lease`]: `Lease` — grant, keepalive, revoke, list (deadlines in
//!   [`crate::leases`]).
//! - [`resources`]: `Resources` — apply, get, list, delete mesh documents
//!   (`trellis/v1`, parsed and validated by `trellis-resources`).
//!
//! - [`identity`]: `Identity` — the cluster CA, join tokens, issued
//!   certificates (work in [`crate::ca`]).
//! - [`internal`]: `Internal` — node-to-node proposals, read index and
//!   the proxy-status fan-out.
//!
//! Writes and linearizable reads go through [`crate::node::Node::route`]:
//! served here if this node leads, else forwarded once to the leader
//! (marked with the [`FORWARDED`] header so they never bounce).

/// The forward arm of every admin handler: send `$req` to the leader over
/// `$channel` with `$svc.client(..).$method`, marked as forwarded and with
/// the request deadline; transport failures become [`forward_error`]s.
macro_rules! forward {
    ($svc:expr, $channel:expr, $leader:expr, $method:ident, $req:expr) => {
        $svc.client($channel)
            .$method($crate::api::forward_request(
                $req,
                $svc.node.request_timeout,
            ))
            .await
            .map_err(|s| $crate::api::forward_error($leader, s))
    };
}

pub mod cluster;
pub mod convert;
pub mod identity;
pub mod internal;
pub mod kv;
pub mod lease;
pub mod resources;
pub mod watch;

use std::sync::Arc;

use trellis_proto::admin::cluster_server::ClusterServer;
use trellis_proto::admin::kv_server::KvServer;
use trellis_proto::admin::lease_server::LeaseServer;
use trellis_proto::admin::resources_server::ResourcesServer;

use crate::node::{Node, MAX_ADMIN_MESSAGE_BYTES};

/// Metadata key set on requests a follower forwards to the leader.
pub const FORWARDED: &str = "x-trellis-forwarded";

/// Was this request forwarded by another node?
pub fn is_forwarded<T>(req: &tonic::Request<T>) -> bool {
    req.metadata().contains_key(FORWARDED)
}

/// The status to return when forwarding to `leader` failed. A status that
/// a trellisd produced (it carries `x-trellis-retry-safe`) passes through
/// unchanged; anything else was produced by the local gRPC client: the
/// leader could not be reached, or the connection broke mid-call.
pub fn forward_error(leader: u64, status: tonic::Status) -> tonic::Status {
    if status.metadata().contains_key("x-trellis-retry-safe") {
        return crate::error::ApiError::Remote(status).into();
    }
    let message = status.message().to_string();
    let sent = !never_sent(&status);
    crate::error::ApiError::LeaderUnreachable {
        leader,
        detail: message,
        sent,
    }
    .into()
}

/// Did the local gRPC client fail before the request left (connect
/// refused / unreachable / connect timeout)? Only hyper-util's connect
/// errors say so; anything else (e.g. "connection closed before message
/// completed") may have reached the leader.
fn never_sent(status: &tonic::Status) -> bool {
    let mut texts = vec![status.message().to_string()];
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        texts.push(e.to_string());
        source = e.source();
    }
    texts.iter().any(|t| {
        t.contains("tcp connect error")
            || t.contains("error trying to connect")
            || t.contains("Connection refused")
    })
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

/// The `Lease` service of `node`.
pub fn lease_service(node: Arc<Node>) -> LeaseServer<lease::LeaseService> {
    LeaseServer::new(lease::LeaseService::new(node))
}

/// The `Resources` service of `node`.
pub fn resources_service(node: Arc<Node>) -> ResourcesServer<resources::ResourcesService> {
    ResourcesServer::new(resources::ResourcesService::new(node))
        .max_decoding_message_size(MAX_ADMIN_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_ADMIN_MESSAGE_BYTES)
}

/// The `Identity` service of `node`.
pub fn identity_service(
    node: Arc<Node>,
) -> trellis_proto::admin::identity_server::IdentityServer<identity::IdentityService> {
    trellis_proto::admin::identity_server::IdentityServer::new(identity::IdentityService::new(node))
}

/// The `Internal` service of `node`.
pub fn internal_service(
    node: Arc<Node>,
) -> trellis_proto::admin::internal_server::InternalServer<internal::InternalService> {
    trellis_proto::admin::internal_server::InternalServer::new(internal::InternalService::new(node))
        .max_decoding_message_size(MAX_ADMIN_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_ADMIN_MESSAGE_BYTES)
}

/// The `Cluster` service of `node`.
pub fn cluster_service(node: Arc<Node>) -> ClusterServer<cluster::ClusterService> {
    ClusterServer::new(cluster::ClusterService::new(node))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connect_failures_count_as_never_sent() {
        assert!(never_sent(&tonic::Status::unavailable("tcp connect error")));
        assert!(!never_sent(&tonic::Status::unavailable(
            "connection closed before message completed"
        )));
        assert!(!never_sent(&tonic::Status::unavailable("connection error")));
        let forwarded = forward_error(
            3,
            tonic::Status::unavailable("error reading a body from connection"),
        );
        assert_eq!(
            forwarded
                .metadata()
                .get("x-trellis-retry-safe")
                .map(|v| v.as_bytes()),
            Some(&b"false"[..])
        );
        let forwarded = forward_error(3, tonic::Status::unavailable("tcp connect error"));
        assert_eq!(
            forwarded
                .metadata()
                .get("x-trellis-retry-safe")
                .map(|v| v.as_bytes()),
            Some(&b"true"[..])
        );
        assert!(forwarded.message().contains("node 3"));
    }
}
