//! How far this node's Raft log is durable, and the two rules that let a
//! leader replicate an entry while its own flush is still running.
//!
//! openraft 0.9 awaits each log append's flush inside its core before it
//! sends the entry to followers, so without help a write pays the
//! leader's disk sync and then a follower's, one after the other. The log
//! store therefore reports a *leader's own* appends done as soon as they
//! are readable (see `LogStore::append`) and syncs them in the background,
//! the overlap the Raft thesis allows (§10.2.1) and etcd uses. openraft
//! then counts the leader in a quorum before the leader's copy is
//! durable, so two rules keep every effect of a commit behind a durable
//! majority:
//!
//! - **apply**: the state machine applies no entry reported done early
//!   before it is on disk ([`DurableLog::wait_for`]), so no client is
//!   answered before the leader's copy and one follower's are durable
//!   (followers report appends only after their flush);
//! - **tell**: the peer transport never tells followers a commit index
//!   above this node's durable log ([`DurableLog::clamp_commit`]), so no
//!   follower applies an entry that a crash of the leader could still
//!   take back.
//!
//! If the leader crashes before its sync, the entry may vanish with it:
//! nobody applied it and no client was answered, so the cluster may
//! legitimately elect a leader without it. When a clamp held a commit
//! back, [`DurableLog::clamp_releases`] tells the node to send a
//! heartbeat once the sync lands, so followers learn it at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use crate::LogId;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct State {
    /// Highest log id known to be on disk here.
    log_id: Option<LogId>,
    /// A flush failed: what was reported done may not be durable, and
    /// never will be.
    failed: bool,
}

/// Shared view of this node's durable log position. Cheap to clone.
#[derive(Clone)]
pub struct DurableLog {
    tx: Arc<watch::Sender<State>>,
    /// A commit index sent to a follower was cut down to the durable
    /// position since the last durable advance was announced.
    clamped: Arc<AtomicBool>,
    /// Highest index reported done before it was durable (0: none).
    early: Arc<AtomicU64>,
}

/// A flush of the Raft log failed; nothing above the last durable entry
/// may be applied.
#[derive(Debug, thiserror::Error)]
#[error("the raft log could not be made durable (a flush failed)")]
pub struct FlushFailed;

impl DurableLog {
    /// Start at `log_id` (everything the store holds when it opens is on
    /// disk).
    pub fn new(log_id: Option<LogId>) -> Self {
        DurableLog {
            tx: Arc::new(
                watch::channel(State {
                    log_id,
                    failed: false,
                })
                .0,
            ),
            clamped: Arc::default(),
            early: Arc::default(),
        }
    }

    /// The highest durable log id.
    pub fn log_id(&self) -> Option<LogId> {
        self.tx.borrow().log_id
    }

    /// Everything up to `log_id` is on disk.
    pub(crate) fn advance(&self, log_id: LogId) {
        self.tx.send_if_modified(|s| {
            let newer = s.log_id.is_none_or(|d| log_id.index > d.index);
            if newer {
                s.log_id = Some(log_id);
            }
            newer
        });
    }

    /// The log was truncated back to `log_id` (a follower dropping
    /// conflicting entries).
    pub(crate) fn truncated_to(&self, log_id: Option<LogId>) {
        self.tx.send_if_modified(|s| {
            let above = s.log_id.map(|d| d.index) > log_id.map(|l| l.index);
            if above {
                s.log_id = log_id;
            }
            above
        });
    }

    /// Entries up to `index` were reported done before their flush.
    pub(crate) fn reported_early(&self, index: u64) {
        self.early.fetch_max(index, Ordering::AcqRel);
    }

    pub(crate) fn fail(&self) {
        self.tx.send_modify(|s| s.failed = true);
    }

