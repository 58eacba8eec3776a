//! The revisioned resource store: the state machine's data, behind the
//! [`RevisionedStore`] trait, implemented on sled by [`SledStore`].
//!
//! Rules (like etcd's MVCC, without old versions of values):
//! - One global `revision`. An applied entry that changes at least one key
//!   bumps it by exactly one; all its changes share that revision.
//! - Every key carries `create_revision`, `mod_revision` and `version`.
//! - Each revision's events go to the history in the same atomic write
//!   as the data and `last_applied` (see [`WriteSet`]), so a crash never
//!   separates them. History is kept for [`HISTORY_RETENTION`] revisions (and can be
//!   compacted sooner by a `Compact` command); a reader asking for older
//!   revisions gets [`StoreError::Compacted`].

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use openraft::EntryPayload;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::codec::{decode, decode_prefix, encode, CodecError};
use crate::types::*;
use crate::{Entry, LogId, StoredMembership};

/// Revisions of change history kept for watchers that resume. At ~1 KiB
/// per change this bounds history to ~100 MiB while giving a watcher that
/// was disconnected for minutes under heavy write load room to resume.
pub const HISTORY_RETENTION: u64 = 100_000;

/// History is trimmed in steps of this many revisions, so the (cheap, but
/// not free) range delete runs once per step rather than per write.
pub const HISTORY_COMPACT_STEP: u64 = 1_000;

/// sled writes any record over ~128 KiB (a quarter of its default 512 KiB
/// segment) to a blob file of its own, which costs a file and a directory
/// fsync per record; Raft entries are batched below this.
pub const SLED_BLOB_THRESHOLD_BYTES: usize = 128 * 1024;

/// Write sets up to this size are made atomic with a redo record rather
/// than a sled batch (see [`WriteSet::commit`]). A single put writes ~3 KiB
/// (record, history event, counters); batched proposals write more, and
/// for them one batch is cheaper than writing everything twice.
pub const REDO_MAX_BYTES: usize = 32 * 1024;

/// sled page cache. The working set of a mesh's config is small; 256 MiB
/// keeps reads in memory without letting sled take the machine.
pub const SLED_CACHE_BYTES: u64 = 256 * 1024 * 1024;

/// Errors of the store. None of them is safe to retry blindly except
/// [`StoreError::Compacted`], which asks the reader to start over.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error ({what}): {source}")]
    Sled {
        what: String,
        #[source]
        source: sled::Error,
    },
    #[error("i/o error ({what}): {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// History at or below `compact_revision` is gone.
    #[error(
        "revision {requested} was compacted (history starts after revision {compact_revision})"
    )]
    Compacted {
        requested: u64,
        compact_revision: u64,
    },
    #[error("corrupt store: {0}")]
    Corrupt(String),
}

impl StoreError {
    fn sled(what: &str, source: sled::Error) -> Self {
        StoreError::Sled {
            what: what.to_string(),
            source,
        }
    }
}

/// A page of the change feed.
#[derive(Debug, Default)]
pub struct HistoryPage {
    /// Revisions with at least one event matching the prefix, in order.
    pub revisions: Vec<RevisionEvents>,
    /// Every revision up to this one was examined (matching or not).
    pub scanned_to: u64,
}

/// A page of keys.
#[derive(Debug, Default)]
pub struct ListPage {
    pub kvs: Vec<KeyValue>,
    /// More keys follow (after the last one in `kvs`).
    pub more: bool,
    /// The revision the page was read at.
    pub revision: u64,
}

/// History read per `events_since` call stops after about this many bytes
/// of events (always at least one revision): bounds a watcher's memory.
pub const HISTORY_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// A consistent copy of the whole state machine, as carried in snapshots.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotBody {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub revision: u64,
    pub kvs: Vec<KeyValue>,
    /// Every lease; which keys each holds is in `kvs` (`KeyValue::lease`).
    pub leases: Vec<Lease>,
}

/// The state machine's storage engine. Implementations must apply a batch
/// of entries atomically (data, history, `last_applied` together) and give
/// readers a consistent view.
pub trait RevisionedStore: Send + Sync + 'static {
    /// Apply committed entries in order; one response per entry.
    fn apply_entries(&self, entries: &[Entry]) -> Result<Vec<ProposalResponse>, StoreError>;
    /// The last applied log id and membership.
    fn applied_state(&self) -> Result<(Option<LogId>, StoredMembership), StoreError>;
    /// Current revision (of the applied state).
    fn revision(&self) -> u64;
    /// History holds every revision above this one.
    fn compact_revision(&self) -> u64;
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Keys with `prefix`, after `start_after` if given, at most `limit`
    /// and about `max_bytes` of keys and values (always at least one key),
    /// values left out with `keys_only`. Read as of one revision (no apply
    /// lands in the middle), which the page carries.
    fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        max_bytes: usize,
        keys_only: bool,
    ) -> Result<ListPage, StoreError>;
    /// Events of revisions after `after` whose keys start with `prefix`,
    /// at most `max_revisions` revisions examined.
    fn events_since(
        &self,
        after: u64,
        prefix: &str,
        max_revisions: usize,
    ) -> Result<HistoryPage, StoreError>;
    /// Tells subscribers the revision whenever a new one is applied.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// A consistent copy of the state for a snapshot.
    fn export(&self) -> Result<SnapshotBody, StoreError>;
    /// Replace the whole state with a snapshot's.
    fn import(&self, body: SnapshotBody) -> Result<(), StoreError>;
    /// Make everything applied so far durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Bytes on disk (approximate).
    fn size_on_disk(&self) -> u64;
    /// Every lease, by id.
    fn leases(&self) -> Result<Vec<Lease>, StoreError>;
    /// One lease and the keys attached to it; `None` if it does not exist.
    fn lease(&self, id: u64) -> Result<Option<(Lease, Vec<String>)>, StoreError>;
}

/// Value of a key as stored (the key is in the sled key).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    create_revision: u64,
    mod_revision: u64,
    version: u64,
    lease: u64,
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
}

impl Record {
    fn into_kv(self, key: &str) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: self.value,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        }
    }
}

/// The leading fields of a [`Record`], decoded without its value.
#[derive(Debug, Deserialize)]
struct RecordHead {
    create_revision: u64,
    mod_revision: u64,
    version: u64,
    lease: u64,
}

impl RecordHead {
    fn into_kv(self, key: &str) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: Vec::new(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        }
    }
}

/// Counters written with every apply batch.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SmMeta {
    last_applied: Option<LogId>,
    revision: u64,
    compact_revision: u64,
}

