//! A running control node: binds its listeners, opens the store, starts
//! Raft, and serves the peer and admin gRPC services.
//!
//! [`Node`] is the state every request handler shares: the [`Raft`]
//! handle, the [`RevisionedStore`] to read from, and leader routing —
//! [`Node::route`] says whether this node can serve a write or a
//! linearizable read itself or which leader to forward it to.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::ServerState;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Channel;
use trellis_proto::admin::internal_client::InternalClient;
use trellis_proto::admin::ResponseHeader;
use trellis_raft_store::{
    Command, CommandResponse, NodeAddr, NodeId, Raft, RevisionedStore, StateMachine,
};

use crate::auth::{AuthorizeLayer, Policy};
use crate::config::NodeConfig;
use crate::error::ApiError;
use crate::network::{lazy_channel, ClientTls, PeerNetwork};
use crate::proposer::Proposer;

/// Connect timeout when forwarding to the leader's admin API.
const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Largest admin message accepted or sent: a 1 MiB value plus overhead,
/// and list pages (bounded by [`crate::api::kv::LIST_MAX_BYTES`]).
pub const MAX_ADMIN_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Where a request is served.
pub enum Route {
    /// This node is the leader.
    Local,
    /// Forward to the leader's admin API over this channel.
    Forward { leader: NodeId, channel: Channel },
}

/// Shared state of a control node.
pub struct Node {
    pub id: NodeId,
    pub raft: Raft,
    pub store: Arc<dyn RevisionedStore>,
    pub sm: StateMachine,
    /// This node's advertised addresses.
    pub addr: NodeAddr,
    pub config: NodeConfig,
    pub request_timeout: Duration,
    admin_channels: Mutex<HashMap<String, Channel>>,
    barrier: ReadBarrier,
    proposer: Proposer,
    /// Lease deadlines, while this node leads.
    pub leases: crate::leases::LeaseKeeper,
    /// The leader the crash detector holds an open stream to (0: none).
    pub liveness_watched: Arc<AtomicU64>,
    /// How this node dials other nodes (mutual TLS, or plaintext in
    /// `--insecure-dev` mode).
    pub client_tls: ClientTls,
    /// Sidecars connected to this node's QUIC endpoint.
    pub sidecars: Arc<crate::quic::registry::SidecarRegistry>,
    /// The parsed cluster CA, by the mod revision it was read at.
    pub(crate) ca_cache: Mutex<Option<(u64, Arc<trellis_identity::Ca>)>>,
}

/// Coalesces concurrent linearizable reads onto shared read-index rounds.
///
/// A read may use any round that *started* after the read arrived (its
/// read index then covers every write acknowledged before the read). One
/// round runs at a time; reads that arrive during it share the next one.
#[derive(Default)]
struct ReadBarrier {
    /// Rounds started so far (a round's number is its start order).
    started: AtomicU64,
    /// Highest round number that completed successfully.
    completed: AtomicU64,
    /// Held for the duration of a round.
    round: tokio::sync::Mutex<()>,
}

impl Node {
    /// The response header for an answer at `revision`.
    pub fn header(&self, revision: u64) -> ResponseHeader {
        ResponseHeader {
            revision,
            node_id: self.id,
            raft_term: self.raft.metrics().borrow().current_term,
        }
    }

