//! QUIC plumbing shared by every stream the sidecar opens to a control
//! node: client TLS configs (mutual TLS with the cluster CA, ALPN
//! `trellis/1`), endpoints, connecting with a timeout, opening a stream with
//! its `Open` frame, and the server's `Error` message as a Rust error.
//!
//! The server name is always the node's IP literal (node certificates carry
//! IP SANs); a seed given as a DNS name is resolved first ([`resolve`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use trellis_proto::frame::{write_frame, FrameError};
use trellis_proto::sidecar::{self, Open};

/// Keepalive on every connection: the server sees a live sidecar and NATs
/// keep their mapping; also what makes the idle timeout below meaningful.
/// Four a second per sidecar is ~4,000 small packets/s for a 1,000-sidecar
/// mesh, spread over the control nodes.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_millis(250);
/// A connection with no packets from the node for this long is dead (a
/// killed process sends no CONNECTION_CLOSE): four missed keepalive
/// acknowledgements. Sidecars must be re-attached elsewhere within 2 s of a
/// node dying; quinn's default of 30 s would leave them on a dead node for
/// half a minute, and a false alarm only costs a resumed watch.
pub const IDLE_TIMEOUT_MS: u32 = 1_000;

/// Why talking to a control node failed. `retryable()` says whether trying
/// again (possibly on another node) may succeed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The CA, certificate or key cannot make a TLS config (not retryable).
    #[error("TLS config: {0}")]
    Tls(String),
    #[error("cannot bind a UDP socket on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot resolve {seed}: {reason}")]
    Resolve { seed: String, reason: String },
    #[error("connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("connect to {addr}: no handshake within {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("open stream: {0}")]
    Open(#[from] quinn::ConnectionError),
    #[error("stream: {0}")]
    Frame(#[from] FrameError),
}

impl TransportError {
    /// True if the same operation may succeed later or on another node.
    pub fn retryable(&self) -> bool {
        !matches!(self, TransportError::Tls(_) | TransportError::Bind { .. })
    }
}

/// The server's `Error` message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({code:?})")]
pub struct RemoteError {
    pub code: sidecar::error::Code,
    pub message: String,
    /// The server says the same request may succeed if sent again.
    pub retryable: bool,
}

impl From<sidecar::Error> for RemoteError {
    fn from(e: sidecar::Error) -> Self {
        RemoteError {
            code: sidecar::error::Code::try_from(e.code).unwrap_or(sidecar::error::Code::Unknown),
            message: e.message,
            retryable: e.retryable,
        }
    }
}

impl RemoteError {
    /// Codes that mean "this request will never succeed as sent": a bad or
    /// expired token, a scope violation, a malformed request.
    pub fn is_refusal(&self) -> bool {
        use sidecar::error::Code;
        matches!(
            self.code,
            Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument
        )
    }
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        IDLE_TIMEOUT_MS,
    ))));
    Arc::new(t)
}

/// A quinn client config trusting `ca_pem`, presenting `cert` = (cert PEM,
/// key PEM) if given (without one, only join streams are allowed), with
/// ALPN `trellis/1`.
pub fn quic_client_config(
    ca_pem: &str,
    cert: Option<(&str, &str)>,
) -> Result<quinn::ClientConfig, TransportError> {
    let tls = trellis_identity::client_config(ca_pem, cert, &[trellis_identity::ALPN_SIDECAR])
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config());
    Ok(config)
}

