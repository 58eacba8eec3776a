//! Raft peer transport, client side: openraft's [`RaftNetworkFactory`] over
//! tonic. The server side is [`crate::peer`].
//!
//! openraft messages travel postcard-encoded inside `RaftPayload`; the
//! reply is the encoded `Result` of the remote `Raft` call, so remote Raft
//! errors come back typed. One lazily connected HTTP/2 channel per peer
//! address is shared by that peer's replication and vote traffic.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use trellis_proto::raft::raft_peer_client::RaftPeerClient;
use trellis_proto::raft::RaftPayload;
use trellis_raft_store::codec::{decode, encode};
use trellis_raft_store::durable::DurableLog;
use trellis_raft_store::{NodeAddr, NodeId, TypeConfig};

use crate::coalesce::CoalescingConnector;

/// Largest peer message accepted. A Raft append carries up to
/// `max_payload_entries` (300) entries of up to ~1 MiB each.
pub const MAX_PEER_MESSAGE_BYTES: usize = 512 * 1024 * 1024;
/// Connect timeout to a peer: a refused or unroutable peer is reported
/// quickly so openraft backs off instead of stalling replication.
pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Wait between retries to an unreachable peer. openraft's 500 ms default
/// delays a restarted follower's catch-up for no benefit on a LAN.
pub const PEER_RETRY_BACKOFF: Duration = Duration::from_millis(200);

/// How this node dials other nodes: mutual TLS with its node certificate,
/// or plaintext (`--insecure-dev`).
pub type ClientTls = Option<ClientTlsConfig>;

/// Make a lazily connecting channel to `addr` (`host:port`), over mutual
/// TLS when `tls` is set (the server name is the address's host: node
/// certificates carry their IPs as SANs). The connection gathers each
/// call's frames into one write ([`crate::coalesce`]).
pub fn lazy_channel(
    addr: &str,
    connect_timeout: Duration,
    tls: &ClientTls,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = match tls {
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls.clone())?,
        None => Endpoint::from_shared(format!("http://{addr}"))?,
    };
    Ok(endpoint
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(CoalescingConnector::new()))
}

/// Creates [`PeerClient`]s; shared by all of a node's Raft tasks.
#[derive(Clone, Default)]
pub struct PeerNetwork {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    overrides: Arc<BTreeMap<NodeId, String>>,
    tls: ClientTls,
    /// This node's durable log: followers are told no commit above it.
    durable: Option<DurableLog>,
}

impl PeerNetwork {
    /// `overrides` replaces the dialed address of some peers (fault-proxy
    /// harnesses); membership keeps the advertised one.
    pub fn new(overrides: BTreeMap<NodeId, String>, tls: ClientTls) -> Self {
        PeerNetwork {
            channels: Arc::default(),
            overrides: Arc::new(overrides),
            tls,
            durable: None,
        }
    }

    /// Tell followers no commit index above what `durable` says is on disk
    /// here (one of the two rules in `trellis_raft_store::durable`).
    pub fn commits_up_to(mut self, durable: DurableLog) -> Self {
        self.durable = Some(durable);
        self
    }

    /// How peers are dialed.
    pub fn tls(&self) -> &ClientTls {
        &self.tls
    }

    /// The address dialed for peer `id`: its override, or its advertised
    /// Raft address.
    pub fn dial_addr(&self, id: NodeId, node: &NodeAddr) -> String {
        self.overrides.get(&id).unwrap_or(&node.raft_addr).clone()
    }

    fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = map.get(addr) {
            return Ok(ch.clone());
        }
        let ch = lazy_channel(addr, PEER_CONNECT_TIMEOUT, &self.tls)?;
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddr) -> PeerClient {
        let addr = self.dial_addr(target, node);
        let client = self.channel(&addr).map(|ch| {
            RaftPeerClient::new(ch)
                .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES)
        });
        PeerClient {
            target,
            durable: self.durable.clone(),
            addr,
            client: client.map_err(|e| e.to_string()),
        }
    }
}

/// Talks to one peer.
pub struct PeerClient {
    target: NodeId,
    durable: Option<DurableLog>,
    addr: String,
    /// `Err` when the address could not even be parsed into an endpoint.
    client: Result<RaftPeerClient<Channel>, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("peer {target} at {addr}: {message}")]
struct PeerError {
    target: NodeId,
    addr: String,
    message: String,
}

type PeerResult<T, E> = Result<T, RPCError<NodeId, NodeAddr, RaftError<NodeId, E>>>;

impl PeerClient {
    fn err(&self, message: impl Into<String>) -> PeerError {
        PeerError {
            target: self.target,
            addr: self.addr.clone(),
            message: message.into(),
        }
    }

    /// Send `req` with `call`, decode the remote `Result<T, RaftError<E>>`.
    async fn call<Req, T, E, F, Fut>(
        &mut self,
        req: &Req,
        ttl: Duration,
        what: &'static str,
        f: F,
    ) -> PeerResult<T, E>
    where
        Req: serde::Serialize,
        T: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
        F: FnOnce(RaftPeerClient<Channel>, tonic::Request<RaftPayload>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<RaftPayload>, tonic::Status>>,
    {
        let client = match &self.client {
            Ok(c) => c.clone(),
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::new(
                    &self.err(e.clone()),
                )))
            }
        };
        let data = encode(what, req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { data });
        request.set_timeout(ttl);
        let reply = match f(client, request).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let e = self.err(format!("{what}: {}: {}", status.code(), status.message()));
                return Err(match status.code() {
                    tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&e)),
                    _ => RPCError::Network(NetworkError::new(&e)),
                });
            }
        };
        let result: Result<T, RaftError<NodeId, E>> =
            decode(what, &reply.data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    #[tracing::instrument(level = "trace", skip_all, fields(target = self.target))]
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> PeerResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        if let Some(durable) = &self.durable {
            rpc.leader_commit = durable.clamp_commit(rpc.leader_commit);
        }
        self.call(
            &rpc,
            option.hard_ttl(),
            "append entries",
            |mut c, r| async move { c.append_entries(r).await },
        )
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(target = self.target))]
    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> PeerResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(
            &rpc,
            option.hard_ttl(),
            "install snapshot",
            |mut c, r| async move { c.install_snapshot(r).await },
        )
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(target = self.target))]
    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> PeerResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(&rpc, option.hard_ttl(), "vote", |mut c, r| async move {
            c.vote(r).await
        })
        .await
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(PEER_RETRY_BACKOFF))
    }
}
