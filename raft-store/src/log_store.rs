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
//! fsync. `save_vote` waits for the flusher before it returns. All trees
//! share sled's one log, so one flush covers the state machine's writes
//! too. sled's flush ends in `sync_file_range`, enough for a `kill -9`
//! but not for power loss, and sled writes records over ~1/4 segment to
//! blob files it never syncs; unless `Durability::KillSafe` is chosen the
//! flusher also `fdatasync`s sled's data file and any new blob files (and
//! their directory), once per group.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader, StorageError, StorageIOError, Vote};

use crate::codec::{decode, encode};
use crate::store::StoreError;
use crate::{Entry, LogId, NodeId, TypeConfig};

const META_VOTE: &[u8] = b"vote";
const META_COMMITTED: &[u8] = b"committed";
const META_LAST_PURGED: &[u8] = b"last_purged";

/// The Raft log and vote of one node. Cheap to clone (sled handles).
#[derive(Clone)]
pub struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
    flusher: Flusher,
}

/// A group commit slower than this is logged at warn level.
const SLOW_FLUSH: std::time::Duration = std::time::Duration::from_millis(100);

/// Work for the flusher thread: something to report once durable.
enum FlushWaiter {
    Append(LogFlushed<TypeConfig>),
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
    fn start(db: sled::Db, sync_file: Option<SyncTarget>) -> Result<Self, StoreError> {
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
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "raft log flush failed");
                    }
                    for w in waiters {
                        match w {
                            FlushWaiter::Append(cb) => {
                                cb.log_io_completed(result.clone().map_err(std::io::Error::other))
                            }
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

    /// Report `cb` complete once everything written so far is durable.
    fn after_flush(&self, cb: LogFlushed<TypeConfig>) -> Result<(), std::io::Error> {
        self.tx
            .send(FlushWaiter::Append(cb))
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

impl LogStore {
    /// Open the log trees of `db`. With `sync` (sled's files), every group
    /// commit also `fdatasync`s them.
    pub fn new(db: sled::Db, sync: Option<SyncTarget>) -> Result<Self, StoreError> {
        let sync_file = sync;
        let open = |name: &str| {
            db.open_tree(name).map_err(|source| StoreError::Sled {
                what: format!("open tree {name}"),
                source,
            })
        };
        Ok(LogStore {
            log: open("raft_log")?,
            meta: open("raft_meta")?,
            flusher: Flusher::start(db, sync_file)?,
        })
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> SResult<Option<T>> {
        match self.meta.get(key).map_err(read_err)? {
            None => Ok(None),
            Some(b) => Ok(Some(decode(what, &b).map_err(read_err)?)),
        }
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
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self.log.range((start, end)) {
            let (_, v) = item.map_err(read_err)?;
            out.push(decode::<Entry>("log entry", &v).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> SResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId> = self.read_meta(META_LAST_PURGED, "last purged")?;
        let last_log_id = match self.log.last().map_err(read_err)? {
            Some((_, v)) => Some(decode::<Entry>("log entry", &v).map_err(read_err)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
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
        let mut encoded = Vec::new();
        for entry in entries {
            let bytes = encode("log entry", &entry).map_err(write_err)?;
            encoded.push((index_key(entry.log_id.index), bytes));
        }
        // A single entry needs no batch (a batch also writes a manifest
        // record to sled's log); several go in one atomic batch.
        if encoded.len() == 1 {
            let (k, v) = encoded.swap_remove(0);
            self.log.insert(k, v).map_err(write_err)?;
        } else {
            let mut batch = sled::Batch::default();
            for (k, v) in encoded {
                batch.insert(&k, v);
            }
            self.log.apply_batch(batch).map_err(write_err)?;
        }
        // Durable before openraft is told: the flusher calls back after
        // the fsync that covers this batch.
        self.flusher.after_flush(callback).map_err(write_err)
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn truncate(&mut self, log_id: LogId) -> SResult<()> {
        self.remove_range(index_key(log_id.index)..)
            .map_err(write_err)?;
        self.flush().await.map_err(write_err)?;
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
        self.remove_range(..=index_key(log_id.index))
            .map_err(write_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
