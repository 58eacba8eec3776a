//! Prompt failover when the leader's process dies.
//!
//! openraft 0.9 lets a follower start an election only after its leader
//! lease (the max election timeout) plus a random election timeout have
//! passed without a heartbeat. Timeouts short enough for sub-second
//! failover flap when a loaded machine stalls a node, so Trellis keeps them
//! long and adds a second, event-driven signal for the common failure — a
//! crashed or killed leader process:
//!
//! 1. Every follower holds a `Liveness` stream open to its current leader
//!    ([`crate::peer`] serves it; the leader never ends it while running).
//! 2. When the stream breaks (it must have been open: a leader this node
//!    never reached, e.g. one it remembers across its own restart, is left
//!    to the election timeout), the follower dials the leader's Raft port. A
//!    refused connection means nothing listens there any more: the process
//!    is gone. Anything else (the dial succeeds, or times out as it would
//!    across a partition) proves nothing, and the election timeout stays in
//!    charge.
//! 3. On a refused dial, the follower starts an election at once. When
//!    several followers notice, their candidacies in the same term do not
//!    split the vote: openraft orders same-term votes by node id, so the
//!    highest id wins. A follower that has not noticed yet still honours
//!    the dead leader's lease and rejects; so the survivors try again a
//!    moment later, highest id first, once the others' votes are no longer
//!    bound to the dead leader.
//!
//! A live leader never refuses connections on its Raft port, so the
//! detector cannot depose a healthy leader.
//!
//! Entry point: [`spawn`], one task per node, stopped by the shutdown watch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_proto::raft::raft_peer_client::RaftPeerClient;
use trellis_proto::raft::LivenessRequest;
use trellis_raft_store::{NodeId, Raft};

use crate::network::{lazy_channel, PeerNetwork, PEER_CONNECT_TIMEOUT};

/// How long a dial may take before the leader's state counts as unknown.
/// A refusal on a LAN or loopback arrives within a round trip.
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// Wait before reopening a stream that could not be opened or ended while
/// the leader still accepts connections (restarting, or shutting down).
const RESUBSCRIBE_BACKOFF: Duration = Duration::from_millis(100);
/// Step between the extra election attempts of survivors, by rank: a round
/// takes about one peer round trip plus a log flush, so rank 0 retries
/// after 25 ms, rank 1 after 50 ms, and so on.
const ELECTION_RETRY_STEP: Duration = Duration::from_millis(25);
/// Extra election attempts per detected crash, after the first: with the
/// growing, jittered spacing below they span ~1.8 s for rank 1, so two
/// survivors that keep colliding in the same term (seen, rarely, under a
/// loaded test machine) get many chances to come apart before the
/// election timeout takes over.
const ELECTION_RETRIES: u32 = 8;

/// Who this node follows, as read from Raft metrics.
#[derive(Debug, Clone, PartialEq)]
struct Following {
    leader: NodeId,
    term: u64,
    /// The address dialed for the leader.
    addr: String,
    /// Position of this node among the voters other than the leader, by
    /// descending id (the order in which same-term candidacies win).
    rank: u32,
}

/// Start the detector for the node `raft` belongs to.
/// `watched` shows the leader whose stream is open (0: none), for status.
pub fn spawn(
    raft: Raft,
    network: PeerNetwork,
    watched: Arc<AtomicU64>,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut stop = shutdown.clone();
        tokio::select! {
            () = run(raft, network, watched) => {}
            _ = stop.wait_for(|stopping| *stopping) => {}
        }
    })
}

fn following(raft: &Raft, network: &PeerNetwork) -> Option<Following> {
    let m = raft.metrics();
    let m = m.borrow();
    if m.state != ServerState::Follower {
        return None;
    }
    let leader = m.current_leader.filter(|l| *l != m.id)?;
    let membership = m.membership_config.membership();
    let node = membership.get_node(&leader)?;
    let rank = membership
        .voter_ids()
        .filter(|v| *v != leader && *v > m.id)
        .count() as u32;
    if !membership.voter_ids().any(|v| v == m.id) {
        return None; // learners do not vote
    }
    Some(Following {
        leader,
        term: m.current_term,
        addr: network.dial_addr(leader, node),
        rank,
    })
}

/// Wait until this node follows a leader; `None` once Raft has stopped.
async fn next_following(raft: &Raft, network: &PeerNetwork) -> Option<Following> {
    let mut metrics = raft.metrics();
    loop {
        if let Some(f) = following(raft, network) {
            return Some(f);
        }
        if metrics.changed().await.is_err() {
            return None;
        }
    }
}

