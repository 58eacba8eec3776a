//! Write coalescing under the control plane's gRPC client connections.
//!
//! hyper's HTTP/2 client queues a request's HEADERS from the caller and
//! streams its body from a task of its own, and the connection task
//! flushes after each: a unary gRPC call left a node as two or three
//! `writev`s (HEADERS, DATA, the empty END_STREAM DATA), and the END_STREAM
//! frame, which tonic waits for before it hands a unary request to the
//! service, trailed the data by ~150 µs. A Raft leader sends two such
//! calls per follower per write (the append, then the commit), so at
//! concurrency 1 it made 11 socket writes per put; now it makes 5.
//!
//! [`CoalescingIo`] wraps the TCP stream (under TLS, when TLS is on): it
//! keeps what is written in a buffer, and a flush yields to the runtime
//! while the tasks already woken keep adding to the burst (at most
//! [`MAX_YIELDS`] turns), so the body and END_STREAM leave in the same
//! segment as the HEADERS. A yield costs one task poll, not a timer:
//! nothing waits for a clock. Writes larger than [`COALESCE_MAX_BYTES`] go
//! straight through.
//!
//! [`CoalescingConnector`] is the connector tonic dials with; every
//! channel made by [`crate::network::lazy_channel`] (Raft peers, write
//! forwarding, cluster operations) uses it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Most bytes held back for coalescing. A call's burst is its HEADERS, its
/// message and END_STREAM; a larger message (a big Raft append, a
/// snapshot chunk) gains nothing from a copy and is written directly,
/// after what is already buffered.
pub const COALESCE_MAX_BYTES: usize = 64 * 1024;

/// Most turns a flush yields while other tasks keep adding to the burst.
/// A gRPC call takes three: HEADERS, then DATA once the body task has
/// stream capacity, then END_STREAM once the data has left h2's queue.
pub const MAX_YIELDS: u8 = 3;

/// A stream whose writes are gathered until a flush, which yields to the
/// runtime while the burst still grows and then writes it with as few
/// syscalls as the socket allows.
#[derive(Debug)]
pub struct CoalescingIo<T> {
    inner: T,
    buf: Vec<u8>,
    /// Times the current flush has yielded.
    yields: u8,
    /// Bytes buffered when it last yielded.
    len_at_yield: usize,
}

impl<T> CoalescingIo<T> {
    /// Wrap `inner`.
    pub fn new(inner: T) -> Self {
        CoalescingIo {
            inner,
            buf: Vec::new(),
            yields: 0,
            len_at_yield: 0,
        }
    }
}

