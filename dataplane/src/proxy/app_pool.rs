//! Step 11's connections to the local application: [`AppPool`], pooled
//! HTTP/1.1 and HTTP/2 (h2c prior knowledge) to `app_addr`.
//!
//! Every request the inbound listener forwards goes through here, so this
//! pool is kept to what one local address needs (hyper_util's generic
//! client, which it replaced, keys a map by scheme and authority, wraps
//! each connection twice and spawns a task per HTTP/1.1 request to notice
//! when the connection is free again):
//!
//! * **HTTP/1.1**: a stack of idle connections, most recently used on top
//!   (its buffers and the app's worker are warm). A request takes the top
//!   one or dials a new one. The connection comes back as soon as hyper
//!   has read the whole response off it (the rest of the body waits in
//!   its channel), which for small responses is when the headers arrive;
//!   else when the body wrapper ([`PooledBody`]) sees hyper ready, or the
//!   body's end (then from a small task if hyper is not ready yet). A
//!   connection whose response is dropped before hyper has read it is not
//!   reused (hyper closes it). Idle connections older than
//!   [`APP_IDLE_TIMEOUT`] are closed when the stack is next touched; at
//!   most [`MAX_IDLE_APP_CONNECTIONS`] are kept.
//! * **HTTP/2**: one shared connection, multiplexed; dialled on first use
//!   (one dial at a time) and again once the app has closed it.
//! * **A request never sent** — the app closed a pooled connection just
//!   before it was used, and hyper hands the request back — goes again on
//!   another connection. A request that reached the app is never replayed.
//!
//! Failures are [`AppError`]s: dialling (the app is not listening) or the
//! exchange itself; [`super::error::ProxyError::from_app`] makes them 502s.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper::header::HOST;
use hyper::{Request, Response, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::Instant;

use super::body::ProxyBody;
use super::conn::Limits;

/// Idle HTTP/1.1 connections to the app older than this are closed: the
/// timeout of the hyper_util client this pool replaced, and above the
/// keep-alive timeouts app servers commonly use (5-75 s), so the app
/// usually closes first and the connection is then dropped as closed.
pub const APP_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// At most this many idle HTTP/1.1 connections are kept: a burst of
/// concurrent requests leaves one connection each, and file descriptors
/// beyond what a busy app needs are better returned.
pub const MAX_IDLE_APP_CONNECTIONS: usize = 1024;

/// Why a request to the app failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No connection: the app is not listening (nothing was sent).
    #[error("connect to the app: {0}")]
    Connect(#[source] std::io::Error),
    /// The connection was made but the HTTP handshake failed.
    #[error("HTTP handshake with the app: {0}")]
    Handshake(#[source] hyper::Error),
    /// The request or its response failed on an open connection.
    #[error("{0}")]
    Request(#[source] hyper::Error),
}

impl AppError {
    /// True when no connection could be made, so the app never saw the
    /// request.
    pub fn is_connect(&self) -> bool {
        matches!(self, AppError::Connect(_) | AppError::Handshake(_))
    }
}

/// An idle HTTP/1.1 connection and when it became idle.
struct Idle {
    tx: http1::SendRequest<ProxyBody>,
    since: Instant,
}

/// Pooled connections to one local application.
pub struct AppPool {
    addr: SocketAddr,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// Idle HTTP/1.1 connections, the most recently used last.
    idle: Mutex<Vec<Idle>>,
    /// The shared HTTP/2 connection, once dialled.
    shared: Mutex<Option<http2::SendRequest<ProxyBody>>>,
    /// Held while the HTTP/2 connection is dialled: one dial at a time.
    dialing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for AppPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppPool")
            .field("addr", &self.addr)
            .field("idle_http1", &self.idle_http1())
            .finish()
    }
}

impl AppPool {
    /// A pool for `addr`, its connections configured by `limits`
    /// ([`Limits::app_http1`], [`Limits::app_http2`]).
    pub fn new(addr: SocketAddr, limits: &Limits) -> Arc<AppPool> {
        Arc::new(AppPool {
            addr,
            http1: limits.app_http1(),
            http2: limits.app_http2(),
            idle: Mutex::new(Vec::new()),
            shared: Mutex::new(None),
            dialing: tokio::sync::Mutex::new(()),
        })
    }

    /// Idle HTTP/1.1 connections held now (closed ones included until the
    /// stack is next touched).
    pub fn idle_http1(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Sends `req` over HTTP/1.1, in origin form (path and query): an
    /// absolute URI's authority becomes `Host` when the request has none.
    pub async fn send_http1(
        self: &Arc<Self>,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, AppError> {
        if req.uri().authority().is_some() {
            origin_form(&mut req);
        }
        loop {
            let (mut tx, pooled) = match self.checkout() {
                Some(tx) => (tx, true),
                None => (self.dial_http1().await?, false),
            };
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(self.attach(tx, resp)),
                Err(mut e) => match e.take_message() {
                    // Never sent: the pooled connection had closed.
                    Some(back) if pooled => req = back,
                    _ => return Err(AppError::Request(e.into_error())),
                },
            }
        }
    }

    /// Sends `req` over the shared HTTP/2 connection (its URI must be
    /// absolute: scheme and authority become the pseudo-headers).
    pub async fn send_http2(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, AppError> {
        loop {
            let (mut tx, fresh) = match self.current_http2() {
                Some(tx) => (tx, false),
                None => self.dial_http2().await?,
            };
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(BodyExt::boxed)),
                Err(mut e) => match e.take_message() {
                    // Never sent: the connection had closed; dial again.
                    Some(back) if !fresh => {
                        self.forget_http2();
                        req = back;
                    }
                    _ => return Err(AppError::Request(e.into_error())),
                },
            }
        }
    }

    /// The most recently used idle HTTP/1.1 connection that is still open
    /// and ready; closed and expired ones on the way are dropped.
    fn checkout(&self) -> Option<http1::SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        while let Some(Idle { tx, since }) = idle.pop() {
            if tx.is_ready() && now.duration_since(since) < APP_IDLE_TIMEOUT {
                return Some(tx);
            }
        }
        None
    }

    /// Returns a connection whose exchange has ended: onto the stack when
    /// hyper reports it ready, else once it is (a connection that closes
    /// instead is dropped).
    fn release(self: &Arc<Self>, mut tx: http1::SendRequest<ProxyBody>) {
        if tx.is_ready() {
            self.push_idle(tx);
        } else if !tx.is_closed() {
            let pool = Arc::clone(self);
            tokio::spawn(async move {
                if tx.ready().await.is_ok() {
                    pool.push_idle(tx);
                }
            });
        }
    }

    fn push_idle(&self, tx: http1::SendRequest<ProxyBody>) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        // The oldest are at the bottom: drop the expired and the closed
        // there, and the oldest beyond the cap.
        let keep_from = idle
            .iter()
            .position(|i| now.duration_since(i.since) < APP_IDLE_TIMEOUT && !i.tx.is_closed())
            .unwrap_or(idle.len());
        let over = (idle.len() - keep_from + 1).saturating_sub(MAX_IDLE_APP_CONNECTIONS);
        idle.drain(..keep_from + over);
        idle.push(Idle { tx, since: now });
    }

    /// The response, the connection given back at once when hyper has
    /// already read all of it, else its body wrapped to give it back
    /// later.
    fn attach(
        self: &Arc<Self>,
        tx: http1::SendRequest<ProxyBody>,
        resp: Response<Incoming>,
    ) -> Response<ProxyBody> {
        if resp.body().is_end_stream() || tx.is_ready() {
            self.release(tx);
            return resp.map(BodyExt::boxed);
        }
        let pool = Arc::clone(self);
        resp.map(|inner| {
            PooledBody {
                inner,
                conn: Some((pool, tx)),
            }
            .boxed()
        })
    }

    async fn connect(&self) -> Result<TokioIo<tokio::net::TcpStream>, AppError> {
        let s = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(AppError::Connect)?;
        s.set_nodelay(true).map_err(AppError::Connect)?;
        Ok(TokioIo::new(s))
    }

    async fn dial_http1(&self) -> Result<http1::SendRequest<ProxyBody>, AppError> {
        let io = self.connect().await?;
        let (tx, conn) = self
            .http1
            .handshake(io)
            .await
            .map_err(AppError::Handshake)?;
        drive(self.addr, "HTTP/1.1", conn);
        Ok(tx)
    }

    fn current_http2(&self) -> Option<http2::SendRequest<ProxyBody>> {
        let shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        shared.as_ref().filter(|tx| !tx.is_closed()).cloned()
    }

    fn forget_http2(&self) {
        *self.shared.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// The HTTP/2 connection, dialled unless another request just did;
    /// `true` when it was dialled here.
    async fn dial_http2(&self) -> Result<(http2::SendRequest<ProxyBody>, bool), AppError> {
        let _one = self.dialing.lock().await;
        if let Some(tx) = self.current_http2() {
            return Ok((tx, false));
        }
        let io = self.connect().await?;
        let (tx, conn) = self
            .http2
            .handshake(io)
            .await
            .map_err(AppError::Handshake)?;
        drive(self.addr, "HTTP/2", conn);
        *self.shared.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx.clone());
        Ok((tx, true))
    }
}

