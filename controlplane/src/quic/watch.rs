//! A sidecar's watch stream: a snapshot or a resume point, then every
//! revision's events, progress notices, and compaction notices.
//!
//! The stream keeps the watch contract (ARCHITECTURE.md):
//! - served from this node's applied state, reading the store's change
//!   feed at the sidecar's pace (QUIC flow control), so a slow or stuck
//!   sidecar never blocks the store or other watchers;
//! - ordered by revision, each revision once and never split: one `Delta`
//!   per revision with matching events;
//! - resumable anywhere: `after_revision = R` sends every change after R;
//!   on a node that has not applied R yet, the stream waits rather than
//!   going back;
//! - if the history after R was compacted (or the sidecar fell behind a
//!   compaction while reading), a `Compacted` notice is followed by a full
//!   `Snapshot`, and deltas continue from the snapshot's revision;
//! - keys under the reserved prefix (CA, tokens, certificates) are never
//!   sent; a revision without matching events moves the sidecar forward
//!   with a `Progress`.
//!
//! A frame that the sidecar does not take within [`STUCK_WATCHER_TIMEOUT`]
//! resets the stream ([`STUCK_RESET_CODE`]): the sidecar resumes from its
//! last applied revision (here or elsewhere) instead of pinning this task.

use std::time::Duration;

use quinn::SendStream;
use trellis_proto::frame::{write_frame, SNAPSHOT_CHUNK_BYTES};
use trellis_proto::sidecar as sc;
use trellis_raft_store::{EventKind, KeyValue};

use crate::api::watch::{read_history, History, MAX_WATCH_REVISION};
use crate::error::ApiError;
use crate::node::Node;
use crate::system;

/// A sidecar that has not taken one frame in this long is told to resync.
pub const STUCK_WATCHER_TIMEOUT: Duration = Duration::from_secs(30);
/// QUIC stream error code of a watch reset for not reading.
pub const STUCK_RESET_CODE: u32 = 0x5e;
/// Bounds a sidecar's progress interval from below: progress is a liveness
/// signal, not a stream of its own.
const MIN_PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Why the stream ended (for the log).
#[derive(Debug, thiserror::Error)]
pub enum WatchEnd {
    #[error("sidecar went away")]
    Gone,
    #[error("sidecar did not read for {STUCK_WATCHER_TIMEOUT:?}")]
    Stuck,
    #[error(transparent)]
    Api(#[from] ApiError),
}

struct Out<'a> {
    send: &'a mut SendStream,
    node_id: u64,
}

impl Out<'_> {
    async fn send(&mut self, kind: sc::watch_message::Kind) -> Result<(), WatchEnd> {
        let msg = sc::WatchMessage {
            node_id: self.node_id,
            kind: Some(kind),
        };
        match tokio::time::timeout(STUCK_WATCHER_TIMEOUT, write_frame(self.send, &msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(WatchEnd::Gone),
            Err(_) => {
                // Part of a frame may have gone out: nothing more can be
                // framed on this stream. Reset it; the sidecar resumes
                // from its last applied revision.
                let _ = self.send.reset(STUCK_RESET_CODE.into());
                Err(WatchEnd::Stuck)
            }
        }
    }
}

fn kv_to_sc(kv: KeyValue) -> sc::KeyValue {
    sc::KeyValue {
        key: kv.key,
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    }
}