impl<T: AsyncWrite + Unpin> CoalescingIo<T> {
    /// Write out everything buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut written = 0;
        while written < self.buf.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.buf[written..]) {
                Poll::Ready(Ok(0)) => {
                    self.buf.drain(..written);
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => {
                    self.buf.drain(..written);
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    self.buf.drain(..written);
                    return Poll::Pending;
                }
            }
        }
        self.buf.clear();
        Poll::Ready(Ok(()))
    }

    /// Make room for `len` more bytes: `Ready(true)` when they fit the
    /// buffer, `Ready(false)` when they should be written directly.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.buf.len() + len <= COALESCE_MAX_BYTES {
            return Poll::Ready(Ok(true));
        }
        ready!(self.poll_drain(cx))?;
        Poll::Ready(Ok(len <= COALESCE_MAX_BYTES))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if ready!(this.poll_room(cx, data.len()))? {
            this.buf.extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        } else {
            Pin::new(&mut this.inner).poll_write(cx, data)
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let len = bufs.iter().map(|b| b.len()).sum();
        if ready!(this.poll_room(cx, len))? {
            for b in bufs {
                this.buf.extend_from_slice(b);
            }
            Poll::Ready(Ok(len))
        } else {
            Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.buf.is_empty() {
            // Let the tasks already woken add to this burst first, again
            // while they keep adding to it.
            if this.yields < MAX_YIELDS && this.buf.len() > this.len_at_yield {
                this.yields += 1;
                this.len_at_yield = this.buf.len();
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(this.poll_drain(cx))?;
        }
        this.yields = 0;
        this.len_at_yield = 0;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// tonic connector: plain TCP ([`HttpConnector`], `TCP_NODELAY` on)
/// wrapped in [`CoalescingIo`]. tonic adds TLS on top when the endpoint
/// has a TLS config, and the endpoint's connect timeout around it.
#[derive(Clone, Debug)]
pub struct CoalescingConnector {
    http: HttpConnector,
}

impl CoalescingConnector {
    /// A connector for `http://` and `https://` endpoints.
    pub fn new() -> Self {
        let mut http = HttpConnector::new();
        // tonic's TLS layer takes `https` URIs over this connector.
        http.enforce_http(false);
        http.set_nodelay(true);
        CoalescingConnector { http }
    }
}

impl Default for CoalescingConnector {
    fn default() -> Self {
        Self::new()
    }
}

/// A connect error (hyper-util does not export its own type).
type BoxError = Box<dyn std::error::Error + Send + Sync>;

type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<TokioIo<CoalescingIo<TcpStream>>, BoxError>> + Send>>;

impl tower_service::Service<tonic::codegen::http::Uri> for CoalescingConnector {
    type Response = TokioIo<CoalescingIo<TcpStream>>;
    type Error = BoxError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        Box::pin(async move {
            let tcp = connecting.await.map_err(BoxError::from)?;
            Ok(TokioIo::new(CoalescingIo::new(tcp.into_inner())))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncWriteExt;

    /// Records each write call; accepts at most `per_call` bytes per call
    /// and refuses (Pending) every other call when `stall` is set.
    #[derive(Clone, Default)]
    struct Recorder {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        per_call: Option<usize>,
        stall: bool,
        stalled_last: bool,
        flushes: Arc<Mutex<usize>>,
    }

    impl Recorder {
        fn writes(&self) -> Vec<Vec<u8>> {
            self.writes.lock().map(|w| w.clone()).unwrap_or_default()
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.stall && !self.stalled_last {
                self.stalled_last = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.stalled_last = false;
            let n = self.per_call.map_or(data.len(), |p| p.min(data.len()));
            if let Ok(mut w) = self.writes.lock() {
                w.push(data[..n].to_vec());
            }
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            if let Ok(mut f) = self.flushes.lock() {
                *f += 1;
            }
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_before_a_flush_leave_as_one() {
        let rec = Recorder::default();
        let mut io = CoalescingIo::new(rec.clone());
        io.write_all(b"headers").await.expect("write");
        io.write_all(b"data").await.expect("write");
        assert!(rec.writes().is_empty(), "nothing is written before a flush");
        io.flush().await.expect("flush");
        assert_eq!(rec.writes(), vec![b"headersdata".to_vec()]);
        assert_eq!(*rec.flushes.lock().expect("lock"), 1);
        // A flush with nothing buffered goes straight to the stream.
        io.flush().await.expect("flush");
        assert_eq!(rec.writes().len(), 1);
        assert_eq!(*rec.flushes.lock().expect("lock"), 2);
    }

    type Shared = std::sync::Mutex<CoalescingIo<Recorder>>;

    fn lock(io: &Shared) -> std::sync::MutexGuard<'_, CoalescingIo<Recorder>> {
        io.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[tokio::test]
    async fn a_flush_yields_while_other_tasks_add_to_the_burst() {
        // Single-threaded runtime, as in trellisd: the flush yields, the
        // other task adds its bytes, and both leave in one write.
        let rec = Recorder::default();
        let io = Arc::new(std::sync::Mutex::new(CoalescingIo::new(rec.clone())));
        std::future::poll_fn(|cx| Pin::new(&mut *lock(&io)).poll_write(cx, b"HEADERS"))
            .await
            .expect("write");
        let other = {
            let io = io.clone();
            tokio::spawn(async move {
                std::future::poll_fn(|cx| Pin::new(&mut *lock(&io)).poll_write(cx, b"+DATA")).await
            })
        };
        let mut pending = 0;
        std::future::poll_fn(|cx| {
            let r = Pin::new(&mut *lock(&io)).poll_flush(cx);
            pending += usize::from(r.is_pending());
            r
        })
        .await
        .expect("flush");
        other.await.expect("join").expect("write");
        assert_eq!(pending, 2, "yields while the burst grows, then writes");
        assert_eq!(rec.writes(), vec![b"HEADERS+DATA".to_vec()]);
    }

    #[test]
    fn a_flush_yields_a_bounded_number_of_times() {
        let rec = Recorder::default();
        let mut io = CoalescingIo::new(rec.clone());
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut pending = 0;
        loop {
            // A writer that adds to the burst before every flush poll.
            let w = Pin::new(&mut io).poll_write(&mut cx, b"x");
            assert!(matches!(w, Poll::Ready(Ok(1))));
            match Pin::new(&mut io).poll_flush(&mut cx) {
                Poll::Pending => pending += 1,
                Poll::Ready(r) => {
                    r.expect("flush");
                    break;
                }
            }
            assert!(pending <= usize::from(MAX_YIELDS), "flush never wrote");
        }
        assert_eq!(pending, usize::from(MAX_YIELDS));
        assert_eq!(rec.writes().concat().len(), usize::from(MAX_YIELDS) + 1);
        // The next burst starts counting afresh.
        let w = Pin::new(&mut io).poll_write(&mut cx, b"y");
        assert!(matches!(w, Poll::Ready(Ok(1))));
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_pending());
    }

    #[tokio::test]
    async fn partial_and_refused_writes_keep_every_byte_in_order() {
        let rec = Recorder {
            per_call: Some(3),
            stall: true,
            ..Default::default()
        };
        let mut io = CoalescingIo::new(rec.clone());
        io.write_all(b"abcdefgh").await.expect("write");
        io.write_all(b"ij").await.expect("write");
        io.flush().await.expect("flush");
        assert_eq!(rec.writes().concat(), b"abcdefghij".to_vec());
        assert!(io.buf.is_empty());
    }

    #[tokio::test]
    async fn large_writes_go_through_after_what_is_buffered() {
        let rec = Recorder::default();
        let mut io = CoalescingIo::new(rec.clone());
        io.write_all(b"small").await.expect("write");
        let big = vec![7u8; COALESCE_MAX_BYTES + 1];
        io.write_all(&big).await.expect("write");
        io.flush().await.expect("flush");
        let writes = rec.writes();
        assert_eq!(writes[0], b"small".to_vec(), "buffered bytes go first");
        assert_eq!(writes[1..].concat(), big);
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_buffered() {
        let rec = Recorder::default();
        let mut io = CoalescingIo::new(rec.clone());
        io.write_all(b"last words").await.expect("write");
        io.shutdown().await.expect("shutdown");
        assert_eq!(rec.writes(), vec![b"last words".to_vec()]);
    }

    #[tokio::test]
    async fn the_connector_dials_tcp_and_delivers_whole_writes() {
        // A real TCP connection: what one side writes and flushes arrives
        // whole at the other.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut got = vec![0u8; 11];
            tokio::io::AsyncReadExt::read_exact(&mut s, &mut got)
                .await
                .expect("read");
            got
        });
        let mut connector = CoalescingConnector::new();
        let uri: tonic::codegen::http::Uri = format!("http://{addr}").parse().expect("uri");
        let io = tower_service::Service::call(&mut connector, uri)
            .await
            .expect("connect");
        let mut io = io.into_inner();
        io.write_all(b"hello ").await.expect("write");
        io.write_all(b"world").await.expect("write");
        io.flush().await.expect("flush");
        assert_eq!(server.await.expect("join"), b"hello world".to_vec());
    }
}