/// Runs a connection's I/O in its own task until it ends (the app closed
/// it, or every sender was dropped).
fn drive(
    addr: SocketAddr,
    version: &'static str,
    conn: impl std::future::Future<Output = hyper::Result<()>> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(app = %addr, version, error = %e, "connection to the app ended");
        }
    });
}

/// Moves an absolute URI's authority into `Host` (unless the request has
/// one) and leaves its path and query.
fn origin_form(req: &mut Request<ProxyBody>) {
    if !req.headers().contains_key(HOST) {
        let host = req
            .uri()
            .authority()
            .and_then(|a| hyper::header::HeaderValue::from_str(a.as_str()).ok());
        if let Some(v) = host {
            req.headers_mut().insert(HOST, v);
        }
    }
    let mut parts = hyper::http::uri::Parts::default();
    parts.path_and_query = Some(
        req.uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/")),
    );
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// An HTTP/1.1 response body that returns its connection to the pool once
/// hyper is ready for the next request or the body ends. Dropped before
/// that, the connection goes with it.
struct PooledBody {
    inner: Incoming,
    conn: Option<(Arc<AppPool>, http1::SendRequest<ProxyBody>)>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((pool, tx)) = self.conn.take() {
            pool.release(tx);
        }
    }
}

impl Body for PooledBody {
    type Data = hyper::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.conn = None,
            // hyper has read the whole response off the connection (the
            // rest waits in the body's channel): it can take the next
            // request now.
            _ if this.conn.as_ref().is_some_and(|(_, tx)| tx.is_ready()) => this.release(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use hyper::server::conn::{http1 as server1, http2 as server2};

    use super::*;
    use crate::proxy::body::full;
    use crate::proxy::error::ProxyError;

    /// How the test app answers: the request target and Host as the body,
    /// `size` bytes of it at least; `close` asks to close the connection.
    #[derive(Clone, Copy)]
    struct Answer {
        size: usize,
        close: bool,
    }

    /// An app on loopback (HTTP/2 prior knowledge with `h2`, else
    /// HTTP/1.1); returns its address and the count of accepted
    /// connections.
    async fn app(h2: bool, answer: Answer) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<Incoming>| async move {
                            let host = req
                                .headers()
                                .get(HOST)
                                .map(|h| h.to_str().unwrap_or("?").to_string())
                                .unwrap_or_default();
                            let mut text = format!("{} {host}", req.uri());
                            if text.len() < answer.size {
                                text.push_str(&" ".repeat(answer.size - text.len()));
                            }
                            let mut r = Response::new(Full::new(Bytes::from(text)));
                            if answer.close {
                                r.headers_mut().insert(
                                    hyper::header::CONNECTION,
                                    hyper::header::HeaderValue::from_static("close"),
                                );
                            }
                            Ok::<_, std::convert::Infallible>(r)
                        });
                    let io = TokioIo::new(s);
                    if h2 {
                        let _ = server2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = server1::Builder::new().serve_connection(io, svc).await;
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn request(uri: &str) -> Request<ProxyBody> {
        Request::builder().uri(uri).body(full("")).unwrap()
    }

    async fn text(resp: Response<ProxyBody>) -> String {
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec())
            .unwrap()
            .trim_end()
            .to_string()
    }

