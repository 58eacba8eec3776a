//! The `Cluster` service: initialize, status, membership, leader transfer
//! and snapshots. Membership changes and transfers run on the leader
//! (followers forward them); `Status`, `Initialize` and `Snapshot` act on
//! the node that receives them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use openraft::{ChangeMembers, ServerState};
use tonic::{Request, Response, Status};
use trellis_proto::admin as pb;
use trellis_proto::admin::cluster_client::ClusterClient;
use trellis_proto::admin::cluster_server::Cluster;
use trellis_proto::admin::internal_client::InternalClient;
use trellis_proto::raft::raft_peer_client::RaftPeerClient;
use trellis_proto::raft::TimeoutNowRequest;
use trellis_raft_store::{NodeAddr, NodeId};

use super::{forward_error, forward_request, is_forwarded};
use crate::error::ApiError;
use crate::network::{lazy_channel, PEER_CONNECT_TIMEOUT};
use crate::node::{Node, Route};

/// How long a new member may take to catch up (log or snapshot) before
/// `AddMember` gives up waiting; it stays a learner and catches up anyway.
pub const ADD_MEMBER_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a snapshot may take to build.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

pub struct ClusterService {
    node: Arc<Node>,
}

impl ClusterService {
    pub fn new(node: Arc<Node>) -> Self {
        ClusterService { node }
    }

