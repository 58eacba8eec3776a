//! openraft [`RaftLogStorage`] on sled: the Raft log and the vote.
//!
//! - `raft_log` tree: key = entry index as big-endian `u64` (so sled's key
//!   order is log order), value = postcard-encoded [`Entry`].
//! - `raft_meta` tree: `vote`, `committed`, `last_purged`.
//!
//! Durability, by group commit: `append` writes the entries into sled's
//! memory and hands openraft's [`LogFlushed`] callback to one flusher
//! thread, which takes every callback queued so far, calls `Db::flush`
//! (write + fsync) once, and only then reports them complete. Under load
//! one fsync acknowledges many appends; alone, an append waits for one
//! fsync. `save_vote` waits for the flusher before it returns. With
//! leader overlap on, a leader's own appends in its own term are the
//! exception: they are reported done once readable and synced by the same
//! group commit in the background, so replication to followers overlaps
//! the leader's sync; [`crate::durable`] tracks how far the log is on disk
//! and holds the rules that keep this safe. All trees share sled's one
//! log, so one flush covers the state machine's writes too. sled's flush ends in `sync_file_range`, enough for a `kill -9`
//! but not for power loss, and sled writes records over ~1/4 segment to
//! blob files it never syncs; unless `Durability::KillSafe` is chosen the
//! flusher also `fdatasync`s sled's data file and any new blob files (and
//! their directory), once per group.
//!
//! Purging (after a snapshot) records the purge point durably and returns;
//! a purger thread deletes the entries in small batches. A purge of
//! thousands of entries done inline stalled the node's single Raft core
//! for long enough to cost a healthy leader its leadership. Reads never
//! see entries at or below the purge point, and entries a crash left
//! behind are deleted when the store opens again.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader, StorageError, StorageIOError, Vote};

use crate::codec::{decode, encode};
use crate::durable::DurableLog;
use crate::store::StoreError;
use crate::{Entry, LogId, NodeId, TypeConfig};

const META_VOTE: &[u8] = b"vote";
const META_COMMITTED: &[u8] = b"committed";
const META_LAST_PURGED: &[u8] = b"last_purged";

/// The Raft log and vote of one node. Cheap to clone (sled handles).
#[derive(Clone)]
pub struct LogStore {
    /// With leader overlap on, this node's id: appends of entries it leads
    /// in its current term are reported done before their flush (see
    /// [`crate::durable`]).
    overlap_as: Option<NodeId>,
    /// The last vote saved: tells whether an append is this node's own,
    /// as leader.
    vote: Arc<std::sync::Mutex<Option<Vote<NodeId>>>>,
    durable: DurableLog,
    log: sled::Tree,
    meta: sled::Tree,
    flusher: Flusher,
    purger: Purger,
    /// First index that is not purged (0: nothing purged). Entries below
    /// it may still be on disk until the purger gets to them.
    first_kept: Arc<AtomicU64>,
}

/// Entries the purger deletes per sled batch: small enough that the
/// batch never holds sled up noticeably.
const PURGE_BATCH: usize = 512;

/// Handle to the purger thread, which deletes log entries up to the
/// index it is sent. The thread ends when the last handle is dropped.
#[derive(Clone)]
struct Purger {
    tx: std::sync::mpsc::Sender<u64>,
}

impl Purger {
    fn start(log: sled::Tree) -> Result<Self, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        std::thread::Builder::new()
            .name("raft-log-purge".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let upto = rx.try_iter().fold(first, u64::max);
                    let started = std::time::Instant::now();
                    let mut removed = 0usize;
                    loop {
                        let mut batch = sled::Batch::default();
                        let mut n = 0;
                        for item in log.range(..=index_key(upto)).take(PURGE_BATCH) {
                            match item {
                                Ok((k, _)) => {
                                    batch.remove(k);
                                    n += 1;
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "reading purged raft log entries");
                                    break;
                                }
                            }
                        }
                        if n == 0 {
                            break;
                        }
                        if let Err(e) = log.apply_batch(batch) {
                            tracing::error!(error = %e, "deleting purged raft log entries");
                            break;
                        }
                        removed += n;
                    }
                    tracing::debug!(
                        upto,
                        removed,
                        micros = started.elapsed().as_micros() as u64,
                        "raft log purged"
                    );
                }
            })
            .map_err(|source| StoreError::Io {
                what: "start the raft log purger thread".into(),
                source,
            })?;
        Ok(Purger { tx })
    }

    /// Delete every entry up to and including `index`, in the background.
    fn purge(&self, index: u64) -> Result<(), std::io::Error> {
        self.tx
            .send(index)
            .map_err(|_| std::io::Error::other("the raft log purger thread is gone"))
    }
}