    pub(crate) fn admin_channel(&self, addr: &str) -> Result<Channel, ApiError> {
        let mut map = self
            .admin_channels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = map.get(addr) {
            return Ok(ch.clone());
        }
        let ch = lazy_channel(addr, FORWARD_CONNECT_TIMEOUT, &self.client_tls).map_err(|e| {
            ApiError::internal("forwarding", format!("bad leader address {addr:?}: {e}"))
        })?;
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// Decide where a write or linearizable read is served, waiting (up to
    /// the request timeout) for a leader if an election is under way.
    /// A request that was already forwarded once is never forwarded again.
    pub async fn route(&self, already_forwarded: bool) -> Result<Route, ApiError> {
        let mut rx = self.raft.metrics();
        let deadline = Instant::now() + self.request_timeout;
        loop {
            {
                let m = rx.borrow_and_update();
                if m.membership_config
                    .membership()
                    .voter_ids()
                    .next()
                    .is_none()
                {
                    return Err(ApiError::FailedPrecondition(
                        "this node is not part of an initialized cluster (run `trellisctl cluster init`)".into(),
                    ));
                }
                match m.current_leader {
                    Some(l) if l == self.id && m.state == ServerState::Leader => {
                        return Ok(Route::Local)
                    }
                    Some(l) if l != self.id => {
                        if already_forwarded {
                            return Err(ApiError::NoLeader(format!(
                                "node {} is not the leader; node {l} is",
                                self.id
                            )));
                        }
                        let addr = m
                            .membership_config
                            .membership()
                            .get_node(&l)
                            .map(|n| n.admin_addr.clone())
                            .ok_or_else(|| {
                                ApiError::NoLeader(format!("leader {l} is not in the membership"))
                            })?;
                        drop(m);
                        return Ok(Route::Forward {
                            leader: l,
                            channel: self.admin_channel(&addr)?,
                        });
                    }
                    _ => {}
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(ApiError::NoLeader(format!(
                    "no leader elected within {:?}",
                    self.request_timeout
                )));
            }
        }
    }

    /// Where a read is served: locally for a serializable read; else like
    /// [`Node::route`], and when local only after a read barrier.
    pub async fn read_route(
        &self,
        serializable: bool,
        already_forwarded: bool,
    ) -> Result<Route, ApiError> {
        if serializable {
            return Ok(Route::Local);
        }
        let route = self.route(already_forwarded).await?;
        if let Route::Local = route {
            self.read_barrier().await?;
        }
        Ok(route)
    }

    /// Propose `cmd` on this node (which [`Node::route`] found to be the
    /// leader), batched with concurrent writes, and wait until it is
    /// applied.
    pub async fn write(&self, cmd: Command) -> Result<CommandResponse, ApiError> {
        self.proposer.propose(cmd).await
    }

    /// Propose `cmd` from any node: here if this node leads, else through
    /// the leader's `Internal.Propose` (for the control plane's own writes,
    /// e.g. on behalf of a sidecar connected to a follower).
    pub async fn propose(&self, cmd: Command) -> Result<CommandResponse, ApiError> {
        match self.route(false).await? {
            Route::Local => self.write(cmd).await,
            Route::Forward { leader, channel } => {
                let command = postcard::to_stdvec(&cmd)
                    .map_err(|e| ApiError::internal("encode command", e))?;
                let resp = InternalClient::new(channel)
                    .propose(crate::api::forward_request(
                        trellis_proto::admin::ProposeRequest { command },
                        self.request_timeout,
                    ))
                    .await
                    .map_err(|s| ApiError::Remote(crate::api::forward_error(leader, s)))?
                    .into_inner();
                postcard::from_bytes(&resp.response)
                    .map_err(|e| ApiError::internal("decode command response", e))
            }
        }
    }

    /// Make the next local read linearizable, on any node: the leader runs
    /// a read barrier; a follower asks the leader for its read revision
    /// (`Internal.ReadIndex`, after the leader's own barrier) and waits
    /// until it has applied that far — etcd's follower read protocol.
    pub async fn linearize(&self) -> Result<(), ApiError> {
        match self.route(false).await? {
            Route::Local => self.read_barrier().await,
            Route::Forward { leader, channel } => {
                let want = InternalClient::new(channel)
                    .read_index(crate::api::forward_request(
                        trellis_proto::admin::ReadIndexRequest {},
                        self.request_timeout,
                    ))
                    .await
                    .map_err(|s| ApiError::Remote(crate::api::forward_error(leader, s)))?
                    .into_inner()
                    .revision;
                let mut applied = self.store.subscribe();
                tokio::time::timeout(self.request_timeout, applied.wait_for(|r| *r >= want))
                    .await
                    .map_err(|_| {
                        ApiError::NoLeader(format!(
                            "this node did not apply up to the leader's revision {want} within {:?}",
                            self.request_timeout
                        ))
                    })?
                    .map_err(|_| ApiError::internal("linearize", "store stopped"))?;
                Ok(())
            }
        }
    }

    /// Commit a membership change (this node leads), within the request
    /// timeout.
    pub async fn change_membership(
        &self,
        change: openraft::ChangeMembers<NodeId, NodeAddr>,
    ) -> Result<(), ApiError> {
        tokio::time::timeout(
            self.request_timeout,
            self.raft.change_membership(change, false),
        )
        .await
        .map_err(|_| ApiError::Timeout {
            what: "membership change",
            after: self.request_timeout,
        })??;
        Ok(())
    }

    /// Confirm leadership with a quorum (read index) and wait until this
    /// node has applied up to it: a read after this is linearizable.
    /// Concurrent callers share rounds (see [`ReadBarrier`]).
    pub async fn read_barrier(&self) -> Result<(), ApiError> {
        let b = &self.barrier;
        let arrival = b.started.load(Ordering::SeqCst);
        let _round = tokio::time::timeout(self.request_timeout, b.round.lock())
            .await
            .map_err(|_| {
                ApiError::NoLeader(format!(
                    "no read-index round completed within {:?}",
                    self.request_timeout
                ))
            })?;
        if b.completed.load(Ordering::SeqCst) > arrival {
            return Ok(());
        }
        let number = b.started.fetch_add(1, Ordering::SeqCst) + 1;
        self.read_index_round().await?;
        b.completed.store(number, Ordering::SeqCst);
        Ok(())
    }

    /// One read-index round: ask openraft for the read log id (leadership
    /// confirmed by a quorum) and wait for the state machine to apply it.
    /// (openraft's `ensure_linearizable` waits on metrics, which are
    /// published lazily and cost a heartbeat interval per read.)
    async fn read_index_round(&self) -> Result<(), ApiError> {
        let deadline = Instant::now() + self.request_timeout;
        let mut applied = self.sm.subscribe_applied();
        let read_log_id = match tokio::time::timeout_at(deadline, self.raft.get_read_log_id()).await
        {
            Err(_) => Err(ApiError::NoLeader(format!(
                "leadership not confirmed by a quorum within {:?}",
                self.request_timeout
            ))),
            Ok(Ok((read_log_id, _))) => Ok(read_log_id),
            Ok(Err(e)) => Err(ApiError::from(e)),
        }?;
        let want = read_log_id.map_or(0, |l| l.index);
        let waited = tokio::time::timeout_at(deadline, applied.wait_for(|a| *a >= want))
            .await
            .map(|r| r.map(|_| ()));
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(ApiError::internal("read barrier", "state machine stopped")),
            Err(_) => Err(ApiError::NoLeader(format!(
                "this node did not apply up to the read index {want} within {:?}",
                self.request_timeout
            ))),
        }
    }
}

/// Addresses a started node actually bound (port 0 resolved).
#[derive(Debug, Clone)]
pub struct BoundAddrs {
    pub raft: SocketAddr,
    pub admin: SocketAddr,
    /// `None` in `--insecure-dev` mode (no QUIC endpoint).
    pub quic: Option<SocketAddr>,
}

/// A started node and its server tasks.
pub struct RunningNode {
    pub node: Arc<Node>,
    pub addrs: BoundAddrs,
    shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot bind {what} address {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the store: {0}")]
    Store(#[from] trellis_raft_store::StoreError),
    #[error("cannot start raft: {0}")]
    Raft(String),
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Quic(#[from] crate::quic::QuicError),
}

/// A node's TLS material, read and checked at start.
struct NodeTls {
    server: tonic::transport::ServerTlsConfig,
    client: tonic::transport::ClientTlsConfig,
    quic: rustls::ServerConfig,
}

fn read_pem(field: &str, path: &std::path::Path) -> Result<String, StartError> {
    std::fs::read_to_string(path)
        .map_err(|e| StartError::Tls(format!("{field} {}: {e}", path.display())))
}

/// Load `tls`, checking that the certificate is this node's (`node/<id>`)
/// and chains to the CA.
fn load_tls(id: NodeId, tls: &crate::config::TlsConfig) -> Result<NodeTls, StartError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
    let ca = read_pem("tls.ca_file", &tls.ca_file)?;
    let cert = read_pem("tls.cert_file", &tls.cert_file)?;
    let key = read_pem("tls.key_file", &tls.key_file)?;
    let info = trellis_identity::cert_info(&cert)
        .map_err(|e| StartError::Tls(format!("tls.cert_file {}: {e}", tls.cert_file.display())))?;
    if info.identity != (trellis_identity::Identity::Node { id }) {
        return Err(StartError::Tls(format!(
            "tls.cert_file {} is for {}, not node/{id} (make one with `trellisctl cert create --node {id}`)",
            tls.cert_file.display(),
            info.identity
        )));
    }
    // Building the QUIC config checks that the key matches the certificate
    // and that the CA parses.
    let quic = trellis_identity::server_config(
        &ca,
        &cert,
        &key,
        trellis_identity::ClientAuth::Optional,
        &[trellis_identity::ALPN_SIDECAR],
    )
    .map_err(|e| StartError::Tls(e.to_string()))?;
    Ok(NodeTls {
        server: ServerTlsConfig::new()
            .identity(Identity::from_pem(&cert, &key))
            .client_ca_root(Certificate::from_pem(&ca)),
        client: ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca))
            .identity(Identity::from_pem(&cert, &key)),
        quic,
    })
}

/// When a commit index sent to followers was held back to this node's
/// durable log (see `trellis_raft_store::durable`), send a heartbeat as
/// soon as the log catches up, so followers apply without waiting for the
/// next heartbeat interval.
fn spawn_commit_nudge(
    raft: Raft,
    durable: trellis_raft_store::durable::DurableLog,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<Result<(), tonic::transport::Error>> {
    tokio::spawn(async move {
        let mut releases = durable.clamp_releases();
        loop {
            tokio::select! {
                _ = async { shutdown.wait_for(|stop| *stop).await.map(drop) } => break,
                released = releases.next() => {
                    if released.is_none() || raft.trigger().heartbeat().await.is_err() {
                        break;
                    }
                }
            }
        }
        Ok(())
    })
}

/// Accepted connections with `TCP_NODELAY` (small gRPC messages must not
/// wait for delayed ACKs: that costs ~40 ms a round trip) and keepalive.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(30)))
}

async fn bind_tcp(what: &'static str, addr: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            what,
            addr: addr.to_string(),
            source,
        })
}