    /// Before applying entries up to `index`: wait until those of them
    /// reported done early are on disk. (Entries reported after their
    /// flush, every follower's, need no wait.)
    pub async fn wait_for(&self, index: u64) -> Result<(), FlushFailed> {
        let target = index.min(self.early.load(Ordering::Acquire));
        if target == 0 {
            return Ok(());
        }
        let durable = |s: &State| s.log_id.is_some_and(|d| d.index >= target);
        let mut rx = self.tx.subscribe();
        let state = rx
            .wait_for(|s| s.failed || durable(s))
            .await
            .map_err(|_| FlushFailed)?;
        if durable(&state) {
            Ok(())
        } else {
            Err(FlushFailed)
        }
    }

    /// The commit index a leader may tell followers: `commit`, or the
    /// durable position when that is lower (an entry at or below a
    /// committed index is itself committed).
    pub fn clamp_commit(&self, commit: Option<LogId>) -> Option<LogId> {
        let c = commit?;
        let durable = self.log_id();
        if durable.is_some_and(|d| d.index >= c.index) {
            return commit;
        }
        self.clamped.store(true, Ordering::Release);
        // The position may have advanced between the read and the flag,
        // unseen by a waiter that checked the flag first: announce again.
        if self.log_id() != durable {
            self.tx.send_modify(|_| ());
        }
        durable
    }

    /// Durable advances that follow a clamped commit index, for the task
    /// that then sends followers a heartbeat carrying the rest.
    pub fn clamp_releases(&self) -> ClampReleases {
        ClampReleases {
            rx: self.tx.subscribe(),
            clamped: self.clamped.clone(),
        }
    }
}

/// See [`DurableLog::clamp_releases`].
pub struct ClampReleases {
    rx: watch::Receiver<State>,
    clamped: Arc<AtomicBool>,
}

impl ClampReleases {
    /// Resolves at the next durable advance after a clamp; `None` once the
    /// log store is gone.
    pub async fn next(&mut self) -> Option<()> {
        loop {
            self.rx.changed().await.ok()?;
            if self.clamped.swap(false, Ordering::AcqRel) {
                return Some(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    #[tokio::test]
    async fn apply_waits_for_entries_reported_early() {
        let d = DurableLog::new(Some(id(3)));
        // Nothing reported early: nothing to wait for, durable or not.
        d.wait_for(9).await.expect("no early report");
        d.reported_early(5);
        d.wait_for(3).await.expect("already durable");
        let waiter = tokio::spawn({
            let d = d.clone();
            async move { d.wait_for(5).await }
        });
        d.advance(id(4));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "4 is not 5");
        d.advance(id(5));
        waiter.await.expect("join").expect("durable");
        // Never backwards through advance; truncation may.
        d.advance(id(2));
        assert_eq!(d.log_id(), Some(id(5)));
        d.truncated_to(Some(id(2)));
        assert_eq!(d.log_id(), Some(id(2)));
    }

    #[tokio::test]
    async fn a_failed_flush_fails_the_waiters() {
        let d = DurableLog::new(None);
        d.reported_early(1);
        let waiter = tokio::spawn({
            let d = d.clone();
            async move { d.wait_for(1).await }
        });
        tokio::task::yield_now().await;
        d.fail();
        assert!(waiter.await.expect("join").is_err());
    }

    #[tokio::test]
    async fn commits_told_to_followers_stop_at_the_durable_position() {
        let d = DurableLog::new(Some(id(4)));
        assert_eq!(d.clamp_commit(None), None);
        assert_eq!(d.clamp_commit(Some(id(3))), Some(id(3)));
        assert_eq!(d.clamp_commit(Some(id(4))), Some(id(4)));
        let mut releases = d.clamp_releases();
        let release = tokio::spawn(async move { releases.next().await });
        tokio::task::yield_now().await;
        // An advance with nothing clamped does not wake it.
        d.advance(id(5));
        tokio::task::yield_now().await;
        assert!(!release.is_finished());
        assert_eq!(d.clamp_commit(Some(id(7))), Some(id(5)));
        d.advance(id(7));
        release.await.expect("join").expect("released");
    }
}