/// A group commit slower than this is logged at warn level.
const SLOW_FLUSH: std::time::Duration = std::time::Duration::from_millis(100);

/// Work for the flusher thread: something to report once durable.
enum FlushWaiter {
    /// A follower's append (or a candidate's): openraft hears of it after
    /// the flush.
    Append(LogFlushed<TypeConfig>, LogId),
    /// A leader's own append, already reported done: the flush only
    /// advances the durable position.
    Leader(LogId),
    Sync(tokio::sync::oneshot::Sender<Result<(), String>>),
}

/// What `fsync` durability syncs after sled's flush: sled's data file, and
/// the blob files sled writes (unsynced) for records over ~1/4 segment.
pub struct SyncTarget {
    data: std::fs::File,
    blobs_dir: std::path::PathBuf,
    /// Blob files already synced (sled never rewrites a blob in place).
    synced_blobs: std::collections::HashSet<std::ffi::OsString>,
    /// The blobs directory's mtime when last listed, if that listing came
    /// well after it (directory timestamps are coarse: a file added in the
    /// same clock tick would not change it). Unchanged then means no file
    /// was added, and the listing is skipped.
    blobs_mtime: Option<std::time::SystemTime>,
}

/// How long after a directory's mtime a listing must happen to be sure it
/// saw every file added at that mtime (kernel timestamps are coarse).
const MTIME_SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

impl SyncTarget {
    /// Sync targets of the sled database in `db_dir`.
    pub fn open(db_dir: &std::path::Path) -> Result<Self, StoreError> {
        let path = db_dir.join("db");
        let data = std::fs::File::open(&path).map_err(|source| StoreError::Io {
            what: format!("open {} for fdatasync", path.display()),
            source,
        })?;
        Ok(SyncTarget {
            data,
            blobs_dir: db_dir.join("blobs"),
            synced_blobs: Default::default(),
            blobs_mtime: None,
        })
    }

    fn sync(&mut self) -> Result<(), String> {
        self.data
            .sync_data()
            .map_err(|e| format!("fdatasync: {e}"))?;
        let mtime = match std::fs::metadata(&self.blobs_dir).and_then(|m| m.modified()) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("stat {}: {e}", self.blobs_dir.display())),
        };
        if mtime.is_some() && mtime == self.blobs_mtime {
            return Ok(());
        }
        let entries = match std::fs::read_dir(&self.blobs_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("list {}: {e}", self.blobs_dir.display())),
        };
        let mut present = std::collections::HashSet::new();
        let mut new_files = false;
        for entry in entries {
            let entry = entry.map_err(|e| format!("list {}: {e}", self.blobs_dir.display()))?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                let path = entry.path();
                match std::fs::File::open(&path) {
                    Ok(f) => f
                        .sync_data()
                        .map_err(|e| format!("fdatasync {}: {e}", path.display()))?,
                    // Removed since listed (sled garbage-collects blobs).
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(format!("open {}: {e}", path.display())),
                }
                new_files = true;
            }
            present.insert(name);
        }
        if new_files {
            std::fs::File::open(&self.blobs_dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("fsync {}: {e}", self.blobs_dir.display()))?;
        }
        self.synced_blobs = present;
        let settled = mtime
            .and_then(|m| std::time::SystemTime::now().duration_since(m).ok())
            .is_some_and(|age| age > MTIME_SETTLE);
        self.blobs_mtime = if settled { mtime } else { None };
        Ok(())
    }
}

/// Handle to the group-commit thread. The thread ends when the last
/// handle is dropped.
#[derive(Clone)]
struct Flusher {
    tx: std::sync::mpsc::Sender<FlushWaiter>,
}

