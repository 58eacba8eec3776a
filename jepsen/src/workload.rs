//! The workloads: register workers and watchers.
//!
//! # Registers
//!
//! `--concurrency` workers, worker `w` attached to slot `w % 3` (it always
//! talks to that slot's node, through the slot's client proxy). Each does
//! one operation at a time at about `rate / concurrency` operations per
//! second: a linearizable `read`, a `write` of a unique value
//! (`"{process}-{seq}"`) or a `cas` (Txn: compare the value, put on
//! success; "absent" compares `create_revision == 0`) whose expected value
//! is the last value anybody observed for that key. Keys are a window of
//! [`KEYS`] registers (`/jepsen/r{n}`, recorded as `r{n}`) that moves on to
//! fresh keys every [`ROTATE_EVERY`] operations, so every key's history
//! stays short enough to check for linearizability.
//!
//! Outcomes: a definite answer is `ok` or `fail`; `fail` also for errors
//! that prove nothing happened (UNAVAILABLE marked `x-trellis-retry-safe`,
//! a refused connect, a refused request). Anything else (client deadline,
//! other UNAVAILABLE, broken connection) is `info` for writes and cas: the
//! operation may still take effect, so the process is considered hung and
//! the worker continues as a new process (Jepsen's rule). A read has no
//! effect, so an indeterminate read is recorded as `fail` (also Jepsen's
//! rule) and its process goes on.
//!
//! # Watchers
//!
//! One watcher per slot on the prefix `/jepsen/` from revision 1, through
//! the slot's client proxy. Every response with events becomes one `watch`
//! record; when the stream breaks (or is silent for [`WATCH_IDLE`] despite
//! progress notices) it re-subscribes to the same slot from the last
//! delivered revision + 1, and records `watch-start` once the new stream is
//! confirmed. If the node no longer has that history (`compacted`), the
//! watcher cannot continue without a gap and goes on as a new process from
//! the compaction point.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};
use trellis_jepsen_checker::history::{Function, RecordType, WatchEvent};
use trellis_proto::admin::compare::{Op as CompareOp, Target as CompareTarget};
use trellis_proto::admin::event::EventType;
use trellis_proto::admin::kv_client::KvClient;
use trellis_proto::admin::txn_op::Op as TxnOpKind;
use trellis_proto::admin::{
    Compare, GetRequest, PutRequest, TxnOp, TxnRequest, WatchRequest, WatchResponse,
};

use crate::cluster::admin_channel;
use crate::recorder::{Entry, Recorder};

/// Prefix of every key the workload uses (and the watchers watch).
pub const KEY_PREFIX: &str = "/jepsen/";
/// Registers in use at a time.
pub const KEYS: u64 = 5;
/// Operations (over all workers) before the window moves to fresh keys:
/// about 100 per key.
pub const ROTATE_EVERY: u64 = 500;
/// Client deadline of one operation.
pub const OP_TIMEOUT: Duration = Duration::from_secs(1);
/// A watch stream silent this long is reopened (progress notices come
/// every [`WATCH_PROGRESS_MS`]).
pub const WATCH_IDLE: Duration = Duration::from_secs(3);
/// Progress notice interval asked of the server.
pub const WATCH_PROGRESS_MS: u32 = 250;

/// The stored key of register `n`.
pub fn key_path(n: u64) -> String {
    format!("{KEY_PREFIX}r{n}")
}

/// The history name of register `n`.
pub fn key_name(n: u64) -> String {
    format!("r{n}")
}

/// State shared by all workers and watchers.
pub struct Shared {
    pub recorder: Arc<Recorder>,
    next_process: AtomicI64,
    ops_started: AtomicU64,
    keys_used: Mutex<BTreeSet<u64>>,
    /// Last value observed per register (`None`: absent).
    last_known: Mutex<HashMap<u64, Option<String>>>,
}

impl Shared {
    /// Processes `0..first_free` are taken by the initial workers and
    /// watchers.
    pub fn new(recorder: Arc<Recorder>, first_free: i64) -> Self {
        Shared {
            recorder,
            next_process: AtomicI64::new(first_free),
            ops_started: AtomicU64::new(0),
            keys_used: Mutex::new(BTreeSet::new()),
            last_known: Mutex::new(HashMap::new()),
        }
    }

