//! Connections to peer sidecars: one pooled, multiplexed HTTP/2 connection
//! over mutual TLS per (endpoint, expected SPIFFE ID). Requests share it;
//! a closed connection is replaced by the next request (and a request that
//! finds its pooled connection dead before sending gets one fresh try). Connects to one
//! endpoint are serialized so a burst makes one connection, not hundreds.
//!
//! Connection limits ([`super::conn::Limits::http2_client`]): keepalive
//! pings also while idle, response headers up to
//! `max_response_header_bytes`; a connection no request picked for
//! `upstream_idle_timeout` leaves the pool, and closes once the streams it
//! still carries (long responses, tunnels) end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::body::ProxyBody;
use super::conn::Limits;
use super::tls::TlsSource;

/// TCP + TLS + HTTP/2 handshake bound: loopback and LAN take well under
/// 10 ms; a peer that needs a second is treated as unreachable (the
/// request's own deadline still applies on top).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// HTTP/2 flow-control window per stream between sidecars: 1 MiB keeps a
/// fast stream at full speed on a LAN round trip of a few ms.
pub const STREAM_WINDOW: u32 = 1 << 20;
/// HTTP/2 window per connection: 16 streams' worth, so one stream (or
/// tunnel) whose reader stalls cannot take the whole connection's window
/// from the others.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Streams in flight per sidecar-to-sidecar connection (both directions):
/// far above any one caller's concurrency, bounded so a peer cannot make
/// unbounded work.
pub const MAX_CONCURRENT_STREAMS: u32 = 4096;

/// Why a request did not get a response from the peer sidecar.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made (TCP, TLS incl. identity, HTTP/2).
    #[error("{0}")]
    Connect(String),
    /// The connection or stream failed after the request was sent.
    #[error("{0}")]
    Reset(String),
    /// The peer refused the stream (HTTP/2 REFUSED_STREAM): it did not
    /// process the request.
    #[error("{0}")]
    Refused(String),
}

/// The error of a sent request: [`UpstreamError::Refused`] when any cause
/// in the chain is an HTTP/2 REFUSED_STREAM, else [`UpstreamError::Reset`].
fn sent_error(e: hyper::Error) -> UpstreamError {
    let mut text = e.to_string();
    let mut refused = false;
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let t = c.to_string();
        refused |= t.contains("refused stream") || t.contains("REFUSED_STREAM");
        text = format!("{text}: {t}");
        cause = c.source();
    }
    if refused {
        UpstreamError::Refused(text)
    } else {
        UpstreamError::Reset(text)
    }
}

type Key = (SocketAddr, String);

/// A pooled connection: its sender, which connection it is (so the idle
/// reaper removes only its own), and when a request last picked it.
#[derive(Debug)]
struct Pooled {
    sender: SendRequest<ProxyBody>,
    id: u64,
    used: Arc<LastUse>,
}

/// When a pooled connection was last picked: microseconds after `since`.
#[derive(Debug)]
struct LastUse {
    since: Instant,
    us: AtomicU64,
}

