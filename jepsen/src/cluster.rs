//! The cluster under test: three `trellisd` processes on loopback, the fault
//! proxies on every link, formation, and the process-level faults (kill,
//! restart, pause, membership changes).
//!
//! # Slots
//!
//! The cluster always has three members, one per *slot* (0, 1, 2). Node ids
//! are never reused, so a membership change replaces the member of a slot
//! with a new id: slot `s` holds ids `s+1, s+4, s+7, ...`
//! ([`slot_of`]). Links and clients belong to slots, not ids: register
//! workers and the watcher of a slot keep talking to "the node in slot s"
//! through the same proxy whichever id it currently has.
//!
//! # Wiring
//!
//! - Peer links: one proxy per ordered slot pair `a → b`. A node is started
//!   with `--peer-dial K=<proxy a→slot_of(K)>` for *every* id `K` up to
//!   [`MAX_NODE_ID`] outside its own slot, so nodes added later are reached
//!   through the proxies too without restarting anybody.
//! - Forwarding: followers forward client writes and linearizable reads to
//!   the leader's advertised admin address, which is the same for every
//!   sender. Each node advertises (`--advertise-admin-addr`, and in
//!   `AddMember`) a per-slot forward proxy; for each connection it finds
//!   the sending node by the owner of the connecting socket
//!   ([`crate::proxy::socket_owner`]) and applies the faults of the pipe
//!   between the two nodes.
//! - Clients: one proxy per slot in front of the node's admin port, from
//!   [`Endpoint::Client`]`(s)` to [`Endpoint::Node`]`(s)`.
//! - The harness's own calls (status, formation, membership, the final
//!   reads) go to the admin ports directly: the operator is never
//!   partitioned.
//!
//! Killing a node first takes down every proxy in front of it (listener
//! closed, connections dropped) so peers and clients see what they would
//! see at a dead process: refused connects. Pausing (SIGSTOP) leaves the
//! proxies alone: the kernel still accepts connections for a stopped
//! process.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};
use tonic::Code;
use trellis_proto::admin::cluster_client::ClusterClient;
use trellis_proto::admin::{
    AddMemberRequest, InitializeRequest, RemoveMemberRequest, StatusRequest, StatusResponse,
};

use crate::proxy::{socket_owner, Endpoint, Faults, Proxy, Resolver, Source};

/// Members of the cluster (and slots).
pub const SLOTS: usize = 3;
/// Largest node id a run may use (every node gets a `--peer-dial` for
/// each id of the other slots up to this one): 99 replacements per slot.
pub const MAX_NODE_ID: u64 = 300;
/// How long a node may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Timeout of one status / membership RPC made by the harness.
const CONTROL_RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the harness retries a membership change.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped (SIGTERM) node may take to exit before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Raft timing flags passed unless `--extra-trellisd-arg` sets them: short
/// timeouts so faults cause elections within a run's fault windows, and a
/// request timeout below the clients' 1 s deadline so "no leader" comes
/// back as a definite UNAVAILABLE instead of a client timeout.
const DEFAULT_NODE_FLAGS: &[(&str, &str)] = &[
    ("--heartbeat-ms", "50"),
    ("--election-timeout-min-ms", "150"),
    ("--election-timeout-max-ms", "300"),
    ("--request-timeout-ms", "800"),
];

/// The slot of node `id`.
pub fn slot_of(id: u64) -> usize {
    usize::try_from((id.max(1) - 1) % SLOTS as u64).unwrap_or(0)
}

/// What the harness needs to start nodes.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The `trellisd` binary.
    pub trellisd: PathBuf,
    /// Where node data directories and logs go.
    pub dir: PathBuf,
    /// Appended to every node's command line.
    pub extra_args: Vec<String>,
    /// Seeds the proxies' loss emulation.
    pub seed: u64,
}

/// The ready line `trellisd` prints on stdout.
#[derive(Debug, Deserialize)]
struct ReadyLine {
    event: String,
    node_id: u64,
    raft_addr: String,
    admin_addr: String,
    #[serde(default)]
    quic_addr: Option<String>,
}

/// What a slot's process is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Running,
    /// SIGSTOPped.
    Paused,
    /// SIGKILLed; restart with [`Cluster::restart`].
    Killed,
    /// Removed from the membership and stopped; replace with
    /// [`Cluster::add_replacement`].
    Removed,
}

