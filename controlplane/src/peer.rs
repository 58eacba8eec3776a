//! Raft peer transport, server side: decodes openraft messages from peers,
//! hands them to the local [`Raft`], and encodes the `Result` back. Also
//! serves `TimeoutNow`, the target half of a leadership transfer, and the
//! `Liveness` streams followers watch (see [`crate::crash_detector`]).

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use trellis_proto::raft::raft_peer_server::RaftPeer;
use trellis_proto::raft::{
    LivenessEvent, LivenessRequest, RaftPayload, TimeoutNowRequest, TimeoutNowResponse,
};
use trellis_raft_store::codec::{decode, encode};
use trellis_raft_store::Raft;

/// Interval between election attempts while taking over leadership.
const TAKEOVER_RETRY: Duration = Duration::from_millis(30);
/// Upper bound on how long a `TimeoutNow` may keep trying.
const MAX_TAKEOVER: Duration = Duration::from_secs(10);

pub struct PeerService {
    raft: Raft,
    /// Becomes `true` when the node shuts down; ends `Liveness` streams so
    /// a graceful shutdown is not held up by them.
    shutdown: watch::Receiver<bool>,
}

impl PeerService {
    pub fn new(raft: Raft, shutdown: watch::Receiver<bool>) -> Self {
        PeerService { raft, shutdown }
    }
}

fn bad_payload(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("undecodable raft payload: {e}"))
}

fn payload<T: serde::Serialize>(
    what: &'static str,
    value: &T,
) -> Result<Response<RaftPayload>, Status> {
    let data = encode(what, value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftPayload { data }))
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    type LivenessStream = Pin<Box<dyn Stream<Item = Result<LivenessEvent, Status>> + Send>>;

    /// Yields one event, then stays open until this node shuts down.
    #[tracing::instrument(level = "debug", skip_all, fields(from = req.get_ref().from))]
    async fn liveness(
        &self,
        req: Request<LivenessRequest>,
    ) -> Result<Response<Self::LivenessStream>, Status> {
        let _ = req;
        let mut shutdown = self.shutdown.clone();
        // One event at once (it also flushes the response headers, so the
        // follower knows the stream is open), then nothing until shutdown.
        let hello = futures::stream::once(async { Ok(LivenessEvent {}) });
        let ends = futures::stream::once(async move {
            let _ = shutdown.wait_for(|stopping| *stopping).await;
        });
        let quiet = futures::StreamExt::filter_map(ends, |()| async { None });
        Ok(Response::new(Box::pin(futures::StreamExt::chain(
            hello, quiet,
        ))))
    }

    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode("append entries", &req.into_inner().data).map_err(bad_payload)?;
        let result = self.raft.append_entries(rpc).await;
        payload("append entries result", &result)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode("vote", &req.into_inner().data).map_err(bad_payload)?;
        let result = self.raft.vote(rpc).await;
        payload("vote result", &result)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode("install snapshot", &req.into_inner().data).map_err(bad_payload)?;
        let result = self.raft.install_snapshot(rpc).await;
        payload("install snapshot result", &result)
    }

    #[tracing::instrument(level = "info", skip_all, fields(from = req.get_ref().from_leader))]
    async fn timeout_now(
        &self,
        req: Request<TimeoutNowRequest>,
    ) -> Result<Response<TimeoutNowResponse>, Status> {
        let req = req.into_inner();
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(req.deadline_ms as u64).min(MAX_TAKEOVER);
        let me = self.raft.metrics().borrow().id;
        loop {
            let (leader, term) = {
                let m = self.raft.metrics();
                let m = m.borrow();
                (m.current_leader, m.current_term)
            };
            if leader == Some(me) && term > req.term {
                return Ok(Response::new(TimeoutNowResponse {
                    became_leader: true,
                    term,
                }));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Response::new(TimeoutNowResponse {
                    became_leader: false,
                    term,
                }));
            }
            self.raft
                .trigger()
                .elect()
                .await
                .map_err(|e| Status::unavailable(format!("raft stopped: {e}")))?;
            tokio::time::sleep(TAKEOVER_RETRY).await;
        }
    }
}
