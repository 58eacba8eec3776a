//! Opaque TCP through the sidecar pair. The client sidecar opens an HTTP/2
//! `CONNECT <service>.<ns>:<port>` stream on its pooled mutual-TLS
//! connection to the chosen instance's sidecar ([`Upstreams::tunnel`]);
//! that sidecar dials its application and, once connected, answers 200 and
//! splices the two. So TCP gets the same identity check, pooling and
//! certificate rotation as HTTP, and needs no second port.
//!
//! ```text
//! client ──TCP──► outbound (forward listener, or intercepted + detected)
//!   1. route      Route `tcp` rule for the port → weighted destination,
//!                 else every instance of the Service (route::decide_tcp)
//!   2. balance    the destination policy's balancer (balance.rs)
//!   3. tunnel     CONNECT over HTTP/2 + mTLS; a connect failure or a
//!                 refused tunnel tries one other endpoint (nothing was
//!                 sent yet), then gives up and closes the client
//!   4. splice     bytes both ways until either side closes; counted live
//! peer sidecar ──CONNECT──► inbound
//!   5. dial       the app (app_addr); failure → 502 with x-trellis-error
//!   6. splice     200, then bytes both ways
//! ```
//!
//! Intercepted connections whose original destination is no mesh service
//! are passed through to that destination unchanged ([`passthrough`]).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use hyper::body::Incoming;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::access_log::{self, Entry};
use super::balance;
use super::body::{full, ProxyBody};
use super::circuit;
use super::error::ProxyError;
use super::metrics::{self, Direction, TcpConnGuard, TcpLabels};
use super::outlier::Observed;
use super::route;
use super::upstream::CONNECT_TIMEOUT;
use super::{Inbound, Outbound};

/// Endpoints tried for one connection: the pick, then one other if the
/// first could not be reached (as a TCP client would retry a refused
/// connect elsewhere).
pub const CONNECT_ATTEMPTS: usize = 2;

/// TCP keepalive on proxied sockets: a peer or app host that vanishes
/// without a reset is found within about a minute (idle 30 s, then 3
/// probes 10 s apart) instead of holding a tunnel and its task forever.
pub const TCP_KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
/// Interval between keepalive probes.
pub const TCP_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Turns on TCP keepalive ([`TCP_KEEPALIVE_IDLE`]) and no-delay; failures
/// only lose the early detection, so they are ignored.
pub(crate) fn tune_socket(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL);
    let _ = socket2::SockRef::from(s).set_tcp_keepalive(&ka);
}

/// The destination label of passed-through connections.
pub const PASSTHROUGH: &str = "passthrough";

/// A stream that counts bytes into a connection's series as they move:
/// reads from it were sent to the far side, writes to it came from there.
struct Counted<'a, S> {
    inner: S,
    conn: &'a TcpConnGuard,
    read: u64,
    written: u64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.read += n;
            self.conn.series().bytes(n, 0);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
            self.conn.series().bytes(0, n as u64);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The start time for the access log, formatted only when it is on.
fn log_time(log: &access_log::AccessLog) -> String {
    if log.enabled() {
        access_log::now_rfc3339()
    } else {
        String::new()
    }
}

/// What a finished splice reports.
#[derive(Default)]
struct Spliced {
    sent: u64,
    received: u64,
    error: Option<String>,
}

/// Copies both ways between `near` (counted) and `far` until both sides
/// are done or one fails.
async fn splice<A, B>(near: A, mut far: B, conn: &TcpConnGuard) -> Spliced
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut near = Counted {
        inner: near,
        conn,
        read: 0,
        written: 0,
    };
    let error = tokio::io::copy_bidirectional(&mut near, &mut far)
        .await
        .err()
        .map(|e| e.to_string());
    Spliced {
        sent: near.read,
        received: near.written,
        error,
    }
}

