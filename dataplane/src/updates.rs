//! A bounded ring buffer of the config updates the sidecar applied (the
//! last [`UPDATE_LOG_CAPACITY`]), for debugging and tests: served as JSON
//! by `GET /debug/updates` ([`crate::admin`]), written by
//! [`crate::cache::ConfigCache`] after each applied snapshot or delta.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Updates kept: enough to see several minutes of a busy mesh's history,
/// small enough (a few hundred KB) to keep the sidecar's idle memory low.
pub const UPDATE_LOG_CAPACITY: usize = 4096;

/// One changed key of a delta.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyChange {
    /// `"put"` or `"delete"`.
    #[serde(rename = "type")]
    pub event_type: &'static str,
    pub key: String,
    pub mod_revision: u64,
}

/// One applied update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpdateRecord {
    /// 1, 2, 3, ... over the sidecar's lifetime (gaps mean entries fell
    /// out of the buffer).
    pub seq: u64,
    /// `"snapshot"` or `"delta"`.
    pub kind: &'static str,
    pub revision: u64,
    /// The control node that sent it.
    pub node_id: u64,
    /// The delta's events, in order; empty for snapshots (see `key_count`).
    pub keys: Vec<KeyChange>,
    /// Keys in the snapshot, or events in the delta.
    pub key_count: usize,
    pub at_unix_ms: u64,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, Default)]
struct Inner {
    next_seq: u64,
    records: VecDeque<UpdateRecord>,
}

/// The ring buffer; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct UpdateLog {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl Default for UpdateLog {
    fn default() -> Self {
        UpdateLog::with_capacity(UPDATE_LOG_CAPACITY)
    }
}

impl UpdateLog {
    /// A log keeping the last `capacity` (≥ 1) records.
    pub fn with_capacity(capacity: usize) -> Self {
        UpdateLog {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Appends a record (assigning its `seq` and time), dropping the oldest
    /// if full.
    pub fn push(
        &self,
        kind: &'static str,
        revision: u64,
        node_id: u64,
        keys: Vec<KeyChange>,
        key_count: usize,
    ) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.next_seq += 1;
        let record = UpdateRecord {
            seq: inner.next_seq,
            kind,
            revision,
            node_id,
            keys,
            key_count,
            at_unix_ms: now_unix_ms(),
        };
        if inner.records.len() >= self.capacity {
            inner.records.pop_front();
        }
        inner.records.push_back(record);
    }

    /// A copy of the records, oldest first.
    pub fn records(&self) -> Vec<UpdateRecord> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.records.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest() {
        let log = UpdateLog::with_capacity(3);
        for rev in 1..=5 {
            log.push("delta", rev, 1, Vec::new(), 0);
        }
        let r = log.records();
        assert_eq!(r.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(r.iter().map(|r| r.revision).collect::<Vec<_>>(), [3, 4, 5]);
    }
}
