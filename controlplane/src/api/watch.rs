//! Watch streams: one task per watcher, reading the store's change feed.
//!
//! Guarantees (the watch contract of ARCHITECTURE.md):
//! - ordered by revision, each revision once, and a revision's events are
//!   never split (one response per revision);
//! - served from this node's applied state; a start revision this node has
//!   not applied yet is waited for, never answered from the past;
//! - a start revision that was compacted away gets one response with
//!   `compacted = true` and the stream ends: the client re-lists and
//!   watches from the list's revision + 1;
//! - keys under the control plane's reserved prefix are never sent;
//! - a slow client only slows its own task: the task reads history at the
//!   client's pace through a bounded channel, and if the client falls
//!   behind compaction it is told to resync the same way.
//!
//! A response without events (the first one, which confirms the watch is
//! registered, and progress notices) has as header revision the revision
//! up to which every matching event was delivered: a client resuming
//! from it + 1 misses nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use trellis_proto::admin as pb;
use trellis_raft_store::{EventKind, StoreError};

use super::convert::kv_to_pb;
use crate::error::ApiError;
use crate::node::Node;

/// Responses buffered per watcher before its task waits for the client.
pub const WATCH_BUFFER: usize = 64;
/// Revisions read from history per batch.
const HISTORY_BATCH: usize = 256;
/// The largest start revision a watch accepts. No cluster gets near 2^62
/// revisions; the bound keeps `revision + 1` arithmetic far from overflow
/// whatever a client sends (a wrapped revision would spin a watch loop).
pub const MAX_WATCH_REVISION: u64 = 1 << 62;

/// Start a watch task; returns the response stream.
pub fn spawn(
    node: Arc<Node>,
    req: pb::WatchRequest,
) -> Result<ReceiverStream<Result<pb::WatchResponse, Status>>, Status> {
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    let progress = (req.progress_interval_ms > 0)
        .then(|| Duration::from_millis(req.progress_interval_ms as u64));
    tokio::spawn(async move {
        let prefix = req.prefix;
        if req.start_revision > MAX_WATCH_REVISION {
            let err = ApiError::invalid(
                "start_revision",
                format!("{} is beyond any revision", req.start_revision),
            );
            let _ = tx.send(Err(err.into())).await;
            return;
        }
        if let Err(status) = run(&node, &prefix, req.start_revision, progress, &tx).await {
            let _ = tx.send(Err(status)).await;
        }
    });
    Ok(ReceiverStream::new(rx))
}

type Tx = mpsc::Sender<Result<pb::WatchResponse, Status>>;

/// Send, or report that the client is gone.
async fn send(tx: &Tx, resp: pb::WatchResponse) -> Result<(), ()> {
    tx.send(Ok(resp)).await.map_err(|_| ())
}

async fn run(
    node: &Node,
    prefix: &str,
    start_revision: u64,
    progress: Option<Duration>,
    tx: &Tx,
) -> Result<(), Status> {
    let store = &node.store;
    let mut applied = store.subscribe();
    let current = *applied.borrow_and_update();
    // Next revision to deliver.
    let mut next = if start_revision == 0 {
        current + 1
    } else {
        start_revision
    };
    let created = pb::WatchResponse {
        header: Some(node.header(next - 1)),
        ..Default::default()
    };
    if send(tx, created).await.is_err() {
        return Ok(());
    }
    loop {
        let current = *applied.borrow_and_update();
        while next <= current {
            // The node runs on one thread: let Raft and other requests in
            // between pages of a long catch-up.
            tokio::task::yield_now().await;
            let page = match read_history(&**store, next, prefix)? {
                History::Page(page) => page,
                History::Compacted(compact_revision) => {
                    let resp = pb::WatchResponse {
                        header: Some(node.header(store.revision())),
                        compacted: true,
                        compact_revision,
                        ..Default::default()
                    };
                    let _ = send(tx, resp).await;
                    return Ok(());
                }
                History::Retry => continue,
            };
            for rev in page.revisions {
                let resp = pb::WatchResponse {
                    header: Some(node.header(rev.revision)),
                    events: rev
                        .events
                        .into_iter()
                        .map(|e| pb::Event {
                            r#type: match e.kind {
                                EventKind::Put => pb::event::EventType::Put as i32,
                                EventKind::Delete => pb::event::EventType::Delete as i32,
                            },
                            kv: Some(kv_to_pb(e.kv)),
                        })
                        .collect(),
                    ..Default::default()
                };
                if send(tx, resp).await.is_err() {
                    return Ok(());
                }
            }
            next = page.scanned_to + 1;
        }
        let changed = applied.changed();
        tokio::select! {
            r = changed => if r.is_err() { return Ok(()) },
            _ = tx.closed() => return Ok(()),
            _ = sleep_or_forever(progress) => {
                let resp = pb::WatchResponse { header: Some(node.header(next - 1)), ..Default::default() };
                if send(tx, resp).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// What the change feed holds from a revision on, for one watcher.
pub(crate) enum History {
    /// Revisions from `next` on (reserved keys left out; revisions left
    /// with no events dropped); `scanned_to` says how far it looked.
    Page(trellis_raft_store::HistoryPage),
    /// History at `next` is gone; it now starts after this revision.
    Compacted(u64),
    /// The history was replaced under the reader (snapshot install): read
    /// again, which reports the compaction.
    Retry,
}

/// Read the change feed from revision `next` for keys under `prefix` (the
/// shared step of admin and sidecar watches).
pub(crate) fn read_history(
    store: &dyn trellis_raft_store::RevisionedStore,
    next: u64,
    prefix: &str,
) -> Result<History, ApiError> {
    let mut page = match store.events_since(next - 1, prefix, HISTORY_BATCH) {
        Ok(page) => page,
        Err(StoreError::Compacted {
            compact_revision, ..
        }) => return Ok(History::Compacted(compact_revision)),
        Err(e) => return Err(ApiError::internal("watch history", e)),
    };
    if page.scanned_to < next {
        if store.compact_revision() < next {
            return Err(ApiError::internal(
                "watch history",
                format!("history has a gap after revision {}", next - 1),
            ));
        }
        return Ok(History::Retry);
    }
    if crate::system::prefix_reaches_reserved(prefix) {
        for rev in &mut page.revisions {
            rev.events
                .retain(|e| !crate::system::is_reserved(&e.kv.key));
        }
        page.revisions.retain(|r| !r.events.is_empty());
    }
    Ok(History::Page(page))
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => futures::future::pending().await,
    }
}
