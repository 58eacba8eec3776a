//! One watch stream: `Open{watch}` then `WatchMessage`s, decoded into
//! [`WatchUpdate`]s. Snapshot chunks are reassembled here (all chunks of a
//! snapshot share its revision; only the whole set is returned), so a
//! caller never sees a partial snapshot.
//!
//! [`WatchSession`] is the lightweight API: the connection manager
//! ([`crate::control`]) opens one on its connection with
//! [`WatchSession::open`]; a benchmark opens a thousand, each on its own
//! connection, from one shared endpoint with [`WatchSession::connect`].
//! Ordering rules (a delta must be after the applied revision) are the
//! cache's ([`crate::cache`]), not checked here.

use std::net::SocketAddr;
use std::time::Duration;

use trellis_proto::frame::{read_frame, FrameError, MAX_FRAME_BYTES};
use trellis_proto::sidecar::{
    open, watch_message, Delta, KeyValue, Open, WatchMessage, WatchRequest,
};

use crate::transport::{self, RemoteError, TransportError};

/// Handshake timeout of [`WatchSession::connect`].
pub const WATCH_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a watch stream ended. Every variant is retry-safe: resume from the
/// last applied revision, here or on another node.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("watch stream: {0}")]
    Frame(#[from] FrameError),
    #[error("watch stream closed by the server")]
    Closed,
    #[error("watch ended by the server: {0}")]
    Remote(RemoteError),
    #[error("watch protocol violation: {0}")]
    Protocol(String),
}

/// What one watch message (or, for a snapshot, its chunks) said.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// Every key under the prefix at `revision` (all chunks joined).
    Snapshot { revision: u64, kvs: Vec<KeyValue> },
    /// All matching events of one revision.
    Delta(Delta),
    /// Every matching change up to `revision` was sent.
    Progress { revision: u64 },
    /// The requested history is gone; a snapshot follows.
    Compacted { compact_revision: u64 },
}

/// A decoded watch message with the id of the node that sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchUpdate {
    pub node_id: u64,
    pub event: WatchEvent,
}

/// An open watch stream.
#[derive(Debug)]
pub struct WatchSession {
    /// Held when the session made its own connection ([`WatchSession::connect`]).
    own_conn: Option<quinn::Connection>,
    // Kept open: dropping it would finish our side of the stream.
    _send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: Decoder,
}

/// Turns watch messages into updates, joining snapshot chunks.
#[derive(Debug, Default)]
struct Decoder {
    node_id: u64,
    /// A snapshot being reassembled: its revision and the keys so far.
    pending: Option<(u64, Vec<KeyValue>)>,
}

impl WatchSession {
    /// Connects to the node at `addr` through `endpoint` (its default client
    /// config: see [`crate::client_endpoint`]) and watches `prefix` after
    /// `after_revision` (`None`: start with a snapshot).
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
        prefix: &str,
        after_revision: Option<u64>,
    ) -> Result<WatchSession, WatchError> {
        let conn =
            transport::connect(endpoint, None, addr, server_name, WATCH_CONNECT_TIMEOUT).await?;
        let req = WatchRequest {
            prefix: prefix.to_string(),
            after_revision,
            progress_interval_ms: 0,
        };
        let mut s = WatchSession::open(&conn, req).await?;
        s.own_conn = Some(conn);
        Ok(s)
    }

    /// Opens a watch stream on an existing connection.
    pub async fn open(
        conn: &quinn::Connection,
        req: WatchRequest,
    ) -> Result<WatchSession, WatchError> {
        let open = Open {
            kind: Some(open::Kind::Watch(req)),
        };
        let (send, recv) = transport::open_stream(conn, &open).await?;
        Ok(WatchSession {
            own_conn: None,
            _send: send,
            recv,
            decoder: Decoder::default(),
        })
    }

    /// The id of the node serving the stream (0 before its first message).
    pub fn node_id(&self) -> u64 {
        self.decoder.node_id
    }

    /// The connection, if this session made its own.
    pub fn connection(&self) -> Option<&quinn::Connection> {
        self.own_conn.as_ref()
    }

    /// The next update. Snapshot chunks are collected until the last one.
    pub async fn next(&mut self) -> Result<WatchUpdate, WatchError> {
        loop {
            let msg: WatchMessage = read_frame(&mut self.recv, MAX_FRAME_BYTES, "watch message")
                .await?
                .ok_or(WatchError::Closed)?;
            if let Some(update) = self.decoder.absorb(msg)? {
                return Ok(update);
            }
        }
    }
}

