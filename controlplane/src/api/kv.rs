//! The `KV` service: the revisioned key-value API over Raft.
//!
//! Path of a write: validate ([`super::convert`]) → [`Node::route`] →
//! leader: `Raft::client_write`, wait for apply, answer from the state
//! machine's response | follower: forward once to the leader.
//! Path of a linearizable read: route → leader: read index barrier, then a
//! local read | follower: forward. Serializable reads are always local.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};
use trellis_proto::admin as pb;
use trellis_proto::admin::kv_client::KvClient;
use trellis_proto::admin::kv_server::Kv;
use trellis_raft_store::{Command, CommandResponse, Outcome};

use super::convert::{
    check_key, check_put, delete_command, kv_to_pb, put_command, txn_command, txn_result_to_pb,
};
use super::is_forwarded;
use crate::bugs::{self, Bug};
use crate::error::ApiError;
use crate::node::{Node, Route, MAX_ADMIN_MESSAGE_BYTES};

/// Page size when the request leaves it 0.
pub const DEFAULT_LIST_LIMIT: usize = 1000;
/// Largest page size accepted.
pub const MAX_LIST_LIMIT: usize = 10_000;
/// A list page stops growing past this many value bytes, so a page of
/// large values stays well below the message size limit.
pub const LIST_MAX_BYTES: usize = 4 * 1024 * 1024;

pub struct KvService {
    node: Arc<Node>,
}

impl KvService {
    pub fn new(node: Arc<Node>) -> Self {
        KvService { node }
    }

    fn client(&self, channel: tonic::transport::Channel) -> KvClient<tonic::transport::Channel> {
        KvClient::new(channel)
            .max_decoding_message_size(MAX_ADMIN_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_ADMIN_MESSAGE_BYTES)
    }

    /// Propose `cmd` locally (the caller checked the route).
    async fn propose(&self, cmd: Command) -> Result<CommandResponse, ApiError> {
        let resp = self.node.write(cmd).await?;
        match resp.outcome {
            Outcome::Conflict {
                key,
                current_mod_revision,
            } => Err(ApiError::Conflict {
                key,
                current: current_mod_revision,
            }),
            // Only compaction rejects (a race with the edge check above).
            Outcome::Rejected { reason } => Err(ApiError::OutOfRange(reason)),
            Outcome::LeaseNotFound { id } => Err(ApiError::LeaseNotFound { id }),
            _ => Ok(resp),
        }
    }
}