    /// A process id never used before.
    pub fn new_process(&self) -> i64 {
        self.next_process.fetch_add(1, Ordering::Relaxed)
    }

    /// Every register an operation was invoked on.
    pub fn keys_used(&self) -> Vec<u64> {
        self.keys_used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }

    fn observe(&self, key: u64, value: Option<String>) {
        self.last_known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, value);
    }

    fn last_known(&self, key: u64) -> Option<String> {
        self.last_known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned()
            .flatten()
    }
}

/// One register operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write(String),
    Cas {
        expected: Option<String>,
        new: String,
    },
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// Read: value (None = absent) and the key's mod_revision; write/cas:
    /// the revision written.
    Ok {
        value: Option<String>,
        revision: u64,
        node: u64,
    },
    /// Certainly did not happen.
    Fail(String),
    /// May or may not have happened.
    Info(String),
}

/// Did the request certainly not reach the server? (The same rule
/// trellisd uses when forwarding: only connect errors prove it.)
fn never_sent(status: &Status) -> bool {
    let mut texts = vec![status.message().to_string()];
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        texts.push(e.to_string());
        source = e.source();
    }
    texts.iter().any(|t| {
        t.contains("tcp connect error")
            || t.contains("error trying to connect")
            || t.contains("Connection refused")
    })
}

/// `fail` or `info` for an error status of a write or cas.
fn classify(status: &Status) -> Outcome {
    let retry_safe = status
        .metadata()
        .get("x-trellis-retry-safe")
        .is_some_and(|v| v.as_bytes() == b"true");
    let text = format!("{:?}: {}", status.code(), status.message());
    let definite = match status.code() {
        Code::Unavailable => retry_safe || never_sent(status),
        // Refused before anything was proposed.
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::NotFound
        | Code::OutOfRange
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented => true,
        _ => never_sent(status),
    };
    if definite {
        Outcome::Fail(text)
    } else {
        Outcome::Info(text)
    }
}

fn header_node(h: Option<&trellis_proto::admin::ResponseHeader>, fallback: u64) -> u64 {
    h.map(|h| h.node_id).filter(|n| *n != 0).unwrap_or(fallback)
}