    const SMALL: Answer = Answer {
        size: 0,
        close: false,
    };

    #[tokio::test]
    async fn http1_reuses_one_connection_in_origin_form_with_host() {
        let (addr, accepted) = app(false, SMALL).await;
        let pool = AppPool::new(addr, &Limits::default());
        for i in 0..5 {
            let resp = pool
                .send_http1(request(&format!("http://reviews.default:9080/r/{i}?q=1")))
                .await
                .unwrap();
            assert_eq!(
                text(resp).await,
                format!("/r/{i}?q=1 reviews.default:9080"),
                "origin form, and Host from the authority"
            );
            assert_eq!(pool.idle_http1(), 1, "back in the pool when the body ended");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn http1_keeps_the_callers_host() {
        let (addr, _) = app(false, SMALL).await;
        let pool = AppPool::new(addr, &Limits::default());
        let mut req = request("http://reviews.default/x");
        req.headers_mut().insert(
            HOST,
            hyper::header::HeaderValue::from_static("reviews:9080"),
        );
        let resp = pool.send_http1(req).await.unwrap();
        assert_eq!(text(resp).await, "/x reviews:9080");
    }

    #[tokio::test]
    async fn http1_concurrent_requests_each_get_a_connection_then_share_them() {
        // Bodies larger than the socket buffers: hyper cannot have read
        // them before they are consumed, so each held response keeps its
        // connection busy.
        let big = Answer {
            size: 4 << 20,
            close: false,
        };
        let (addr, accepted) = app(false, big).await;
        let pool = AppPool::new(addr, &Limits::default());
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(pool.send_http1(request("http://a/")).await.unwrap());
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        for r in held {
            text(r).await;
        }
        assert_eq!(pool.idle_http1(), 4);
        for _ in 0..8 {
            text(pool.send_http1(request("http://a/")).await.unwrap()).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4, "no new connection");
    }

    #[tokio::test]
    async fn http1_connection_is_free_once_hyper_has_read_the_response() {
        // A small response arrives whole with its headers: the connection
        // takes the next request even before the first body is read.
        let (addr, accepted) = app(false, SMALL).await;
        let pool = AppPool::new(addr, &Limits::default());
        let first = pool.send_http1(request("http://a/1")).await.unwrap();
        let second = pool.send_http1(request("http://a/2")).await.unwrap();
        assert_eq!(text(second).await, "/2 a");
        assert_eq!(text(first).await, "/1 a");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn idle_http1_connections_expire() {
        let (addr, accepted) = app(false, SMALL).await;
        let pool = AppPool::new(addr, &Limits::default());
        text(pool.send_http1(request("http://a/")).await.unwrap()).await;
        text(pool.send_http1(request("http://a/")).await.unwrap()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        tokio::time::pause();
        tokio::time::advance(APP_IDLE_TIMEOUT).await;
        tokio::time::resume();
        text(pool.send_http1(request("http://a/")).await.unwrap()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "the idle one expired");
        assert_eq!(pool.idle_http1(), 1, "and was dropped from the pool");
    }

    #[tokio::test]
    async fn http1_body_dropped_before_its_end_is_not_reused() {
        let big = Answer {
            size: 4 << 20,
            close: false,
        };
        let (addr, accepted) = app(false, big).await;
        let pool = AppPool::new(addr, &Limits::default());
        let resp = pool.send_http1(request("http://a/")).await.unwrap();
        drop(resp);
        assert_eq!(pool.idle_http1(), 0);
        let resp = pool.send_http1(request("http://a/")).await.unwrap();
        assert_eq!(text(resp).await.len(), "/ a".len());
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn http1_connection_the_app_closes_is_replaced() {
        let close = Answer {
            size: 0,
            close: true,
        };
        let (addr, accepted) = app(false, close).await;
        let pool = AppPool::new(addr, &Limits::default());
        for _ in 0..3 {
            let resp = pool.send_http1(request("http://a/p")).await.unwrap();
            assert_eq!(text(resp).await, "/p a");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn http2_multiplexes_concurrent_requests_on_one_connection() {
        let (addr, accepted) = app(true, SMALL).await;
        let pool = AppPool::new(addr, &Limits::default());
        let mut tasks = Vec::new();
        for i in 0..10 {
            let pool = Arc::clone(&pool);
            tasks.push(tokio::spawn(async move {
                let resp = pool
                    .send_http2(request(&format!("http://reviews.default/s/{i}")))
                    .await
                    .unwrap();
                text(resp).await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), format!("http://reviews.default/s/{i}"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_http1(), 0);
    }

    #[tokio::test]
    async fn an_app_not_listening_is_a_connect_error_naming_the_cause() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let pool = AppPool::new(addr, &Limits::default());
        for h2 in [false, true] {
            let e = if h2 {
                pool.send_http2(request("http://a/")).await.unwrap_err()
            } else {
                pool.send_http1(request("http://a/")).await.unwrap_err()
            };
            assert!(e.is_connect(), "{e}");
            match ProxyError::from_app(&e, "reviews", addr) {
                ProxyError::Connect {
                    endpoint, reason, ..
                } => {
                    assert_eq!(endpoint, addr.to_string());
                    assert!(reason.contains("connect to the app"), "{reason}");
                    assert!(reason.to_lowercase().contains("refused"), "{reason}");
                    assert_eq!(reason.matches("refused").count(), 1, "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn an_app_that_resets_mid_exchange_is_a_reset() {
        // Accepts, reads the request, closes without answering.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
            }
        });
        let pool = AppPool::new(addr, &Limits::default());
        let e = pool.send_http1(request("http://a/")).await.unwrap_err();
        assert!(!e.is_connect(), "{e}");
        assert!(matches!(
            ProxyError::from_app(&e, "reviews", addr),
            ProxyError::Reset { .. }
        ));
    }
}
