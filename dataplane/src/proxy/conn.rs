//! Connection-level protection of the data path: the deadlines, idle
//! timeouts, HTTP/2 keepalive pings and header size limits of every
//! connection the sidecar serves or pools, from the sidecar's
//! `[connection]` config ([`crate::config::ConnectionConfig`]).
//!
//! * [`Limits`]: the settings as the request path uses them, and the hyper
//!   builders they configure: [`Limits::auto_server`] (the outbound
//!   listener: HTTP/1 header buffer and count,
//!   HTTP/2 pings and `max_header_list_size`), [`Limits::http2_server`]
//!   (the inbound listener), [`Limits::http2_client`] (the pool of
//!   sidecar-to-sidecar connections), [`Limits::app_http1`] and
//!   [`Limits::app_http2`] (the inbound side's connections to the local
//!   app, [`super::app_pool`]).
//! * [`Activity`] and [`track`]: a connection's requests in flight (from
//!   the request's arrival until its response body ends or is dropped), so
//!   [`drive`] can tell an idle connection from a busy one.
//! * [`drive`]: serves one connection until it ends, closing it at once
//!   when no request arrived within the first-request deadline, and
//!   gracefully (HTTP/1: after the response in progress, HTTP/2: GOAWAY)
//!   when it has had no request in flight for the idle timeout, or at
//!   shutdown.
//!
//! The TLS handshake deadline and the cap on concurrent connections are
//! applied by the inbound listener itself ([`super::inbound`]); idle pooled
//! connections leave the pool in [`super::upstream`]. Each listener and
//! the pool are handed their [`Limits`] by the sidecar.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::time::Instant;

use super::upstream::{CONNECTION_WINDOW, MAX_CONCURRENT_STREAMS, STREAM_WINDOW};
use crate::config::{ConnectionConfig, DEFAULT_MAX_REQUEST_HEADERS, MIN_HEADER_BYTES};
use crate::shutdown::Shutdown;

/// The connection settings in the form the request path uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Inbound: the TLS handshake must finish within this.
    pub tls_handshake_timeout: Duration,
    /// The inbound listener's first HTTP/2 request must arrive within
    /// this (the outbound listener's HTTP/1 clients are bounded by the idle
    /// timeout instead, [`Limits::auto_server`]).
    pub request_header_timeout: Duration,
    /// A downstream connection with no request in flight this long is
    /// closed gracefully; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// A pooled upstream connection no request used this long leaves the
    /// pool; `None`: never.
    pub upstream_idle_timeout: Option<Duration>,
    /// Concurrent inbound connections; more are closed at once.
    pub max_inbound_connections: usize,
    /// Largest request header block (HTTP/1 buffer, HTTP/2 header list).
    pub max_request_header_bytes: usize,
    /// Most HTTP/1 request header fields.
    pub max_request_headers: usize,
    /// Largest response header block from peer sidecars and the app.
    pub max_response_header_bytes: usize,
    /// HTTP/2 keepalive ping interval.
    pub h2_keepalive_interval: Duration,
    /// HTTP/2 keepalive ping timeout.
    pub h2_keepalive_timeout: Duration,
}

