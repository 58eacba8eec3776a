//! The replicated commands, their results, stored values and watch events.
//!
//! These are the validated domain types: the admin API converts protobuf
//! into them at the edge, and they travel inside Raft entries.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a control node listens: written into Raft membership so every peer
/// can dial every other.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    /// Raft peer RPC (gRPC) address, `host:port`.
    pub raft_addr: String,
    /// Admin API (gRPC) address, `host:port`.
    pub admin_addr: String,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} admin={}", self.raft_addr, self.admin_addr)
    }
}

/// A key with its value and revisions, as readers see it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Revision that created the key (since its last delete).
    pub create_revision: u64,
    /// Revision of the last change.
    pub mod_revision: u64,
    /// Number of puts since creation (1 after the first).
    pub version: u64,
    /// The lease the key is attached to (0: none). Revoking or expiring
    /// the lease deletes the key.
    pub lease: u64,
}

/// A lease: keys attached to it are deleted when it is revoked, or when
/// the leader sees no keepalive for `ttl_ms` (see the control plane's
/// lease keeper; deadlines are leader memory, never logged).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: u64,
    pub ttl_ms: u64,
}

/// What one Raft entry carries: commands from concurrent clients, applied
/// in order. Batching lets many commands share one log append, one fsync
/// and one replication round (openraft 0.9 makes the leader wait for each
/// append's flush before the next).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub commands: Vec<Command>,
}

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.commands.as_slice() {
            [one] => write!(f, "{one}"),
            many => write!(f, "{} commands", many.len()),
        }
    }
}

/// The state machine's answer to one entry: one response per command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposalResponse {
    pub responses: Vec<CommandResponse>,
}

/// One state change. If it changes anything it gets exactly one new
/// revision, shared by all its changes (a txn is atomic at one revision).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Set `key`; with `expected_mod_revision`, only if the key's current
    /// mod revision equals it (0 = only if absent).
    Put {
        key: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        expected_mod_revision: Option<u64>,
        /// Return the previous value (else only its revisions are read).
        prev_kv: bool,
        /// Attach the key to this lease (0: none; a put without a lease
        /// detaches the key from its old one). The lease must exist.
        lease: u64,
    },
    /// Remove `key`; with `expected_mod_revision`, only if it matches.
    Delete {
        key: String,
        expected_mod_revision: Option<u64>,
        /// Return the deleted value (else only its revisions are read).
        prev_kv: bool,
    },
    /// If all compares hold run `success`, else `failure`, atomically.
    Txn {
        compare: Vec<Compare>,
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
    },
    /// Forget the change feed at and below `revision`.
    Compact { revision: u64 },
    /// Create lease `id` (not 0, not in use). Changes no key, so it takes
    /// no revision.
    LeaseGrant { id: u64, ttl_ms: u64 },
    /// Delete lease `id` and every key attached to it, at one revision.
    LeaseRevoke { id: u64 },
}

impl Command {
    /// Short name for spans and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Put { .. } => "put",
            Command::Delete { .. } => "delete",
            Command::Txn { .. } => "txn",
            Command::Compact { .. } => "compact",
            Command::LeaseGrant { .. } => "lease-grant",
            Command::LeaseRevoke { .. } => "lease-revoke",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Put { key, value, .. } => write!(f, "put {key} ({} bytes)", value.len()),
            Command::Delete { key, .. } => write!(f, "delete {key}"),
            Command::Txn {
                compare,
                success,
                failure,
            } => write!(
                f,
                "txn ({} compares, {} success ops, {} failure ops)",
                compare.len(),
                success.len(),
                failure.len()
            ),
            Command::Compact { revision } => write!(f, "compact {revision}"),
            Command::LeaseGrant { id, ttl_ms } => write!(f, "grant lease {id} ({ttl_ms} ms)"),
            Command::LeaseRevoke { id } => write!(f, "revoke lease {id}"),
        }
    }
}

/// What a compare looks at, with the value to compare against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    ModRevision(u64),
    CreateRevision(u64),
    Version(u64),
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// How a compare compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

/// One condition of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub key: String,
    pub target: CompareTarget,
    pub op: CompareOp,
}

impl Compare {
    /// Evaluate against the key's current value (`None` = absent: revisions
    /// and version count as 0, and no value matches).
    pub fn holds(&self, current: Option<&KeyValue>) -> bool {
        use std::cmp::Ordering;
        let ordering = match (&self.target, current) {
            (CompareTarget::ModRevision(n), kv) => kv.map_or(0, |kv| kv.mod_revision).cmp(n),
            (CompareTarget::CreateRevision(n), kv) => kv.map_or(0, |kv| kv.create_revision).cmp(n),
            (CompareTarget::Version(n), kv) => kv.map_or(0, |kv| kv.version).cmp(n),
            (CompareTarget::Value(_), None) => return false,
            (CompareTarget::Value(v), Some(kv)) => kv.value.as_slice().cmp(v.as_slice()),
        };
        match self.op {
            CompareOp::Equal => ordering == Ordering::Equal,
            CompareOp::NotEqual => ordering != Ordering::Equal,
            CompareOp::Greater => ordering == Ordering::Greater,
            CompareOp::Less => ordering == Ordering::Less,
        }
    }
}

/// An operation inside a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    Put {
        key: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// As in [`Command::Put`].
        lease: u64,
    },
    Delete {
        key: String,
    },
    Get {
        key: String,
    },
}

/// The result of one transaction operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOpResult {
    /// `prev` is the value before the put.
    Put {
        prev: Option<KeyValue>,
    },
    /// `prev` is the deleted value, `None` if the key did not exist.
    Delete {
        prev: Option<KeyValue>,
    },
    Get {
        kv: Option<KeyValue>,
    },
}

/// What applying a command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Put {
        prev: Option<KeyValue>,
    },
    /// `prev` is `None` when the key did not exist (nothing changed).
    Delete {
        prev: Option<KeyValue>,
    },
    Txn {
        succeeded: bool,
        results: Vec<TxnOpResult>,
    },
    /// A compare-and-set did not hold: nothing changed.
    Conflict {
        key: String,
        current_mod_revision: u64,
    },
    /// The change feed now starts after `compact_revision`.
    Compacted {
        compact_revision: u64,
    },
    /// The command was well-formed but not applicable (e.g. compacting a
    /// future revision). Nothing changed.
    Rejected {
        reason: String,
    },
    /// A put named, or a revoke targeted, a lease that does not exist.
    /// Nothing changed.
    LeaseNotFound {
        id: u64,
    },
    LeaseGranted {
        lease: Lease,
    },
    /// The lease is gone, and with it `deleted_keys` keys.
    LeaseRevoked {
        deleted_keys: u64,
    },
}

/// The response of the state machine to one entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResponse {
    /// The store revision after this entry (unchanged if it changed nothing).
    pub revision: u64,
    pub outcome: Outcome,
}

/// Kind of a watch event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One key's change. For deletes `kv` holds the key and the delete's
/// revision as `mod_revision`; value and the other fields are empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// All events of one revision (never split).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionEvents {
    pub revision: u64,
    pub events: Vec<Event>,
}