// Key layout of the `state` tree. One tree, so that one `apply_batch`
// (sled's atomic batch: cheaper than a multi-tree transaction) covers data,
// history and counters.
const DATA: u8 = b'd';
const HISTORY: u8 = b'h';
const META_KEY: &[u8] = b"m";
const MEMBERSHIP_KEY: &[u8] = b"n";
/// The last apply call's [`Redo`] record, when it was written that way.
const REDO_KEY: &[u8] = b"r";
/// `l` + lease id (BE) -> [`Lease`].
const LEASE: u8 = b'l';
/// `a` + lease id (BE) + key -> empty: which keys a lease holds.
const ATTACHED: u8 = b'a';

fn lease_key(id: u64) -> [u8; 9] {
    let mut k = [LEASE; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn attached_prefix(id: u64) -> [u8; 9] {
    let mut k = [ATTACHED; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn attached_key(id: u64, key: &str) -> Vec<u8> {
    let mut k = attached_prefix(id).to_vec();
    k.extend_from_slice(key.as_bytes());
    k
}

fn data_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(DATA);
    k.extend_from_slice(key.as_bytes());
    k
}

fn history_key(rev: u64) -> [u8; 9] {
    let mut k = [HISTORY; 9];
    k[1..].copy_from_slice(&rev.to_be_bytes());
    k
}

fn u64_from(bytes: &[u8], what: &str) -> Result<u64, StoreError> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what} is {} bytes, expected 8", bytes.len())))?;
    Ok(u64::from_be_bytes(arr))
}

fn key_of(data_key: &[u8]) -> Result<&str, StoreError> {
    std::str::from_utf8(&data_key[1..])
        .map_err(|_| StoreError::Corrupt("a stored key is not UTF-8".to_string()))
}

/// [`RevisionedStore`] on one sled tree, `state`.
pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
    revision: AtomicU64,
    compact_revision: AtomicU64,
    /// Apply and import write under it; export and list read under it, so
    /// they see one state.
    state_lock: RwLock<()>,
    trimmer: Trimmer,
    applied_tx: watch::Sender<u64>,
}

/// Pending changes of one apply call: reads see earlier writes of the
/// same call through `overlay`; everything lands in `batch` at once.
struct Pending<'a> {
    tree: &'a sled::Tree,
    overlay: HashMap<String, Option<Record>>,
    /// Leases granted (`Some`) or revoked (`None`) in this call.
    leases: HashMap<u64, Option<Lease>>,
    /// Keys attached to (`true`) or detached from (`false`) a lease in
    /// this call.
    attached: BTreeMap<(u64, String), bool>,
    batch: WriteSet,
}

/// The writes of one apply call, in order, made durable together by
/// [`WriteSet::commit`].
#[derive(Default)]
struct WriteSet {
    ops: Vec<(sled::IVec, Option<sled::IVec>)>,
    /// Keys and values, for choosing how to commit.
    bytes: usize,
}

/// What [`WriteSet::commit`] stores before single-key writes: every
/// write of the call, the counters (`META_KEY`) last. Replaying it is
/// idempotent, since it holds final values, not operations.
#[derive(Serialize, Deserialize)]
struct Redo<'a> {
    #[serde(borrow)]
    writes: Vec<(&'a [u8], Option<&'a [u8]>)>,
}

impl WriteSet {
    fn insert(&mut self, key: impl Into<sled::IVec>, value: impl Into<sled::IVec>) {
        let (key, value) = (key.into(), value.into());
        self.bytes += key.len() + value.len();
        self.ops.push((key, Some(value)));
    }

    fn remove(&mut self, key: impl Into<sled::IVec>) {
        let key = key.into();
        self.bytes += key.len();
        self.ops.push((key, None));
    }

    /// Write everything to `tree` so that a crash keeps all of it or none.
    ///
    /// A sled batch does that, but every batch seals sled's IO buffer
    /// twice, and each seal is a `pwrite` + `sync_file_range` on sled's IO
    /// thread pool that the next Raft log flush must wait for: measured,
    /// 3 device syncs per put per node instead of 1. So a small set is
    /// written as one [`Redo`] record (a single-key write, atomic by
    /// itself) followed by plain single-key writes. sled recovers a prefix
    /// of its log, so after a crash either the record is missing (and so
    /// is every write after it) or [`recover_redo`] finishes the writes
    /// on open. Larger sets go in one batch, which also drops the record.
    fn commit(self, tree: &sled::Tree) -> Result<(), StoreError> {
        let err = |e| StoreError::sled("apply entries", e);
        if self.bytes <= REDO_MAX_BYTES {
            let redo = Redo {
                writes: self
                    .ops
                    .iter()
                    .map(|(k, v)| (&k[..], v.as_deref()))
                    .collect(),
            };
            tree.insert(REDO_KEY, encode("redo record", &redo)?)
                .map_err(err)?;
            #[cfg(test)]
            if CRASH_AFTER_REDO.with(|c| c.get()) {
                return Err(StoreError::Corrupt(
                    "test: crash after the redo record".into(),
                ));
            }
            for (k, v) in self.ops {
                match v {
                    Some(v) => tree.insert(k, v).map(drop),
                    None => tree.remove(k).map(drop),
                }
                .map_err(err)?;
            }
        } else {
            let mut batch = batch_of(self.ops);
            batch.remove(REDO_KEY);
            tree.apply_batch(batch).map_err(err)?;
        }
        Ok(())
    }
}

/// One sled batch of puts (`Some`) and removals (`None`), in order.
fn batch_of<K, V>(ops: impl IntoIterator<Item = (K, Option<V>)>) -> sled::Batch
where
    K: Into<sled::IVec>,
    V: Into<sled::IVec>,
{
    let mut batch = sled::Batch::default();
    for (k, v) in ops {
        match v {
            Some(v) => batch.insert(k, v),
            None => batch.remove(k),
        }
    }
    batch
}

