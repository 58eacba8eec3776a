//! Length-prefixed protobuf frames, the unit of every sidecar QUIC stream:
//! a 4-byte big-endian length, then that many bytes of one message.
//!
//! [`write_frame`] and [`read_frame`] work on any tokio byte stream (quinn's
//! `SendStream`/`RecvStream` in production, an in-memory duplex in tests).
//! A frame longer than the reader's limit is refused before anything is
//! allocated for it, so a peer cannot make the other side buffer gigabytes.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame a sidecar stream carries. Snapshots are chunked to stay
/// well below it ([`SNAPSHOT_CHUNK_BYTES`]); one revision's events are
/// bounded by the admin API's value limit times the keys in one apply.
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Keys and values per snapshot chunk: big enough that a mesh's whole
/// config is one or two frames, small enough to keep each frame's buffer
/// modest on both sides.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("malformed {what} frame: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Encode `msg` as one frame and write it (without flushing: quinn streams
/// send as soon as they can; call `flush` on buffered writers).
pub async fn write_frame<W, M>(w: &mut W, msg: &M) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    M: Message,
{
    let len = msg.encoded_len();
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_BYTES,
        });
    }
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode_raw(&mut buf);
    w.write_all(&buf).await?;
    Ok(())
}

/// Read one frame and decode it as `M` (`what` names it in errors).
/// `Ok(None)` if the stream ended cleanly before a frame started.
pub async fn read_frame<R, M>(
    r: &mut R,
    max: usize,
    what: &'static str,
) -> Result<Option<M>, FrameError>
where
    R: AsyncRead + Unpin,
    M: Message + Default,
{
    let mut len_buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len_buf[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len_buf) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    M::decode(body.as_slice())
        .map(Some)
        .map_err(|source| FrameError::Decode { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sidecar::{open, Open, WatchRequest};

    fn watch_open() -> Open {
        Open {
            kind: Some(open::Kind::Watch(WatchRequest {
                prefix: "/route/".into(),
                after_revision: Some(42),
                progress_interval_ms: 0,
            })),
        }
    }

    #[tokio::test]
    async fn frames_round_trip_back_to_back() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for _ in 0..3 {
                write_frame(&mut a, &watch_open()).await?;
            }
            Ok::<_, FrameError>(())
        });
        for _ in 0..3 {
            let got: Option<Open> = read_frame(&mut b, MAX_FRAME_BYTES, "open").await.unwrap();
            assert_eq!(got, Some(watch_open()));
        }
        writer.await.unwrap().unwrap();
        let end: Option<Open> = read_frame(&mut b, MAX_FRAME_BYTES, "open").await.unwrap();
        assert_eq!(end, None, "a clean end of stream is not an error");
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocating() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let err = read_frame::<_, Open>(&mut b, 1024, "open")
            .await
            .unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { max: 1024, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn truncated_and_garbage_frames_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0]).await.unwrap();
        drop(a);
        let err = read_frame::<_, Open>(&mut b, 1024, "open")
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");

        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 10]).await.unwrap();
        a.write_all(&[1, 2, 3]).await.unwrap();
        drop(a);
        let err = read_frame::<_, Open>(&mut b, 1024, "open")
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");

        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
        let err = read_frame::<_, Open>(&mut b, 1024, "open")
            .await
            .unwrap_err();
        assert!(
            matches!(err, FrameError::Decode { what: "open", .. }),
            "{err}"
        );
    }
}
