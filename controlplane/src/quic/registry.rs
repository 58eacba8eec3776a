//! The sidecars connected to this node, for `trellisctl proxy-status`.
//!
//! One [`Entry`] per QUIC connection, created when the handshake completes
//! and removed when the [`Registration`] guard drops (the connection task
//! ends). Session streams fill in the sidecar's name, instance and lease,
//! and every `SessionUpdate` moves its applied revision. Node-local memory:
//! the proxy-status call asks every member for its list.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use trellis_proto::admin::SidecarStatus;

use crate::system::now_unix_ms;

/// What this node knows of one connected sidecar.
#[derive(Clone, Debug, Default)]
pub struct Entry {
    pub sidecar_name: String,
    pub spiffe_id: String,
    pub remote_addr: String,
    pub instance_key: String,
    pub lease_id: u64,
    pub applied_revision: u64,
    pub connected_unix_ms: u64,
    pub last_update_unix_ms: u64,
    pub watches: u32,
}

/// Connected sidecars by connection id.
#[derive(Default)]
pub struct SidecarRegistry {
    next_id: AtomicU64,
    entries: Mutex<HashMap<u64, Entry>>,
}

/// Removes its entry when dropped.
pub struct Registration {
    registry: Arc<SidecarRegistry>,
    pub id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl SidecarRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record a new connection.
    pub fn connect(self: &Arc<Self>, spiffe_id: String, remote_addr: String) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now_unix_ms();
        self.lock().insert(
            id,
            Entry {
                spiffe_id,
                remote_addr,
                connected_unix_ms: now,
                last_update_unix_ms: now,
                ..Entry::default()
            },
        );
        Registration {
            registry: self.clone(),
            id,
        }
    }

    /// Change connection `id`'s entry (no-op once it is gone).
    pub fn update(&self, id: u64, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self.lock().get_mut(&id) {
            f(e);
        }
    }

    /// Every connected sidecar, as reported by node `node_id`.
    pub fn list(&self, node_id: u64) -> Vec<SidecarStatus> {
        let mut out: Vec<SidecarStatus> = self
            .lock()
            .values()
            .map(|e| SidecarStatus {
                node_id,
                sidecar_name: e.sidecar_name.clone(),
                spiffe_id: e.spiffe_id.clone(),
                remote_addr: e.remote_addr.clone(),
                instance_key: e.instance_key.clone(),
                lease_id: e.lease_id,
                applied_revision: e.applied_revision,
                connected_unix_ms: e.connected_unix_ms,
                last_update_unix_ms: e.last_update_unix_ms,
                watches: e.watches,
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.sidecar_name, &a.remote_addr).cmp(&(&b.sidecar_name, &b.remote_addr))
        });
        out
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_follow_their_guards() {
        let reg = Arc::new(SidecarRegistry::default());
        let a = reg.connect("spiffe://t/ns/a/svc/x".into(), "127.0.0.1:1".into());
        let b = reg.connect("spiffe://t/ns/a/svc/y".into(), "127.0.0.1:2".into());
        reg.update(a.id, |e| {
            e.sidecar_name = "x-1".into();
            e.applied_revision = 7;
        });
        let list = reg.list(3);
        assert_eq!(list.len(), 2);
        let x = list.iter().find(|s| s.sidecar_name == "x-1").unwrap();
        assert_eq!((x.applied_revision, x.node_id), (7, 3));
        drop(a);
        assert_eq!(reg.len(), 1);
        reg.update(999, |e| e.applied_revision = 1);
        drop(b);
        assert!(reg.is_empty());
    }
}
