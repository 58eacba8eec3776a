//! Lease deadlines, kept by the leader in memory (etcd's lessor model).
//!
//! Leases themselves (id, TTL, attached keys) are replicated state in the
//! store; *when* each one expires is not. Only the leader tracks
//! deadlines:
//!
//! - a grant committed by this leader starts a full TTL ([`LeaseKeeper::granted`]);
//! - a keepalive restarts it, with no Raft entry ([`LeaseKeeper::keep_alive`]);
//! - the expiry task ([`spawn`]) proposes a `LeaseRevoke` for each lease
//!   past its deadline, so the deletes of its keys are committed entries
//!   that every node applies and every watcher sees;
//! - a newly elected leader first catches up (read barrier), then gives
//!   every lease in the store a full TTL: a failover never expires a lease
//!   whose holder kept sending keepalives, wherever they went.
//!
//! Followers forward grant, keepalive, revoke and list to the leader.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::ServerState;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use trellis_raft_store::{Command, Lease, Outcome};

use crate::node::Node;

/// Shortest TTL granted: a lease must outlive a leader failover plus a
/// keepalive round trip, or healthy holders lose it in every election.
pub const MIN_LEASE_TTL_MS: u64 = 1_000;
/// Longest TTL granted: a day; longer is a registration that should not
/// be leased at all.
pub const MAX_LEASE_TTL_MS: u64 = 24 * 60 * 60 * 1_000;
/// How often the leader looks for expired leases: expiry lags a deadline
/// by at most this (plus a commit).
const EXPIRY_TICK: Duration = Duration::from_millis(100);

/// The leader's lease deadlines.
#[derive(Default)]
pub struct LeaseKeeper {
    state: Mutex<KeeperState>,
}

#[derive(Default)]
struct KeeperState {
    /// The leader term the deadlines were set in; `None` while this node
    /// does not lead (no deadlines are kept then).
    term: Option<u64>,
    deadlines: HashMap<u64, (Instant, Duration)>,
}

impl LeaseKeeper {
    fn lock(&self) -> std::sync::MutexGuard<'_, KeeperState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A grant committed: the lease runs for its full TTL from now.
    pub fn granted(&self, lease: Lease) {
        let ttl = Duration::from_millis(lease.ttl_ms);
        self.lock()
            .deadlines
            .insert(lease.id, (Instant::now() + ttl, ttl));
    }

    /// Restart `lease`'s TTL (the caller read it from the store, so it
    /// exists). Returns the TTL.
    pub fn keep_alive(&self, lease: Lease) -> Duration {
        let ttl = Duration::from_millis(lease.ttl_ms);
        self.lock()
            .deadlines
            .insert(lease.id, (Instant::now() + ttl, ttl));
        ttl
    }

    /// Time left before `id` expires, if this node tracks it.
    pub fn remaining(&self, id: u64) -> Option<Duration> {
        self.lock()
            .deadlines
            .get(&id)
            .map(|(at, _)| at.saturating_duration_since(Instant::now()))
    }

    /// The lease is gone from the store.
    pub fn forget(&self, id: u64) {
        self.lock().deadlines.remove(&id);
    }

    /// Leases past their deadline.
    fn expired(&self, now: Instant) -> Vec<u64> {
        self.lock()
            .deadlines
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(id, _)| *id)
            .collect()
    }

    /// This node leads in `term`: is that news (leases must be reloaded)?
    fn leading_in(&self, term: u64) -> bool {
        self.lock().term != Some(term)
    }

    /// Start tracking `leases` with full TTLs, for leader term `term`.
    fn reload(&self, term: u64, leases: Vec<Lease>) {
        let now = Instant::now();
        let mut s = self.lock();
        s.term = Some(term);
        s.deadlines = leases
            .into_iter()
            .map(|l| {
                let ttl = Duration::from_millis(l.ttl_ms);
                (l.id, (now + ttl, ttl))
            })
            .collect();
    }

    /// This node stopped leading: deadlines are the next leader's job.
    fn step_down(&self) {
        let mut s = self.lock();
        if s.term.take().is_some() {
            s.deadlines.clear();
        }
    }
}

/// Run the expiry task of `node` until `shutdown`.
pub fn spawn(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EXPIRY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|stopping| *stopping) => return,
            }
            expire_once(&node).await;
        }
    })
}

#[tracing::instrument(level = "trace", skip_all)]
async fn expire_once(node: &Node) {
    let leader_term = {
        let m = node.raft.metrics();
        let m = m.borrow();
        (m.state == ServerState::Leader && m.current_leader == Some(node.id))
            .then_some(m.current_term)
    };
    let Some(term) = leader_term else {
        node.leases.step_down();
        return;
    };
    if node.leases.leading_in(term) {
        // Apply everything committed before trusting the store's leases.
        if let Err(e) = node.read_barrier().await {
            tracing::debug!(error = %e, "lease reload waits for the read barrier");
            return;
        }
        match node.store.leases() {
            Ok(leases) => {
                tracing::info!(
                    term,
                    leases = leases.len(),
                    "leading: every lease gets a full TTL"
                );
                node.leases.reload(term, leases);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read leases");
                return;
            }
        }
    }
    for id in node.leases.expired(Instant::now()) {
        let span = tracing::info_span!("lease_expiry", lease = id);
        let _enter = span.enter();
        match node.write(Command::LeaseRevoke { id }).await {
            Ok(resp) => {
                match resp.outcome {
                    Outcome::LeaseRevoked { deleted_keys } => {
                        tracing::info!(deleted_keys, "lease expired; its keys are deleted")
                    }
                    Outcome::LeaseNotFound { .. } => {}
                    other => tracing::warn!(?other, "unexpected lease revoke outcome"),
                }
                node.leases.forget(id);
            }
            // Not leading any more, or no quorum: the next tick decides.
            Err(e) => {
                tracing::warn!(error = %e, "cannot revoke an expired lease yet");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_grants_keepalives_and_leadership() {
        let k = LeaseKeeper::default();
        assert!(k.leading_in(3));
        k.reload(
            3,
            vec![Lease {
                id: 1,
                ttl_ms: 2_000,
            }],
        );
        assert!(!k.leading_in(3));
        k.granted(Lease {
            id: 2,
            ttl_ms: 1_000,
        });
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert_eq!(k.expired(Instant::now()), vec![2]);
        k.keep_alive(Lease {
            id: 1,
            ttl_ms: 2_000,
        });
        tokio::time::advance(Duration::from_millis(1_000)).await;
        // Lease 1 was renewed 1 s ago with a 2 s TTL.
        assert_eq!(k.remaining(1), Some(Duration::from_millis(1_000)));
        k.forget(2);
        assert!(k.expired(Instant::now()).is_empty());
        // Losing leadership drops every deadline; a new term reloads.
        k.step_down();
        assert_eq!(k.remaining(1), None);
        assert!(k.leading_in(3));
    }
}