struct NodeProc {
    id: u64,
    raft: SocketAddr,
    admin: SocketAddr,
    quic: SocketAddr,
    child: Option<Child>,
    state: NodeState,
    admin_channel: Channel,
}

/// Every proxy of the cluster and the shared fault state.
pub struct Net {
    pub faults: Faults,
    /// `peer[a][b]`: connections node a opens to node b.
    peer: Vec<Vec<Option<Proxy>>>,
    /// Forwarded requests to the node in a slot (source resolved).
    fwd: Vec<Proxy>,
    /// Clients of a slot to its node.
    client: Vec<Proxy>,
}

impl Net {
    async fn start(seed: u64, pids: Arc<RwLock<HashMap<u32, usize>>>) -> Result<Net> {
        let faults = Faults::default();
        let mut peer = Vec::new();
        let mut n = 0u64;
        for a in 0..SLOTS {
            let mut row = Vec::new();
            for b in 0..SLOTS {
                n += 1;
                row.push(if a == b {
                    None
                } else {
                    Some(
                        Proxy::start(
                            format!("peer {a}->{b}"),
                            Endpoint::Node(b),
                            Source::Fixed(Endpoint::Node(a)),
                            &faults,
                            seed.wrapping_add(n),
                        )
                        .await?,
                    )
                });
            }
            peer.push(row);
        }
        let mut fwd = Vec::new();
        let mut client = Vec::new();
        for s in 0..SLOTS {
            let pids = pids.clone();
            let resolver: Resolver = Arc::new(move |peer, local| {
                let map = pids.read().unwrap_or_else(|p| p.into_inner()).clone();
                let candidates: Vec<u32> = map.keys().copied().collect();
                socket_owner(peer, local, &candidates)
                    .and_then(|pid| map.get(&pid).copied())
                    .map(Endpoint::Node)
            });
            fwd.push(
                Proxy::start(
                    format!("forward ->{s}"),
                    Endpoint::Node(s),
                    Source::Resolve(resolver),
                    &faults,
                    seed.wrapping_add(100 + s as u64),
                )
                .await?,
            );
            client.push(
                Proxy::start(
                    format!("client ->{s}"),
                    Endpoint::Node(s),
                    Source::Fixed(Endpoint::Client(s)),
                    &faults,
                    seed.wrapping_add(200 + s as u64),
                )
                .await?,
            );
        }
        Ok(Net {
            faults,
            peer,
            fwd,
            client,
        })
    }

    /// Every proxy whose target is the node in `slot`.
    fn proxies_into(&self, slot: usize) -> Vec<&Proxy> {
        let mut v: Vec<&Proxy> = self
            .peer
            .iter()
            .filter_map(|row| row.get(slot).and_then(Option::as_ref))
            .collect();
        v.push(&self.fwd[slot]);
        v.push(&self.client[slot]);
        v
    }

    fn peer_proxy(&self, from: usize, to: usize) -> Result<&Proxy> {
        self.peer
            .get(from)
            .and_then(|row| row.get(to))
            .and_then(Option::as_ref)
            .ok_or_else(|| anyhow!("no peer proxy {from}->{to}"))
    }

    /// Point the proxies into `slot` at a node's addresses.
    fn target_slot(&self, slot: usize, raft: SocketAddr, admin: SocketAddr) {
        for row in &self.peer {
            if let Some(Some(p)) = row.get(slot) {
                p.set_target(Some(raft));
            }
        }
        self.fwd[slot].set_target(Some(admin));
        self.client[slot].set_target(Some(admin));
    }

    /// Take the proxies into `slot` down (`false`) or up again.
    fn set_slot_up(&self, slot: usize, up: bool) {
        for p in self.proxies_into(slot) {
            p.set_up(up);
        }
    }

    /// Close every proxied connection (used at the final heal so no
    /// connection keeps a stale half-state).
    pub fn reset_all(&self) {
        for p in self.all() {
            p.reset();
        }
    }

    fn all(&self) -> Vec<&Proxy> {
        let mut v: Vec<&Proxy> = self.peer.iter().flatten().flatten().collect();
        v.extend(self.fwd.iter());
        v.extend(self.client.iter());
        v
    }

    /// The client proxy of `slot`: what workers and the watcher dial.
    pub fn client_addr(&self, slot: usize) -> SocketAddr {
        self.client[slot].addr()
    }