/// Run `op` on register `key` through `channel`.
async fn execute(channel: &Channel, key: u64, op: &Op) -> Outcome {
    let mut kv = KvClient::new(channel.clone());
    let path = key_path(key);
    let call = async {
        match op {
            Op::Read => {
                let mut req = tonic::Request::new(GetRequest {
                    key: path,
                    serializable: false,
                });
                req.set_timeout(OP_TIMEOUT);
                match kv.get(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        let node = header_node(r.header.as_ref(), 0);
                        match r.kv {
                            Some(kv) => Outcome::Ok {
                                value: Some(String::from_utf8_lossy(&kv.value).into_owned()),
                                revision: kv.mod_revision,
                                node,
                            },
                            None => Outcome::Ok {
                                value: None,
                                revision: 0,
                                node,
                            },
                        }
                    }
                    Err(s) if s.code() == Code::NotFound => Outcome::Ok {
                        value: None,
                        revision: 0,
                        node: 0,
                    },
                    // A read changes nothing: whatever went wrong, it
                    // certainly did not happen.
                    Err(s) => Outcome::Fail(format!("{:?}: {}", s.code(), s.message())),
                }
            }
            Op::Write(value) => {
                let mut req = tonic::Request::new(PutRequest {
                    key: path,
                    value: value.clone().into_bytes(),
                    expected_mod_revision: None,
                    prev_kv: false,
                    lease: 0,
                });
                req.set_timeout(OP_TIMEOUT);
                match kv.put(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        Outcome::Ok {
                            value: Some(value.clone()),
                            revision: r.header.as_ref().map_or(0, |h| h.revision),
                            node: header_node(r.header.as_ref(), 0),
                        }
                    }
                    Err(s) => classify(&s),
                }
            }
            Op::Cas { expected, new } => {
                let compare = match expected {
                    Some(v) => Compare {
                        key: path.clone(),
                        target: CompareTarget::Value as i32,
                        op: CompareOp::Equal as i32,
                        number: 0,
                        value: v.clone().into_bytes(),
                    },
                    None => Compare {
                        key: path.clone(),
                        target: CompareTarget::CreateRevision as i32,
                        op: CompareOp::Equal as i32,
                        number: 0,
                        value: Vec::new(),
                    },
                };
                let put = TxnOp {
                    op: Some(TxnOpKind::Put(PutRequest {
                        key: path,
                        value: new.clone().into_bytes(),
                        expected_mod_revision: None,
                        prev_kv: false,
                        lease: 0,
                    })),
                };
                let mut req = tonic::Request::new(TxnRequest {
                    compare: vec![compare],
                    success: vec![put],
                    failure: Vec::new(),
                });
                req.set_timeout(OP_TIMEOUT);
                match kv.txn(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        if r.succeeded {
                            Outcome::Ok {
                                value: Some(new.clone()),
                                revision: r.header.as_ref().map_or(0, |h| h.revision),
                                node: header_node(r.header.as_ref(), 0),
                            }
                        } else {
                            Outcome::Fail("compare failed".into())
                        }
                    }
                    Err(s) if s.code() == Code::FailedPrecondition => {
                        Outcome::Fail(format!("compare failed: {}", s.message()))
                    }
                    Err(s) => classify(&s),
                }
            }
        }
    };
    match tokio::time::timeout(OP_TIMEOUT + Duration::from_millis(200), call).await {
        Ok(o) => o,
        Err(_) if *op == Op::Read => Outcome::Fail("client timeout".into()),
        Err(_) => Outcome::Info("client timeout".into()),
    }
}

/// Invoke, run and complete one operation in the history; returns the
/// completion's type.
pub async fn perform(
    shared: &Shared,
    channel: &Channel,
    process: i64,
    slot_node: u64,
    key: u64,
    op: &Op,
) -> RecordType {
    let (f, value, expected) = match op {
        Op::Read => (Function::Read, None, None),
        Op::Write(v) => (Function::Write, Some(v.clone()), None),
        Op::Cas { expected, new } => (Function::Cas, Some(new.clone()), expected.clone()),
    };
    shared
        .keys_used
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key);
    let mut e = Entry::new(process, RecordType::Invoke, f);
    e.key = Some(key_name(key));
    e.value = value;
    e.expected = expected;
    shared.recorder.record(e.clone());
    match execute(channel, key, op).await {
        Outcome::Ok {
            value: v,
            revision,
            node,
        } => {
            e.kind = RecordType::Ok;
            e.node = Some(if node == 0 { slot_node } else { node });
            e.revision = Some(revision);
            if f == Function::Read {
                e.value = v.clone();
            }
            shared.observe(key, v);
        }
        Outcome::Fail(err) => {
            e.kind = RecordType::Fail;
            e.node = Some(slot_node);
            e.error = Some(err);
        }
        Outcome::Info(err) => {
            e.kind = RecordType::Info;
            e.node = Some(slot_node);
            e.error = Some(err);
        }
    }
    let kind = e.kind;
    shared.recorder.record(e);
    kind
}

/// What a register worker needs.
pub struct WorkerConfig {
    /// Worker number (also its first process id).
    pub index: usize,
    pub slot: usize,
    /// The slot's client proxy.
    pub addr: SocketAddr,
    /// Time between two operations of this worker.
    pub interval: Duration,
    pub seed: u64,
    /// The id of the node currently in the slot (for records of failed
    /// operations); updated by the run on membership changes.
    pub slot_node: watch::Receiver<u64>,
}