    fn members(&self) -> Vec<pb::Member> {
        let m = self.node.raft.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, n)| pb::Member {
                node_id: *id,
                raft_addr: n.raft_addr.clone(),
                admin_addr: n.admin_addr.clone(),
                voter: voters.contains(id),
            })
            .collect()
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    #[tracing::instrument(level = "info", skip_all)]
    async fn initialize(
        &self,
        _req: Request<pb::InitializeRequest>,
    ) -> Result<Response<pb::InitializeResponse>, Status> {
        let mut members = BTreeMap::new();
        members.insert(self.node.id, self.node.addr.clone());
        match self.node.raft.initialize(members).await {
            Ok(()) => {}
            Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
                return Err(ApiError::FailedPrecondition(format!(
                    "node {} is already initialized: {e}",
                    self.node.id
                ))
                .into())
            }
            Err(RaftError::APIError(e)) => {
                return Err(ApiError::FailedPrecondition(e.to_string()).into())
            }
            Err(RaftError::Fatal(e)) => return Err(ApiError::internal("raft initialize", e).into()),
        }
        // Wait until this node leads its one-member cluster, so the next
        // call (AddMember) finds a leader.
        let mut rx = self.node.raft.metrics();
        let id = self.node.id;
        let waited = tokio::time::timeout(
            self.node.request_timeout,
            rx.wait_for(|m| m.current_leader == Some(id) && m.state == ServerState::Leader),
        )
        .await;
        if !matches!(waited, Ok(Ok(_))) {
            return Err(ApiError::NoLeader(
                "initialized, but did not become leader in time".into(),
            )
            .into());
        }
        Ok(Response::new(pb::InitializeResponse {
            member: Some(pb::Member {
                node_id: self.node.id,
                raft_addr: self.node.addr.raft_addr.clone(),
                admin_addr: self.node.addr.admin_addr.clone(),
                voter: true,
            }),
        }))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let committed = self
            .node
            .raft
            .with_raft_state(|s| s.committed.map(|c| c.index))
            .await
            .ok()
            .flatten();
        let m = self.node.raft.metrics().borrow().clone();
        let state = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let initialized = m
            .membership_config
            .membership()
            .voter_ids()
            .next()
            .is_some();
        Ok(Response::new(pb::StatusResponse {
            node_id: self.node.id,
            raft_addr: self.node.addr.raft_addr.clone(),
            admin_addr: self.node.addr.admin_addr.clone(),
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            state: state.to_string(),
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index: committed.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            revision: self.node.store.revision(),
            compact_revision: self.node.store.compact_revision(),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            purged_index: m.purged.map_or(0, |l| l.index),
            members: self.members(),
            initialized,
            db_size_bytes: self.node.store.size_on_disk(),
            liveness_watched_leader: self
                .node
                .liveness_watched
                .load(std::sync::atomic::Ordering::Relaxed),
        }))
    }

    #[tracing::instrument(level = "info", skip_all, fields(node = req.get_ref().node_id))]
    async fn add_member(
        &self,
        req: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::AddMemberResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let r = req.into_inner();
        if r.node_id == 0 {
            return Err(ApiError::invalid("node_id", "must be positive").into());
        }
        for (field, addr) in [("raft_addr", &r.raft_addr), ("admin_addr", &r.admin_addr)] {
            addr.parse::<std::net::SocketAddr>()
                .map_err(|e| ApiError::invalid(field, format!("{addr:?} is not ip:port ({e})")))?;
        }
        if let Route::Forward { channel, leader } = self.node.route(forwarded).await? {
            return ClusterClient::new(channel)
                .add_member(forward_request(r, ADD_MEMBER_CATCH_UP_TIMEOUT))
                .await
                .map_err(|s| forward_error(leader, s));
        }
        let addr = NodeAddr {
            raft_addr: r.raft_addr.clone(),
            admin_addr: r.admin_addr.clone(),
        };
        if let Some(existing) = self.members().into_iter().find(|m| m.node_id == r.node_id) {
            if existing.raft_addr != addr.raft_addr || existing.admin_addr != addr.admin_addr {
                return Err(ApiError::FailedPrecondition(format!(
                    "node {} is already a member at raft={} admin={}; remove it first",
                    r.node_id, existing.raft_addr, existing.admin_addr
                ))
                .into());
            }
        }
        tokio::time::timeout(
            ADD_MEMBER_CATCH_UP_TIMEOUT,
            self.node.raft.add_learner(r.node_id, addr, true),
        )
        .await
        .map_err(|_| ApiError::Timeout {
            what: "add learner",
            after: ADD_MEMBER_CATCH_UP_TIMEOUT,
        })?
        .map_err(ApiError::from)?;
        if !r.learner {
            let ids: BTreeSet<NodeId> = [r.node_id].into();
            self.node
                .change_membership(ChangeMembers::AddVoterIds(ids))
                .await?;
        }
        Ok(Response::new(pb::AddMemberResponse {
            members: self.members(),
        }))
    }

    #[tracing::instrument(level = "info", skip_all, fields(node = req.get_ref().node_id))]
    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let r = req.into_inner();
        if let Route::Forward { channel, leader } = self.node.route(forwarded).await? {
            return ClusterClient::new(channel)
                .remove_member(forward_request(r, self.node.request_timeout))
                .await
                .map_err(|s| forward_error(leader, s));
        }
        let member = self
            .members()
            .into_iter()
            .find(|m| m.node_id == r.node_id)
            .ok_or(ApiError::MemberNotFound { id: r.node_id })?;
        let ids: BTreeSet<NodeId> = [r.node_id].into();
        let change = if member.voter {
            ChangeMembers::RemoveVoters(ids)
        } else {
            ChangeMembers::RemoveNodes(ids)
        };
        self.node.change_membership(change).await?;
        Ok(Response::new(pb::RemoveMemberResponse {
            members: self.members(),
        }))
    }

    #[tracing::instrument(level = "info", skip_all, fields(to = req.get_ref().node_id))]
    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let r = req.into_inner();
        let target = self
            .members()
            .into_iter()
            .find(|m| m.node_id == r.node_id)
            .ok_or(ApiError::MemberNotFound { id: r.node_id })?;
        if !target.voter {
            return Err(ApiError::FailedPrecondition(format!(
                "node {} is a learner and cannot lead",
                r.node_id
            ))
            .into());
        }
        if let Route::Forward { channel, leader } = self.node.route(forwarded).await? {
            if leader == r.node_id {
                return Ok(Response::new(pb::TransferLeaderResponse {
                    leader_id: leader,
                }));
            }
            return ClusterClient::new(channel)
                .transfer_leader(forward_request(r, self.node.request_timeout))
                .await
                .map_err(|s| forward_error(leader, s));
        }
        if r.node_id == self.node.id {
            return Ok(Response::new(pb::TransferLeaderResponse {
                leader_id: self.node.id,
            }));
        }
        // In a task of its own: if this RPC is cancelled (client deadline),
        // the transfer still ends by re-enabling heartbeats and elections.
        let node = self.node.clone();
        let (to, addr) = (r.node_id, target.raft_addr.clone());
        tokio::spawn(async move {
            let result = transfer(&node, to, &addr).await;
            // Whatever happened, this node must be able to lead again later.
            node.raft.runtime_config().heartbeat(true);
            node.raft.runtime_config().elect(true);
            result
        })
        .await
        .map_err(|e| ApiError::internal("leader transfer", e))??;
        Ok(Response::new(pb::TransferLeaderResponse {
            leader_id: r.node_id,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn proxy_status(
        &self,
        _req: Request<pb::ProxyStatusRequest>,
    ) -> Result<Response<pb::ProxyStatusResponse>, Status> {
        // The revision first: a sidecar that reports at least this much had
        // applied everything committed before the call.
        self.node.linearize().await?;
        let revision = self.node.store.revision();
        let mut sidecars = Vec::new();
        let mut unreachable = Vec::new();
        let asks = self.members().into_iter().map(|m| {
            let node = self.node.clone();
            async move {
                if m.node_id == node.id {
                    return (m.node_id, Ok(node.sidecars.list(node.id)));
                }
                let result = async {
                    let channel = node.admin_channel(&m.admin_addr)?;
                    let mut req = Request::new(pb::LocalSidecarsRequest {});
                    req.set_timeout(node.request_timeout);
                    InternalClient::new(channel)
                        .max_decoding_message_size(crate::node::MAX_ADMIN_MESSAGE_BYTES)
                        .local_sidecars(req)
                        .await
                        .map(|r| r.into_inner().sidecars)
                        .map_err(ApiError::Remote)
                }
                .await;
                (m.node_id, result)
            }
        });
        for (id, result) in futures::future::join_all(asks).await {
            match result {
                Ok(list) => sidecars.extend(list),
                Err(e) => unreachable.push(format!("node {id}: {e}")),
            }
        }
        Ok(Response::new(pb::ProxyStatusResponse {
            header: Some(self.node.header(revision)),
            revision,
            sidecars,
            unreachable,
        }))
    }

    #[tracing::instrument(level = "info", skip_all)]
    async fn snapshot(
        &self,
        _req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let raft = &self.node.raft;
        let applied = raft.metrics().borrow().last_applied.map_or(0, |l| l.index);
        raft.trigger()
            .snapshot()
            .await
            .map_err(|e| ApiError::internal("raft snapshot", e))?;
        let m = raft
            .wait(Some(SNAPSHOT_TIMEOUT))
            .metrics(
                |m| m.snapshot.map_or(0, |s| s.index) >= applied,
                "snapshot built",
            )
            .await
            .map_err(|e| ApiError::internal("raft snapshot", e))?;
        let snapshot_index = m.snapshot.map_or(0, |s| s.index);
        if snapshot_index > 0 {
            raft.trigger()
                .purge_log(snapshot_index)
                .await
                .map_err(|e| ApiError::internal("raft purge", e))?;
        }
        let purged_index = raft.metrics().borrow().purged.map_or(0, |l| l.index);
        Ok(Response::new(pb::SnapshotResponse {
            node_id: self.node.id,
            snapshot_index,
            purged_index,
        }))
    }
}

/// Leadership transfer (openraft 0.9 has none): wait until the target has
/// the whole log, stop heartbeats and elections here so followers' leader
/// leases lapse, and ask the target to campaign (`TimeoutNow`).
async fn transfer(node: &Node, target: NodeId, target_raft_addr: &str) -> Result<(), ApiError> {
    let raft = &node.raft;
    let election_max = Duration::from_millis(node.config.raft.election_timeout_max_ms);
    let last = raft.metrics().borrow().last_log_index;
    raft.wait(Some(node.request_timeout))
        .metrics(
            |m| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&target))
                    .is_some_and(|matched| matched.map(|l| l.index) >= last)
            },
            "target caught up",
        )
        .await
        .map_err(|_| {
            ApiError::FailedPrecondition(format!(
                "node {target} did not catch up with the log in time"
            ))
        })?;
    let term = raft.metrics().borrow().current_term;
    raft.runtime_config().heartbeat(false);
    raft.runtime_config().elect(false);
    let deadline = election_max * 4 + Duration::from_secs(1);
    let channel = lazy_channel(target_raft_addr, PEER_CONNECT_TIMEOUT, &node.client_tls)
        .map_err(|e| ApiError::internal("leader transfer", e))?;
    let mut req = tonic::Request::new(TimeoutNowRequest {
        from_leader: node.id,
        term,
        deadline_ms: deadline.as_millis() as u32,
    });
    req.set_timeout(deadline + Duration::from_secs(1));
    let resp = RaftPeerClient::new(channel)
        .timeout_now(req)
        .await
        .map_err(|s| {
            ApiError::NoLeader(format!("node {target} did not take over: {}", s.message()))
        })?
        .into_inner();
    if !resp.became_leader {
        return Err(ApiError::NoLeader(format!(
            "node {target} could not win an election within {deadline:?} (writes in flight keep follower leases fresh)"
        )));
    }
    Ok(())
}
