//! Connections to peer sidecars: one pooled, multiplexed HTTP/2 connection
//! over mutual TLS per (endpoint, expected SPIFFE ID). Requests share it;
//! a closed connection is replaced by the next request (and a request that
//! finds its pooled connection dead before sending gets one fresh try). Connects to one
//! endpoint are serialized so a burst makes one connection, not hundreds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::body::ProxyBody;
use super::tls::TlsSource;

/// TCP + TLS + HTTP/2 handshake bound: loopback and LAN take well under
/// 10 ms; a peer that needs a second is treated as unreachable (the
/// request's own deadline still applies on top).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 keepalive ping interval: finds a dead peer on an idle pooled
/// connection before a request does.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

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
/// A pooled connection whose keepalive ping is not answered in this long
/// is dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

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

/// The pool.
#[derive(Debug)]
pub struct Upstreams {
    tls: Arc<TlsSource>,
    senders: Mutex<HashMap<Key, SendRequest<ProxyBody>>>,
    connecting: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

impl Upstreams {
    /// An empty pool using `tls` for new connections.
    pub fn new(tls: Arc<TlsSource>) -> Self {
        Upstreams {
            tls,
            senders: Mutex::new(HashMap::new()),
            connecting: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, key: &Key) -> Option<SendRequest<ProxyBody>> {
        let mut m = self.senders.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(key) {
            Some(s) if !s.is_closed() => Some(s.clone()),
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
        let gate = {
            let mut m = self.connecting.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(m.entry(key.clone()).or_default())
        };
        let _turn = gate.lock().await;
        if let Some(s) = self.cached(key) {
            return Ok(s);
        }
        let s = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(key))
            .await
            .map_err(|_| {
                UpstreamError::Connect(format!("connect timed out after {CONNECT_TIMEOUT:?}"))
            })??;
        self.senders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), s.clone());
        Ok(s)
    }

    async fn connect(&self, (ep, expected): &Key) -> Result<SendRequest<ProxyBody>, UpstreamError> {
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
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| err("http2", &e))?;
        let ep = *ep;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint = %ep, error = %e, "upstream connection ended");
            }
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