    /// Totals over all proxies: (accepted, dropped chunks, delayed chunks,
    /// resets, unresolved sources).
    pub fn totals(&self) -> (u64, u64, u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut t = (0, 0, 0, 0, 0);
        for p in self.all() {
            let s = p.stats();
            t.0 += s.accepted.load(Relaxed);
            t.1 += s.dropped_chunks.load(Relaxed);
            t.2 += s.delayed_chunks.load(Relaxed);
            t.3 += s.resets.load(Relaxed);
            t.4 += s.unresolved.load(Relaxed);
        }
        t
    }
}

/// A healthy cluster's state, from [`Cluster::wait_healthy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub leader: u64,
    pub term: u64,
    pub revision: u64,
}

/// The three nodes, their proxies, and every id used so far.
pub struct Cluster {
    opts: ClusterOptions,
    net: Arc<Net>,
    slots: Vec<NodeProc>,
    pids: Arc<RwLock<HashMap<u32, usize>>>,
    /// Every node id started during the run, in order.
    history: Vec<u64>,
    /// The current id of each slot, for workers' records.
    slot_ids: Vec<watch::Sender<u64>>,
}

impl Cluster {
    /// Start the proxies and three nodes, form the cluster and wait until
    /// it is healthy.
    pub async fn start(opts: ClusterOptions) -> Result<Cluster> {
        if !opts.trellisd.is_file() {
            bail!(
                "trellisd binary not found at {} (build it with `cargo build --release --bins`, or pass --trellisd)",
                opts.trellisd.display()
            );
        }
        std::fs::create_dir_all(&opts.dir)
            .with_context(|| format!("creating {}", opts.dir.display()))?;
        let pids = Arc::new(RwLock::new(HashMap::new()));
        let net = Arc::new(Net::start(opts.seed, pids.clone()).await?);
        let mut slots = Vec::new();
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        for slot in 0..SLOTS {
            let id = slot as u64 + 1;
            let node = spawn_node(&opts, &net, &pids, id, any, any, any).await?;
            slots.push(node);
        }
        let mut cluster = Cluster {
            opts,
            net,
            slots,
            pids,
            history: (1..=SLOTS as u64).collect(),
            slot_ids: (1..=SLOTS as u64).map(|id| watch::channel(id).0).collect(),
        };
        for slot in 0..SLOTS {
            let (raft, admin) = (cluster.slots[slot].raft, cluster.slots[slot].admin);
            cluster.net.target_slot(slot, raft, admin);
        }
        cluster.form().await?;
        cluster
            .wait_healthy(Duration::from_secs(30))
            .await
            .context("the new cluster did not become healthy")?;
        Ok(cluster)
    }

    /// The proxies.
    pub fn net(&self) -> Arc<Net> {
        self.net.clone()
    }

    /// The current member id of each slot.
    pub fn member_ids(&self) -> Vec<u64> {
        self.slots.iter().map(|n| n.id).collect()
    }

    /// Every node id started so far.
    pub fn all_ids(&self) -> Vec<u64> {
        self.history.clone()
    }

    /// The id of the node in `slot`.
    pub fn id(&self, slot: usize) -> u64 {
        self.slots[slot].id
    }

    /// Follows the id of the node in `slot` across membership changes.
    pub fn slot_id_watch(&self, slot: usize) -> watch::Receiver<u64> {
        self.slot_ids[slot].subscribe()
    }

    /// The admin address of the node in `slot` (not proxied).
    pub fn admin_addr(&self, slot: usize) -> SocketAddr {
        self.slots[slot].admin
    }

    /// What the node in `slot` is doing.
    pub fn state(&self, slot: usize) -> NodeState {
        self.slots[slot].state
    }

    /// Log files of every node started.
    pub fn log_paths(&self) -> Vec<PathBuf> {
        self.history
            .iter()
            .map(|id| self.opts.dir.join(format!("n{id}.log")))
            .collect()
    }

    /// Data directories of every node started.
    pub fn data_dirs(&self) -> Vec<PathBuf> {
        self.history
            .iter()
            .map(|id| self.opts.dir.join(format!("n{id}")))
            .collect()
    }

    async fn form(&mut self) -> Result<()> {
        let first = &self.slots[0];
        let mut c = ClusterClient::new(first.admin_channel.clone());
        let mut req = tonic::Request::new(InitializeRequest {});
        req.set_timeout(CONTROL_RPC_TIMEOUT);
        tokio::time::timeout(CONTROL_RPC_TIMEOUT * 2, c.initialize(req))
            .await
            .map_err(|_| anyhow!("Initialize on node {} timed out", first.id))?
            .map_err(|s| anyhow!("Initialize on node {}: {s}", first.id))?;
        for slot in 1..SLOTS {
            self.add_member(slot).await?;
        }
        Ok(())
    }