/// One register worker, until `stop` turns true.
pub async fn worker(
    shared: Arc<Shared>,
    cfg: WorkerConfig,
    mut stop: watch::Receiver<bool>,
) -> Result<u64> {
    let channel = admin_channel(cfg.addr)?;
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ (cfg.index as u64).wrapping_mul(0x9E37_79B9));
    let mut process = cfg.index as i64;
    let mut seq = 0u64;
    let mut ops = 0u64;
    // Spread the workers over one interval.
    let mut next = Instant::now() + cfg.interval.mul_f64(rng.random::<f64>());
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        if *stop.borrow() {
            break;
        }
        next += cfg.interval;
        let now = Instant::now();
        if next < now {
            next = now;
        }
        let n = shared.ops_started.fetch_add(1, Ordering::Relaxed);
        let key = (n / ROTATE_EVERY) * KEYS + rng.random_range(0..KEYS);
        let value = format!("{process}-{seq}");
        let op = match rng.random_range(0..3) {
            0 => Op::Read,
            1 => {
                seq += 1;
                Op::Write(value)
            }
            _ => {
                seq += 1;
                Op::Cas {
                    expected: shared.last_known(key),
                    new: value,
                }
            }
        };
        let node = *cfg.slot_node.borrow();
        let done = perform(&shared, &channel, process, node, key, &op).await;
        ops += 1;
        if done == RecordType::Info {
            process = shared.new_process();
            seq = 0;
        }
    }
    Ok(ops)
}