#[allow(clippy::too_many_arguments)]
fn log_entry(
    direction: Direction,
    start: (String, Instant),
    source: &str,
    destination: &str,
    authority: Option<String>,
    upstream: Option<String>,
    done: &Spliced,
    error: Option<String>,
) -> Entry {
    Entry {
        start_time: start.0,
        direction: direction.as_str(),
        protocol: "TCP",
        method: None,
        authority,
        path: None,
        code: 0,
        duration_us: start.1.elapsed().as_micros() as u64,
        source: source.to_string(),
        destination: destination.to_string(),
        route: route::NO_RULE.to_string(),
        upstream,
        retries: 0,
        resilience: Vec::new(),
        error: error.or_else(|| done.error.clone()),
        trace_id: None,
        span_id: None,
        parent_span_id: None,
        bytes_sent: Some(done.sent),
        bytes_received: Some(done.received),
    }
}

/// Proxies `client`'s connection to service `name` in `ns` on `port`
/// through a peer sidecar (steps 1-4). Never fails loudly: a connection
/// that cannot be routed is logged and closed.
pub async fn outbound<S>(out: &Outbound, client: S, name: &str, ns: &str, port: u16)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let start = (log_time(&out.access_log), Instant::now());
    let cfg = Arc::clone(&out.config.borrow());
    let notes = out.outlier_returns();
    // One access-log line either way: the spliced connection, or the
    // refusal (counted as a connection that moved no bytes).
    let (destination, upstream, done, error) = match connect(out, &cfg, name, ns, port).await {
        Ok((far, ep, destination, conn, _guard, _permit)) => {
            let done = splice(client, far, &conn).await;
            (destination, Some(ep.to_string()), done, None)
        }
        Err((destination, e)) => {
            tracing::info!(service = %name, namespace = %ns, port, error = %e,
                "outbound TCP connection refused");
            drop(out.metrics.tcp_open(&TcpLabels {
                direction: Direction::Outbound,
                source: out.source.clone(),
                destination: destination.clone(),
            }));
            (destination, None, Spliced::default(), Some(e.to_string()))
        }
    };
    let mut line = log_entry(
        Direction::Outbound,
        start,
        &out.source,
        &destination,
        Some(format!("{name}.{ns}:{port}")),
        upstream,
        &done,
        error,
    );
    line.resilience = notes;
    out.access_log.log(line);
}

type Connected = (
    TokioIo<hyper::upgrade::Upgraded>,
    SocketAddr,
    String,
    TcpConnGuard,
    balance::InFlightGuard,
    Option<circuit::Permit>,
);

