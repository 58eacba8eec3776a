//! Protocol detection on the outbound side: the first bytes a client sends
//! tell HTTP/2 prior knowledge (the 24-byte connection preface), HTTP/1.x
//! (a request line starting with a known method and a space), or anything
//! else (opaque TCP). Bytes read to decide are replayed to whichever path
//! takes the connection ([`Rewind`]).
//!
//! On an intercepted connection, a client that sends nothing within
//! [`DETECT_TIMEOUT`] is opaque TCP: server-first protocols (MySQL, SMTP)
//! wait for the server to speak. Ports a `Service` declares `tcp` skip
//! detection altogether, and so never pay that wait. A connection made to
//! the outbound listener itself can only be HTTP (opaque TCP there has no
//! destination), so it may stay silent longer ([`IDLE_BEFORE_FIRST_BYTES`];
//! connection pools open connections before they need them).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// How long a silent client may take to send its first bytes before it is
/// treated as opaque TCP. Istio's protocol sniffing used 100 ms too: long
/// enough for any client that speaks first, short enough that a
/// server-first protocol on an undeclared port barely notices.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(100);

/// How long a connection made to the outbound listener itself may stay
/// silent before its first request: as long as a typical HTTP keep-alive
/// idle timeout, so pooled idle connections are not cut, yet a forgotten
/// socket does not hold a task forever.
pub const IDLE_BEFORE_FIRST_BYTES: Duration = Duration::from_secs(60);

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Request methods recognised as the start of HTTP/1.x.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

/// What `bytes` (all received so far) say: a protocol, or `None` when more
/// bytes are needed to tell.
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    let is_prefix = |full: &[u8]| bytes.len() < full.len() && full.starts_with(bytes);
    if bytes.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    if METHODS.iter().any(|m| bytes.starts_with(m)) {
        return Some(Protocol::Http1);
    }
    if bytes.is_empty() || is_prefix(H2_PREFACE) || METHODS.iter().any(|m| is_prefix(m)) {
        return None;
    }
    Some(Protocol::Opaque)
}

/// Reads from `io` until the protocol is known, `quiet` passes (opaque) or
/// the client closes. Returns the protocol and the bytes read, to be
/// replayed with [`Rewind`].
pub async fn detect<S: AsyncRead + Unpin>(
    io: &mut S,
    quiet: Duration,
) -> io::Result<(Protocol, Bytes)> {
    let mut buf = Vec::with_capacity(H2_PREFACE.len());
    let deadline = tokio::time::Instant::now() + quiet;
    loop {
        if let Some(p) = classify(&buf) {
            return Ok((p, buf.into()));
        }
        let mut chunk = [0u8; 64];
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Err(_) => return Ok((Protocol::Opaque, buf.into())),
            Ok(Ok(0)) => return Ok((Protocol::Opaque, buf.into())),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// An I/O object that first yields `prefix`, then reads from `inner`;
/// writes go straight to `inner`.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"OPTIONS "), Some(Protocol::Http1));
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        // "P" could start POST, PUT, PATCH or the preface.
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GETX"), Some(Protocol::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Protocol::Opaque));
    }

    #[tokio::test]
    async fn detection_replays_what_it_read() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"PO").await.unwrap();
        let writer = tokio::spawn(async move {
            client.write_all(b"ST /x HTTP/1.1\r\n\r\n").await.unwrap();
            client
        });
        let (p, prefix) = detect(&mut server, DETECT_TIMEOUT).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        let _client = writer.await.unwrap();
        let mut r = Rewind::new(prefix, server);
        let mut all = vec![0u8; 20];
        r.read_exact(&mut all).await.unwrap();
        assert_eq!(&all, b"POST /x HTTP/1.1\r\n\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_opaque_after_the_timeout() {
        let (_client, mut server) = tokio::io::duplex(64);
        let (p, prefix) = detect(&mut server, DETECT_TIMEOUT).await.unwrap();
        assert_eq!(p, Protocol::Opaque);
        assert!(prefix.is_empty());
    }
}