/// A client endpoint bound to `bind` whose default config is
/// [`quic_client_config`]`(ca_pem, cert)`.
pub fn client_endpoint_on(
    bind: SocketAddr,
    ca_pem: &str,
    cert: Option<(&str, &str)>,
) -> Result<quinn::Endpoint, TransportError> {
    let config = quic_client_config(ca_pem, cert)?;
    let mut endpoint = quinn::Endpoint::client(bind)
        .map_err(|source| TransportError::Bind { addr: bind, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// A client endpoint on `127.0.0.1:0` (for tests and benchmarks on
/// loopback; see [`client_endpoint_on`] for `[::1]:0` or other binds).
/// Many [`crate::WatchSession`]s can share it.
pub fn client_endpoint(
    ca_pem: &str,
    cert: Option<(&str, &str)>,
) -> Result<quinn::Endpoint, TransportError> {
    client_endpoint_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), ca_pem, cert)
}

/// A client endpoint suited to reaching `target`: bound to the loopback
/// address of its family (`127.0.0.1:0` / `[::1]:0`) for a loopback target,
/// else to the unspecified address of its family.
pub fn client_endpoint_for(
    target: &SocketAddr,
    ca_pem: &str,
    cert: Option<(&str, &str)>,
) -> Result<quinn::Endpoint, TransportError> {
    let ip = match (target.ip(), target.ip().is_loopback()) {
        (IpAddr::V4(_), true) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        (IpAddr::V6(_), true) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        (IpAddr::V4(_), false) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (IpAddr::V6(_), false) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    client_endpoint_on(SocketAddr::new(ip, 0), ca_pem, cert)
}

/// The TLS server name for a node: its IP literal.
pub fn server_name(addr: &SocketAddr) -> String {
    addr.ip().to_string()
}

/// `host:port` to an address (the first one, for DNS names).
pub async fn resolve(seed: &str) -> Result<SocketAddr, TransportError> {
    if let Ok(a) = seed.parse::<SocketAddr>() {
        return Ok(a);
    }
    let mut addrs = tokio::net::lookup_host(seed)
        .await
        .map_err(|e| TransportError::Resolve {
            seed: seed.to_string(),
            reason: e.to_string(),
        })?;
    addrs.next().ok_or_else(|| TransportError::Resolve {
        seed: seed.to_string(),
        reason: "no addresses".into(),
    })
}

/// Connects to `addr` with `config` (or the endpoint's default), verifying
/// the node's certificate for `server_name`, within `timeout`.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    config: Option<quinn::ClientConfig>,
    addr: SocketAddr,
    server_name: &str,
    timeout: Duration,
) -> Result<quinn::Connection, TransportError> {
    let connecting = match config {
        Some(c) => endpoint.connect_with(c, addr, server_name),
        None => endpoint.connect(addr, server_name),
    }
    .map_err(|e| TransportError::Connect {
        addr,
        reason: e.to_string(),
    })?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(TransportError::Connect {
            addr,
            reason: e.to_string(),
        }),
        Err(_) => Err(TransportError::ConnectTimeout { addr, timeout }),
    }
}

/// Opens a bidirectional stream and sends its `Open` frame.
pub async fn open_stream(
    conn: &quinn::Connection,
    open: &Open,
) -> Result<(quinn::SendStream, quinn::RecvStream), TransportError> {
    let (mut send, recv) = conn.open_bi().await?;
    write_frame(&mut send, open).await?;
    Ok((send, recv))
}

/// One client endpoint per address family, created on first use and
/// shared by every connection the sidecar makes (the TLS config is chosen
/// per connection, so a renewed certificate needs no new endpoint).
#[derive(Debug, Default)]
pub struct Endpoints {
    v4: Mutex<Option<quinn::Endpoint>>,
    v6: Mutex<Option<quinn::Endpoint>>,
}

impl Endpoints {
    /// The endpoint to reach `target` from (bound to the unspecified
    /// address of its family, port 0).
    pub fn for_target(&self, target: &SocketAddr) -> Result<quinn::Endpoint, TransportError> {
        let (slot, bind) = match target.ip() {
            IpAddr::V4(_) => (&self.v4, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))),
            IpAddr::V6(_) => (&self.v6, SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))),
        };
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = slot.as_ref() {
            return Ok(e.clone());
        }
        let e = quinn::Endpoint::client(bind)
            .map_err(|source| TransportError::Bind { addr: bind, source })?;
        *slot = Some(e.clone());
        Ok(e)
    }

    /// Closes every endpoint's connections and waits (at most `grace`) for
    /// the close frames to go out.
    pub async fn shutdown(&self, grace: Duration) {
        let all: Vec<quinn::Endpoint> = [&self.v4, &self.v6]
            .iter()
            .filter_map(|m| m.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect();
        for e in &all {
            e.close(quinn::VarInt::from_u32(0), b"sidecar shutting down");
        }
        for e in all {
            let _ = tokio::time::timeout(grace, e.wait_idle()).await;
        }
    }
}