impl Decoder {
    /// Folds one message into the session's state; `Some` when it completes
    /// an update.
    fn absorb(&mut self, msg: WatchMessage) -> Result<Option<WatchUpdate>, WatchError> {
        self.node_id = msg.node_id;
        let kind = msg
            .kind
            .ok_or_else(|| WatchError::Protocol("watch message without a kind".into()))?;
        if self.pending.is_some()
            && !matches!(
                kind,
                watch_message::Kind::Snapshot(_) | watch_message::Kind::Error(_)
            )
        {
            return Err(WatchError::Protocol(
                "a snapshot's chunks were interrupted by another message".into(),
            ));
        }
        let event = match kind {
            watch_message::Kind::Snapshot(s) => {
                let (revision, mut kvs) = match self.pending.take() {
                    None => (s.revision, Vec::new()),
                    Some((rev, _)) if rev != s.revision => {
                        return Err(WatchError::Protocol(format!(
                            "snapshot chunk at revision {} inside a snapshot at revision {rev}",
                            s.revision
                        )))
                    }
                    Some(p) => p,
                };
                kvs.extend(s.kvs);
                if s.more {
                    self.pending = Some((revision, kvs));
                    return Ok(None);
                }
                WatchEvent::Snapshot { revision, kvs }
            }
            watch_message::Kind::Delta(d) => WatchEvent::Delta(d),
            watch_message::Kind::Progress(p) => WatchEvent::Progress {
                revision: p.revision,
            },
            watch_message::Kind::Compacted(c) => WatchEvent::Compacted {
                compact_revision: c.compact_revision,
            },
            watch_message::Kind::Error(e) => return Err(WatchError::Remote(e.into())),
        };
        Ok(Some(WatchUpdate {
            node_id: self.node_id,
            event,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::sidecar::{Progress, Snapshot};

    fn kv(k: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            ..Default::default()
        }
    }

    fn snap(rev: u64, keys: &[&str], more: bool) -> WatchMessage {
        WatchMessage {
            node_id: 2,
            kind: Some(watch_message::Kind::Snapshot(Snapshot {
                revision: rev,
                kvs: keys.iter().map(|k| kv(k)).collect(),
                more,
            })),
        }
    }

    #[test]
    fn chunks_are_joined() {
        let mut h = Decoder::default();
        assert!(h.absorb(snap(5, &["/a", "/b"], true)).unwrap().is_none());
        assert!(h.absorb(snap(5, &["/c"], true)).unwrap().is_none());
        let u = h.absorb(snap(5, &["/d"], false)).unwrap().unwrap();
        assert_eq!(u.node_id, 2);
        match u.event {
            WatchEvent::Snapshot { revision, kvs } => {
                assert_eq!(revision, 5);
                assert_eq!(
                    kvs.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
                    ["/a", "/b", "/c", "/d"]
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn interleaved_or_mismatched_chunks_are_violations() {
        let mut h = Decoder::default();
        h.absorb(snap(5, &["/a"], true)).unwrap();
        assert!(matches!(
            h.absorb(snap(6, &["/b"], false)),
            Err(WatchError::Protocol(_))
        ));
        let mut h = Decoder::default();
        h.absorb(snap(5, &["/a"], true)).unwrap();
        let progress = WatchMessage {
            node_id: 2,
            kind: Some(watch_message::Kind::Progress(Progress { revision: 5 })),
        };
        assert!(matches!(h.absorb(progress), Err(WatchError::Protocol(_))));
        let empty = WatchMessage {
            node_id: 1,
            kind: None,
        };
        assert!(matches!(
            Decoder::default().absorb(empty),
            Err(WatchError::Protocol(_))
        ));
    }

    #[test]
    fn server_errors_end_the_watch() {
        let mut h = Decoder::default();
        let err = WatchMessage {
            node_id: 3,
            kind: Some(watch_message::Kind::Error(trellis_proto::sidecar::Error {
                code: trellis_proto::sidecar::error::Code::Unavailable as i32,
                message: "shutting down".into(),
                retryable: true,
            })),
        };
        match h.absorb(err) {
            Err(WatchError::Remote(e)) => {
                assert_eq!(e.code, trellis_proto::sidecar::error::Code::Unavailable);
                assert!(e.retryable);
            }
            other => panic!("{other:?}"),
        }
    }
}
