//! openraft [`RaftLogStorage`] on sled: the Raft log and the vote.
//!
//! - `raft_log` tree: key = entry index as big-endian `u64` (so sled's key
//!   order is log order), value = postcard-encoded [`Entry`].
//! - `raft_meta` tree: `vote`, `committed`, `last_purged`.
//!
//! Durability: `append` and `save_vote` call `flush_async` (sled's fsync)
//! before they report success, so what openraft counts on survives a
//! `kill -9`. All trees share sled's one log, so one flush covers them.

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
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
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
    /// Open the log trees of `db`.
    pub fn new(db: sled::Db) -> Result<Self, StoreError> {
        let open = |name: &str| {
            db.open_tree(name).map_err(|source| StoreError::Sled {
                what: format!("open tree {name}"),
                source,
            })
        };
        Ok(LogStore {
            log: open("raft_log")?,
            meta: open("raft_meta")?,
            db,
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

    async fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush_async().await.map(|_| ())
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
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = encode("log entry", &entry).map_err(write_err)?;
            batch.insert(&index_key(entry.log_id.index), bytes);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        // Durable before openraft is told: the callback is the promise.
        let flushed = self.flush().await;
        let failed = flushed.as_ref().err().map(|e| write_err(e.clone()));
        callback.log_io_completed(flushed.map_err(std::io::Error::other));
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
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