impl Flusher {
    fn start(
        db: sled::Db,
        sync_file: Option<SyncTarget>,
        durable: DurableLog,
    ) -> Result<Self, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel::<FlushWaiter>();
        let mut sync_file = sync_file;
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    waiters.extend(rx.try_iter());
                    let started = std::time::Instant::now();
                    let mut result = db.flush().map(|_| ()).map_err(|e| e.to_string());
                    // sled's flush on Linux ends in sync_file_range, which
                    // neither flushes the device cache nor file metadata:
                    // fdatasync makes the group power-loss durable.
                    if let (Ok(()), Some(target)) = (&result, &mut sync_file) {
                        result = target.sync();
                    }
                    let micros = started.elapsed().as_micros() as u64;
                    tracing::trace!(waiters = waiters.len(), micros, "raft log group commit");
                    if started.elapsed() >= SLOW_FLUSH {
                        // openraft 0.9 blocks the node's core on this flush:
                        // long ones can cost leadership (see README).
                        tracing::warn!(waiters = waiters.len(), micros, "slow raft log flush");
                    }
                    match &result {
                        Err(e) => {
                            tracing::error!(error = %e, "raft log flush failed");
                            durable.fail();
                        }
                        Ok(()) => {
                            let newest = waiters
                                .iter()
                                .filter_map(|w| match w {
                                    FlushWaiter::Append(_, id) | FlushWaiter::Leader(id) => {
                                        Some(*id)
                                    }
                                    FlushWaiter::Sync(_) => None,
                                })
                                .max_by_key(|id| id.index);
                            if let Some(id) = newest {
                                durable.advance(id);
                            }
                        }
                    }
                    for w in waiters {
                        match w {
                            FlushWaiter::Append(cb, _) => {
                                cb.log_io_completed(result.clone().map_err(std::io::Error::other))
                            }
                            FlushWaiter::Leader(_) => {}
                            FlushWaiter::Sync(tx) => {
                                let _ = tx.send(result.clone());
                            }
                        }
                    }
                }
            })
            .map_err(|source| StoreError::Io {
                what: "start the raft log flusher thread".into(),
                source,
            })?;
        Ok(Flusher { tx })
    }

    fn flusher_gone() -> std::io::Error {
        std::io::Error::other("the raft log flusher thread is gone")
    }

    /// Report `cb` complete once everything written so far, up to `last`,
    /// is durable.
    fn after_flush(&self, cb: LogFlushed<TypeConfig>, last: LogId) -> Result<(), std::io::Error> {
        self.tx
            .send(FlushWaiter::Append(cb, last))
            .map_err(|_| Self::flusher_gone())
    }

    /// Make everything written so far, up to `last`, durable in the next
    /// group commit, telling no one but the durable position.
    fn in_background(&self, last: LogId) -> Result<(), std::io::Error> {
        self.tx
            .send(FlushWaiter::Leader(last))
            .map_err(|_| Self::flusher_gone())
    }

    /// Wait until everything written so far is durable.
    async fn flush(&self) -> Result<(), std::io::Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(FlushWaiter::Sync(tx))
            .map_err(|_| Self::flusher_gone())?;
        rx.await
            .map_err(|_| Self::flusher_gone())?
            .map_err(std::io::Error::other)
    }
}

type SResult<T> = Result<T, StorageError<NodeId>>;