async fn run(raft: Raft, network: PeerNetwork, watched: Arc<AtomicU64>) {
    let me = raft.metrics().borrow().id;
    // The leader (and term) whose stream this node has had open: only a
    // leader seen alive from here can be declared dead from here.
    let mut seen_alive: Option<Following> = None;
    loop {
        let Some(f) = next_following(&raft, &network).await else {
            return;
        };
        tracing::debug!(leader = f.leader, term = f.term, "watching leader liveness");
        let outcome = watch_leader(&raft, &network, &f, me, &watched).await;
        watched.store(0, Ordering::Relaxed);
        tracing::debug!(leader = f.leader, ?outcome, "liveness watch ended");
        match outcome {
            Watch::Changed => continue,
            Watch::StreamEnded => seen_alive = Some(f.clone()),
            // Never seen alive from here: a node restarted before the
            // leader it remembers must not campaign just because that
            // leader is not up yet (after a full-cluster restart it comes
            // back and leads in the same term); the timers decide. A
            // leader seen alive is probed again: a dial made while a
            // killed process is being torn down can still be accepted.
            Watch::CannotOpen if seen_alive.as_ref() != Some(&f) => {
                backoff(&raft, &network, &f).await;
                continue;
            }
            Watch::CannotOpen => {}
        }
        // Is anybody there?
        if leader_refuses(&f.addr).await && still_following(&raft, &network, &f) {
            tracing::warn!(
                leader = f.leader,
                term = f.term,
                addr = %f.addr,
                "leader's Raft port refuses connections; starting an election"
            );
            elect(&raft, &f).await;
        } else {
            backoff(&raft, &network, &f).await;
        }
    }
}

#[derive(Debug)]
enum Watch {
    /// The leader or term changed while watching.
    Changed,
    /// The stream broke or ended.
    StreamEnded,
    /// The stream could not be opened.
    CannotOpen,
}

fn still_following(raft: &Raft, network: &PeerNetwork, f: &Following) -> bool {
    following(raft, network).as_ref() == Some(f)
}

/// Hold the `Liveness` stream to `f.leader` until it ends or we stop
/// following that leader in that term.
async fn watch_leader(
    raft: &Raft,
    network: &PeerNetwork,
    f: &Following,
    me: NodeId,
    watched: &AtomicU64,
) -> Watch {
    let Ok(channel) = lazy_channel(&f.addr, PEER_CONNECT_TIMEOUT, network.tls()) else {
        return Watch::CannotOpen;
    };
    let mut client = RaftPeerClient::new(channel);
    let ended = async move {
        match client.liveness(LivenessRequest { from: me }).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                // The leader greets with one event: only then was it seen
                // alive from here.
                if !matches!(stream.message().await, Ok(Some(_))) {
                    return Watch::CannotOpen;
                }
                watched.store(f.leader, Ordering::Relaxed);
                while let Ok(Some(_)) = stream.message().await {}
                Watch::StreamEnded
            }
            Err(status) => {
                tracing::debug!(leader = f.leader, %status, "cannot open the liveness stream");
                Watch::CannotOpen
            }
        }
    };
    tokio::select! {
        outcome = ended => outcome,
        () = changed(raft, network, f) => Watch::Changed,
    }
}

/// Resolves once this node no longer follows `f` (or Raft stopped).
async fn changed(raft: &Raft, network: &PeerNetwork, f: &Following) {
    let mut metrics = raft.metrics();
    while still_following(raft, network, f) {
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Pause before reopening the stream, unless the leadership changes first.
async fn backoff(raft: &Raft, network: &PeerNetwork, f: &Following) {
    tokio::select! {
        () = tokio::time::sleep(RESUBSCRIBE_BACKOFF) => {}
        () = changed(raft, network, f) => {}
    }
}

/// True only when the dial is refused: the port has no listener.
async fn leader_refuses(addr: &str) -> bool {
    match tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// Start an election now, and again while nobody has won (see the module
/// docs).
async fn elect(raft: &Raft, f: &Following) {
    if raft.trigger().elect().await.is_err() {
        return;
    }
    for attempt in 1..=ELECTION_RETRIES {
        let jitter = ELECTION_RETRY_STEP.mul_f64(rand::random::<f64>());
        tokio::time::sleep(ELECTION_RETRY_STEP * (f.rank + 1) * attempt + jitter).await;
        let leader = raft.metrics().borrow().current_leader;
        if leader.is_some_and(|l| l != f.leader) {
            return;
        }
        tracing::info!(
            attempt,
            rank = f.rank,
            "no leader yet after a crash; electing again"
        );
        if raft.trigger().elect().await.is_err() {
            return;
        }
    }
}
