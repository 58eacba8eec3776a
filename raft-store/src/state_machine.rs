//! openraft [`RaftStateMachine`] over a [`RevisionedStore`].
//!
//! - `apply` hands each batch of committed entries to the store, which
//!   writes data, history and `last_applied` atomically, once the entries
//!   are durable in this node's log (see [`crate::durable`]).
//! - `build_snapshot` takes a consistent copy of the store (apply waits
//!   for the copy, not for encoding or the file write), encodes it, saves
//!   it as the current snapshot and makes the store durable, so openraft
//!   may then purge the log the snapshot covers.
//! - `install_snapshot` replaces the store's state with a received one.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{RaftSnapshotBuilder, StorageError, StorageIOError};
use tokio::sync::watch;

use crate::codec::{decode, encode};
use crate::durable::DurableLog;
use crate::snapshot::{SnapshotDir, SnapshotMeta};
use crate::store::{RevisionedStore, SnapshotBody, StoreError};
use crate::{Entry, LogId, NodeId, ProposalResponse, StoredMembership, TypeConfig};

type SResult<T> = Result<T, StorageError<NodeId>>;

fn sm_write(e: impl std::error::Error + Send + Sync + 'static) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&e).into()
}

fn sm_read(e: impl std::error::Error + Send + Sync + 'static) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(&e).into()
}

fn snap_write(e: impl std::error::Error + Send + Sync + 'static) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, &e).into()
}

fn snap_read(e: impl std::error::Error + Send + Sync + 'static) -> StorageError<NodeId> {
    StorageIOError::read_snapshot(None, &e).into()
}

/// The state machine of a control node. Cheap to clone.
#[derive(Clone)]
pub struct StateMachine {
    store: Arc<dyn RevisionedStore>,
    snapshots: SnapshotDir,
    /// Distinguishes snapshots built at the same log id.
    snapshot_seq: Arc<AtomicU64>,
    /// Index of the last applied entry (blank and membership entries
    /// included, unlike the store's revision): read barriers wait on it.
    applied_tx: Arc<watch::Sender<u64>>,
    /// Nothing above this node's durable log is applied.
    durable: Option<DurableLog>,
}

impl StateMachine {
    /// A state machine over `store`, keeping snapshots in `snapshot_dir`.
    pub fn new(store: Arc<dyn RevisionedStore>, snapshot_dir: PathBuf) -> Result<Self, StoreError> {
        let (last_applied, _) = store.applied_state()?;
        let applied = last_applied.map_or(0, |l| l.index);
        let sm = StateMachine {
            store,
            snapshots: SnapshotDir::new(snapshot_dir)?,
            snapshot_seq: Arc::new(AtomicU64::new(0)),
            applied_tx: Arc::new(watch::channel(applied).0),
            durable: None,
        };
        // A crash between installing a snapshot into the store and saving
        // its file leaves the file behind the state, and openraft may purge
        // the log up to the state: rebuild the file from the state then.
        if let Some(meta) = sm.current_snapshot_meta()? {
            if meta.last_log_id < last_applied {
                tracing::warn!(snapshot = %meta.snapshot_id, "snapshot file is behind the state; rebuilding it");
                sm.write_snapshot()?;
            }
        }
        Ok(sm)
    }

    /// Apply entries only once `durable` says they are on disk here: a
    /// leader's own appends are reported done before their flush.
    pub fn apply_only_durable(mut self, durable: DurableLog) -> Self {
        self.durable = Some(durable);
        self
    }

    /// Export the store, save it as the current snapshot, return it.
    fn write_snapshot(&self) -> Result<(SnapshotMeta, Vec<u8>), StoreError> {
        let body = self.store.export()?;
        let data = encode("snapshot", &body)?;
        // Everything the snapshot covers must be durable in the store
        // before openraft purges the log behind it.
        self.store.flush()?;
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match body.last_applied {
            Some(id) => format!(
                "{}-{}-{}-{seq}",
                id.leader_id.term, id.leader_id.node_id, id.index
            ),
            None => format!("0-0-0-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: body.last_applied,
            last_membership: body.membership.clone(),
            snapshot_id,
        };
        self.snapshots.save(&meta, &data)?;
        tracing::info!(
            snapshot = %meta.snapshot_id,
            revision = body.revision,
            keys = body.kvs.len(),
            bytes = data.len(),
            "built snapshot"
        );
        Ok((meta, data))
    }

    /// Follows the index of the last applied log entry.
    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    /// The store, for readers (admin API, watches).
    pub fn store(&self) -> Arc<dyn RevisionedStore> {
        self.store.clone()
    }

    /// The last snapshot's metadata, if any.
    pub fn current_snapshot_meta(&self) -> Result<Option<SnapshotMeta>, StoreError> {
        Ok(self.snapshots.load()?.map(|(meta, _)| meta))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    #[tracing::instrument(level = "info", skip(self))]
    async fn build_snapshot(&mut self) -> SResult<Snapshot<TypeConfig>> {
        let sm = self.clone();
        let (meta, data) = tokio::task::spawn_blocking(move || sm.write_snapshot())
            .await
            .map_err(|e| snap_write(std::io::Error::other(e.to_string())))?
            .map_err(snap_write)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> SResult<(Option<LogId>, StoredMembership)> {
        self.store.applied_state().map_err(sm_read)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn apply<I>(&mut self, entries: I) -> SResult<Vec<ProposalResponse>>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id.index) else {
            return Ok(Vec::new());
        };
        if let Some(durable) = &self.durable {
            durable.wait_for(last).await.map_err(sm_write)?;
        }
        let responses = self.store.apply_entries(&entries).map_err(sm_write)?;
        self.applied_tx.send_replace(last);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> SResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    #[tracing::instrument(level = "info", skip(self, snapshot), fields(snapshot = %meta.snapshot_id))]
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> SResult<()> {
        let data = snapshot.into_inner();
        let mut body: SnapshotBody = decode("snapshot", &data).map_err(snap_read)?;
        // The meta is authoritative for what the snapshot covers.
        body.last_applied = meta.last_log_id;
        body.membership = meta.last_membership.clone();
        let revision = body.revision;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.import(body))
            .await
            .map_err(|e| sm_write(std::io::Error::other(e.to_string())))?
            .map_err(sm_write)?;
        self.snapshots.save(meta, &data).map_err(snap_write)?;
        self.applied_tx
            .send_replace(meta.last_log_id.map_or(0, |l| l.index));
        tracing::info!(revision, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> SResult<Option<Snapshot<TypeConfig>>> {
        Ok(self
            .snapshots
            .load()
            .map_err(snap_read)?
            .map(|(meta, data)| Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            }))
    }
}
