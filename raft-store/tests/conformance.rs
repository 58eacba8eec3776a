//! openraft's storage conformance suite against the sled log store and
//! state machine: every test gets a fresh database in a temp dir. It runs
//! twice: as configured by default, and with leader overlap on for node 1
//! (the suite saves votes for node 1 and appends as its leader).

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use trellis_raft_store::{Durability, LogStore, NodeId, StateMachine, TypeConfig};

struct SledBuilder {
    leader_overlap: Option<NodeId>,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().map_err(|e| openraft::StorageIOError::write(&e))?;
        let (log, sm) =
            trellis_raft_store::open_with(dir.path(), Durability::default(), self.leader_overlap)
                .map_err(|e| openraft::StorageIOError::write(&e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() -> Result<(), StorageError<NodeId>> {
    Suite::test_all(SledBuilder {
        leader_overlap: None,
    })
}

#[test]
fn openraft_storage_suite_with_leader_overlap() -> Result<(), StorageError<NodeId>> {
    Suite::test_all(SledBuilder {
        leader_overlap: Some(1),
    })
}