impl LastUse {
    fn new() -> Arc<LastUse> {
        Arc::new(LastUse {
            since: Instant::now(),
            us: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let us = u64::try_from(self.since.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.us.fetch_max(us, Ordering::Relaxed);
    }

    /// Resolves once the connection has not been picked for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let deadline =
                self.since + Duration::from_micros(self.us.load(Ordering::Relaxed)) + idle;
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

type Senders = Mutex<HashMap<Key, Pooled>>;

/// Logs how a pooled connection ended.
fn log_end(ep: SocketAddr, r: hyper::Result<()>) {
    if let Err(e) = r {
        tracing::debug!(endpoint = %ep, error = %e, "upstream connection ended");
    }
}

/// Removes pooled connection `id` (if still the one pooled for `key`):
/// dropping the pool's sender lets hyper close the connection once the
/// streams in flight on it end.
fn forget_idle(pool: &Weak<Senders>, key: &Key, id: u64, idle: Duration) {
    let Some(pool) = pool.upgrade() else { return };
    let mut m = pool.lock().unwrap_or_else(|e| e.into_inner());
    if m.get(key).is_some_and(|p| p.id == id) {
        m.remove(key);
        tracing::debug!(endpoint = %key.0, ?idle, "upstream connection idle; left the pool");
    }
}

/// The pool.
#[derive(Debug)]
pub struct Upstreams {
    tls: Arc<TlsSource>,
    limits: Arc<Limits>,
    senders: Arc<Senders>,
    connecting: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    next_id: AtomicU64,
}

impl Upstreams {
    /// An empty pool using `tls` for new connections, with the default
    /// connection limits.
    pub fn new(tls: Arc<TlsSource>) -> Self {
        Self::with_limits(tls, Arc::new(Limits::default()))
    }

    /// An empty pool using `tls` for new connections, under `limits`.
    pub fn with_limits(tls: Arc<TlsSource>, limits: Arc<Limits>) -> Self {
        Upstreams {
            tls,
            limits,
            senders: Arc::new(Mutex::new(HashMap::new())),
            connecting: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    /// Whether a live pooled connection to `ep` (proving `expected`)
    /// exists, so a request would not wait for a handshake.
    pub fn is_connected(&self, ep: SocketAddr, expected: &str) -> bool {
        let key = (ep, expected.to_string());
        self.senders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .is_some_and(|p| !p.sender.is_closed())
    }

    /// Makes (or waits for) the pooled connection to `ep`, without sending
    /// anything: the circuit breaker counts requests waiting here as
    /// pending.
    pub async fn connect_to(&self, ep: SocketAddr, expected: &str) -> Result<(), UpstreamError> {
        self.sender(&(ep, expected.to_string())).await.map(|_| ())
    }

    fn cached(&self, key: &Key) -> Option<SendRequest<ProxyBody>> {
        let mut m = self.senders.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(key) {
            Some(p) if !p.sender.is_closed() => {
                p.used.touch();
                Some(p.sender.clone())
            }
            Some(_) => {
                m.remove(key);
                None
            }
            None => None,
        }
    }

    fn forget(&self, key: &Key) {
        self.senders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    async fn sender(&self, key: &Key) -> Result<SendRequest<ProxyBody>, UpstreamError> {
        if let Some(s) = self.cached(key) {
            return Ok(s);
        }
        // Boxed: the handshake's state (TLS and HTTP/2) is kilobytes, and
        // every request's future would otherwise carry room for it, moved
        // on every hop through the request path.
        Box::pin(self.establish(key)).await
    }

    /// The slow path of [`Upstreams::sender`]: one handshake per key at a
    /// time; whoever waited for it takes the connection it made.
    async fn establish(&self, key: &Key) -> Result<SendRequest<ProxyBody>, UpstreamError> {
        let gate = {
            let mut m = self.connecting.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(m.entry(key.clone()).or_default())
        };
        let _turn = gate.lock().await;
        if let Some(s) = self.cached(key) {
            return Ok(s);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let used = LastUse::new();
        let s = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(key, id, &used))
            .await
            .map_err(|_| {
                UpstreamError::Connect(format!("connect timed out after {CONNECT_TIMEOUT:?}"))
            })??;
        let pooled = Pooled {
            sender: s.clone(),
            id,
            used,
        };
        self.senders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), pooled);
        Ok(s)
    }

    async fn connect(
        &self,
        key: &Key,
        id: u64,
        used: &Arc<LastUse>,
    ) -> Result<SendRequest<ProxyBody>, UpstreamError> {
        let (ep, expected) = key;
        let err =
            |what: &str, e: &dyn std::fmt::Display| UpstreamError::Connect(format!("{what}: {e}"));
        let tls = self
            .tls
            .client_config(expected)
            .map_err(|e| err("tls config", &e))?;
        let tcp = TcpStream::connect(ep).await.map_err(|e| err("tcp", &e))?;
        super::tcp::tune_socket(&tcp);
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(ServerName::IpAddress(ep.ip().into()), tcp)
            .await
            .map_err(|e| err("tls", &e))?;
        let (sender, conn) = self
            .limits
            .http2_client()
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| err("http2", &e))?;
        let ep = *ep;
        let reaper = self.limits.upstream_idle_timeout.map(|idle| {
            (
                idle,
                Arc::downgrade(&self.senders),
                key.clone(),
                Arc::clone(used),
            )
        });
        tokio::spawn(async move {
            tokio::pin!(conn);
            if let Some((idle, pool, key, used)) = reaper {
                tokio::select! {
                    r = conn.as_mut() => return log_end(ep, r),
                    _ = used.idle(idle) => forget_idle(&pool, &key, id, idle),
                }
            }
            log_end(ep, conn.await);
        });
        tracing::debug!(endpoint = %ep, peer = %expected, "upstream connection established");
        Ok(sender)
    }

    /// Sends `req` to the sidecar at `ep`, which must prove the SPIFFE ID
    /// `expected`.
    pub async fn send(
        &self,
        ep: SocketAddr,
        expected: &str,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let key = (ep, expected.to_string());
        let mut sender = self.sender(&key).await?;
        if sender.ready().await.is_err() {
            // The pooled connection died since it was last used (the peer
            // restarted, an idle timeout): nothing was sent on it, so one
            // fresh connection is safe for any request.
            self.forget(&key);
            sender = self.sender(&key).await?;
            sender
                .ready()
                .await
                .map_err(|e| UpstreamError::Connect(format!("connection closed: {e}")))?;
        }
        match sender.try_send_request(req).await {
            Ok(r) => Ok(r),
            Err(mut e) => match e.take_message() {
                // Never written to the connection (it was going away, e.g.
                // the peer's GOAWAY at its shutdown): safe to send once
                // more, on a fresh connection, for any request.
                Some(req) => {
                    tracing::debug!(endpoint = %ep, error = %e.error(), "request not sent; reconnecting once");
                    self.forget(&key);
                    let mut sender = self.sender(&key).await?;
                    sender
                        .ready()
                        .await
                        .map_err(|e| UpstreamError::Connect(format!("connection closed: {e}")))?;
                    sender.send_request(req).await.map_err(sent_error)
                }
                None => Err(sent_error(e.into_error())),
            },
        }
    }

    /// Opens a TCP tunnel through the sidecar at `ep` (which must prove
    /// `expected`): an HTTP/2 `CONNECT authority` stream on the pooled
    /// connection, upgraded into a byte stream once the peer answers 200.
    /// A refusal (any other status) is [`UpstreamError::Connect`]: the peer
    /// could not reach its application, and nothing was sent.
    pub async fn tunnel(
        &self,
        ep: SocketAddr,
        expected: &str,
        authority: &str,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, UpstreamError> {
        let req = Request::builder()
            .method(hyper::Method::CONNECT)
            .uri(authority)
            .body(super::body::full(hyper::body::Bytes::new()))
            .map_err(|e| UpstreamError::Connect(format!("CONNECT {authority}: {e}")))?;
        let resp = self.send(ep, expected, req).await?;
        if resp.status() != hyper::StatusCode::OK {
            let why = resp
                .headers()
                .get(super::error::ERROR_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            return Err(UpstreamError::Connect(format!(
                "peer refused the tunnel with {}: {why}",
                resp.status()
            )));
        }
        hyper::upgrade::on(resp)
            .await
            .map(TokioIo::new)
            .map_err(|e| UpstreamError::Reset(format!("tunnel upgrade: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_once_no_request_picked_it_for_the_timeout() {
        let used = LastUse::new();
        let idle = Duration::from_secs(60);
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(50)).await;
        used.touch();
        used.idle(idle).await;
        assert_eq!(start.elapsed(), Duration::from_secs(110));
    }

    /// A client connection over an in-memory pipe to a hyper HTTP/2
    /// server that answers 200; the server's task ends when the
    /// connection closes.
    async fn pipe_sender() -> (SendRequest<ProxyBody>, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(64 << 10);
        let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
            Ok::<_, std::convert::Infallible>(Response::new(super::super::body::full("")))
        });
        let server = tokio::spawn(async move {
            let _ = Limits::default()
                .http2_server()
                .serve_connection(TokioIo::new(server), svc)
                .await;
        });
        let (sender, conn) = Limits::default()
            .http2_client()
            .handshake(TokioIo::new(client))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        (sender, server)
    }

    #[tokio::test]
    async fn only_the_idle_connection_itself_leaves_the_pool() {
        let pool: Arc<Senders> = Arc::new(Mutex::new(HashMap::new()));
        let key: Key = ("127.0.0.1:1".parse().expect("addr"), "id".into());
        let (sender, server) = pipe_sender().await;
        let pooled = Pooled {
            sender,
            id: 2,
            used: LastUse::new(),
        };
        pool.lock().expect("lock").insert(key.clone(), pooled);
        // An older connection of the same key going idle: stays.
        forget_idle(&Arc::downgrade(&pool), &key, 1, Duration::ZERO);
        assert_eq!(pool.lock().expect("lock").len(), 1);
        // This one: leaves, and with the pool's handle gone the connection
        // closes. A dropped pool: nothing to do.
        forget_idle(&Arc::downgrade(&pool), &key, 2, Duration::ZERO);
        assert!(pool.lock().expect("lock").is_empty());
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the connection closed")
            .expect("server task");
        forget_idle(&Weak::new(), &key, 2, Duration::ZERO);
    }
}