fn local(what: &'static str, l: &TcpListener, addr: &str) -> Result<SocketAddr, StartError> {
    l.local_addr().map_err(|source| StartError::Bind {
        what,
        addr: addr.to_string(),
        source,
    })
}

impl RunningNode {
    /// Validate `config`, bind, open the store, start Raft and the servers.
    pub async fn start(config: NodeConfig) -> Result<RunningNode, StartError> {
        config.validate()?;
        let raft_listener = bind_tcp("raft", &config.raft_addr).await?;
        let admin_listener = bind_tcp("admin", &config.admin_addr).await?;
        let tls = match &config.tls {
            Some(t) => Some(load_tls(config.id, t)?),
            None => None,
        };
        let quic_bind_error = |source| StartError::Bind {
            what: "quic",
            addr: config.quic_addr.clone(),
            source,
        };
        // QUIC needs TLS: a --insecure-dev node binds no UDP port at all.
        let quic_socket = match &tls {
            Some(_) => Some(std::net::UdpSocket::bind(&config.quic_addr).map_err(quic_bind_error)?),
            None => None,
        };
        let addrs = BoundAddrs {
            raft: local("raft", &raft_listener, &config.raft_addr)?,
            admin: local("admin", &admin_listener, &config.admin_addr)?,
            quic: quic_socket
                .as_ref()
                .map(|s| s.local_addr())
                .transpose()
                .map_err(quic_bind_error)?,
        };
        let addr = NodeAddr {
            raft_addr: config
                .advertise_raft_addr
                .clone()
                .unwrap_or(addrs.raft.to_string()),
            admin_addr: config
                .advertise_admin_addr
                .clone()
                .unwrap_or(addrs.admin.to_string()),
        };

        let (log_store, sm) = trellis_raft_store::open_with(
            &config.data_dir,
            config.durability,
            config.raft.leader_overlap.then_some(config.id),
        )?;
        let durable = log_store.durable();
        let store = sm.store();
        let raft_config = Arc::new(config.openraft_config()?);
        let client_tls = tls.as_ref().map(|t| t.client.clone());
        let network = PeerNetwork::new(
            config
                .peer_dial_overrides
                .clone()
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
            client_tls.clone(),
        );
        // With leader overlap on, followers hear no commit index above
        // this node's durable log (the "tell" rule of
        // trellis_raft_store::durable); off, the leader's appends are
        // durable before they count, so there is nothing to hold back.
        let network = if config.raft.leader_overlap {
            network.commits_up_to(durable.clone())
        } else {
            network
        };
        let raft = Raft::new(
            config.id,
            raft_config,
            network.clone(),
            log_store,
            sm.clone(),
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;

        let request_timeout = Duration::from_millis(config.request_timeout_ms);
        let node = Arc::new(Node {
            id: config.id,
            raft: raft.clone(),
            store,
            sm,
            addr,
            request_timeout,
            config,
            admin_channels: Mutex::default(),
            barrier: ReadBarrier::default(),
            proposer: Proposer::start(raft.clone(), request_timeout),
            leases: Default::default(),
            liveness_watched: Arc::default(),
            client_tls,
            sidecars: Arc::default(),
            ca_cache: Mutex::default(),
        });

        let (shutdown, shutdown_rx) = watch::channel(false);
        let stop = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

        let peer = trellis_proto::raft::raft_peer_server::RaftPeerServer::new(
            crate::peer::PeerService::new(raft.clone(), shutdown_rx.clone()),
        )
        .max_decoding_message_size(crate::network::MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(crate::network::MAX_PEER_MESSAGE_BYTES);
        let mut peer_builder = tonic::transport::Server::builder();
        let mut admin_builder = tonic::transport::Server::builder();
        if let Some(t) = &tls {
            peer_builder = peer_builder
                .tls_config(t.server.clone())
                .map_err(|e| StartError::Tls(e.to_string()))?;
            admin_builder = admin_builder
                .tls_config(t.server.clone())
                .map_err(|e| StartError::Tls(e.to_string()))?;
        }
        let peer_server = peer_builder
            .layer(AuthorizeLayer::new(Policy::RaftPeers))
            .add_service(peer)
            .serve_with_incoming_shutdown(incoming(raft_listener), stop(shutdown_rx.clone()));

        // Both reflection versions: grpcurl speaks v1, older clients v1alpha.
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(trellis_proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartError::Reflection(e.to_string()))?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(trellis_proto::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| StartError::Reflection(e.to_string()))?;
        let admin_server = admin_builder
            .layer(AuthorizeLayer::new(Policy::Admin))
            .add_service(crate::api::kv_service(node.clone()))
            .add_service(crate::api::cluster_service(node.clone()))
            .add_service(crate::api::lease_service(node.clone()))
            .add_service(crate::api::resources_service(node.clone()))
            .add_service(crate::api::identity_service(node.clone()))
            .add_service(crate::api::internal_service(node.clone()))
            .add_service(reflection)
            .add_service(reflection_alpha)
            .serve_with_incoming_shutdown(incoming(admin_listener), stop(shutdown_rx.clone()));

        let mut servers = vec![tokio::spawn(peer_server), tokio::spawn(admin_server)];
        match (tls, quic_socket) {
            (Some(t), Some(socket)) => {
                let (quic, _) =
                    crate::quic::spawn(node.clone(), socket, t.quic, shutdown_rx.clone())?;
                servers.push(tokio::spawn(async move {
                    let _ = quic.await;
                    Ok(())
                }));
            }
            _ => tracing::warn!(
                "--insecure-dev: plaintext and unauthenticated admin API and Raft RPC; no QUIC endpoint for sidecars (QUIC needs TLS)"
            ),
        }
        if node.config.raft.leader_overlap {
            servers.push(spawn_commit_nudge(
                node.raft.clone(),
                durable,
                shutdown_rx.clone(),
            ));
        }
        let expiry = crate::leases::spawn(node.clone(), shutdown_rx.clone());
        servers.push(tokio::spawn(async move {
            let _ = expiry.await;
            Ok(())
        }));
        if node.config.raft.crash_detection {
            let detector = crate::crash_detector::spawn(
                node.raft.clone(),
                network,
                node.liveness_watched.clone(),
                shutdown_rx,
            );
            servers.push(tokio::spawn(async move {
                let _ = detector.await;
                Ok(())
            }));
        }
        tracing::info!(
            node_id = node.id,
            raft = %addrs.raft,
            admin = %addrs.admin,
            quic = ?addrs.quic,
            "control node started"
        );
        Ok(RunningNode {
            node,
            addrs,
            shutdown,
            servers,
        })
    }

    /// Stop serving, stop Raft, make the store durable.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for s in self.servers {
            match s.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "server stopped with an error"),
                Err(e) => tracing::warn!(error = %e, "server task failed"),
            }
        }
        if let Err(e) = self.node.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        if let Err(e) = self.node.store.flush() {
            tracing::warn!(error = %e, "final flush");
        }
    }
}