fn unexpected(what: &'static str, outcome: &Outcome) -> ApiError {
    ApiError::internal("kv", format!("{what} produced {outcome:?}"))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Kv for KvService {
    #[tracing::instrument(level = "debug", skip_all, fields(key = %req.get_ref().key))]
    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let pb_req = req.into_inner();
        check_put(&pb_req)?;
        match self.node.route(forwarded).await? {
            Route::Forward { channel, leader } => {
                forward!(self, channel, leader, put, pb_req)
            }
            Route::Local if bugs::active(Bug::EarlyAck) => {
                // Injected bug: answer before the write is committed.
                let node = self.node.clone();
                let cmd = put_command(pb_req)?;
                tokio::spawn(async move {
                    let _ = node.write(cmd).await;
                });
                Ok(Response::new(pb::PutResponse {
                    header: Some(self.node.header(self.node.store.revision() + 1)),
                    prev_kv: None,
                }))
            }
            Route::Local => {
                let want_prev = pb_req.prev_kv;
                let resp = self.propose(put_command(pb_req)?).await?;
                let Outcome::Put { prev } = resp.outcome else {
                    return Err(unexpected("put", &resp.outcome).into());
                };
                Ok(Response::new(pb::PutResponse {
                    header: Some(self.node.header(resp.revision)),
                    prev_kv: if want_prev { prev.map(kv_to_pb) } else { None },
                }))
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %req.get_ref().key))]
    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let pb_req = req.into_inner();
        check_key("key", &pb_req.key)?;
        let local_only = pb_req.serializable || bugs::active(Bug::StaleRead);
        match self.node.read_route(local_only, forwarded).await? {
            Route::Forward { channel, leader } => {
                forward!(self, channel, leader, get, pb_req)
            }
            Route::Local => {
                let revision = self.node.store.revision();
                let kv = self
                    .node
                    .store
                    .get(&pb_req.key)
                    .map_err(|e| ApiError::internal("store get", e))?
                    .ok_or_else(|| ApiError::NotFound {
                        key: pb_req.key.clone(),
                    })?;
                Ok(Response::new(pb::GetResponse {
                    header: Some(self.node.header(revision)),
                    kv: Some(kv_to_pb(kv)),
                }))
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(prefix = %req.get_ref().prefix))]
    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let pb_req = req.into_inner();
        let limit = match pb_req.limit as usize {
            0 => DEFAULT_LIST_LIMIT,
            n if n > MAX_LIST_LIMIT => {
                return Err(ApiError::invalid(
                    "limit",
                    format!("{n} is over the maximum {MAX_LIST_LIMIT}"),
                )
                .into())
            }
            n => n,
        };
        match self.node.read_route(pb_req.serializable, forwarded).await? {
            Route::Forward { channel, leader } => {
                forward!(self, channel, leader, list, pb_req)
            }
            Route::Local => {
                // The page is read as of one revision (no apply lands in
                // the middle), which the header carries: list-then-watch
                // from revision + 1 misses nothing and sees nothing twice.
                let start_after =
                    (!pb_req.page_token.is_empty()).then_some(pb_req.page_token.as_str());
                let page = self
                    .node
                    .store
                    .list(
                        &pb_req.prefix,
                        start_after,
                        limit,
                        LIST_MAX_BYTES,
                        pb_req.keys_only,
                    )
                    .map_err(|e| ApiError::internal("store list", e))?;
                let next_page_token = match (page.more, page.kvs.last()) {
                    (true, Some(last)) => last.key.clone(),
                    _ => String::new(),
                };
                Ok(Response::new(pb::ListResponse {
                    header: Some(self.node.header(page.revision)),
                    kvs: page
                        .kvs
                        .into_iter()
                        .filter(|kv| !crate::system::is_reserved(&kv.key))
                        .map(kv_to_pb)
                        .collect(),
                    next_page_token,
                }))
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %req.get_ref().key))]
    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let pb_req = req.into_inner();
        check_key("key", &pb_req.key)?;
        match self.node.route(forwarded).await? {
            Route::Forward { channel, leader } => {
                forward!(self, channel, leader, delete, pb_req)
            }
            Route::Local => {
                let want_prev = pb_req.prev_kv;
                let resp = self.propose(delete_command(pb_req)?).await?;
                let Outcome::Delete { prev } = resp.outcome else {
                    return Err(unexpected("delete", &resp.outcome).into());
                };
                Ok(Response::new(pb::DeleteResponse {
                    header: Some(self.node.header(resp.revision)),
                    deleted: prev.is_some(),
                    prev_kv: if want_prev { prev.map(kv_to_pb) } else { None },
                }))
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let pb_req = req.into_inner();
        let cmd = txn_command(&pb_req)?;
        match self.node.route(forwarded).await? {
            Route::Forward { channel, leader } => {
                forward!(self, channel, leader, txn, pb_req)
            }
            Route::Local => {
                let resp = self.propose(cmd).await?;
                let Outcome::Txn { succeeded, results } = resp.outcome else {
                    return Err(unexpected("txn", &resp.outcome).into());
                };
                let header = self.node.header(resp.revision);
                Ok(Response::new(pb::TxnResponse {
                    header: Some(header),
                    succeeded,
                    results: results
                        .into_iter()
                        .map(|r| txn_result_to_pb(r, &header))
                        .collect(),
                }))
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(revision = req.get_ref().revision))]
    async fn compact(
        &self,
        req: Request<pb::CompactRequest>,
    ) -> Result<Response<pb::CompactResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let pb_req = req.into_inner();
        match self.node.route(forwarded).await? {
            Route::Forward { channel, leader } => {
                forward!(self, channel, leader, compact, pb_req)
            }
            Route::Local => {
                let (current, compacted) = (
                    self.node.store.revision(),
                    self.node.store.compact_revision(),
                );
                if pb_req.revision > current {
                    return Err(ApiError::OutOfRange(format!(
                        "revision {} is in the future: the current revision is {current}",
                        pb_req.revision
                    ))
                    .into());
                }
                if pb_req.revision < compacted {
                    return Err(ApiError::OutOfRange(format!(
                        "revision {} is already compacted: history starts after revision {compacted}",
                        pb_req.revision
                    ))
                    .into());
                }
                let resp = self
                    .propose(Command::Compact {
                        revision: pb_req.revision,
                    })
                    .await?;
                Ok(Response::new(pb::CompactResponse {
                    header: Some(self.node.header(resp.revision)),
                }))
            }
        }
    }

    type WatchStream = WatchStream;

    #[tracing::instrument(level = "debug", skip_all, fields(prefix = %req.get_ref().prefix, start = req.get_ref().start_revision))]
    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = req.into_inner();
        let stream = super::watch::spawn(self.node.clone(), req)?;
        Ok(Response::new(Box::pin(stream)))
    }
}
