//! Who may call what on a node's gRPC listeners, once mutual TLS has proved
//! who the caller is: an [`Authorize`] layer in front of each server.
//!
//! | listener | allowed identities |
//! |---|---|
//! | Raft peer RPC | `node/<id>` |
//! | admin API | `admin/<name>` and `node/<id>` (nodes forward to the leader) |
//! | admin API, `trellis.admin.v1.Internal/*` | `node/<id>` |
//!
//! Sidecars (`ns/<ns>/svc/<svc>`) talk to the QUIC endpoint only. The TLS
//! handshake already refused clients without a certificate from the cluster
//! CA; this layer refuses valid certificates of the wrong kind with
//! PERMISSION_DENIED and a message naming the identity. Without TLS
//! (`--insecure-dev`) the layer lets everything through.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;
use trellis_identity::Identity;

/// Which listener a layer guards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    RaftPeers,
    Admin,
}

const INTERNAL_PREFIX: &str = "/trellis.admin.v1.Internal/";

impl Policy {
    /// May `identity` call `path`?
    pub fn allows(self, identity: &Identity, path: &str) -> bool {
        match (self, identity) {
            (_, Identity::Node { .. }) => true,
            (Policy::Admin, Identity::Admin { .. }) => !path.starts_with(INTERNAL_PREFIX),
            _ => false,
        }
    }
}

/// Check the caller's certificate against `policy`; plaintext connections
/// (no TLS info at all) pass, as the server only runs without TLS in
/// `--insecure-dev` mode.
fn check<B>(policy: Policy, req: &http::Request<B>) -> Result<(), Status> {
    let Some(info) = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() else {
        return Ok(());
    };
    let Some(chain) = info.peer_certs() else {
        return Err(Status::unauthenticated("a client certificate is required"));
    };
    let cert = trellis_identity::peer_cert_info(&chain)
        .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
    let path = req.uri().path();
    if policy.allows(&cert.identity, path) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "{} may not call {path} (the admin API takes admin and node certificates; Raft and internal calls node certificates only)",
            cert.spiffe_id
        )))
    }
}

/// The layer: wraps each service of a server.
#[derive(Clone, Copy, Debug)]
pub struct AuthorizeLayer {
    policy: Policy,
}

impl AuthorizeLayer {
    pub fn new(policy: Policy) -> Self {
        AuthorizeLayer { policy }
    }
}

impl<S> tower_layer::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            policy: self.policy,
        }
    }
}

/// The service: answers with the refusal, or calls the inner service.
#[derive(Clone, Debug)]
pub struct Authorize<S> {
    inner: S,
    policy: Policy,
}

impl<S, B, ResBody> tower_service::Service<http::Request<B>> for Authorize<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<http::Response<ResBody>, S::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match check(self.policy, &req) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => {
                tracing::info!(path = %req.uri().path(), reason = %status.message(), "call refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_table() {
        let node = Identity::Node { id: 1 };
        let admin = Identity::Admin { name: "ops".into() };
        let sidecar = Identity::Workload {
            namespace: "default".into(),
            service: "reviews".into(),
        };
        let kv = "/trellis.admin.v1.KV/Put";
        let internal = "/trellis.admin.v1.Internal/Propose";
        let raft = "/trellis.raft.v1.RaftPeer/AppendEntries";
        assert!(Policy::Admin.allows(&admin, kv));
        assert!(Policy::Admin.allows(&node, kv));
        assert!(Policy::Admin.allows(&node, internal));
        assert!(!Policy::Admin.allows(&admin, internal));
        assert!(!Policy::Admin.allows(&sidecar, kv));
        assert!(Policy::RaftPeers.allows(&node, raft));
        assert!(!Policy::RaftPeers.allows(&admin, raft));
        assert!(!Policy::RaftPeers.allows(&sidecar, raft));
    }
}