    /// `AddMember` for the node in `slot` (advertising its forward proxy),
    /// sent to another running member, retried until the node is a voter.
    async fn add_member(&self, slot: usize) -> Result<()> {
        let n = &self.slots[slot];
        let req = AddMemberRequest {
            node_id: n.id,
            raft_addr: n.raft.to_string(),
            admin_addr: self.net.fwd[slot].addr().to_string(),
            learner: false,
        };
        let deadline = Instant::now() + MEMBERSHIP_TIMEOUT;
        let mut last_err = String::new();
        while Instant::now() < deadline {
            for via in self.running_slots().into_iter().filter(|s| *s != slot) {
                let mut c = ClusterClient::new(self.slots[via].admin_channel.clone());
                let mut r = tonic::Request::new(req.clone());
                r.set_timeout(Duration::from_secs(15));
                match tokio::time::timeout(Duration::from_secs(16), c.add_member(r)).await {
                    Ok(Ok(_)) => return self.wait_voter(n.id, true, deadline).await,
                    Ok(Err(s)) => last_err = format!("via node {}: {s}", self.slots[via].id),
                    Err(_) => last_err = format!("via node {}: timed out", self.slots[via].id),
                }
                // The change may have happened even if the answer was lost.
                if self.is_voter(n.id).await == Some(true) {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("AddMember of node {} failed: {last_err}", n.id)
    }

    /// Remove the node in `slot` from the membership, stop it and take
    /// its proxies down. Returns its id.
    pub async fn remove(&mut self, slot: usize) -> Result<u64> {
        let id = self.slots[slot].id;
        let deadline = Instant::now() + MEMBERSHIP_TIMEOUT;
        let mut last_err = String::new();
        'outer: while Instant::now() < deadline {
            for via in self.running_slots().into_iter().filter(|s| *s != slot) {
                let mut c = ClusterClient::new(self.slots[via].admin_channel.clone());
                let mut r = tonic::Request::new(RemoveMemberRequest { node_id: id });
                r.set_timeout(Duration::from_secs(5));
                match tokio::time::timeout(Duration::from_secs(6), c.remove_member(r)).await {
                    Ok(Ok(_)) => break 'outer,
                    Ok(Err(s)) if s.code() == Code::NotFound => break 'outer,
                    Ok(Err(s)) => last_err = format!("via node {}: {s}", self.slots[via].id),
                    Err(_) => last_err = format!("via node {}: timed out", self.slots[via].id),
                }
                if self.is_voter(id).await == Some(false) {
                    break 'outer;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.wait_voter(id, false, deadline)
            .await
            .with_context(|| format!("RemoveMember of node {id}: {last_err}"))?;
        self.net.set_slot_up(slot, false);
        self.stop_process(slot).await?;
        self.slots[slot].state = NodeState::Removed;
        Ok(id)
    }

    /// Start a fresh node with the next id of `slot` (empty data
    /// directory, new ports), point the slot's proxies at it and add it to
    /// the membership. Returns the new id.
    pub async fn add_replacement(&mut self, slot: usize) -> Result<u64> {
        if self.slots[slot].state != NodeState::Removed {
            bail!(
                "slot {slot} still has a member (node {})",
                self.slots[slot].id
            );
        }
        let id = self.slots[slot].id + SLOTS as u64;
        if id > MAX_NODE_ID {
            bail!("node ids exhausted (max {MAX_NODE_ID})");
        }
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let node = spawn_node(&self.opts, &self.net, &self.pids, id, any, any, any).await?;
        self.history.push(id);
        self.net.target_slot(slot, node.raft, node.admin);
        self.slots[slot] = node;
        self.slot_ids[slot].send_replace(id);
        self.net.set_slot_up(slot, true);
        self.add_member(slot).await?;
        Ok(id)
    }

    /// SIGKILL the node in `slot` (its proxies go down first).
    pub async fn kill(&mut self, slot: usize) -> Result<u64> {
        let id = self.slots[slot].id;
        if self.slots[slot].state != NodeState::Running {
            bail!("node {id} is not running");
        }
        self.net.set_slot_up(slot, false);
        let n = &mut self.slots[slot];
        if let Some(mut child) = n.child.take() {
            if let Some(pid) = child.id() {
                self.pids
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&pid);
            }
            child
                .start_kill()
                .with_context(|| format!("SIGKILL to node {id}"))?;
            tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .map_err(|_| anyhow!("node {id} did not exit after SIGKILL"))?
                .with_context(|| format!("waiting for node {id}"))?;
        }
        n.state = NodeState::Killed;
        Ok(id)
    }

    /// Restart a killed node with its id, data and addresses.
    pub async fn restart(&mut self, slot: usize) -> Result<u64> {
        let n = &self.slots[slot];
        if n.state != NodeState::Killed {
            bail!("node {} was not killed", n.id);
        }
        let (id, raft, admin, quic) = (n.id, n.raft, n.admin, n.quic);
        let mut tries = 0;
        let node = loop {
            tries += 1;
            match spawn_node(&self.opts, &self.net, &self.pids, id, raft, admin, quic).await {
                Ok(node) => break node,
                // The old ports may be briefly unavailable.
                Err(e) if tries < 5 => {
                    tracing::warn!(node = id, error = %format!("{e:#}"), "restart failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        };
        self.slots[slot] = node;
        self.net.set_slot_up(slot, true);
        Ok(id)
    }

    /// SIGSTOP the node in `slot`.
    pub async fn pause(&mut self, slot: usize) -> Result<u64> {
        let n = &mut self.slots[slot];
        if n.state != NodeState::Running {
            bail!("node {} is not running", n.id);
        }
        let pid = n
            .child
            .as_ref()
            .and_then(Child::id)
            .ok_or_else(|| anyhow!("node {} has no pid", n.id))?;
        signal(pid, "STOP").await?;
        n.state = NodeState::Paused;
        Ok(n.id)
    }

    /// SIGCONT the node in `slot`.
    pub async fn resume(&mut self, slot: usize) -> Result<u64> {
        let n = &mut self.slots[slot];
        if n.state != NodeState::Paused {
            bail!("node {} is not paused", n.id);
        }
        if let Some(pid) = n.child.as_ref().and_then(Child::id) {
            signal(pid, "CONT").await?;
        }
        n.state = NodeState::Running;
        Ok(n.id)
    }

    /// Undo every process-level fault: resume paused nodes, restart killed
    /// ones, replace removed ones. Returns what was done.
    pub async fn heal_processes(&mut self) -> Result<Vec<String>> {
        let mut done = Vec::new();
        for slot in 0..SLOTS {
            match self.slots[slot].state {
                NodeState::Running => {}
                NodeState::Paused => done.push(format!("resumed n{}", self.resume(slot).await?)),
                NodeState::Killed => done.push(format!("restarted n{}", self.restart(slot).await?)),
                NodeState::Removed => {
                    done.push(format!("added n{}", self.add_replacement(slot).await?));
                }
            }
        }
        Ok(done)
    }

    fn running_slots(&self) -> Vec<usize> {
        (0..SLOTS)
            .filter(|s| self.slots[*s].state == NodeState::Running)
            .collect()
    }

    /// Status of the node in `slot`, asked directly.
    pub async fn status(&self, slot: usize) -> Result<StatusResponse> {
        status_of(&self.slots[slot].admin_channel).await
    }

    /// The slot whose node is the leader, as the running nodes see it: a
    /// node that says it leads (the highest term wins), else the leader
    /// most nodes name.
    pub async fn leader_slot(&self) -> Option<usize> {
        let statuses = self.statuses().await;
        let id = statuses
            .iter()
            .filter(|s| s.state == "leader")
            .max_by_key(|s| s.term)
            .map(|s| s.node_id)
            .or_else(|| {
                let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
                for s in statuses.iter().filter(|s| s.leader_id != 0) {
                    *votes.entry(s.leader_id).or_default() += 1;
                }
                votes.into_iter().max_by_key(|(_, n)| *n).map(|(id, _)| id)
            })?;
        self.slots.iter().position(|n| n.id == id)
    }

    async fn statuses(&self) -> Vec<StatusResponse> {
        let futs = self
            .running_slots()
            .into_iter()
            .map(|s| status_of(&self.slots[s].admin_channel));
        futures::future::join_all(futs)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Whether `id` is a voter, as the first running node that answers
    /// (other than `id`) sees it.
    async fn is_voter(&self, id: u64) -> Option<bool> {
        for s in self.running_slots() {
            if self.slots[s].id == id {
                continue;
            }
            if let Ok(st) = self.status(s).await {
                if st.leader_id != 0 {
                    return Some(st.members.iter().any(|m| m.node_id == id && m.voter));
                }
            }
        }
        None
    }

    async fn wait_voter(&self, id: u64, voter: bool, deadline: Instant) -> Result<()> {
        loop {
            if self.is_voter(id).await == Some(voter) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "node {id} did not {} the voters in time",
                    if voter { "join" } else { "leave" }
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until all three members run, agree on one leader and term,
    /// list exactly the current members as voters, and have applied the
    /// same revision and log index.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<Health> {
        let deadline = Instant::now() + timeout;
        let ids: BTreeSet<u64> = self.member_ids().into_iter().collect();
        let mut last: String;
        loop {
            if self.running_slots().len() == SLOTS {
                let statuses = self.statuses().await;
                match healthy(&statuses, &ids) {
                    Ok(h) => return Ok(h),
                    Err(why) => last = why,
                }
            } else {
                last = "not every node is running".into();
            }
            if Instant::now() >= deadline {
                bail!("cluster not healthy after {timeout:?}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stop every node (SIGCONT, SIGTERM, then SIGKILL after a grace
    /// period) and close the proxies' connections.
    pub async fn stop(&mut self) {
        for slot in 0..SLOTS {
            if let Err(e) = self.stop_process(slot).await {
                tracing::warn!(slot, error = %format!("{e:#}"), "stopping node");
            }
        }
        self.net.reset_all();
    }

    async fn stop_process(&mut self, slot: usize) -> Result<()> {
        let n = &mut self.slots[slot];
        let Some(mut child) = n.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            self.pids
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&pid);
            if n.state == NodeState::Paused {
                let _ = signal(pid, "CONT").await;
            }
            let _ = signal(pid, "TERM").await;
        }
        if tokio::time::timeout(STOP_TIMEOUT, child.wait())
            .await
            .is_err()
        {
            tracing::warn!(node = n.id, "did not stop on SIGTERM; killing it");
            let _ = child.start_kill();
            let _ = tokio::time::timeout(STOP_TIMEOUT, child.wait()).await;
        }
        Ok(())
    }
}

fn healthy(statuses: &[StatusResponse], ids: &BTreeSet<u64>) -> Result<Health, String> {
    if statuses.len() != ids.len() {
        return Err(format!(
            "{} of {} nodes answered",
            statuses.len(),
            ids.len()
        ));
    }
    let first = &statuses[0];
    for s in statuses {
        if s.leader_id == 0 || !ids.contains(&s.leader_id) {
            return Err(format!("node {} sees leader {}", s.node_id, s.leader_id));
        }
        if s.leader_id != first.leader_id || s.term != first.term {
            return Err(format!(
                "nodes disagree: node {} sees leader {} in term {}, node {} sees {} in term {}",
                first.node_id, first.leader_id, first.term, s.node_id, s.leader_id, s.term
            ));
        }
        let voters: BTreeSet<u64> = s
            .members
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.node_id)
            .collect();
        if &voters != ids || s.members.len() != ids.len() {
            return Err(format!(
                "node {} lists members {:?}",
                s.node_id,
                s.members.iter().map(|m| m.node_id).collect::<Vec<_>>()
            ));
        }
        if s.applied_index != first.applied_index || s.revision != first.revision {
            return Err(format!(
                "node {} applied index {} (revision {}), node {} applied {} (revision {})",
                first.node_id,
                first.applied_index,
                first.revision,
                s.node_id,
                s.applied_index,
                s.revision
            ));
        }
    }
    Ok(Health {
        leader: first.leader_id,
        term: first.term,
        revision: first.revision,
    })
}

async fn status_of(channel: &Channel) -> Result<StatusResponse> {
    let mut c = ClusterClient::new(channel.clone());
    let mut req = tonic::Request::new(StatusRequest {});
    req.set_timeout(CONTROL_RPC_TIMEOUT);
    Ok(tokio::time::timeout(CONTROL_RPC_TIMEOUT, c.status(req))
        .await
        .map_err(|_| anyhow!("status timed out"))??
        .into_inner())
}

/// A lazily connected admin channel to `addr`.
pub fn admin_channel(addr: SocketAddr) -> Result<Channel> {
    Ok(TonicEndpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("bad address {addr}"))?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// Send a signal with the `kill` utility (the workspace forbids `unsafe`).
async fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .await
        .with_context(|| format!("running kill -{sig} {pid}"))?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed: {status}");
    }
    Ok(())
}

/// The command-line flags of node `id` (everything but the addresses).
fn node_flags(opts: &ClusterOptions, net: &Net, id: u64) -> Result<Vec<String>> {
    let slot = slot_of(id);
    let mut args = Vec::new();
    for (flag, value) in DEFAULT_NODE_FLAGS {
        let overridden = opts
            .extra_args
            .iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")));
        if !overridden {
            args.push(flag.to_string());
            args.push(value.to_string());
        }
    }
    // The harness's clients and fault proxies speak plaintext gRPC; the
    // faults under test (Raft, storage, clocks of delivery) do not depend
    // on TLS.
    args.push("--insecure-dev".into());
    args.push("--advertise-admin-addr".into());
    args.push(net.fwd[slot].addr().to_string());
    for k in 1..=MAX_NODE_ID {
        let to = slot_of(k);
        if to != slot {
            args.push("--peer-dial".into());
            args.push(format!("{k}={}", net.peer_proxy(slot, to)?.addr()));
        }
    }
    args.extend(opts.extra_args.iter().cloned());
    Ok(args)
}

/// Start `trellisd` for node `id` and wait for its ready line.
async fn spawn_node(
    opts: &ClusterOptions,
    net: &Net,
    pids: &RwLock<HashMap<u32, usize>>,
    id: u64,
    raft: SocketAddr,
    admin: SocketAddr,
    quic: SocketAddr,
) -> Result<NodeProc> {
    let data_dir = opts.dir.join(format!("n{id}"));
    let log_path = opts.dir.join(format!("n{id}.log"));
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = Command::new(&opts.trellisd);
    cmd.arg("--id")
        .arg(id.to_string())
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--raft-addr")
        .arg(raft.to_string())
        .arg("--admin-addr")
        .arg(admin.to_string())
        .arg("--quic-addr")
        .arg(quic.to_string())
        .args(node_flags(opts, net, id)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", opts.trellisd.display()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("node {id}: no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(READY_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if let Ok(r) = serde_json::from_str::<ReadyLine>(line.trim()) {
                if r.event == "ready" {
                    return Ok::<_, std::io::Error>(Some(r));
                }
            }
        }
        Ok(None)
    })
    .await;
    let ready = match ready {
        Ok(Ok(Some(r))) => r,
        other => {
            let _ = child.start_kill();
            let why = match other {
                Err(_) => format!("no ready line within {READY_TIMEOUT:?}"),
                Ok(Err(e)) => format!("reading its stdout: {e}"),
                _ => "it exited before printing its ready line".into(),
            };
            bail!("node {id}: {why}\n{}", log_tail(&log_path, 30));
        }
    };
    // Nothing else is expected on stdout; keep draining it anyway.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    if ready.node_id != id {
        bail!("node {id} reported id {}", ready.node_id);
    }
    let parse = |what: &str, s: &str| -> Result<SocketAddr> {
        s.parse()
            .with_context(|| format!("node {id} reported a bad {what} address {s:?}"))
    };
    let raft = parse("raft", &ready.raft_addr)?;
    let admin = parse("admin", &ready.admin_addr)?;
    let quic = match &ready.quic_addr {
        Some(q) if !q.is_empty() => parse("quic", q)?,
        // Empty: --insecure-dev serves no QUIC endpoint.
        _ => quic,
    };
    if let Some(pid) = child.id() {
        pids.write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pid, slot_of(id));
    }
    tracing::info!(node = id, %raft, %admin, "node ready");
    Ok(NodeProc {
        id,
        raft,
        admin,
        quic,
        child: Some(child),
        state: NodeState::Running,
        admin_channel: admin_channel(admin)?,
    })
}

/// The last `n` lines of a log file.
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            format!(
                "--- last lines of {} ---\n{}",
                path.display(),
                lines[start..].join("\n")
            )
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_of_ids() {
        assert_eq!(slot_of(1), 0);
        assert_eq!(slot_of(2), 1);
        assert_eq!(slot_of(3), 2);
        assert_eq!(slot_of(4), 0);
        assert_eq!(slot_of(8), 1);
        assert_eq!(slot_of(300), 2);
    }
}