#[cfg(test)]
thread_local! {
    /// Test hook: [`WriteSet::commit`] stops after the redo record, as a
    /// crash there would.
    static CRASH_AFTER_REDO: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Finish the last apply call if a crash cut its single-key writes short:
/// replay its [`Redo`] record when the counters it carries are newer than
/// the stored ones. Returns whether it replayed.
fn recover_redo(tree: &sled::Tree) -> Result<bool, StoreError> {
    let Some(bytes) = tree
        .get(REDO_KEY)
        .map_err(|e| StoreError::sled("read redo record", e))?
    else {
        return Ok(false);
    };
    let redo: Redo = decode("redo record", &bytes)?;
    let Some((_, Some(meta))) = redo.writes.iter().rev().find(|(k, _)| *k == META_KEY) else {
        return Err(StoreError::Corrupt(
            "the redo record has no state machine meta".into(),
        ));
    };
    let redo_applied = decode::<SmMeta>("state machine meta", meta)?
        .last_applied
        .map(|l| l.index);
    let stored_applied = match tree
        .get(META_KEY)
        .map_err(|e| StoreError::sled("read meta", e))?
    {
        Some(b) => decode::<SmMeta>("state machine meta", &b)?
            .last_applied
            .map(|l| l.index),
        None => None,
    };
    if redo_applied <= stored_applied {
        return Ok(false);
    }
    tree.apply_batch(batch_of(redo.writes.iter().copied()))
        .map_err(|e| StoreError::sled("replay redo record", e))?;
    tracing::info!(
        last_applied = ?redo_applied,
        writes = redo.writes.len(),
        "finished an apply cut short by a crash (redo record replayed)"
    );
    Ok(true)
}

impl<'a> Pending<'a> {
    fn new(tree: &'a sled::Tree) -> Self {
        Pending {
            tree,
            overlay: HashMap::new(),
            leases: HashMap::new(),
            attached: BTreeMap::new(),
            batch: WriteSet::default(),
        }
    }

    /// A key's revisions without its value (cheaper: the value is not
    /// decoded or copied).
    fn head(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        if let Some(pending) = self.overlay.get(key) {
            return Ok(pending.as_ref().map(|r| {
                RecordHead {
                    create_revision: r.create_revision,
                    mod_revision: r.mod_revision,
                    version: r.version,
                    lease: r.lease,
                }
                .into_kv(key)
            }));
        }
        match self
            .tree
            .get(data_key(key))
            .map_err(|e| StoreError::sled("read during apply", e))?
        {
            None => Ok(None),
            Some(bytes) => {
                let h: RecordHead = decode_prefix("kv record", &bytes)?;
                Ok(Some(h.into_kv(key)))
            }
        }
    }

    fn lease(&self, id: u64) -> Result<Option<Lease>, StoreError> {
        if let Some(pending) = self.leases.get(&id) {
            return Ok(*pending);
        }
        match self
            .tree
            .get(lease_key(id))
            .map_err(|e| StoreError::sled("read lease during apply", e))?
        {
            None => Ok(None),
            Some(b) => Ok(Some(decode("lease", &b)?)),
        }
    }

    fn set_lease(&mut self, id: u64, lease: Option<Lease>) -> Result<(), StoreError> {
        match &lease {
            Some(l) => self.batch.insert(&lease_key(id), encode("lease", l)?),
            None => self.batch.remove(&lease_key(id)),
        }
        self.leases.insert(id, lease);
        Ok(())
    }

    fn attach(&mut self, id: u64, key: &str, on: bool) {
        if on {
            self.batch.insert(attached_key(id, key), Vec::<u8>::new());
        } else {
            self.batch.remove(attached_key(id, key));
        }
        self.attached.insert((id, key.to_string()), on);
    }

    /// Keys attached to lease `id`, including this call's changes.
    fn attached_keys(&self, id: u64) -> Result<Vec<String>, StoreError> {
        let mut keys = std::collections::BTreeSet::new();
        for item in self.tree.scan_prefix(attached_prefix(id)).keys() {
            let k = item.map_err(|e| StoreError::sled("read lease keys", e))?;
            let key = std::str::from_utf8(&k[9..])
                .map_err(|_| StoreError::Corrupt("a lease's key is not UTF-8".to_string()))?;
            keys.insert(key.to_string());
        }
        for ((lease, key), on) in self.attached.range((id, String::new())..) {
            if *lease != id {
                break;
            }
            if *on {
                keys.insert(key.clone());
            } else {
                keys.remove(key);
            }
        }
        Ok(keys.into_iter().collect())
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        if let Some(pending) = self.overlay.get(key) {
            return Ok(pending.clone().map(|r| r.into_kv(key)));
        }
        match self
            .tree
            .get(data_key(key))
            .map_err(|e| StoreError::sled("read during apply", e))?
        {
            None => Ok(None),
            Some(bytes) => Ok(Some(decode::<Record>("kv record", &bytes)?.into_kv(key))),
        }
    }
}

/// One command's changes, at most one new revision.
struct CommandTx<'a, 'b> {
    pending: &'a mut Pending<'b>,
    revision: u64,
    changed: bool,
    events: Vec<Event>,
}

impl CommandTx<'_, '_> {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.pending.get(key)
    }

    /// The revision changes of this command are written at (bumped once).
    fn next_revision(&mut self) -> u64 {
        if !self.changed {
            self.changed = true;
            self.revision += 1;
        }
        self.revision
    }

    /// `want_prev`: return the previous value too (else revisions only).
    /// The caller has checked that `lease` (if not 0) exists.
    fn put(
        &mut self,
        key: &str,
        value: &[u8],
        lease: u64,
        want_prev: bool,
    ) -> Result<Option<KeyValue>, StoreError> {
        let prev = if want_prev {
            self.get(key)?
        } else {
            self.pending.head(key)?
        };
        let rev = self.next_revision();
        let old_lease = prev.as_ref().map_or(0, |p| p.lease);
        if old_lease != lease {
            if old_lease != 0 {
                self.pending.attach(old_lease, key, false);
            }
            if lease != 0 {
                self.pending.attach(lease, key, true);
            }
        }
        let rec = Record {
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            lease,
            value: value.to_vec(),
        };
        self.pending
            .batch
            .insert(data_key(key), encode("kv record", &rec)?);
        self.events.push(Event {
            kind: EventKind::Put,
            kv: rec.clone().into_kv(key),
        });
        self.pending.overlay.insert(key.to_string(), Some(rec));
        Ok(prev)
    }

    fn delete(&mut self, key: &str, want_prev: bool) -> Result<Option<KeyValue>, StoreError> {
        let prev = if want_prev {
            self.get(key)?
        } else {
            self.pending.head(key)?
        };
        if let Some(p) = &prev {
            let rev = self.next_revision();
            if p.lease != 0 {
                self.pending.attach(p.lease, key, false);
            }
            self.pending.batch.remove(data_key(key));
            self.pending.overlay.insert(key.to_string(), None);
            self.events.push(Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    key: key.to_string(),
                    mod_revision: rev,
                    ..KeyValue::default()
                },
            });
        }
        Ok(prev)
    }

    fn run_op(&mut self, op: &TxnOp) -> Result<TxnOpResult, StoreError> {
        Ok(match op {
            TxnOp::Put { key, value, lease } => TxnOpResult::Put {
                prev: self.put(key, value, *lease, true)?,
            },
            TxnOp::Delete { key } => TxnOpResult::Delete {
                prev: self.delete(key, true)?,
            },
            TxnOp::Get { key } => TxnOpResult::Get { kv: self.get(key)? },
        })
    }

    fn check_expected(
        &self,
        key: &str,
        expected: Option<u64>,
    ) -> Result<Result<(), Outcome>, StoreError> {
        let Some(expected) = expected else {
            return Ok(Ok(()));
        };
        let current = self.pending.head(key)?.map_or(0, |kv| kv.mod_revision);
        if current == expected {
            Ok(Ok(()))
        } else {
            Ok(Err(Outcome::Conflict {
                key: key.to_string(),
                current_mod_revision: current,
            }))
        }
    }

    /// `Some(id)` for the first of `leases` (0 = none) that does not exist.
    fn missing_lease(
        &self,
        leases: impl IntoIterator<Item = u64>,
    ) -> Result<Option<u64>, StoreError> {
        for id in leases {
            if id != 0 && self.pending.lease(id)?.is_none() {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    fn execute(
        &mut self,
        cmd: &Command,
        compact_revision: &mut u64,
    ) -> Result<Outcome, StoreError> {
        match cmd {
            Command::Put {
                key,
                value,
                expected_mod_revision,
                prev_kv,
                lease,
            } => {
                if let Err(conflict) = self.check_expected(key, *expected_mod_revision)? {
                    return Ok(conflict);
                }
                if let Some(id) = self.missing_lease([*lease])? {
                    return Ok(Outcome::LeaseNotFound { id });
                }
                Ok(Outcome::Put {
                    prev: self.put(key, value, *lease, *prev_kv)?,
                })
            }
            Command::Delete {
                key,
                expected_mod_revision,
                prev_kv,
            } => {
                if let Err(conflict) = self.check_expected(key, *expected_mod_revision)? {
                    return Ok(conflict);
                }
                Ok(Outcome::Delete {
                    prev: self.delete(key, *prev_kv)?,
                })
            }
            Command::Txn {
                compare,
                success,
                failure,
            } => {
                let mut succeeded = true;
                for c in compare {
                    if !c.holds(self.get(&c.key)?.as_ref()) {
                        succeeded = false;
                        break;
                    }
                }
                let ops = if succeeded { success } else { failure };
                let leases = ops.iter().filter_map(|op| match op {
                    TxnOp::Put { lease, .. } => Some(*lease),
                    _ => None,
                });
                if let Some(id) = self.missing_lease(leases)? {
                    return Ok(Outcome::LeaseNotFound { id });
                }
                let mut results = Vec::with_capacity(ops.len());
                for op in ops {
                    results.push(self.run_op(op)?);
                }
                Ok(Outcome::Txn { succeeded, results })
            }
            Command::Compact { revision } => {
                if *revision > self.revision {
                    return Ok(Outcome::Rejected {
                        reason: format!(
                            "cannot compact to revision {revision}: the current revision is {}",
                            self.revision
                        ),
                    });
                }
                if *revision < *compact_revision {
                    return Ok(Outcome::Rejected {
                        reason: format!(
                            "revision {revision} is already compacted: history starts after revision {compact_revision}"
                        ),
                    });
                }
                *compact_revision = *revision;
                Ok(Outcome::Compacted {
                    compact_revision: *compact_revision,
                })
            }
            Command::LeaseGrant { id, ttl_ms } => {
                if *id == 0 {
                    return Ok(Outcome::Rejected {
                        reason: "lease id 0 means \"no lease\" and cannot be granted".into(),
                    });
                }
                if self.pending.lease(*id)?.is_some() {
                    return Ok(Outcome::Rejected {
                        reason: format!("lease {id} already exists"),
                    });
                }
                let lease = Lease {
                    id: *id,
                    ttl_ms: *ttl_ms,
                };
                self.pending.set_lease(*id, Some(lease))?;
                Ok(Outcome::LeaseGranted { lease })
            }
            Command::LeaseRevoke { id } => {
                if self.pending.lease(*id)?.is_none() {
                    return Ok(Outcome::LeaseNotFound { id: *id });
                }
                let keys = self.pending.attached_keys(*id)?;
                for key in &keys {
                    self.delete(key, false)?;
                }
                self.pending.set_lease(*id, None)?;
                Ok(Outcome::LeaseRevoked {
                    deleted_keys: keys.len() as u64,
                })
            }
        }
    }
}

impl SledStore {
    /// Open the state-machine tree of `db`.
    pub fn new(db: sled::Db) -> Result<Self, StoreError> {
        let tree = db
            .open_tree("state")
            .map_err(|e| StoreError::sled("open tree state", e))?;
        recover_redo(&tree)?;
        let meta: SmMeta = match tree
            .get(META_KEY)
            .map_err(|e| StoreError::sled("read meta", e))?
        {
            Some(b) => decode("state machine meta", &b)?,
            None => SmMeta::default(),
        };
        let (applied_tx, _) = watch::channel(meta.revision);
        let trimmer = Trimmer::start(tree.clone())?;
        Ok(SledStore {
            db,
            tree,
            revision: AtomicU64::new(meta.revision),
            compact_revision: AtomicU64::new(meta.compact_revision),
            state_lock: RwLock::new(()),
            trimmer,
            applied_tx,
        })
    }

    fn lock(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        // Nothing in apply or import panics part way through its writes;
        // an error there (sled's I/O) stops the Raft node, and the redo
        // record completes the writes when the store reopens. So a
        // poisoned lock is still usable.
        self.state_lock.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.state_lock.read().unwrap_or_else(|p| p.into_inner())
    }

    fn meta(&self) -> Result<SmMeta, StoreError> {
        match self
            .tree
            .get(META_KEY)
            .map_err(|e| StoreError::sled("read meta", e))?
        {
            Some(b) => Ok(decode("state machine meta", &b)?),
            None => Ok(SmMeta::default()),
        }
    }
}

/// Most history records one trimming batch removes: trimming runs in the
/// background in small steps, so it never holds up apply for long.
const TRIM_BATCH: usize = 1_000;

/// Background thread that physically removes history at or below the
/// compact revision. Logically that history is already gone (readers check
/// the compact revision first), so nothing waits for this.
struct Trimmer {
    tx: Option<std::sync::mpsc::Sender<u64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Trimmer {
    /// Stop the thread and wait for it, so the database is closed when the
    /// store is (the thread holds a tree handle).
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Trimmer {
    fn start(tree: sled::Tree) -> Result<Self, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let thread = std::thread::Builder::new()
            .name("history-trim".into())
            .spawn(move || {
                while let Ok(mut upto) = rx.recv() {
                    // Only the newest request matters.
                    upto = rx.try_iter().fold(upto, u64::max);
                    if let Err(e) = trim(&tree, upto) {
                        tracing::warn!(error = %e, upto, "trimming watch history failed; retried at the next compaction");
                    }
                }
            })
            .map_err(|source| StoreError::Io {
                what: "start the history trimming thread".into(),
                source,
            })?;
        Ok(Trimmer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn request(&self, upto: u64) {
        // The thread only stops with the store; nothing to do then.
        if let Some(tx) = &self.tx {
            let _ = tx.send(upto);
        }
    }
}

/// Remove history at or below `upto`, [`TRIM_BATCH`] records at a time.
fn trim(tree: &sled::Tree, upto: u64) -> Result<(), StoreError> {
    let mut removed = 0usize;
    loop {
        let mut batch = sled::Batch::default();
        let mut n = 0usize;
        for item in tree
            .range(history_key(0)..=history_key(upto))
            .take(TRIM_BATCH)
        {
            let (k, _) = item.map_err(|e| StoreError::sled("scan history", e))?;
            batch.remove(k);
            n += 1;
        }
        if n == 0 {
            break;
        }
        tree.apply_batch(batch)
            .map_err(|e| StoreError::sled("trim history", e))?;
        removed += n;
    }
    if removed > 0 {
        tracing::debug!(upto, removed, "trimmed watch history");
    }
    Ok(())
}

impl RevisionedStore for SledStore {
    fn apply_entries(&self, entries: &[Entry]) -> Result<Vec<ProposalResponse>, StoreError> {
        let guard = self.lock();
        let start_revision = self.revision.load(Ordering::Acquire);
        let start_compact = self.compact_revision.load(Ordering::Acquire);
        let mut revision = start_revision;
        let mut compact_revision = start_compact;
        let mut pending = Pending::new(&self.tree);
        let mut responses = Vec::with_capacity(entries.len());
        let mut last_applied = None;
        for entry in entries {
            last_applied = Some(entry.log_id);
            let mut answers = Vec::new();
            match &entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Membership(m) => {
                    let stored = StoredMembership::new(Some(entry.log_id), m.clone());
                    pending
                        .batch
                        .insert(MEMBERSHIP_KEY, encode("membership", &stored)?);
                }
                EntryPayload::Normal(proposal) => {
                    answers.reserve(proposal.commands.len());
                    for cmd in &proposal.commands {
                        let mut tx = CommandTx {
                            pending: &mut pending,
                            revision,
                            changed: false,
                            events: Vec::new(),
                        };
                        let outcome = tx.execute(cmd, &mut compact_revision)?;
                        if tx.changed {
                            revision = tx.revision;
                            let events = encode("history", &tx.events)?;
                            pending.batch.insert(&history_key(revision), events);
                            // Keep history bounded, deterministically on every node.
                            if revision.is_multiple_of(HISTORY_COMPACT_STEP)
                                && revision > HISTORY_RETENTION
                            {
                                compact_revision =
                                    compact_revision.max(revision - HISTORY_RETENTION);
                            }
                        }
                        answers.push(CommandResponse { revision, outcome });
                    }
                }
            }
            responses.push(ProposalResponse { responses: answers });
        }
        let meta = SmMeta {
            last_applied,
            revision,
            compact_revision,
        };
        pending
            .batch
            .insert(META_KEY, encode("state machine meta", &meta)?);
        pending.batch.commit(&self.tree)?;
        self.revision.store(revision, Ordering::Release);
        if compact_revision > start_compact {
            self.compact_revision
                .store(compact_revision, Ordering::Release);
            self.trimmer.request(compact_revision);
        }
        drop(guard);
        if revision != start_revision {
            self.applied_tx.send_replace(revision);
        }
        Ok(responses)
    }

    fn applied_state(&self) -> Result<(Option<LogId>, StoredMembership), StoreError> {
        let last_applied = self.meta()?.last_applied;
        let membership = match self
            .tree
            .get(MEMBERSHIP_KEY)
            .map_err(|e| StoreError::sled("read membership", e))?
        {
            Some(b) => decode("membership", &b)?,
            None => StoredMembership::default(),
        };
        Ok((last_applied, membership))
    }

    fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    fn compact_revision(&self) -> u64 {
        self.compact_revision.load(Ordering::Acquire)
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        // An apply's single-key writes (see `WriteSet::commit`) land one by
        // one under the write lock; reading under the read lock never sees
        // half of a multi-key change.
        let _guard = self.read_lock();
        match self
            .tree
            .get(data_key(key))
            .map_err(|e| StoreError::sled("get", e))?
        {
            None => Ok(None),
            Some(b) => Ok(Some(decode::<Record>("kv record", &b)?.into_kv(key))),
        }
    }

    fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        max_bytes: usize,
        keys_only: bool,
    ) -> Result<ListPage, StoreError> {
        use std::ops::Bound;
        let _guard = self.read_lock();
        let lower = match start_after {
            Some(after) if after >= prefix => Bound::Excluded(data_key(after)),
            _ => Bound::Included(data_key(prefix)),
        };
        let full_prefix = data_key(prefix);
        let mut page = ListPage {
            revision: self.revision(),
            ..ListPage::default()
        };
        let mut bytes = 0usize;
        for item in self.tree.range::<Vec<u8>, _>((lower, Bound::Unbounded)) {
            let (k, v) = item.map_err(|e| StoreError::sled("list", e))?;
            if !k.starts_with(&full_prefix) {
                break;
            }
            if page.kvs.len() == limit || (bytes >= max_bytes && !page.kvs.is_empty()) {
                page.more = true;
                break;
            }
            let key = key_of(&k)?;
            let kv = if keys_only {
                decode_prefix::<RecordHead>("kv record", &v)?.into_kv(key)
            } else {
                decode::<Record>("kv record", &v)?.into_kv(key)
            };
            bytes += kv.key.len() + kv.value.len();
            page.kvs.push(kv);
        }
        Ok(page)
    }

    fn events_since(
        &self,
        after: u64,
        prefix: &str,
        max_revisions: usize,
    ) -> Result<HistoryPage, StoreError> {
        let compacted = |compact_revision: u64| StoreError::Compacted {
            requested: after + 1,
            compact_revision,
        };
        let compact = self.compact_revision();
        if after < compact {
            return Err(compacted(compact));
        }
        let mut page = HistoryPage {
            revisions: Vec::new(),
            scanned_to: after,
        };
        let mut page_bytes = 0usize;
        let range = history_key(after.saturating_add(1))..=history_key(u64::MAX);
        for item in self.tree.range(range).take(max_revisions) {
            let (k, v) = item.map_err(|e| StoreError::sled("read history", e))?;
            let revision = u64_from(&k[1..], "history key")?;
            if revision != page.scanned_to + 1 {
                // A hole: trimmed under us, or an import replaced history.
                break;
            }
            if page_bytes >= HISTORY_PAGE_BYTES && !page.revisions.is_empty() {
                break;
            }
            page.scanned_to = revision;
            page_bytes += v.len();
            let events: Vec<Event> = decode("history", &v)?;
            let events: Vec<Event> = events
                .into_iter()
                .filter(|e| e.kv.key.starts_with(prefix))
                .collect();
            if !events.is_empty() {
                page.revisions.push(RevisionEvents { revision, events });
            }
        }
        // History below the compact revision may have been trimmed while we
        // read; if so what we read may have holes.
        let compact = self.compact_revision();
        if after < compact {
            return Err(compacted(compact));
        }
        Ok(page)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    fn export(&self) -> Result<SnapshotBody, StoreError> {
        let guard = self.read_lock();
        let (last_applied, membership) = self.applied_state()?;
        let revision = self.revision();
        let mut kvs = Vec::new();
        for item in self.tree.scan_prefix([DATA]) {
            let (k, v) = item.map_err(|e| StoreError::sled("export", e))?;
            kvs.push(decode::<Record>("kv record", &v)?.into_kv(key_of(&k)?));
        }
        let leases = self.leases()?;
        drop(guard);
        Ok(SnapshotBody {
            last_applied,
            membership,
            revision,
            kvs,
            leases,
        })
    }

    fn import(&self, body: SnapshotBody) -> Result<(), StoreError> {
        let guard = self.lock();
        let e = |what: &'static str| move |err| StoreError::sled(what, err);
        // One atomic batch replaces everything (removals of the old keys,
        // then the new state): a crash mid-install leaves the old state or
        // the new one, never an empty store.
        let mut batch = sled::Batch::default();
        for item in self.tree.iter().keys() {
            batch.remove(item.map_err(e("scan state"))?);
        }
        for lease in &body.leases {
            batch.insert(&lease_key(lease.id), encode("lease", lease)?);
        }
        for kv in body.kvs {
            if kv.lease != 0 {
                batch.insert(attached_key(kv.lease, &kv.key), Vec::<u8>::new());
            }
            let rec = Record {
                create_revision: kv.create_revision,
                mod_revision: kv.mod_revision,
                version: kv.version,
                lease: kv.lease,
                value: kv.value,
            };
            batch.insert(data_key(&kv.key), encode("kv record", &rec)?);
        }
        // No history survives a snapshot install: watchers from before it
        // are told to resync.
        let meta = SmMeta {
            last_applied: body.last_applied,
            revision: body.revision,
            compact_revision: body.revision,
        };
        batch.insert(META_KEY, encode("state machine meta", &meta)?);
        batch.insert(MEMBERSHIP_KEY, encode("membership", &body.membership)?);
        // Raise the compact revision before the history disappears, so a
        // watcher reading meanwhile is told "compacted", not a gap.
        self.compact_revision
            .fetch_max(body.revision, Ordering::AcqRel);
        self.tree.apply_batch(batch).map_err(e("import"))?;
        self.db.flush().map_err(e("flush after import"))?;
        self.revision.store(body.revision, Ordering::Release);
        self.compact_revision
            .store(body.revision, Ordering::Release);
        drop(guard);
        self.applied_tx.send_replace(body.revision);
        Ok(())
    }

    fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([LEASE]).values() {
            let v = item.map_err(|e| StoreError::sled("read leases", e))?;
            out.push(decode("lease", &v)?);
        }
        Ok(out)
    }

    fn lease(&self, id: u64) -> Result<Option<(Lease, Vec<String>)>, StoreError> {
        let _guard = self.read_lock();
        let pending = Pending::new(&self.tree);
        match pending.lease(id)? {
            None => Ok(None),
            Some(lease) => Ok(Some((lease, pending.attached_keys(id)?))),
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(|e| StoreError::sled("flush", e))
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    struct Fixture {
        _dir: tempfile::TempDir,
        store: SledStore,
        index: u64,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let db = sled::Config::new()
                .path(dir.path())
                .open()
                .expect("open sled");
            Fixture {
                store: SledStore::new(db).expect("store"),
                _dir: dir,
                index: 0,
            }
        }

        fn entry(&mut self, cmd: Command) -> Entry {
            self.index += 1;
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), self.index),
                payload: EntryPayload::Normal(Proposal {
                    commands: vec![cmd],
                }),
            }
        }

        fn apply(&mut self, cmds: Vec<Command>) -> Vec<CommandResponse> {
            let entries: Vec<Entry> = cmds.into_iter().map(|c| self.entry(c)).collect();
            self.store
                .apply_entries(&entries)
                .expect("apply")
                .into_iter()
                .flat_map(|r| r.responses)
                .collect()
        }

        fn apply1(&mut self, cmd: Command) -> CommandResponse {
            self.apply(vec![cmd]).remove(0)
        }
    }

    fn put(key: &str, value: &str) -> Command {
        Command::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            expected_mod_revision: None,
            prev_kv: true,
            lease: 0,
        }
    }

    fn put_leased(key: &str, lease: u64) -> Command {
        Command::Put {
            key: key.into(),
            value: b"v".to_vec(),
            expected_mod_revision: None,
            prev_kv: false,
            lease,
        }
    }

    #[test]
    fn revoking_a_lease_deletes_its_keys_at_one_revision() {
        let mut f = Fixture::new();
        // Grant changes no key: no revision.
        let r = f.apply1(Command::LeaseGrant {
            id: 7,
            ttl_ms: 5_000,
        });
        assert_eq!(r.revision, 0);
        assert_eq!(
            r.outcome,
            Outcome::LeaseGranted {
                lease: Lease {
                    id: 7,
                    ttl_ms: 5_000
                }
            }
        );
        // Granting it again, or lease 0, is refused.
        assert!(matches!(
            f.apply1(Command::LeaseGrant { id: 7, ttl_ms: 1 }).outcome,
            Outcome::Rejected { .. }
        ));
        // Puts under a missing lease change nothing.
        let r = f.apply1(put_leased("/x", 9));
        assert_eq!(
            (r.revision, r.outcome),
            (0, Outcome::LeaseNotFound { id: 9 })
        );
        f.apply(vec![
            put_leased("/i/a", 7),
            put_leased("/i/b", 7),
            put_leased("/i/c", 7),
            put("/plain", "p"),
        ]);
        // Re-put without a lease detaches; a delete forgets the key.
        f.apply1(put("/i/c", "now plain"));
        let (lease, keys) = f.store.lease(7).expect("read").expect("lease");
        assert_eq!(lease.ttl_ms, 5_000);
        assert_eq!(keys, vec!["/i/a".to_string(), "/i/b".to_string()]);
        assert_eq!(f.store.get("/i/a").expect("get").expect("kv").lease, 7);

        let r = f.apply1(Command::LeaseRevoke { id: 7 });
        assert_eq!(r.outcome, Outcome::LeaseRevoked { deleted_keys: 2 });
        assert_eq!(r.revision, 6, "both deletes share one revision");
        assert!(f.store.get("/i/a").expect("get").is_none());
        assert!(f.store.get("/i/c").expect("get").is_some());
        assert!(f.store.lease(7).expect("read").is_none());
        assert!(f.store.leases().expect("leases").is_empty());
        let page = f.store.events_since(5, "", 10).expect("history");
        assert_eq!(page.revisions.len(), 1);
        assert_eq!(page.revisions[0].events.len(), 2);
        assert!(page.revisions[0]
            .events
            .iter()
            .all(|e| e.kind == EventKind::Delete));
        assert_eq!(
            f.apply1(Command::LeaseRevoke { id: 7 }).outcome,
            Outcome::LeaseNotFound { id: 7 }
        );
    }

    #[test]
    fn grant_attach_and_revoke_work_inside_one_apply_call() {
        let mut f = Fixture::new();
        let r = f.apply(vec![
            Command::LeaseGrant {
                id: 3,
                ttl_ms: 1_000,
            },
            put_leased("/k", 3),
            Command::LeaseRevoke { id: 3 },
        ]);
        assert_eq!(r[2].outcome, Outcome::LeaseRevoked { deleted_keys: 1 });
        assert!(f.store.get("/k").expect("get").is_none());
        assert!(f.store.lease(3).expect("read").is_none());
    }

    #[test]
    fn leases_travel_in_snapshots() {
        let mut f = Fixture::new();
        f.apply(vec![
            Command::LeaseGrant {
                id: 4,
                ttl_ms: 2_000,
            },
            put_leased("/a", 4),
        ]);
        let body = f.store.export().expect("export");
        let mut g = Fixture::new();
        g.store.import(body).expect("import");
        let (lease, keys) = g.store.lease(4).expect("read").expect("lease");
        assert_eq!((lease.ttl_ms, keys), (2_000, vec!["/a".to_string()]));
        let r = g.apply1(Command::LeaseRevoke { id: 4 });
        assert_eq!(r.outcome, Outcome::LeaseRevoked { deleted_keys: 1 });
    }

    #[test]
    fn revisions_and_versions_follow_etcd_rules() {
        let mut f = Fixture::new();
        assert_eq!(f.apply1(put("/a", "1")).revision, 1);
        assert_eq!(f.apply1(put("/b", "1")).revision, 2);
        assert_eq!(f.apply1(put("/a", "2")).revision, 3);
        let a = f.store.get("/a").expect("get").expect("present");
        assert_eq!((a.create_revision, a.mod_revision, a.version), (1, 3, 2));
        // Deleting a missing key spends no revision.
        let r = f.apply1(Command::Delete {
            key: "/nope".into(),
            expected_mod_revision: None,
            prev_kv: true,
        });
        assert_eq!(r.revision, 3);
        assert_eq!(r.outcome, Outcome::Delete { prev: None });
        let r = f.apply1(Command::Delete {
            key: "/a".into(),
            expected_mod_revision: None,
            prev_kv: true,
        });
        assert_eq!(r.revision, 4);
        // Re-created key starts a new life.
        f.apply1(put("/a", "3"));
        let a = f.store.get("/a").expect("get").expect("present");
        assert_eq!((a.create_revision, a.mod_revision, a.version), (5, 5, 1));
        assert_eq!(f.store.revision(), 5);
    }

    #[test]
    fn compare_and_set_conflicts_report_current_revision() {
        let mut f = Fixture::new();
        f.apply1(put("/k", "v1"));
        let r = f.apply1(Command::Put {
            key: "/k".into(),
            value: b"v2".to_vec(),
            expected_mod_revision: Some(7),
            prev_kv: true,
            lease: 0,
        });
        assert_eq!(
            r.outcome,
            Outcome::Conflict {
                key: "/k".into(),
                current_mod_revision: 1
            }
        );
        assert_eq!(r.revision, 1, "a failed CAS spends no revision");
        let r = f.apply1(Command::Put {
            key: "/k".into(),
            value: b"v2".to_vec(),
            expected_mod_revision: Some(1),
            prev_kv: true,
            lease: 0,
        });
        assert!(matches!(r.outcome, Outcome::Put { prev: Some(_) }));
        // Create-only.
        let r = f.apply1(Command::Put {
            key: "/k".into(),
            value: b"v3".to_vec(),
            expected_mod_revision: Some(0),
            prev_kv: true,
            lease: 0,
        });
        assert!(matches!(
            r.outcome,
            Outcome::Conflict {
                current_mod_revision: 2,
                ..
            }
        ));
    }

    #[test]
    fn txn_is_atomic_with_one_revision() {
        let mut f = Fixture::new();
        f.apply1(put("/x", "1"));
        let r = f.apply1(Command::Txn {
            compare: vec![Compare {
                key: "/x".into(),
                target: CompareTarget::Value(b"1".to_vec()),
                op: CompareOp::Equal,
            }],
            success: vec![
                TxnOp::Put {
                    key: "/y".into(),
                    value: b"2".to_vec(),
                    lease: 0,
                },
                TxnOp::Delete { key: "/x".into() },
                TxnOp::Get { key: "/y".into() },
            ],
            failure: vec![],
        });
        assert_eq!(r.revision, 2);
        let Outcome::Txn { succeeded, results } = r.outcome else {
            panic!("expected txn outcome");
        };
        assert!(succeeded);
        assert!(matches!(&results[2], TxnOpResult::Get { kv: Some(kv) } if kv.value == b"2"));
        let page = f.store.events_since(1, "/", 10).expect("history");
        assert_eq!(page.revisions.len(), 1, "both changes in one revision");
        assert_eq!(page.revisions[0].events.len(), 2);
        // Failing compare runs the failure branch.
        let r = f.apply1(Command::Txn {
            compare: vec![Compare {
                key: "/x".into(),
                target: CompareTarget::Version(0),
                op: CompareOp::Greater,
            }],
            success: vec![TxnOp::Put {
                key: "/z".into(),
                value: vec![],
                lease: 0,
            }],
            failure: vec![TxnOp::Get { key: "/y".into() }],
        });
        assert!(matches!(
            r.outcome,
            Outcome::Txn {
                succeeded: false,
                ..
            }
        ));
        assert_eq!(r.revision, 2, "read-only branch spends no revision");
        assert!(f.store.get("/z").expect("get").is_none());
    }

    #[test]
    fn history_is_ordered_filtered_and_compactable() {
        let mut f = Fixture::new();
        f.apply(vec![put("/a/1", "x"), put("/b/1", "x"), put("/a/2", "x")]);
        let page = f.store.events_since(0, "/a/", 100).expect("history");
        let revs: Vec<u64> = page.revisions.iter().map(|r| r.revision).collect();
        assert_eq!(revs, vec![1, 3]);
        assert_eq!(page.scanned_to, 3);
        let r = f.apply1(Command::Compact { revision: 2 });
        assert_eq!(
            r.outcome,
            Outcome::Compacted {
                compact_revision: 2
            }
        );
        assert!(matches!(
            f.store.events_since(1, "", 100),
            Err(StoreError::Compacted {
                compact_revision: 2,
                ..
            })
        ));
        let page = f.store.events_since(2, "", 100).expect("after compaction");
        assert_eq!(page.revisions.len(), 1);
        let r = f.apply1(Command::Compact { revision: 99 });
        assert!(matches!(r.outcome, Outcome::Rejected { .. }));
        // Compacting below the compact revision is refused, not ignored.
        let r = f.apply1(Command::Compact { revision: 1 });
        assert!(
            matches!(r.outcome, Outcome::Rejected { ref reason } if reason.contains("already compacted"))
        );
        assert_eq!(f.store.compact_revision(), 2);
    }

    #[test]
    fn one_entry_of_several_commands_gives_each_its_revision() {
        let mut f = Fixture::new();
        f.index += 1;
        let entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), f.index),
            payload: EntryPayload::Normal(Proposal {
                commands: vec![
                    put("/b/1", "a"),
                    Command::Put {
                        key: "/b/1".into(),
                        value: b"lost".to_vec(),
                        expected_mod_revision: Some(0),
                        prev_kv: true,
                        lease: 0,
                    },
                    put("/b/2", "b"),
                ],
            }),
        };
        let out = f.store.apply_entries(&[entry]).expect("apply");
        let revs: Vec<u64> = out[0].responses.iter().map(|r| r.revision).collect();
        // The conflicting middle command spends no revision.
        assert_eq!(revs, vec![1, 1, 2]);
        assert!(matches!(
            out[0].responses[1].outcome,
            Outcome::Conflict {
                current_mod_revision: 1,
                ..
            }
        ));
        let page = f.store.events_since(0, "", 10).expect("history");
        assert_eq!(
            page.revisions
                .iter()
                .map(|r| r.revision)
                .collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    #[test]
    fn export_import_round_trip() {
        let mut f = Fixture::new();
        f.apply(vec![put("/a", "1"), put("/b", "2"), put("/a", "3")]);
        let body = f.store.export().expect("export");
        let mut g = Fixture::new();
        g.apply(vec![put("/stale", "old"), put("/a", "old")]);
        g.store.import(body).expect("import");
        assert!(
            g.store.get("/stale").expect("get").is_none(),
            "import replaces the whole state"
        );
        assert_eq!(g.store.revision(), 3);
        assert_eq!(
            g.store.get("/a").expect("get"),
            f.store.get("/a").expect("get")
        );
        assert!(matches!(
            g.store.events_since(0, "", 10),
            Err(StoreError::Compacted { .. })
        ));
        // Applying continues from the imported revision.
        g.index = 3;
        assert_eq!(
            g.store
                .list("", None, 10, usize::MAX, false)
                .expect("list")
                .kvs
                .len(),
            2
        );
        let page = g.store.list("", None, 10, 1, true).expect("list");
        assert_eq!(page.kvs.len(), 1, "byte budget stops after one key");
        assert!(page.more && page.kvs[0].value.is_empty() && page.kvs[0].mod_revision > 0);
        assert_eq!(g.apply1(put("/c", "4")).revision, 4);
    }

    /// The state seen through a second store opened on `f`'s database,
    /// as after a restart.
    fn reopened(f: &Fixture) -> SledStore {
        SledStore::new(f.store.db.clone()).expect("reopen store")
    }

    #[test]
    fn an_apply_cut_short_after_its_redo_record_is_finished_on_open() {
        let mut f = Fixture::new();
        f.apply1(put("/a", "1"));
        CRASH_AFTER_REDO.with(|c| c.set(true));
        let op = |key: &str, value: &str| TxnOp::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            lease: 0,
        };
        let entry = f.entry(Command::Txn {
            compare: vec![],
            success: vec![op("/a", "2"), op("/b", "x")],
            failure: vec![],
        });
        let cut = f.store.apply_entries(&[entry]);
        CRASH_AFTER_REDO.with(|c| c.set(false));
        assert!(cut.is_err(), "the test hook stops the apply");
        // None of the entry's single-key writes landed.
        let a = f.store.get("/a").expect("get").expect("/a");
        assert_eq!((a.value.as_slice(), a.mod_revision), (&b"1"[..], 1));
        assert!(f.store.get("/b").expect("get").is_none());

        let store = reopened(&f);
        assert_eq!(store.revision(), 2);
        let (applied, _) = store.applied_state().expect("applied");
        assert_eq!(applied.map(|l| l.index), Some(2));
        for (key, value) in [("/a", "2"), ("/b", "x")] {
            let kv = store.get(key).expect("get").expect(key);
            assert_eq!(
                (kv.value.as_slice(), kv.mod_revision),
                (value.as_bytes(), 2)
            );
        }
        let page = store.events_since(1, "/", 10).expect("history");
        assert_eq!(page.revisions.len(), 1);
        let keys: Vec<&str> = page.revisions[0]
            .events
            .iter()
            .map(|e| e.kv.key.as_str())
            .collect();
        assert_eq!(keys, ["/a", "/b"]);
    }

    #[test]
    fn a_redo_record_older_than_the_state_is_not_replayed() {
        let mut f = Fixture::new();
        f.apply1(put("/a", "1"));
        let old = f
            .store
            .tree
            .get(REDO_KEY)
            .expect("get")
            .expect("redo record");
        f.apply1(put("/a", "2"));
        f.store.tree.insert(REDO_KEY, old).expect("insert");
        assert!(!recover_redo(&f.store.tree).expect("recover"));
        let store = reopened(&f);
        let a = store.get("/a").expect("get").expect("/a");
        assert_eq!((a.value.as_slice(), store.revision()), (&b"2"[..], 2));
    }

    #[test]
    fn large_write_sets_go_in_one_batch_without_a_redo_record() {
        let mut f = Fixture::new();
        f.apply1(put("/small", "1"));
        assert!(f.store.tree.get(REDO_KEY).expect("get").is_some());
        let big = "x".repeat(REDO_MAX_BYTES);
        f.apply1(put("/big", &big));
        assert!(f.store.tree.get(REDO_KEY).expect("get").is_none());
        let kv = f.store.get("/big").expect("get").expect("/big");
        assert_eq!((kv.value.len(), kv.mod_revision), (big.len(), 2));
        assert!(!recover_redo(&f.store.tree).expect("recover"));
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = sled::Config::new().path(dir.path()).open().expect("open");
            let mut f = Fixture {
                store: SledStore::new(db).expect("store"),
                _dir: tempfile::tempdir().expect("tempdir"),
                index: 0,
            };
            f.apply(vec![put("/a", "1"), put("/a", "2")]);
            f.store.flush().expect("flush");
        }
        let db = sled::Config::new().path(dir.path()).open().expect("reopen");
        let store = SledStore::new(db).expect("store");
        assert_eq!(store.revision(), 2);
        let (applied, _) = store.applied_state().expect("applied");
        assert_eq!(applied.map(|l| l.index), Some(2));
    }
}