impl From<&ConnectionConfig> for Limits {
    fn from(c: &ConnectionConfig) -> Self {
        let ms = Duration::from_millis;
        let off_if_zero = |v: u64| (v > 0).then(|| ms(v));
        Limits {
            tls_handshake_timeout: ms(c.tls_handshake_timeout_ms),
            request_header_timeout: ms(c.request_header_timeout_ms),
            idle_timeout: off_if_zero(c.idle_timeout_ms),
            upstream_idle_timeout: off_if_zero(c.upstream_idle_timeout_ms),
            max_inbound_connections: c.max_inbound_connections,
            max_request_header_bytes: c.max_request_header_bytes,
            max_request_headers: c.max_request_headers,
            max_response_header_bytes: c.max_response_header_bytes,
            h2_keepalive_interval: ms(c.h2_keepalive_interval_ms),
            h2_keepalive_timeout: ms(c.h2_keepalive_timeout_ms),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::from(&ConnectionConfig::default())
    }
}

/// A header limit as HTTP/2 SETTINGS carry it (validated ≤ 1 MiB).
fn settings_u32(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl Limits {
    /// The outbound listener's server (HTTP/1.1 and HTTP/2 prior
    /// knowledge): HTTP/1 header buffer and field count (431 beyond);
    /// HTTP/2 keepalive pings and `max_header_list_size`.
    ///
    /// No hyper HTTP/1 header timer here: hyper arms it for every request
    /// head (a timer per request on the hot path) and also runs it while a keep-alive connection waits
    /// for its next request, where a deadline shorter than the apps' pool
    /// idle times (90 s and more) would race their reuse. [`drive`]'s idle
    /// timeout bounds both instead: a connection whose request headers
    /// never complete has no request in flight, so it is closed as idle.
    /// The clients are the local app, so slowloris is not the concern it
    /// is on the inbound listener.
    pub fn auto_server(&self) -> auto::Builder<TokioExecutor> {
        let mut b = auto::Builder::new(TokioExecutor::new());
        {
            let mut h1 = b.http1();
            // `None` explicitly: with a timer, hyper would default to 30 s.
            h1.header_read_timeout(None)
                .max_buf_size(self.max_request_header_bytes);
            // hyper parses up to 100 headers on the stack; a different
            // count moves the parse to the heap.
            if self.max_request_headers != DEFAULT_MAX_REQUEST_HEADERS {
                h1.max_headers(self.max_request_headers);
            }
        }
        b.http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(self.h2_keepalive_interval)
            .keep_alive_timeout(self.h2_keepalive_timeout)
            .max_header_list_size(settings_u32(self.max_request_header_bytes));
        b
    }

    /// The inbound listener's HTTP/2 server (peer sidecars): keepalive
    /// pings, `max_header_list_size`, and the sidecar-to-sidecar windows
    /// and stream limit.
    pub fn http2_server(&self) -> hyper::server::conn::http2::Builder<TokioExecutor> {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .keep_alive_interval(self.h2_keepalive_interval)
            .keep_alive_timeout(self.h2_keepalive_timeout)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_header_list_size(settings_u32(self.max_request_header_bytes));
        b
    }

    /// The pooled HTTP/2 client to peer sidecars: keepalive pings also
    /// while idle (a dead peer is noticed before a request picks the
    /// connection), the response `max_header_list_size`, the windows.
    pub fn http2_client(&self) -> hyper::client::conn::http2::Builder<TokioExecutor> {
        let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .keep_alive_interval(self.h2_keepalive_interval)
            .keep_alive_timeout(self.h2_keepalive_timeout)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(settings_u32(self.max_response_header_bytes));
        b
    }

    /// The inbound side's HTTP/1.1 connections to the local app
    /// ([`super::app_pool`]): the response head's buffer bounded like the
    /// peers' headers (hyper's floor is 8 KiB, as the config's).
    pub fn app_http1(&self) -> hyper::client::conn::http1::Builder {
        let mut b = hyper::client::conn::http1::Builder::new();
        b.max_buf_size(self.max_response_header_bytes.max(MIN_HEADER_BYTES));
        b
    }

    /// The inbound side's HTTP/2 (h2c) connection to the local app: the
    /// response `max_header_list_size`.
    pub fn app_http2(&self) -> hyper::client::conn::http2::Builder<TokioExecutor> {
        let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .max_header_list_size(settings_u32(self.max_response_header_bytes));
        b
    }
}

/// One connection's requests: how many are in flight, how many arrived,
/// and since when none has been in flight.
#[derive(Debug)]
pub struct Activity {
    born: Instant,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    /// Microseconds after `born` when the last request ended.
    idle_since_us: AtomicU64,
}

impl Activity {
    /// A connection starting now, with no request yet.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            idle_since_us: AtomicU64::new(0),
        })
    }

    /// A request arrived; it is in flight until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// Requests that arrived so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    fn idle_since(&self) -> Instant {
        self.born + Duration::from_micros(self.idle_since_us.load(Ordering::Acquire))
    }

    /// Resolves once no request has been in flight for `after`. While
    /// requests are in flight it only looks again every `after`: no
    /// wake-ups on the request path.
    pub async fn idle(&self, after: Duration) {
        loop {
            let now = Instant::now();
            let deadline = if self.in_flight() > 0 {
                now + after
            } else {
                self.idle_since() + after
            };
            if deadline <= now && self.in_flight() == 0 {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A request in flight on a connection ([`Activity::begin`]).
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        let us = u64::try_from(a.born.elapsed().as_micros()).unwrap_or(u64::MAX);
        a.idle_since_us.fetch_max(us, Ordering::AcqRel);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight until it ends (or is
/// dropped, e.g. when the client resets the stream).
#[derive(Debug)]
pub struct TrackedBody<B> {
    inner: B,
    guard: Option<InFlight>,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None | Some(Err(_)))) {
            this.guard = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `svc`, with each request counted in flight on `activity` from its
/// arrival until its response body ends.
pub fn track<S, B>(
    svc: S,
    activity: &Arc<Activity>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<TrackedBody<B>>,
    Error = Infallible,
    Future: Send + 'static,
> + Send
       + 'static
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Unpin + Send + 'static,
{
    let activity = Arc::clone(activity);
    hyper::service::service_fn(move |req| {
        let guard = activity.begin();
        let fut = svc.call(req);
        async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| TrackedBody {
                inner,
                guard: Some(guard),
            }))
        }
    })
}

/// A connection closed because no request arrived in time.
#[derive(Debug, thiserror::Error)]
#[error("no request within {0:?}; closed")]
pub struct NoRequest(pub Duration);

/// Serves `conn` (whose requests `activity` counts, see [`track`]) until
/// it ends. With `first_request`, a connection that has not delivered a
/// request that long after `activity` began is dropped at once (a silent or
/// trickling client); with `idle`, one without a request in flight for
/// that long is closed with `graceful`, as it is at `shutdown`, and then
/// finishes what it has in flight (dropped if it has nothing in flight
/// [`IDLE_CLOSE_GRACE`] later).
pub async fn drive<C, T>(
    mut conn: Pin<&mut C>,
    graceful: impl FnOnce(Pin<&mut C>),
    activity: &Activity,
    first_request: Option<Duration>,
    idle: Option<Duration>,
    mut shutdown: Shutdown,
) -> Result<T, NoRequest>
where
    C: Future<Output = T>,
{
    let first = async {
        if let Some(d) = first_request {
            tokio::time::sleep_until(activity.born + d).await;
            if activity.requests() == 0 {
                return d;
            }
        }
        std::future::pending().await
    };
    let idle_wait = async {
        match idle {
            Some(d) => activity.idle(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(first, idle_wait);
    let why = tokio::select! {
        r = conn.as_mut() => return Ok(r),
        d = &mut first => return Err(NoRequest(d)),
        _ = &mut idle_wait => "idle",
        _ = shutdown.wait() => "shutdown",
    };
    tracing::debug!(why, "closing the connection gracefully");
    graceful(conn.as_mut());
    if why == "idle" {
        // A connection idle in the middle of a request head (a client
        // trickling HTTP/1 headers) does not end on a graceful close:
        // drop it if it still has nothing in flight a moment later.
        loop {
            tokio::select! {
                r = conn.as_mut() => return Ok(r),
                _ = tokio::time::sleep(IDLE_CLOSE_GRACE) => {
                    if activity.in_flight() == 0 {
                        return Err(NoRequest(idle.unwrap_or(IDLE_CLOSE_GRACE)));
                    }
                }
            }
        }
    }
    Ok(conn.await)
}

/// How long an idle connection may take to end after its graceful close
/// before it is dropped (when it still has no request in flight): ample
/// for a client to see a GOAWAY or a closed keep-alive connection; only a
/// client stuck mid-request-head reaches it.
pub const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_requests_to_end() {
        let a = Activity::new();
        let t = Duration::from_secs(10);
        // Idle from the start: resolves after `t`.
        let start = Instant::now();
        a.idle(t).await;
        assert!(start.elapsed() >= t);
        // A request in flight holds it off; `t` after it ends, it resolves.
        let g = a.begin();
        let a2 = Arc::clone(&a);
        let waiter = tokio::spawn(async move { a2.idle(t).await });
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(!waiter.is_finished());
        assert_eq!(a.in_flight(), 1);
        drop(g);
        let ended = Instant::now();
        waiter.await.unwrap();
        assert!(ended.elapsed() >= t - Duration::from_millis(1));
        assert!(ended.elapsed() <= t + Duration::from_secs(1));
        assert_eq!(a.requests(), 1);
        assert_eq!(a.in_flight(), 0);
    }

    #[tokio::test]
    async fn tracked_body_ends_the_request_with_its_last_frame() {
        use http_body_util::BodyExt;
        let a = Activity::new();
        let mut body = TrackedBody {
            inner: super::super::body::full("x"),
            guard: Some(a.begin()),
        };
        assert_eq!(a.in_flight(), 1);
        let f = body.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "x");
        assert!(body.frame().await.is_none());
        assert_eq!(a.in_flight(), 0);
        // Dropped before its end (a reset stream): also done.
        let body = TrackedBody {
            inner: super::super::body::full("y"),
            guard: Some(a.begin()),
        };
        assert_eq!(a.in_flight(), 1);
        drop(body);
        assert_eq!(a.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn drive_closes_silent_and_idle_connections() {
        let (_trigger, shutdown) = crate::shutdown::channel();
        // Never a request: dropped at the first-request deadline.
        let a = Activity::new();
        let conn = std::future::pending::<()>();
        tokio::pin!(conn);
        let r = drive(
            conn,
            |_| {},
            &a,
            Some(Duration::from_secs(2)),
            None,
            shutdown.clone(),
        )
        .await;
        assert!(matches!(r, Err(NoRequest(d)) if d == Duration::from_secs(2)));
        // A request arrived: no deadline; idle → graceful, then the
        // connection's own end.
        let a = Activity::new();
        drop(a.begin());
        let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c2 = Arc::clone(&closing);
        let conn = std::future::poll_fn(move |_| {
            if c2.load(Ordering::SeqCst) {
                Poll::Ready(7)
            } else {
                Poll::Pending
            }
        });
        tokio::pin!(conn);
        let start = Instant::now();
        let r = drive(
            conn,
            |_| closing.store(true, Ordering::SeqCst),
            &a,
            Some(Duration::from_secs(2)),
            Some(Duration::from_secs(5)),
            shutdown,
        )
        .await;
        assert_eq!(r.unwrap(), 7);
        assert!(start.elapsed() >= Duration::from_secs(4));
    }

    #[test]
    fn limits_from_config() {
        let mut c = ConnectionConfig {
            idle_timeout_ms: 0,
            ..ConnectionConfig::default()
        };
        c.request_header_timeout_ms = 250;
        let l = Limits::from(&c);
        assert_eq!(l.idle_timeout, None);
        assert_eq!(l.request_header_timeout, Duration::from_millis(250));
        assert_eq!(
            Limits::default().upstream_idle_timeout,
            Some(Duration::from_millis(
                crate::config::DEFAULT_UPSTREAM_IDLE_TIMEOUT_MS
            ))
        );
    }
}