fn read_err(e: impl std::error::Error + Send + Sync + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + Send + Sync + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// The record `key` of the `raft_meta` tree, decoded.
fn read_meta<T: serde::de::DeserializeOwned>(
    meta: &sled::Tree,
    key: &[u8],
    what: &'static str,
) -> SResult<Option<T>> {
    match meta.get(key).map_err(read_err)? {
        None => Ok(None),
        Some(b) => Ok(Some(decode(what, &b).map_err(read_err)?)),
    }
}

/// The purge point and the last log id (the newest entry, which may be
/// one the purger has not deleted yet, or the purge point).
fn log_state(log: &sled::Tree, meta: &sled::Tree) -> SResult<LogState<TypeConfig>> {
    let last_purged_log_id: Option<LogId> = read_meta(meta, META_LAST_PURGED, "last purged")?;
    let last_entry = match log.last().map_err(read_err)? {
        Some((_, v)) => Some(decode::<Entry>("log entry", &v).map_err(read_err)?.log_id),
        None => None,
    };
    Ok(LogState {
        last_purged_log_id,
        last_log_id: last_entry.max(last_purged_log_id),
    })
}

impl LogStore {
    /// Open the log trees of `db`. With `sync` (sled's files), every group
    /// commit also `fdatasync`s them. `leader_overlap` is this node's id
    /// when leader overlap is on (see [`crate::open_with`]).
    pub fn new(
        db: sled::Db,
        sync: Option<SyncTarget>,
        leader_overlap: Option<NodeId>,
    ) -> Result<Self, StoreError> {
        let sync_file = sync;
        let open = |name: &str| {
            db.open_tree(name).map_err(|source| StoreError::Sled {
                what: format!("open tree {name}"),
                source,
            })
        };
        let log = open("raft_log")?;
        let meta = open("raft_meta")?;
        let io = |what: &'static str| {
            move |e: StorageError<NodeId>| StoreError::Io {
                what: what.into(),
                source: std::io::Error::other(e.to_string()),
            }
        };
        let vote: Option<Vote<NodeId>> =
            read_meta(&meta, META_VOTE, "vote").map_err(io("read the vote"))?;
        let state = log_state(&log, &meta).map_err(io("read the raft log state"))?;
        // Whatever the log holds when it opens is on disk.
        let durable = DurableLog::new(state.last_log_id);
        let store = LogStore {
            overlap_as: leader_overlap,
            vote: Arc::new(std::sync::Mutex::new(vote)),
            durable: durable.clone(),
            purger: Purger::start(log.clone())?,
            log,
            meta,
            flusher: Flusher::start(db, sync_file, durable)?,
            first_kept: Arc::default(),
        };
        // Finish a purge a crash interrupted.
        if let Some(p) = state.last_purged_log_id {
            store
                .mark_purged(p.index)
                .map_err(|source| StoreError::Io {
                    what: "purge the raft log".into(),
                    source,
                })?;
        }
        Ok(store)
    }

    /// How far this node's log is on disk (shared with the state machine
    /// and the peer transport; see [`crate::durable`]).
    pub fn durable(&self) -> DurableLog {
        self.durable.clone()
    }

    /// With leader overlap on: the leader id this node appends under when
    /// it leads in the term of its last saved vote.
    fn leading_as(&self) -> Option<openraft::CommittedLeaderId<NodeId>> {
        let me = self.overlap_as?;
        let vote = self.vote.lock().unwrap_or_else(|p| p.into_inner());
        vote.as_ref()
            .filter(|v| v.is_committed() && v.leader_id().voted_for() == Some(me))
            .map(|v| *v.leader_id())
    }

    /// Hide entries up to `index` from readers and have the purger
    /// delete them.
    fn mark_purged(&self, index: u64) -> Result<(), std::io::Error> {
        self.first_kept
            .fetch_max(index.saturating_add(1), Ordering::AcqRel);
        self.purger.purge(index)
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> SResult<Option<T>> {
        read_meta(&self.meta, key, what)
    }

    async fn flush(&self) -> Result<(), std::io::Error> {
        self.flusher.flush().await
    }

    /// Remove every entry whose index is in `range`.
    fn remove_range(&self, range: impl RangeBounds<[u8; 8]>) -> Result<(), sled::Error> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(range) {
            let (k, _) = item?;
            batch.remove(k);
        }
        self.log.apply_batch(batch)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> SResult<Vec<Entry>> {
        // Purged entries may still be on disk: start after them.
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        }
        .max(self.first_kept.load(Ordering::Acquire));
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let empty = match range.end_bound() {
            Bound::Included(i) => start > *i,
            Bound::Excluded(i) => start >= *i,
            Bound::Unbounded => false,
        };
        let mut out = Vec::new();
        if empty {
            return Ok(out);
        }
        for item in self.log.range((Bound::Included(index_key(start)), end)) {
            let (_, v) = item.map_err(read_err)?;
            out.push(decode::<Entry>("log entry", &v).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> SResult<LogState<TypeConfig>> {
        log_state(&self.log, &self.meta)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> SResult<()> {
        let bytes = encode("vote", vote).map_err(|e| StorageIOError::write_vote(&e))?;
        self.meta
            .insert(META_VOTE, bytes)
            .map_err(|e| StorageIOError::write_vote(&e))?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        *self.vote.lock().unwrap_or_else(|p| p.into_inner()) = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> SResult<Option<Vote<NodeId>>> {
        self.read_meta(META_VOTE, "vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> SResult<()> {
        // Not flushed: losing it only means re-applying from the last
        // flushed point, which openraft does.
        let bytes = encode("committed", &committed).map_err(write_err)?;
        self.meta.insert(META_COMMITTED, bytes).map_err(write_err)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> SResult<Option<LogId>> {
        Ok(self
            .read_meta::<Option<LogId>>(META_COMMITTED, "committed")?
            .flatten())
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> SResult<()>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        // One plain insert per entry, in index order, and no sled batch: a
        // batch seals sled's IO buffer twice (a write + sync_file_range
        // each, which the flush below would wait for). Atomicity is not
        // needed: sled recovers a prefix of its log, so a crash before the
        // flush leaves a shorter log with no hole (and a follower has not
        // reported these entries yet; a leader's early report is covered by
        // the rules in crate::durable).
        let leading_as = self.leading_as();
        let mut own = leading_as.is_some();
        let mut last = None;
        for entry in entries {
            own &= Some(entry.log_id.leader_id) == leading_as;
            last = Some(entry.log_id);
            let bytes = encode("log entry", &entry).map_err(write_err)?;
            self.log
                .insert(index_key(entry.log_id.index), bytes)
                .map_err(write_err)?;
        }
        let Some(last) = last else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        if own {
            // This node's own entries as leader of its current term: done
            // for openraft now (readable, so replication can start), durable
            // with the next group commit. See crate::durable for why
            // nothing is applied or told to followers before that.
            self.flusher.in_background(last).map_err(write_err)?;
            self.durable.reported_early(last.index);
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        // Durable before openraft is told: the flusher calls back after
        // the fsync that covers this batch.
        self.flusher.after_flush(callback, last).map_err(write_err)
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn truncate(&mut self, log_id: LogId) -> SResult<()> {
        self.remove_range(index_key(log_id.index)..)
            .map_err(write_err)?;
        self.flush().await.map_err(write_err)?;
        self.durable
            .truncated_to(log_state(&self.log, &self.meta)?.last_log_id);
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn purge(&mut self, log_id: LogId) -> SResult<()> {
        // Record the purge point first: if we crash half way, the log state
        // still says what is gone.
        let bytes = encode("last purged", &log_id).map_err(write_err)?;
        self.meta
            .insert(META_LAST_PURGED, bytes)
            .map_err(write_err)?;
        self.flush().await.map_err(write_err)?;
        self.mark_purged(log_id.index).map_err(write_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use openraft::{CommittedLeaderId, EntryPayload};

    fn log_id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    /// Write entries 1..=n straight into the tree (appends need an
    /// openraft callback; the purge path does not care how they got there).
    fn fill(store: &LogStore, n: u64) {
        for i in 1..=n {
            let entry = Entry {
                log_id: log_id(i),
                payload: EntryPayload::Blank,
            };
            let bytes = encode("log entry", &entry).expect("encode");
            store.log.insert(index_key(i), bytes).expect("insert");
        }
    }

    /// Waits (bounded) for the purger thread to delete entries `..=upto`.
    fn wait_deleted(store: &LogStore, upto: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.log.range(..=index_key(upto)).next().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "purged entries still on disk after 10 s"
            );
            std::thread::yield_now();
        }
    }

    fn indexes(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.log_id.index).collect()
    }

    #[tokio::test]
    async fn purge_hides_entries_at_once_and_deletes_them_in_the_background() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).expect("sled");
        let mut store = LogStore::new(db, None, Some(1)).expect("store");
        fill(&store, 3_000);
        store.purge(log_id(2_500)).await.expect("purge");
        let left = store.try_get_log_entries(..).await.expect("read");
        assert_eq!(indexes(&left), (2_501..=3_000).collect::<Vec<_>>());
        assert!(store
            .try_get_log_entries(10..20)
            .await
            .expect("read")
            .is_empty());
        let state = store.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(2_500)));
        assert_eq!(state.last_log_id, Some(log_id(3_000)));
        wait_deleted(&store, 2_500);
        assert_eq!(store.log.len(), 500);
    }

    #[tokio::test]
    async fn a_purge_cut_short_by_a_crash_finishes_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).expect("sled");
        {
            let store = LogStore::new(db.clone(), None, Some(1)).expect("store");
            fill(&store, 100);
            // The purge point was recorded but nothing was deleted yet.
            let bytes = encode("last purged", &log_id(100)).expect("encode");
            store.meta.insert(META_LAST_PURGED, bytes).expect("meta");
        }
        // What a restart does: open the log store over the same database.
        let mut store = LogStore::new(db, None, Some(1)).expect("store");
        assert!(store
            .try_get_log_entries(..)
            .await
            .expect("read")
            .is_empty());
        // Everything is purged: the last log id is the purge point.
        let state = store.get_log_state().await.expect("state");
        assert_eq!(state.last_log_id, Some(log_id(100)));
        wait_deleted(&store, 100);
    }

    #[tokio::test]
    async fn only_this_nodes_committed_leadership_makes_appends_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).expect("sled");
        let mut store = LogStore::new(db.clone(), None, Some(1)).expect("store");
        assert_eq!(store.leading_as(), None);
        // A candidate's vote for itself is not leadership.
        store.save_vote(&Vote::new(2, 1)).await.expect("vote");
        assert_eq!(store.leading_as(), None);
        store
            .save_vote(&Vote::new_committed(2, 1))
            .await
            .expect("vote");
        assert_eq!(store.leading_as(), Some(CommittedLeaderId::new(2, 1)));
        // Known again after a restart.
        let reopened = LogStore::new(db, None, Some(1)).expect("store");
        assert_eq!(reopened.leading_as(), Some(CommittedLeaderId::new(2, 1)));
        // Following another leader, even one replicating this node's old
        // entries, is not.
        store
            .save_vote(&Vote::new_committed(3, 2))
            .await
            .expect("vote");
        assert_eq!(store.leading_as(), None);
    }

    #[tokio::test]
    async fn background_flushes_advance_the_durable_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).expect("sled");
        let store = LogStore::new(db.clone(), None, Some(1)).expect("store");
        let durable = store.durable();
        assert_eq!(durable.log_id(), None);
        fill(&store, 3);
        store.durable.reported_early(3);
        store.flusher.in_background(log_id(3)).expect("flusher");
        durable.wait_for(3).await.expect("flushed");
        assert_eq!(durable.log_id(), Some(log_id(3)));
        // A store opens durable up to its last entry.
        let reopened = LogStore::new(db, None, Some(1)).expect("store");
        assert_eq!(reopened.durable().log_id(), Some(log_id(3)));
    }

    #[test]
    fn sync_target_syncs_every_new_blob_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("db"), b"data").expect("db file");
        let mut target = SyncTarget::open(dir.path()).expect("open");
        // No blobs directory yet: nothing to do.
        target.sync().expect("sync");
        std::fs::create_dir(dir.path().join("blobs")).expect("blobs dir");
        std::fs::write(dir.path().join("blobs/1"), b"blob").expect("blob");
        target.sync().expect("sync");
        assert!(target.synced_blobs.contains(std::ffi::OsStr::new("1")));
        // A blob added right after a listing is still found: the listing
        // was not long enough after the mtime to be trusted.
        std::fs::write(dir.path().join("blobs/2"), b"blob").expect("blob");
        target.sync().expect("sync");
        assert!(target.synced_blobs.contains(std::ffi::OsStr::new("2")));
        // Removed blobs are forgotten.
        std::fs::remove_file(dir.path().join("blobs/1")).expect("rm");
        target.sync().expect("sync");
        assert!(!target.synced_blobs.contains(std::ffi::OsStr::new("1")));
    }
}
