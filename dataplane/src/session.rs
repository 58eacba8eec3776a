//! One session stream: `Open{session: SessionRequest}` answered by
//! `SessionAccepted` (registration done, lease granted), then
//! `SessionUpdate` frames (keepalive + applied revision, or goodbye), each
//! answered by a `SessionAck`. The loop that drives it (when to send, what
//! to do on errors) is in [`crate::control`].

use std::time::Duration;

use trellis_proto::frame::{read_frame, write_frame, FrameError, MAX_FRAME_BYTES};
use trellis_proto::sidecar::{
    error::Code, open, session_message, Open, SessionAccepted, SessionAck, SessionMessage,
    SessionRequest, SessionUpdate,
};

use crate::transport::{self, RemoteError, TransportError};

/// Why a session stream failed. All are retry-safe (a new session, here or
/// on another node, resuming the lease) except [`SessionError::is_lease_gone`],
/// which needs a fresh registration.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("session stream: {0}")]
    Frame(#[from] FrameError),
    #[error("session stream closed by the server")]
    Closed,
    #[error("no answer from the server within {0:?}")]
    Timeout(Duration),
    #[error("session refused: {0}")]
    Remote(RemoteError),
    #[error("session protocol violation: {0}")]
    Protocol(String),
}

impl SessionError {
    /// The server no longer knows the lease (it expired): register anew
    /// without `resume_lease_id`.
    pub fn is_lease_gone(&self) -> bool {
        matches!(self, SessionError::Remote(e) if e.code == Code::NotFound)
    }
}

/// An accepted session.
#[derive(Debug)]
pub struct SessionStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    accepted: SessionAccepted,
}

impl SessionStream {
    /// Opens the stream and waits (at most `timeout`) for `SessionAccepted`.
    pub async fn open(
        conn: &quinn::Connection,
        req: SessionRequest,
        timeout: Duration,
    ) -> Result<SessionStream, SessionError> {
        let open = Open {
            kind: Some(open::Kind::Session(req)),
        };
        let (send, mut recv) = transport::open_stream(conn, &open).await?;
        let msg = read_reply(&mut recv, timeout).await?;
        match msg {
            session_message::Kind::Accepted(accepted) => Ok(SessionStream {
                send,
                recv,
                accepted,
            }),
            session_message::Kind::Error(e) => Err(SessionError::Remote(e.into())),
            session_message::Kind::Ack(_) => Err(SessionError::Protocol(
                "an ack before SessionAccepted".into(),
            )),
        }
    }

    /// What the server said when it accepted the session.
    pub fn accepted(&self) -> &SessionAccepted {
        &self.accepted
    }

    /// Sends one update and waits (at most `timeout`) for its ack.
    pub async fn update(
        &mut self,
        update: SessionUpdate,
        timeout: Duration,
    ) -> Result<SessionAck, SessionError> {
        write_frame(&mut self.send, &update).await?;
        match read_reply(&mut self.recv, timeout).await? {
            session_message::Kind::Ack(ack) => Ok(ack),
            session_message::Kind::Error(e) => Err(SessionError::Remote(e.into())),
            session_message::Kind::Accepted(_) => {
                Err(SessionError::Protocol("a second SessionAccepted".into()))
            }
        }
    }

    /// Finishes our side of the stream.
    pub fn finish(mut self) {
        let _ = self.send.finish();
    }
}

async fn read_reply(
    recv: &mut quinn::RecvStream,
    timeout: Duration,
) -> Result<session_message::Kind, SessionError> {
    let msg: SessionMessage = tokio::time::timeout(
        timeout,
        read_frame(recv, MAX_FRAME_BYTES, "session message"),
    )
    .await
    .map_err(|_| SessionError::Timeout(timeout))??
    .ok_or(SessionError::Closed)?;
    msg.kind
        .ok_or_else(|| SessionError::Protocol("session message without a kind".into()))
}
