//! The `Lease` service: grant, keepalive, revoke, list.
//!
//! Every call is served by the leader (followers forward once): grants and
//! revokes are Raft entries; keepalives only restart the leader's in-memory
//! deadline ([`crate::leases`]), after a read barrier that confirms this
//! node still leads (a deposed leader must not acknowledge a keepalive the
//! new leader never sees).

use std::sync::Arc;

use tonic::{Request, Response, Status};
use trellis_proto::admin as pb;
use trellis_proto::admin::lease_client::LeaseClient;
use trellis_proto::admin::lease_server::Lease as LeaseApi;
use trellis_raft_store::{Command, Outcome};

use super::is_forwarded;
use crate::error::ApiError;
use crate::leases::{MAX_LEASE_TTL_MS, MIN_LEASE_TTL_MS};
use crate::node::{Node, Route};

/// Attempts at finding an unused random lease id before giving up.
const ID_ATTEMPTS: usize = 5;

pub struct LeaseService {
    node: Arc<Node>,
}

impl LeaseService {
    pub fn new(node: Arc<Node>) -> Self {
        LeaseService { node }
    }

    fn client(&self, channel: tonic::transport::Channel) -> LeaseClient<tonic::transport::Channel> {
        LeaseClient::new(channel)
    }

    async fn grant_local(
        &self,
        r: pb::LeaseGrantRequest,
    ) -> Result<pb::LeaseGrantResponse, ApiError> {
        let chosen = r.id != 0;
        for _ in 0..ID_ATTEMPTS {
            // Random ids below 2^53 survive JSON clients intact.
            let id = if chosen {
                r.id
            } else {
                rand::random_range(1..(1u64 << 53))
            };
            let resp = self
                .node
                .write(Command::LeaseGrant {
                    id,
                    ttl_ms: r.ttl_ms,
                })
                .await?;
            match resp.outcome {
                Outcome::LeaseGranted { lease } => {
                    self.node.leases.granted(lease);
                    return Ok(pb::LeaseGrantResponse {
                        header: Some(self.node.header(resp.revision)),
                        id: lease.id,
                        ttl_ms: lease.ttl_ms,
                    });
                }
                Outcome::Rejected { reason } if chosen => {
                    return Err(ApiError::FailedPrecondition(reason))
                }
                Outcome::Rejected { .. } => continue,
                other => {
                    return Err(ApiError::internal(
                        "lease grant",
                        format!("unexpected outcome {other:?}"),
                    ))
                }
            }
        }
        Err(ApiError::internal(
            "lease grant",
            format!("no unused lease id found in {ID_ATTEMPTS} attempts"),
        ))
    }
}

fn check_ttl(ttl_ms: u64) -> Result<(), ApiError> {
    if !(MIN_LEASE_TTL_MS..=MAX_LEASE_TTL_MS).contains(&ttl_ms) {
        return Err(ApiError::invalid(
            "ttl_ms",
            format!("{ttl_ms} is outside {MIN_LEASE_TTL_MS}..={MAX_LEASE_TTL_MS}"),
        ));
    }
    Ok(())
}

fn check_id(id: u64) -> Result<(), ApiError> {
    if id == 0 {
        return Err(ApiError::invalid("id", "must not be 0"));
    }
    Ok(())
}