/// Final linearizable reads of every register used, recorded as ordinary
/// reads (one fresh process), each retried through the given channels in
/// turn until it succeeds.
pub async fn final_reads(shared: &Shared, channels: &[(u64, Channel)]) -> Result<usize> {
    if channels.is_empty() {
        bail!("no node to read from");
    }
    let keys = shared.keys_used();
    let process = shared.new_process();
    for key in &keys {
        let mut attempt = 0usize;
        loop {
            let (node, channel) = &channels[attempt % channels.len()];
            if perform(shared, channel, process, *node, *key, &Op::Read).await == RecordType::Ok {
                break;
            }
            attempt += 1;
            if attempt >= 30 {
                bail!("final read of {} failed 30 times", key_name(*key));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(keys.len())
}

/// What a watcher needs.
pub struct WatcherConfig {
    pub slot: usize,
    pub process: i64,
    /// The slot's client proxy.
    pub addr: SocketAddr,
    /// Revision up to which this watcher has received every event
    /// (from progress notices and events).
    pub progress: Arc<AtomicU64>,
    /// Whether a subscription was confirmed at least once.
    pub confirmed: Arc<AtomicU64>,
}

fn watch_events(resp: &WatchResponse) -> (u64, Vec<WatchEvent>) {
    let mut rev = 0;
    let events = resp
        .events
        .iter()
        .map(|e| {
            let kv = e.kv.clone().unwrap_or_default();
            rev = rev.max(kv.mod_revision);
            let delete = e.r#type() == EventType::Delete;
            WatchEvent {
                kind: if delete { "delete" } else { "put" }.into(),
                key: kv
                    .key
                    .strip_prefix(KEY_PREFIX)
                    .unwrap_or(&kv.key)
                    .to_string(),
                value: (!delete).then(|| String::from_utf8_lossy(&kv.value).into_owned()),
                mod_revision: kv.mod_revision,
            }
        })
        .collect();
    (rev, events)
}

/// One watcher, until `stop` turns true.
pub async fn watcher(
    shared: Arc<Shared>,
    cfg: WatcherConfig,
    mut stop: watch::Receiver<bool>,
) -> Result<u64> {
    let channel = admin_channel(cfg.addr)?;
    let mut process = cfg.process;
    let mut next_rev = 1u64;
    let mut delivered = 0u64;
    while !*stop.borrow() {
        let mut kv = KvClient::new(channel.clone());
        let req = WatchRequest {
            prefix: KEY_PREFIX.to_string(),
            start_revision: next_rev,
            progress_interval_ms: WATCH_PROGRESS_MS,
        };
        let opened = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(2), kv.watch(req)) => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let mut stream = match opened {
            Ok(Ok(s)) => s.into_inner(),
            Ok(Err(s)) => {
                tracing::debug!(slot = cfg.slot, error = %s, "watch not opened");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(_) => continue,
        };
        let first = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(2), stream.message()) => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let first = match first {
            Ok(Ok(Some(m))) => m,
            _ => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let node = first.header.as_ref().map_or(0, |h| h.node_id);
        if first.compacted {
            // The history we need is gone on this node: a gap is
            // unavoidable, so this watcher ends and a new one starts
            // after the compaction point.
            let mut e = Entry::new(process, RecordType::Info, Function::WatchStart);
            e.node = Some(node);
            e.revision = Some(next_rev);
            e.error = Some(format!(
                "compacted: history starts after revision {}",
                first.compact_revision
            ));
            shared.recorder.record(e);
            process = shared.new_process();
            next_rev = first
                .header
                .as_ref()
                .map_or(first.compact_revision, |h| h.revision)
                .max(first.compact_revision)
                + 1;
            continue;
        }
        let mut e = Entry::new(process, RecordType::Info, Function::WatchStart);
        e.node = Some(node);
        e.revision = Some(next_rev);
        shared.recorder.record(e);
        cfg.confirmed.fetch_add(1, Ordering::Relaxed);
        loop {
            let msg = tokio::select! {
                r = tokio::time::timeout(WATCH_IDLE, stream.message()) => r,
                _ = stop.wait_for(|s| *s) => break,
            };
            let msg = match msg {
                Ok(Ok(Some(m))) => m,
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => break,
            };
            if msg.compacted {
                break;
            }
            let header_rev = msg.header.as_ref().map_or(0, |h| h.revision);
            if msg.events.is_empty() {
                // Progress notice: everything up to header_rev delivered.
                cfg.progress.fetch_max(header_rev, Ordering::Relaxed);
                continue;
            }
            let (rev, events) = watch_events(&msg);
            let mut e = Entry::new(process, RecordType::Ok, Function::Watch);
            e.node = Some(msg.header.as_ref().map_or(node, |h| h.node_id));
            e.revision = Some(rev);
            e.events = events;
            shared.recorder.record(e);
            delivered += 1;
            next_rev = next_rev.max(rev + 1);
            cfg.progress.fetch_max(rev, Ordering::Relaxed);
        }
        if !*stop.borrow() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(delivered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::admin::{Event, KeyValue};

    #[test]
    fn classification() {
        let mut s = Status::unavailable("no leader");
        s.metadata_mut().insert(
            "x-trellis-retry-safe",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        assert!(matches!(classify(&s), Outcome::Fail(_)));
        let s = Status::unavailable("not confirmed; it may still take effect");
        assert!(matches!(classify(&s), Outcome::Info(_)));
        assert!(matches!(
            classify(&Status::deadline_exceeded("t")),
            Outcome::Info(_)
        ));
        assert!(matches!(
            classify(&Status::unavailable(
                "tcp connect error: Connection refused"
            )),
            Outcome::Fail(_)
        ));
        assert!(matches!(
            classify(&Status::invalid_argument("key")),
            Outcome::Fail(_)
        ));
        assert!(matches!(classify(&Status::internal("x")), Outcome::Info(_)));
    }

    #[test]
    fn watch_events_strip_the_prefix() {
        let resp = WatchResponse {
            header: None,
            events: vec![
                Event {
                    r#type: EventType::Put as i32,
                    kv: Some(KeyValue {
                        key: key_path(7),
                        value: b"3-1".to_vec(),
                        mod_revision: 12,
                        ..Default::default()
                    }),
                },
                Event {
                    r#type: EventType::Delete as i32,
                    kv: Some(KeyValue {
                        key: key_path(8),
                        mod_revision: 12,
                        ..Default::default()
                    }),
                },
            ],
            compacted: false,
            compact_revision: 0,
        };
        let (rev, events) = watch_events(&resp);
        assert_eq!(rev, 12);
        assert_eq!(events[0].key, "r7");
        assert_eq!(events[0].value.as_deref(), Some("3-1"));
        assert_eq!(events[1].kind, "delete");
        assert_eq!(events[1].value, None);
    }
}
