//! Snapshot files: the current snapshot of a node, on disk beside the
//! database.
//!
//! One file, `current.snap`, holds the openraft [`SnapshotMeta`] and the
//! snapshot bytes (a postcard-encoded [`SnapshotBody`](crate::store::SnapshotBody)).
//! It is replaced atomically: write `current.snap.tmp`, fsync, rename,
//! fsync the directory. openraft streams the bytes to followers in chunks
//! (`snapshot_max_chunk_size`).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::codec::{decode, encode};
use crate::store::StoreError;
use crate::{NodeAddr, NodeId};

/// Snapshot metadata with Trellis' types.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeAddr>;

const CURRENT: &str = "current.snap";

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

/// The directory holding a node's current snapshot. Clones share one lock:
/// openraft builds snapshots in a task of their own while it may install
/// a received one.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    dir: PathBuf,
    lock: std::sync::Arc<std::sync::Mutex<()>>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Io { what, source }
}

impl SnapshotDir {
    /// Use (and create) `dir`.
    pub fn new(dir: PathBuf) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        Ok(SnapshotDir {
            dir,
            lock: Default::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Atomically replace the current snapshot, unless the current one
    /// already covers more of the log (a build that started before an
    /// install must not overwrite it). Returns whether it was saved.
    pub fn save(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<bool, StoreError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((current, _)) = self.load()? {
            if current.last_log_id > meta.last_log_id {
                tracing::info!(
                    kept = %current.snapshot_id,
                    dropped = %meta.snapshot_id,
                    "not replacing a newer snapshot"
                );
                return Ok(false);
            }
        }
        let file = SnapshotFile {
            meta: meta.clone(),
            data: data.to_vec(),
        };
        let bytes = encode("snapshot file", &file)?;
        let tmp = self.dir.join(format!("{CURRENT}.tmp"));
        let dst = self.dir.join(CURRENT);
        {
            let mut f =
                std::fs::File::create(&tmp).map_err(io(format!("create {}", tmp.display())))?;
            f.write_all(&bytes)
                .map_err(io(format!("write {}", tmp.display())))?;
            f.sync_all()
                .map_err(io(format!("fsync {}", tmp.display())))?;
        }
        std::fs::rename(&tmp, &dst).map_err(io(format!("rename to {}", dst.display())))?;
        let d =
            std::fs::File::open(&self.dir).map_err(io(format!("open {}", self.dir.display())))?;
        d.sync_all()
            .map_err(io(format!("fsync {}", self.dir.display())))?;
        Ok(true)
    }

    /// The current snapshot, if any.
    pub fn load(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StoreError> {
        let path = self.dir.join(CURRENT);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(format!("read {}", path.display()))(e)),
        };
        let file: SnapshotFile = decode("snapshot file", &bytes)?;
        Ok(Some((file.meta, file.data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId};

    fn meta(index: u64) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), index)),
            last_membership: Default::default(),
            snapshot_id: format!("s{index}"),
        }
    }

    #[test]
    fn an_older_snapshot_never_replaces_a_newer_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let snaps = SnapshotDir::new(dir.path().join("snap")).expect("dir");
        assert!(snaps.save(&meta(10), b"ten").expect("save"));
        assert!(!snaps.save(&meta(5), b"five").expect("save"));
        let (m, data) = snaps.load().expect("load").expect("present");
        assert_eq!(
            (m.snapshot_id.as_str(), data.as_slice()),
            ("s10", &b"ten"[..])
        );
        assert!(snaps.save(&meta(12), b"twelve").expect("save"));
        assert_eq!(snaps.load().expect("load").expect("present").1, b"twelve");
    }
}
