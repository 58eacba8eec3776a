//! The `Internal` service: calls between control nodes only. A follower
//! proposes the control plane's own writes through the leader
//! ([`Node::propose`]), asks it for a read index ([`Node::linearize`]),
//! and `proxy-status` collects every member's connected sidecars.
//!
//! With mutual TLS only node identities may call it (checked by the
//! admin server's authorization layer, [`crate::auth`]).

use std::sync::Arc;

use tonic::{Request, Response, Status};
use trellis_proto::admin as pb;
use trellis_proto::admin::internal_server::Internal as InternalApi;
use trellis_raft_store::Command;

use super::is_forwarded;
use crate::error::ApiError;
use crate::node::{Node, Route};

pub struct InternalService {
    node: Arc<Node>,
}

impl InternalService {
    pub fn new(node: Arc<Node>) -> Self {
        InternalService { node }
    }
}

#[tonic::async_trait]
impl InternalApi for InternalService {
    #[tracing::instrument(level = "debug", skip_all)]
    async fn propose(
        &self,
        req: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let cmd: Command = postcard::from_bytes(&req.into_inner().command)
            .map_err(|e| ApiError::invalid("command", e.to_string()))?;
        match self.node.route(forwarded).await? {
            Route::Local => {
                let resp = self.node.write(cmd).await?;
                let response = postcard::to_stdvec(&resp)
                    .map_err(|e| ApiError::internal("encode command response", e))?;
                Ok(Response::new(pb::ProposeResponse { response }))
            }
            Route::Forward { leader, .. } => Err(ApiError::NoLeader(format!(
                "node {} is not the leader; node {leader} is",
                self.node.id
            ))
            .into()),
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn read_index(
        &self,
        req: Request<pb::ReadIndexRequest>,
    ) -> Result<Response<pb::ReadIndexResponse>, Status> {
        match self.node.read_route(false, is_forwarded(&req)).await? {
            Route::Local => Ok(Response::new(pb::ReadIndexResponse {
                revision: self.node.store.revision(),
            })),
            Route::Forward { leader, .. } => Err(ApiError::NoLeader(format!(
                "node {} is not the leader; node {leader} is",
                self.node.id
            ))
            .into()),
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn local_sidecars(
        &self,
        _req: Request<pb::LocalSidecarsRequest>,
    ) -> Result<Response<pb::LocalSidecarsResponse>, Status> {
        Ok(Response::new(pb::LocalSidecarsResponse {
            header: Some(self.node.header(self.node.store.revision())),
            sidecars: self.node.sidecars.list(self.node.id),
        }))
    }
}