#[tonic::async_trait]
impl LeaseApi for LeaseService {
    #[tracing::instrument(level = "debug", skip_all, fields(ttl_ms = req.get_ref().ttl_ms))]
    async fn grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let r = req.into_inner();
        check_ttl(r.ttl_ms)?;
        match self.node.route(forwarded).await? {
            Route::Forward { channel, leader } => {
                forward!(self, channel, leader, grant, r)
            }
            Route::Local => Ok(Response::new(self.grant_local(r).await?)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(lease = req.get_ref().id))]
    async fn keep_alive(
        &self,
        req: Request<pb::LeaseKeepAliveRequest>,
    ) -> Result<Response<pb::LeaseKeepAliveResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let r = req.into_inner();
        check_id(r.id)?;
        match self.node.route(forwarded).await? {
            Route::Forward { channel, leader } => {
                forward!(self, channel, leader, keep_alive, r)
            }
            Route::Local => {
                self.node.read_barrier().await?;
                let revision = self.node.store.revision();
                let (lease, _) = self
                    .node
                    .store
                    .lease(r.id)
                    .map_err(|e| ApiError::internal("lease read", e))?
                    .ok_or(ApiError::LeaseNotFound { id: r.id })?;
                let ttl = self.node.leases.keep_alive(lease);
                Ok(Response::new(pb::LeaseKeepAliveResponse {
                    header: Some(self.node.header(revision)),
                    id: r.id,
                    ttl_ms: ttl.as_millis() as u64,
                }))
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(lease = req.get_ref().id))]
    async fn revoke(
        &self,
        req: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let r = req.into_inner();
        check_id(r.id)?;
        match self.node.route(forwarded).await? {
            Route::Forward { channel, leader } => {
                forward!(self, channel, leader, revoke, r)
            }
            Route::Local => {
                let resp = self.node.write(Command::LeaseRevoke { id: r.id }).await?;
                match resp.outcome {
                    Outcome::LeaseRevoked { deleted_keys } => {
                        self.node.leases.forget(r.id);
                        Ok(Response::new(pb::LeaseRevokeResponse {
                            header: Some(self.node.header(resp.revision)),
                            deleted_keys,
                        }))
                    }
                    Outcome::LeaseNotFound { id } => Err(ApiError::LeaseNotFound { id }.into()),
                    other => Err(ApiError::internal(
                        "lease revoke",
                        format!("unexpected outcome {other:?}"),
                    )
                    .into()),
                }
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list(
        &self,
        req: Request<pb::LeaseListRequest>,
    ) -> Result<Response<pb::LeaseListResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let r = req.into_inner();
        match self.node.route(forwarded).await? {
            Route::Forward { channel, leader } => {
                forward!(self, channel, leader, list, r)
            }
            Route::Local => {
                self.node.read_barrier().await?;
                let revision = self.node.store.revision();
                let store_err = |e| ApiError::internal("lease read", e);
                let mut leases = Vec::new();
                for lease in self.node.store.leases().map_err(store_err)? {
                    // Revoked between the two reads: leave it out.
                    let Some((lease, keys)) = self.node.store.lease(lease.id).map_err(store_err)?
                    else {
                        continue;
                    };
                    let remaining = self
                        .node
                        .leases
                        .remaining(lease.id)
                        .map_or(lease.ttl_ms, |d| d.as_millis() as u64);
                    leases.push(pb::LeaseInfo {
                        id: lease.id,
                        ttl_ms: lease.ttl_ms,
                        remaining_ms: remaining,
                        keys,
                    });
                }
                Ok(Response::new(pb::LeaseListResponse {
                    header: Some(self.node.header(revision)),
                    leases,
                }))
            }
        }
    }
}

/// Lease calls made inside the control plane (join records, sidecar
/// registrations): through the `Lease` service itself, so they forward to
/// the leader and arm its deadlines exactly as a client's calls do.
pub(crate) mod local {
    use std::sync::Arc;

    use trellis_proto::admin as pb;
    use trellis_proto::admin::lease_server::Lease as _;

    use super::LeaseService;
    use crate::error::ApiError;
    use crate::node::Node;

    /// Grant a new lease of `ttl_ms`; returns its id.
    pub async fn grant(node: &Arc<Node>, ttl_ms: u64) -> Result<u64, ApiError> {
        LeaseService::new(node.clone())
            .grant(tonic::Request::new(pb::LeaseGrantRequest { id: 0, ttl_ms }))
            .await
            .map(|r| r.into_inner().id)
            .map_err(ApiError::Remote)
    }

    /// Keep lease `id` alive; returns its TTL.
    pub async fn keep_alive(node: &Arc<Node>, id: u64) -> Result<u64, ApiError> {
        LeaseService::new(node.clone())
            .keep_alive(tonic::Request::new(pb::LeaseKeepAliveRequest { id }))
            .await
            .map(|r| r.into_inner().ttl_ms)
            .map_err(ApiError::Remote)
    }

    /// Revoke lease `id` (and delete its keys).
    pub async fn revoke(node: &Arc<Node>, id: u64) -> Result<(), ApiError> {
        LeaseService::new(node.clone())
            .revoke(tonic::Request::new(pb::LeaseRevokeRequest { id }))
            .await
            .map(|_| ())
            .map_err(ApiError::Remote)
    }
}
