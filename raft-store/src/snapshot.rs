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

/// The directory holding a node's current snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    dir: PathBuf,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Io { what, source }
}

impl SnapshotDir {
    /// Use (and create) `dir`.
    pub fn new(dir: PathBuf) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        Ok(SnapshotDir { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Atomically replace the current snapshot.
    pub fn save(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StoreError> {
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
        Ok(())
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