/// Steps 1-3; on failure, the destination label and the reason.
async fn connect(
    out: &Outbound,
    cfg: &crate::mesh::MeshConfig,
    name: &str,
    ns: &str,
    port: u16,
) -> Result<Connected, (String, ProxyError)> {
    let target = route::decide_tcp(cfg, name, ns, port).map_err(|e| (format!("{ns}/{name}"), e))?;
    let subset = target.subset.unwrap_or("-");
    let destination = format!("{}/{}/{subset}", target.namespace, target.service);
    let fail = |e: ProxyError| (destination.clone(), e);
    let policy = cfg
        .destination_policy(target.namespace, target.service)
        .map(|(_, p)| p);
    let service_key = format!("{}/{}", target.namespace, target.service);
    // maxConnections: each proxied TCP connection holds one unit.
    let permit = out
        .circuits
        .acquire(
            &service_key,
            policy.and_then(|p| p.connection_pool.as_ref()),
            circuit::Limit::Connections,
        )
        .map_err(|o| {
            out.metrics
                .event(metrics::Event::CircuitOpen(o.limit), &service_key);
            fail(ProxyError::CircuitOpen {
                service: target.service.to_string(),
                limit: o.limit,
                max: o.max,
            })
        })?;
    out.health
        .note_destination(target.namespace, target.service);
    let pool = balance::endpoints(cfg, &target, &out.view()).map_err(fail)?;
    let eps = pool.endpoints;
    let expected = out.expected_identity(&target, &service_key).map_err(fail)?;
    let lb = policy.and_then(|p| p.load_balancer.as_ref());
    let outlier = policy.and_then(|p| p.outlier_detection.as_ref());
    let authority = format!("{}.{}:{port}", target.service, target.namespace);
    let mut tried: Vec<SocketAddr> = Vec::new();
    loop {
        let fresh: Vec<balance::Endpoint> = eps
            .iter()
            .copied()
            .filter(|e| !tried.contains(&e.addr))
            .collect();
        let (ep, guard) = out
            .balancer
            .pick(lb, &destination, &fresh, &HeaderMap::new())
            .ok_or_else(|| {
                fail(ProxyError::NoHealthyEndpoint {
                    service: target.service.to_string(),
                    subset: subset.to_string(),
                })
            })?;
        let r = tokio::time::timeout(
            CONNECT_TIMEOUT * 2,
            out.upstreams.tunnel(ep, &expected, &authority),
        )
        .await;
        let reason = match r {
            Ok(Ok(io)) => {
                if let Some(o) = outlier {
                    out.observe(&service_key, ep, Observed::Success, o, pool.size);
                }
                let conn = out.metrics.tcp_open(&TcpLabels {
                    direction: Direction::Outbound,
                    source: out.source.clone(),
                    destination: destination.clone(),
                });
                return Ok((io, ep, destination, conn, guard, permit));
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "tunnel not established in time".to_string(),
        };
        if let Some(o) = outlier {
            out.observe(&service_key, ep, Observed::GatewayError, o, pool.size);
        }
        tried.push(ep);
        if tried.len() >= CONNECT_ATTEMPTS || tried.len() >= eps.len() {
            return Err(fail(ProxyError::Connect {
                service: target.service.to_string(),
                subset: subset.to_string(),
                endpoint: ep.to_string(),
                reason,
            }));
        }
        tracing::debug!(endpoint = %ep, reason = %reason, "TCP tunnel failed; trying another endpoint");
    }
}

/// An intercepted connection to a destination outside the mesh: straight
/// to `dst`, unchanged (the sidecar's own traffic is not intercepted).
pub async fn passthrough<S>(out: &Outbound, client: S, dst: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let start = (log_time(&out.access_log), Instant::now());
    let conn = out.metrics.tcp_open(&TcpLabels {
        direction: Direction::Outbound,
        source: out.source.clone(),
        destination: PASSTHROUGH.to_string(),
    });
    let (done, error) = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
        Ok(Ok(far)) => {
            tune_socket(&far);
            (splice(client, far, &conn).await, None)
        }
        Ok(Err(e)) => (Spliced::default(), Some(format!("connect {dst}: {e}"))),
        Err(_) => (
            Spliced::default(),
            Some(format!("connect {dst}: timed out")),
        ),
    };
    drop(conn);
    out.access_log.log(log_entry(
        Direction::Outbound,
        start,
        &out.source,
        PASSTHROUGH,
        Some(dst.to_string()),
        Some(dst.to_string()),
        &done,
        error,
    ));
}

/// Steps 5-6: a peer's `CONNECT` becomes a connection to the app. The 200
/// goes back only once the app accepted, so a caller never sees a tunnel
/// to nowhere.
pub async fn inbound(
    inb: &Arc<Inbound>,
    req: Request<Incoming>,
    source: String,
) -> Response<ProxyBody> {
    let start = (log_time(&inb.access_log), Instant::now());
    let authority = req.uri().authority().map(|a| a.to_string());
    let app = inb.app_addr;
    let app_conn = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(app)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return inb.app_unreachable(e.to_string()),
        Err(_) => return inb.app_unreachable("connect timed out".into()),
    };
    tune_socket(&app_conn);
    let inb = Arc::clone(inb);
    tokio::spawn(async move {
        let peer = match hyper::upgrade::on(req).await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                return;
            }
        };
        let destination = inb.destination.clone();
        let conn = inb.metrics.tcp_open(&TcpLabels {
            direction: Direction::Inbound,
            source: source.clone(),
            destination: destination.clone(),
        });
        let done = splice(peer, app_conn, &conn).await;
        drop(conn);
        inb.access_log.log(log_entry(
            Direction::Inbound,
            start,
            &source,
            &destination,
            authority,
            Some(app.to_string()),
            &done,
            None,
        ));
    });
    let mut r = Response::new(full(hyper::body::Bytes::new()));
    *r.status_mut() = StatusCode::OK;
    r
}