/// Serve one watch stream until the sidecar leaves or the connection ends.
pub async fn serve(
    node: &Node,
    req: sc::WatchRequest,
    send: &mut SendStream,
    closed: impl std::future::Future<Output = ()>,
) -> Result<(), WatchEnd> {
    let prefix = if req.prefix.is_empty() {
        "/".to_string()
    } else {
        req.prefix
    };
    let progress = (req.progress_interval_ms > 0)
        .then(|| Duration::from_millis(req.progress_interval_ms as u64).max(MIN_PROGRESS_INTERVAL));
    let mut out = Out {
        send,
        node_id: node.id,
    };
    let store = &node.store;
    let mut applied = store.subscribe();
    // `next`: first revision not yet sent; `told`: highest revision the
    // sidecar knows it has everything up to.
    let (mut next, mut told) = match req.after_revision {
        None => {
            let rev = snapshot(node, &prefix, &mut out).await?;
            (rev + 1, rev)
        }
        Some(after) if after > MAX_WATCH_REVISION => {
            return Err(ApiError::invalid(
                "watch.after_revision",
                format!("{after} is beyond any revision"),
            )
            .into())
        }
        Some(after) => (after + 1, after),
    };
    tokio::pin!(closed);
    loop {
        let current = *applied.borrow_and_update();
        while next <= current {
            // The node runs on one thread: let Raft and other requests in
            // between pages of a long catch-up.
            tokio::task::yield_now().await;
            let page = match read_history(&**store, next, &prefix)? {
                History::Page(page) => page,
                History::Compacted(compact_revision) => {
                    out.send(sc::watch_message::Kind::Compacted(sc::Compacted {
                        compact_revision,
                    }))
                    .await?;
                    let rev = snapshot(node, &prefix, &mut out).await?;
                    next = rev + 1;
                    told = rev;
                    continue;
                }
                History::Retry => continue,
            };
            for rev in page.revisions {
                let delta = sc::Delta {
                    revision: rev.revision,
                    events: rev
                        .events
                        .into_iter()
                        .map(|e| sc::Event {
                            r#type: match e.kind {
                                EventKind::Put => sc::event::Type::Put as i32,
                                EventKind::Delete => sc::event::Type::Delete as i32,
                            },
                            kv: Some(kv_to_sc(e.kv)),
                        })
                        .collect(),
                };
                told = rev.revision;
                out.send(sc::watch_message::Kind::Delta(delta)).await?;
            }
            next = page.scanned_to + 1;
        }
        // Caught up: say how far, if the last revisions had nothing to send.
        if told < next - 1 {
            told = next - 1;
            out.send(sc::watch_message::Kind::Progress(sc::Progress {
                revision: told,
            }))
            .await?;
        }
        tokio::select! {
            r = applied.changed() => if r.is_err() { return Err(WatchEnd::Gone) },
            _ = &mut closed => return Err(WatchEnd::Gone),
            _ = sleep_or_forever(progress) => {
                out.send(sc::watch_message::Kind::Progress(sc::Progress { revision: told })).await?;
            }
        }
    }
}

/// Send every key under `prefix` at one revision, in chunks; returns the
/// revision.
async fn snapshot(node: &Node, prefix: &str, out: &mut Out<'_>) -> Result<u64, WatchEnd> {
    let page = node
        .store
        .list(prefix, None, usize::MAX, usize::MAX, false)
        .map_err(|e| ApiError::internal("watch snapshot", e))?;
    let revision = page.revision;
    let mut chunk = Vec::new();
    let mut bytes = 0usize;
    let mut kvs = page
        .kvs
        .into_iter()
        .filter(|kv| !system::is_reserved(&kv.key))
        .peekable();
    loop {
        match kvs.next() {
            Some(kv) => {
                bytes += kv.key.len() + kv.value.len() + 32;
                chunk.push(kv_to_sc(kv));
                if bytes >= SNAPSHOT_CHUNK_BYTES && kvs.peek().is_some() {
                    out.send(sc::watch_message::Kind::Snapshot(sc::Snapshot {
                        revision,
                        kvs: std::mem::take(&mut chunk),
                        more: true,
                    }))
                    .await?;
                    bytes = 0;
                }
            }
            None => {
                out.send(sc::watch_message::Kind::Snapshot(sc::Snapshot {
                    revision,
                    kvs: chunk,
                    more: false,
                }))
                .await?;
                return Ok(revision);
            }
        }
    }
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => futures::future::pending().await,
    }
}
