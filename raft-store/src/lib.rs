//! `trellis-raft-store`: the durable half of a Trellis control node.
//!
//! Everything the mesh knows lives in one sled database per node:
//!
//! | tree | what | written by |
//! |---|---|---|
//! | `raft_log` | Raft entries, key = index (big-endian u64) | [`LogStore::append`](openraft::storage::RaftLogStorage::append) |
//! | `raft_meta` | vote, committed log id, last purged log id | [`LogStore`] |
//! | `state` | `d`+key: current value of every key with its revisions; `h`+revision: the change feed, one record of events per revision; `m`: last applied log id, revision, compact revision; `n`: membership | [`SledStore::apply_entries`], atomically per apply (a redo record or a sled batch) |
//!
//! Snapshots live beside the database as files (see [`snapshot`]).
//!
//! Data enters through openraft: entries are appended by [`LogStore`]
//! (durable before openraft is told, except a leader's own appends, which
//! replicate while they sync: see [`durable`]) and applied by
//! [`StateMachine`] once durable here, which
//! hands them to a [`RevisionedStore`] — the trait that keeps the engine
//! swappable. Data leaves through the same trait: point reads, prefix
//! listings, and [`RevisionedStore::events_since`], which watch streams read
//! while [`RevisionedStore::subscribe`] tells them that a new revision was
//! applied. Slow readers never hold the writer back: they read history at
//! their own pace and are told when they fall behind compaction.

pub mod codec;
pub mod durable;
pub mod log_store;
pub mod snapshot;
pub mod state_machine;
pub mod store;
pub mod types;

use std::io::Cursor;

pub use log_store::LogStore;
pub use state_machine::StateMachine;
pub use store::{HistoryPage, ListPage, RevisionedStore, SledStore, StoreError};
pub use types::*;

openraft::declare_raft_types!(
    /// openraft type configuration of a Trellis control node.
    pub TypeConfig:
        D = Proposal,
        R = ProposalResponse,
        NodeId = NodeId,
        Node = NodeAddr,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Raft node identifier.
pub type NodeId = u64;
/// A Raft log id with Trellis' node id type.
pub type LogId = openraft::LogId<NodeId>;
/// Membership as stored in the state machine.
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeAddr>;
/// A Raft log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// The Raft instance type of a control node.
pub type Raft = openraft::Raft<TypeConfig>;

/// How hard a log append is pushed to disk before openraft hears it is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// sled's flush plus `fdatasync` of its data file: survives power loss.
    #[default]
    Fsync,
    /// sled's flush only (write + `sync_file_range`): survives a crash or
    /// `kill -9` of the process, not necessarily power loss.
    KillSafe,
}

/// Open (or create) the node's database and return the log store and state
/// machine that share it.
pub fn open(data_dir: &std::path::Path) -> Result<(LogStore, StateMachine), StoreError> {
    open_with(data_dir, Durability::default(), None)
}

/// [`open`] with a chosen [`Durability`]. `leader_overlap`, this node's id
/// to turn it on, lets the node as leader replicate its own appends while
/// they sync (see [`durable`]); without it every append is reported to
/// openraft only once durable.
pub fn open_with(
    data_dir: &std::path::Path,
    durability: Durability,
    leader_overlap: Option<NodeId>,
) -> Result<(LogStore, StateMachine), StoreError> {
    std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Io {
        what: format!("create data dir {}", data_dir.display()),
        source: e,
    })?;
    let db = sled::Config::new()
        .path(data_dir.join("db"))
        .cache_capacity(store::SLED_CACHE_BYTES)
        .mode(sled::Mode::HighThroughput)
        .open()
        .map_err(|e| StoreError::Sled {
            what: format!("open database in {}", data_dir.display()),
            source: e,
        })?;
    let sync = match durability {
        Durability::Fsync => Some(log_store::SyncTarget::open(&data_dir.join("db"))?),
        Durability::KillSafe => None,
    };
    let log = LogStore::new(db.clone(), sync, leader_overlap)?;
    let kv = std::sync::Arc::new(SledStore::new(db)?);
    let sm = StateMachine::new(kv, data_dir.join("snapshots"))?;
    // Only a leader's early-reported appends need the "apply" rule of
    // [`durable`]; with the overlap off every append is durable first.
    let sm = match leader_overlap {
        Some(_) => sm.apply_only_durable(log.durable()),
        None => sm,
    };
    Ok((log, sm))
}
