//! The outbound listener: the application's calls to other services.
//!
//! A connection arrives either addressed to the listener itself (the
//! "protocol conversion" style: the target service is the `Host` /
//! `:authority`) or redirected by iptables (transparent interception; the
//! original destination comes from `SO_ORIGINAL_DST`, [`super::orig_dst`]).
//! Per connection ([`Outbound::connection`]):
//!
//! 1. an intercepted connection to a mesh service ([`mesh_destination`]:
//!    a loopback or instance address, on a port exactly one `Service` of
//!    the namespace declares) takes that port's protocol: `tcp` goes to
//!    the TCP path ([`super::tcp`]) without reading a byte,
//!    `http`/`http2`/`grpc` to HTTP; otherwise the first bytes decide
//!    ([`super::detect`]);
//! 2. HTTP/1.1 and HTTP/2 (prior knowledge) are served by hyper-util's auto
//!    server, each request through the path written in [`crate::proxy`];
//!    an intercepted request whose host is no mesh service goes to the
//!    service of its original destination, or, when that is outside the
//!    mesh, to the original destination unchanged ([`Passthrough`]);
//! 3. opaque TCP goes to the service of the original destination port, or
//!    through unchanged when that is no mesh service; on a connection that
//!    was not intercepted it has no destination and is closed.
//!
//! Dedicated TCP listeners (`tcp_forward` in the config) skip all of this:
//! every connection goes to their one service and port ([`serve_tcp`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::Either;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Bytes, Incoming};
use hyper::header::{HeaderValue, HOST};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::Instrument;
use trellis_resources::policy::{
    BackupRequest, ConnectionPool, LoadBalancer, OutlierDetection, RetryBudget,
};
use trellis_resources::Protocol;

use super::access_log::{self, AccessLog, HttpLine};
use super::backup::{self, Latencies};
use super::balance::{self, Balancer, InFlightGuard, View};
use super::body::{full, ProxyBody};
use super::circuit::{self, Circuits, Limit};
use super::conn::Limits;
use super::detect::{self, Rewind};
use super::drain::{Drain, DrainToken};
use super::error::{is_grpc, ProxyError};
use super::fault;
use super::headers;
use super::health_check::HealthChecks;
use super::inbound::ORIG_PROTO_HEADER;
use super::locality::ZONE_LABEL;
use super::metrics::{Direction, Event, Metrics, RequestLabels};
use super::orig_dst;
use super::outlier::{self, Observed, Outliers};
use super::retry::{self, Outcome, ReplayPlan, RetryBudgets};
use super::route::{self, Decision, Target};
use super::tcp;
use super::tls::TlsSource;
use super::trace;
use super::upstream::{UpstreamError, Upstreams};
use crate::mesh::MeshConfig;
use crate::shutdown::Shutdown;

/// Everything the outbound path shares across requests.
#[derive(Debug)]
pub struct Outbound {
    /// The compiled config; each request takes one snapshot.
    pub config: watch::Receiver<Arc<MeshConfig>>,
    /// The caller's namespace (hosts without `.ns` resolve here).
    pub namespace: String,
    /// The caller as metrics name it: `namespace/service`.
    pub source: String,
    /// This instance's labels, for `sourceLabels` matches.
    pub labels: BTreeMap<String, String>,
    /// In-flight counts and balancer state (shared with `/endpoints`).
    pub balancer: Arc<Balancer>,
    /// Pooled connections to peer sidecars.
    pub upstreams: Upstreams,
    /// The identity (for the trust domain of expected peer IDs).
    pub tls: Arc<TlsSource>,
    /// Request counters.
    pub metrics: Arc<Metrics>,
    /// Retry budgets per destination service.
    pub retry_budgets: RetryBudgets,
    /// The JSON access log (maybe disabled).
    pub access_log: AccessLog,
    /// Live connections, for the drain at shutdown.
    pub drain: Drain,
    /// Clients for intercepted HTTP to destinations outside the mesh.
    pub passthrough: Passthrough,
    /// Endpoints failing active health checks (left out of balancing).
    pub health: Arc<HealthChecks>,
    /// Outlier-detection state per endpoint.
    pub outliers: Outliers,
    /// Circuit-breaker counts per destination service.
    pub circuits: Circuits,
    /// Latency histograms per destination service (backup requests).
    pub latencies: Latencies,
    /// Backup-request budgets per destination service.
    pub backup_budgets: RetryBudgets,
    /// Connection limits of the listener (deadlines, idle timeout, header
    /// sizes).
    pub limits: Arc<Limits>,
}

/// What the request path knows about a connection.
#[derive(Debug, Default)]
pub struct ConnCtx {
    /// The mesh service of an intercepted connection's original
    /// destination ([`mesh_destination`]).
    pub service: Option<String>,
    /// The original destination, if the connection was intercepted.
    pub orig: Option<SocketAddr>,
}

/// The mesh service an intercepted connection to `d` is for: the one
/// Service of namespace `ns` declaring `d`'s port, if `d` is a loopback
/// address (the app dials `127.0.0.1:<service port>`) or the address of one
/// of that service's instances. A port alone does not capture traffic to
/// other hosts (an external database on the same port stays external).
pub fn mesh_destination(cfg: &MeshConfig, ns: &str, d: SocketAddr) -> Option<(String, Protocol)> {
    let (svc, protocol) = cfg.service_for_port(ns, d.port())?;
    let ours = d.ip().is_loopback() || cfg.instances(ns, svc).any(|(_, i)| i.address == d.ip());
    ours.then(|| (svc.to_string(), protocol))
}

/// HTTP clients for intercepted requests whose host is no mesh service:
/// they go to the original destination unchanged (no mTLS, no routing), in
/// the HTTP version they came in.
#[derive(Debug)]
pub struct Passthrough {
    http1: Client<HttpConnector, ProxyBody>,
    http2: Client<HttpConnector, ProxyBody>,
}

impl Default for Passthrough {
    fn default() -> Self {
        let mut c = HttpConnector::new();
        c.set_nodelay(true);
        c.set_connect_timeout(Some(super::upstream::CONNECT_TIMEOUT));
        Passthrough {
            http1: Client::builder(TokioExecutor::new()).build(c.clone()),
            http2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(c),
        }
    }
}

impl Passthrough {
    async fn forward(
        &self,
        mut parts: hyper::http::request::Parts,
        body: Incoming,
        orig: SocketAddr,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let authority = parts.uri.authority().map(|a| a.as_str().to_string());
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(orig.to_string())
            .path_and_query(pq)
            .build()
            .map_err(|_| ProxyError::NoHost)?;
        headers::strip_hop_by_hop(&mut parts.headers);
        let client = if parts.version == Version::HTTP_2 {
            &self.http2
        } else {
            if !parts.headers.contains_key(HOST) {
                if let Some(v) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
                    parts.headers.insert(HOST, v);
                }
            }
            parts.version = Version::HTTP_11;
            &self.http1
        };
        let resp = client
            .request(Request::from_parts(parts, body.boxed()))
            .await
            .map_err(|e| ProxyError::from_client(&e, tcp::PASSTHROUGH, orig))?;
        Ok(resp.map(|b| b.boxed()))
    }
}

/// A dedicated TCP listener's destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpForward {
    pub service: String,
    pub namespace: String,
    pub port: u16,
}

/// Accepts until `shutdown`, then lets open connections finish (see
/// [`super::drain`]).
pub async fn serve(listener: TcpListener, out: Arc<Outbound>, mut shutdown: Shutdown) {
    while let Some((stream, peer)) = accept(&listener, &mut shutdown).await {
        let out = Arc::clone(&out);
        let token = out.drain.token();
        let sd = shutdown.clone();
        tokio::spawn(async move { out.connection(stream, peer, sd, token).await });
    }
}

/// Accepts on a `tcp_forward` listener until `shutdown`: every connection
/// goes to `to`.
pub async fn serve_tcp(
    listener: TcpListener,
    out: Arc<Outbound>,
    to: TcpForward,
    mut shutdown: Shutdown,
) {
    let to = Arc::new(to);
    while let Some((stream, _)) = accept(&listener, &mut shutdown).await {
        let out = Arc::clone(&out);
        let to = Arc::clone(&to);
        let token = out.drain.token();
        tokio::spawn(async move {
            let _token = token;
            tcp::outbound(&out, stream, &to.service, &to.namespace, to.port).await;
        });
    }
}

/// The next connection, or `None` at shutdown.
pub(crate) async fn accept(
    listener: &TcpListener,
    shutdown: &mut Shutdown,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, peer)) => {
                    tcp::tune_socket(&s);
                    return Some((s, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    if shutdown.sleep(std::time::Duration::from_millis(100)).await {
                        return None;
                    }
                }
            },
            _ = shutdown.wait() => return None,
        }
    }
}

/// Serves HTTP on `io` with `svc` until the client is done, or (at
/// shutdown) until the requests in progress are. Under `limits`
/// ([`super::conn`]): HTTP/1 headers within
/// `request_header_timeout` (hyper closes the connection otherwise, also
/// when a keep-alive connection waits that long for its next request) and
/// within the header size limits (431); HTTP/2 keepalive pings and
/// `max_header_list_size`; closed gracefully after `idle_timeout` without
/// a request in flight.
pub(crate) async fn serve_http<I, S>(
    io: I,
    svc: S,
    limits: &Limits,
    shutdown: Shutdown,
) -> Result<(), String>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ProxyBody>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let builder: auto::Builder<TokioExecutor> = limits.auto_server();
    let activity = super::conn::Activity::new();
    let conn = builder.serve_connection(TokioIo::new(io), super::conn::track(svc, &activity));
    tokio::pin!(conn);
    super::conn::drive(
        conn,
        |c| c.graceful_shutdown(),
        &activity,
        None,
        limits.idle_timeout,
        shutdown,
    )
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// The request's host: the URI authority (HTTP/2, absolute form) or the
/// `Host` header.
fn host_of(req: &Request<Incoming>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_string());
    }
    req.headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
        .map(str::to_string)
}

fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// The destination label of requests that found no route.
pub const UNROUTED: &str = "unknown";

/// What a request became, for its metrics and access-log line.
struct Done {
    destination: String,
    rule: String,
    upstream: Option<SocketAddr>,
    retries: u32,
    /// Resilience events of this request (fault delay, backup, outlier
    /// ejections and returns), for the access log.
    notes: Vec<String>,
}

/// Why one try got no response.
#[derive(Debug)]
enum TryError {
    /// `maxPendingRequests` was full.
    Circuit(ProxyError),
    Upstream(UpstreamError),
}

/// What every try of one request shares.
struct TryCtx<'a> {
    /// `namespace/service`.
    service_key: &'a str,
    service: &'a str,
    limits: Option<&'a ConnectionPool>,
    /// The SPIFFE ID the endpoints must prove.
    expected: &'a str,
    outlier: Option<&'a OutlierDetection>,
    /// Registered-healthy instances of the service.
    pool_size: usize,
    /// Learn answer latencies (the destination has backup requests).
    learn_latency: bool,
    /// Outlier events of the tries, for the access-log line.
    notes: Mutex<Vec<String>>,
}

/// One try's result, the endpoint that answered, and the in-flight guard
/// of a backup that answered.
type Tried = (
    Result<Response<Incoming>, TryError>,
    SocketAddr,
    Option<InFlightGuard>,
);

impl Outbound {
    /// One accepted connection (steps 1-3 of the module doc).
    async fn connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        shutdown: Shutdown,
        token: DrainToken,
    ) {
        let _token = token;
        let orig = orig_dst::original_dst(&stream);
        let declared = orig.and_then(|d| {
            let cfg = self.config.borrow();
            mesh_destination(&cfg, &self.namespace, d)
        });
        let protocol = match (&declared, orig) {
            (Some((svc, Protocol::Tcp)), Some(d)) => {
                let ns = self.namespace.clone();
                return tcp::outbound(&self, stream, svc, &ns, d.port()).await;
            }
            (Some(_), _) => None,
            (None, _) => {
                let quiet = if orig.is_some() {
                    detect::DETECT_TIMEOUT
                } else {
                    detect::IDLE_BEFORE_FIRST_BYTES
                };
                match detect::detect(&mut stream, quiet).await {
                    Ok(p) => Some(p),
                    Err(e) => {
                        tracing::debug!(peer = %peer, error = %e, "outbound connection lost during detection");
                        return;
                    }
                }
            }
        };
        let (protocol, prefix) = protocol.unwrap_or((detect::Protocol::Http1, Bytes::new()));
        let io = Rewind::new(prefix, stream);
        if protocol == detect::Protocol::Opaque {
            match (declared, orig) {
                (Some((svc, _)), Some(d)) => {
                    let ns = self.namespace.clone();
                    tcp::outbound(&self, io, &svc, &ns, d.port()).await;
                }
                (None, Some(d)) => tcp::passthrough(&self, io, d).await,
                (_, None) => tracing::info!(peer = %peer,
                    "closing a non-HTTP connection to the outbound listener: opaque TCP needs interception or a tcp_forward listener"),
            }
            return;
        }
        let conn = Arc::new(ConnCtx {
            service: declared.map(|(svc, _)| svc),
            orig,
        });
        let out = Arc::clone(&self);
        let svc = hyper::service::service_fn(move |req| {
            let out = Arc::clone(&out);
            let conn = Arc::clone(&conn);
            // Boxed once: hyper and conn::track move the request's
            // future; moving a pointer is cheaper than its kilobytes.
            Box::pin(async move { Ok::<_, Infallible>(out.handle(req, &conn).await) })
        });
        if let Err(e) = serve_http(io, svc, &self.limits, shutdown).await {
            tracing::debug!(peer = %peer, error = %e, "outbound connection ended with an error");
        }
    }

    /// The SPIFFE ID the destination's sidecars must present;
    /// `service_key` is `namespace/service`.
    pub(crate) fn expected_identity(
        &self,
        target: &Target<'_>,
        service_key: &str,
    ) -> Result<Arc<str>, ProxyError> {
        self.tls
            .peer_id(service_key, target.namespace, target.service)
            .map_err(|_| ProxyError::NoIdentity)
    }

    /// One request, start to end; errors become responses here via
    /// [`ProxyError::into_response`]. `conn` says whether the connection
    /// was intercepted, and where to.
    pub async fn handle(&self, req: Request<Incoming>, conn: &ConnCtx) -> Response<ProxyBody> {
        let start = Instant::now();
        let logging = self.access_log.enabled();
        let start_time = if logging {
            access_log::now_rfc3339()
        } else {
            String::new()
        };
        let grpc = is_grpc(req.headers());
        let host = host_of(&req).unwrap_or_default();
        let span = trace::Span::from_headers(req.headers());
        let logged = logging.then(|| {
            (
                req.method().to_string(),
                req.uri().path().to_string(),
                protocol_name(req.version()),
            )
        });
        let tspan = tracing::debug_span!("outbound", method = %req.method(), host = %host,
            path = %req.uri().path(), trace_id = %format_args!("{:032x}", span.trace_id),
            span_id = %format_args!("{:016x}", span.span_id));
        let mut done = Done {
            // Until a route is chosen: a fixed label, so hosts the app
            // makes up cannot create metric series without bound.
            destination: UNROUTED.to_string(),
            rule: route::NO_RULE.to_string(),
            upstream: None,
            retries: 0,
            notes: self.outlier_returns(),
        };
        let resp = match self
            .forward(req, &host, conn, &span, &mut done)
            .instrument(tspan)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let mut r = e.into_response(grpc);
                if done.retries > 0 {
                    r.headers_mut()
                        .insert(retry::RETRIES_HEADER, HeaderValue::from(done.retries));
                }
                r
            }
        };
        let code = resp.status().as_u16();
        let elapsed = start.elapsed();
        if let Some((method, path, protocol)) = logged {
            self.access_log.log(
                HttpLine {
                    start_time,
                    direction: Direction::Outbound.as_str(),
                    protocol,
                    method,
                    authority: Some(host),
                    path,
                    source: self.source.clone(),
                    destination: done.destination.clone(),
                    route: done.rule.clone(),
                    upstream: done.upstream.map(|u| u.to_string()),
                    retries: done.retries,
                    notes: std::mem::take(&mut done.notes),
                }
                .finish(code, resp.headers(), elapsed, &span),
            );
        }
        self.metrics.request(
            &RequestLabels {
                direction: Direction::Outbound,
                source: self.source.clone(),
                destination: done.destination,
                route: done.rule,
                code,
            },
            elapsed,
        );
        resp
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        host: &str,
        conn: &ConnCtx,
        span: &trace::Span,
        done: &mut Done,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if host.is_empty() && conn.service.is_none() && conn.orig.is_none() {
            return Err(ProxyError::NoHost);
        }
        if req.method() == hyper::Method::CONNECT {
            return Err(ProxyError::Unsupported {
                what: "CONNECT on the outbound listener".into(),
            });
        }
        // One snapshot for the whole request: no locks held, no torn view.
        let cfg = Arc::clone(&self.config.borrow());
        let (mut parts, body) = req.into_parts();
        let decided = match route::decide(&cfg, host, &self.namespace, &parts, &self.labels) {
            Err(ProxyError::NoRoute { .. } | ProxyError::NoHost) => {
                match (&conn.service, conn.orig) {
                    // Intercepted to a mesh service's port: that service.
                    (Some(svc), _) => {
                        route::decide(&cfg, svc, &self.namespace, &parts, &self.labels)
                    }
                    // Intercepted to somewhere outside the mesh: as sent.
                    (None, Some(orig)) => {
                        done.destination = tcp::PASSTHROUGH.to_string();
                        done.upstream = Some(orig);
                        // Boxed: rare, and its client's state would
                        // otherwise enlarge every request's future.
                        return Box::pin(self.passthrough.forward(parts, body, orig)).await;
                    }
                    (None, None) => Err(ProxyError::NoRoute {
                        host: host.to_string(),
                    }),
                }
            }
            other => other,
        };
        let target = match decided? {
            Decision::Forward(t) => t,
            Decision::Degrade(d) => return Ok(degrade_response(d)),
        };
        let subset = target.subset.unwrap_or("-");
        done.destination = format!("{}/{}/{subset}", target.namespace, target.service);
        done.rule = target.rule.to_string();
        let service_key = format!("{}/{}", target.namespace, target.service);
        // Step 3b: fault injection, before anything touches the service.
        if let Some(f) = target.fault {
            let injected = fault::draw(f);
            if let Some(d) = injected.delay {
                self.metrics.event(Event::FaultDelay, &service_key);
                done.notes.push(format!("fault delay {} ms", d.as_millis()));
                tokio::time::sleep(d).await;
            }
            if let Some(abort) = injected.abort {
                self.metrics.event(Event::FaultAbort, &service_key);
                return Err(ProxyError::FaultAbort {
                    service: target.service.to_string(),
                    abort,
                });
            }
        }
        let policy_spec = cfg
            .destination_policy(target.namespace, target.service)
            .map(|(_, p)| p);
        // Only destinations with a check need noting (the first request
        // after a healthCheck appears notes it).
        if policy_spec.is_some_and(|p| p.health_check.is_some()) {
            self.health
                .note_destination(target.namespace, target.service);
        }
        let limits = policy_spec.and_then(|p| p.connection_pool.as_ref());
        let outlier = policy_spec.and_then(|p| p.outlier_detection.as_ref());
        // Step 3c: the circuit breaker's request limit, held until the
        // response body ends.
        let permit = self.admit(&service_key, target.service, limits, Limit::Requests)?;
        let pool = balance::endpoints(&cfg, &target, &self.view())?;
        let endpoints = &pool.endpoints;
        let lb = policy_spec.and_then(|p| p.load_balancer.as_ref());
        let no_endpoint = || ProxyError::NoHealthyEndpoint {
            service: target.service.to_string(),
            subset: subset.to_string(),
        };
        let (ep, guard) = self
            .balancer
            .pick(lb, &done.destination, endpoints, &parts.headers)
            .ok_or_else(no_endpoint)?;
        let expected = self.expected_identity(&target, &service_key)?;

        // HTTP/1.1 or HTTP/2 in, HTTP/2 out: absolute URI carries the
        // authority (restored as Host at the far side), and an HTTP/1.x
        // request says so, to be restored to HTTP/1.1 there.
        let authority = if host.is_empty() {
            target.service
        } else {
            host
        };
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(pq)
            .build()
            .map_err(|_| ProxyError::NoHost)?;
        headers::strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(HOST);
        parts.headers.remove(&ORIG_PROTO_HEADER);
        if parts.version < Version::HTTP_2 {
            parts
                .headers
                .insert(&ORIG_PROTO_HEADER, HeaderValue::from_static("HTTP/1.1"));
        }
        parts.version = Version::HTTP_2;
        span.propagate(&mut parts.headers);
        if let Some(ops) = target.headers.and_then(|h| h.request.as_ref()) {
            headers::apply(ops, &mut parts.headers);
        }
        // Backup requests (backup.rs): bodyless idempotent requests to a
        // destination with the policy, once its latency is known.
        let backup = policy_spec
            .and_then(|p| p.backup_request.as_ref())
            .filter(|_| body.is_end_stream() && backup::may_hedge(&parts.method));
        if backup.is_some() {
            self.backup_budgets.deposit(&service_key);
        }
        // Retries (retry.rs): a replayable body is buffered first; the
        // budget counts every request to the destination service.
        self.retry_budgets.deposit(&service_key);
        let policy = target.retries.filter(|p| p.attempts > 0);
        // The route timeout also bounds reading a body to buffer.
        let deadline = tokio::time::Instant::now() + target.timeout;
        let (mut once, replay) = match policy {
            Some(_)
                if retry::replay_plan(
                    &parts.method,
                    body.is_end_stream(),
                    body.size_hint().exact(),
                ) == ReplayPlan::Buffer =>
            {
                let read = tokio::time::timeout_at(deadline, retry::buffer(body))
                    .await
                    .map_err(|_| ProxyError::RequestBody {
                        reason: "timed out".into(),
                    })??;
                (None, Some(read))
            }
            _ => (Some(body.boxed()), None),
        };
        let budget = policy_spec.and_then(|p| p.retry_budget.as_ref());
        let ctx = TryCtx {
            service_key: &service_key,
            service: target.service,
            limits,
            expected: &expected,
            outlier,
            pool_size: pool.size,
            learn_latency: backup.is_some(),
            notes: Mutex::new(Vec::new()),
        };
        let mut ep = ep;
        let mut guard = guard;
        let mut failed: Vec<SocketAddr> = Vec::new();
        loop {
            done.upstream = Some(ep);
            let body = match &replay {
                Some(b) => full(b.clone()),
                None => once.take().unwrap_or_else(|| full(Bytes::new())),
            };
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let per_try = policy
                .and_then(|p| p.per_try_timeout)
                .map_or(remaining, |t| t.as_std().min(remaining));
            let hedge = backup.and_then(|b| {
                self.latencies
                    .hedge_delay(&service_key, b.after_percentile, b.min_delay.as_std())
                    .map(|after| (b, after))
            });
            // The request head is needed again only by a retry (which
            // needs a replayable body) or a backup: otherwise it moves.
            let head = if replay.is_none() && hedge.is_none() {
                std::mem::replace(&mut parts, Request::new(()).into_parts().0)
            } else {
                parts.clone()
            };
            let upstream_req = Request::from_parts(head, body);
            let primary = async { (self.try_endpoint(&ctx, ep, upstream_req).await, ep, None) };
            // Not an async block around `primary`: that would hold the
            // try's future twice (captured, then awaited).
            let attempt = match hedge {
                None => Either::Left(primary),
                Some((b, after)) => {
                    let start_backup =
                        || self.start_backup(&ctx, b, lb, &done.destination, endpoints, ep, &parts);
                    let good = |t: &Tried| t.0.as_ref().is_ok_and(|r| r.status().as_u16() < 500);
                    let service_key = &service_key;
                    // Boxed: two tries in one future, for the few requests
                    // that may hedge.
                    Either::Right(Box::pin(async move {
                        let raced = backup::race(primary, after, start_backup, good).await;
                        if raced.backup_won {
                            self.metrics.event(Event::BackupWon, service_key);
                        }
                        raced.answer
                    }))
                }
            };
            let sent = tokio::time::timeout(per_try, attempt).await;
            done.notes.extend(
                ctx.notes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .drain(..),
            );
            let (outcome, result) = match sent {
                Err(_) => {
                    let ejected = outlier.and_then(|o| {
                        self.observe(&service_key, ep, Observed::GatewayError, o, pool.size)
                    });
                    done.notes.extend(ejected.map(|e| e.to_string()));
                    // The rule's deadline, or only this try's.
                    let overall = per_try >= remaining;
                    let timeout = if overall { target.timeout } else { per_try };
                    let err = ProxyError::Timeout {
                        service: target.service.to_string(),
                        subset: subset.to_string(),
                        timeout_ms: timeout.as_millis() as u64,
                    };
                    if overall {
                        return Err(err);
                    }
                    (Outcome::Timeout, Err(err))
                }
                Ok((r, answered_by, backup_guard)) => {
                    if let Some(g) = backup_guard {
                        // The backup's answer: its endpoint is the one busy.
                        ep = answered_by;
                        guard = g;
                        done.upstream = Some(ep);
                        done.notes.push(format!("backup answered from {ep}"));
                    }
                    match r {
                        Err(TryError::Circuit(e)) => return Err(e),
                        Err(TryError::Upstream(UpstreamError::Connect(reason))) => (
                            Outcome::ConnectFailure,
                            Err(ProxyError::Connect {
                                service: target.service.to_string(),
                                subset: subset.to_string(),
                                endpoint: ep.to_string(),
                                reason,
                            }),
                        ),
                        Err(TryError::Upstream(
                            e @ (UpstreamError::Reset(_) | UpstreamError::Refused(_)),
                        )) => (
                            Outcome::Reset {
                                refused: matches!(e, UpstreamError::Refused(_)),
                            },
                            Err(ProxyError::Reset {
                                service: target.service.to_string(),
                                subset: subset.to_string(),
                                endpoint: ep.to_string(),
                                reason: e.to_string(),
                            }),
                        ),
                        Ok(r) => (
                            Outcome::of_response(r.status().as_u16(), r.headers()),
                            Ok(r),
                        ),
                    }
                }
            };
            let again = match policy {
                Some(p) if replay.is_some() && done.retries < p.attempts => {
                    retry::should_retry(p.effective_retry_on(), outcome)
                        && tokio::time::Instant::now() < deadline
                        && self.retry_budgets.withdraw(&service_key, budget)
                }
                _ => false,
            };
            if !again {
                let resp = result?;
                return Ok(self.respond(resp, &target, (guard, permit), done.retries));
            }
            done.retries += 1;
            self.metrics.retry(&done.destination);
            tracing::debug!(endpoint = %ep, ?outcome, retries = done.retries, "retrying");
            // A fresh pick, away from the endpoints that failed when
            // there are others.
            failed.push(ep);
            drop(result);
            let fresh: Vec<balance::Endpoint> = endpoints
                .iter()
                .copied()
                .filter(|e| !failed.contains(&e.addr))
                .collect();
            let candidates = if fresh.is_empty() { endpoints } else { &fresh };
            (ep, guard) = self
                .balancer
                .pick(lb, &done.destination, candidates, &parts.headers)
                .ok_or_else(no_endpoint)?;
        }
    }

    /// What this sidecar knows about endpoints beyond the registry (for
    /// [`balance::endpoints`]).
    pub(crate) fn view(&self) -> View<'_> {
        View {
            caller_zone: self.labels.get(ZONE_LABEL).map(String::as_str),
            health_checks: Some(&self.health),
            outliers: Some(&self.outliers),
        }
    }

    /// One unit of a circuit-breaker `limit` of `service_key`, or the 503
    /// that refuses the request (counted).
    fn admit(
        &self,
        service_key: &str,
        service: &str,
        limits: Option<&ConnectionPool>,
        limit: Limit,
    ) -> Result<Option<circuit::Permit>, ProxyError> {
        self.circuits
            .acquire(service_key, limits, limit)
            .map_err(|o| {
                self.metrics.event(Event::CircuitOpen(o.limit), service_key);
                ProxyError::CircuitOpen {
                    service: service.to_string(),
                    limit: o.limit,
                    max: o.max,
                }
            })
    }

    /// Step 7, one try: `req` to `ep` on the pooled connection (while that
    /// connection is being made, the request counts as pending,
    /// `maxPendingRequests`); the answer's latency is learnt for backup
    /// requests (answers below 500 only) and its outcome fed to outlier
    /// detection.
    async fn try_endpoint(
        &self,
        ctx: &TryCtx<'_>,
        ep: SocketAddr,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, TryError> {
        let start = ctx.learn_latency.then(Instant::now);
        let r = self.send_pooled(ctx, ep, req).await;
        if let (Some(start), Ok(resp)) = (start, &r) {
            if resp.status().as_u16() < 500 {
                self.latencies.of(ctx.service_key).record(start.elapsed());
            }
        }
        let observed = match &r {
            Ok(resp) => Some(Observed::of_status(resp.status().as_u16())),
            // Refused here, before the endpoint was tried.
            Err(TryError::Circuit(_)) => None,
            Err(TryError::Upstream(_)) => Some(Observed::GatewayError),
        };
        if let (Some(o), Some(observed)) = (ctx.outlier, observed) {
            if let Some(e) = self.observe(ctx.service_key, ep, observed, o, ctx.pool_size) {
                ctx.notes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(e.to_string());
            }
        }
        r
    }

    async fn send_pooled(
        &self,
        ctx: &TryCtx<'_>,
        ep: SocketAddr,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, TryError> {
        if ctx.limits.is_some_and(|l| l.max_pending_requests.is_some())
            && !self.upstreams.is_connected(ep, ctx.expected)
        {
            let _pending = self
                .admit(ctx.service_key, ctx.service, ctx.limits, Limit::Pending)
                .map_err(TryError::Circuit)?;
            self.upstreams
                .connect_to(ep, ctx.expected)
                .await
                .map_err(TryError::Upstream)?;
        }
        self.upstreams
            .send(ep, ctx.expected, req)
            .await
            .map_err(TryError::Upstream)
    }

    /// The backup of a try to `primary`: another endpoint, if the budget
    /// and `maxConcurrentRequests` allow (a backup is one more request in
    /// flight while it runs); counted.
    #[allow(clippy::too_many_arguments)]
    fn start_backup<'a>(
        &'a self,
        ctx: &'a TryCtx<'a>,
        policy: &BackupRequest,
        lb: Option<&LoadBalancer>,
        destination: &str,
        endpoints: &[balance::Endpoint],
        primary: SocketAddr,
        parts: &hyper::http::request::Parts,
    ) -> Option<impl std::future::Future<Output = Tried> + 'a> {
        let others: Vec<balance::Endpoint> = endpoints
            .iter()
            .copied()
            .filter(|e| e.addr != primary)
            .collect();
        if others.is_empty() {
            return None;
        }
        let permit = self
            .circuits
            .acquire(ctx.service_key, ctx.limits, Limit::Requests)
            .ok()?;
        let budget = RetryBudget {
            percent: policy.max_percent,
            min_per_second: 0,
        };
        if !self.backup_budgets.withdraw(ctx.service_key, Some(&budget)) {
            return None;
        }
        let (bep, bguard) = self
            .balancer
            .pick(lb, destination, &others, &parts.headers)?;
        self.metrics.event(Event::BackupSent, ctx.service_key);
        tracing::debug!(primary = %primary, backup = %bep, "sending a backup request");
        let req = Request::from_parts(parts.clone(), full(Bytes::new()));
        Some(async move {
            let _permit = permit;
            (self.try_endpoint(ctx, bep, req).await, bep, Some(bguard))
        })
    }

    /// Records a try's result for outlier detection; returns the ejection
    /// it caused (counted and logged).
    pub(crate) fn observe(
        &self,
        service_key: &str,
        ep: SocketAddr,
        observed: Observed,
        cfg: &OutlierDetection,
        pool_size: usize,
    ) -> Option<outlier::Event> {
        let e = self
            .outliers
            .record(service_key, ep, observed, cfg, pool_size)?;
        self.metrics.event(Event::OutlierEjection, service_key);
        tracing::info!(destination = service_key, event = %e, "outlier ejected");
        Some(e)
    }

    /// Ejections that ended (noticed lazily, one atomic load when none):
    /// counted and logged; returned as notes for the access-log line.
    pub(crate) fn outlier_returns(&self) -> Vec<String> {
        self.outliers
            .returns()
            .into_iter()
            .map(|e| {
                if let outlier::Event::Returned { destination, .. } = &e {
                    self.metrics.event(Event::OutlierReturn, destination);
                }
                tracing::info!(event = %e, "outlier returned");
                e.to_string()
            })
            .collect()
    }

    /// Step 8: the rule's response header ops; the endpoint stays busy
    /// until the body is done.
    fn respond(
        &self,
        resp: Response<Incoming>,
        target: &Target<'_>,
        guard: (InFlightGuard, Option<circuit::Permit>),
        retries: u32,
    ) -> Response<ProxyBody> {
        let (mut rparts, rbody) = resp.into_parts();
        if let Some(ops) = target.headers.and_then(|h| h.response.as_ref()) {
            headers::apply(ops, &mut rparts.headers);
        }
        if retries > 0 {
            rparts
                .headers
                .insert(retry::RETRIES_HEADER, HeaderValue::from(retries));
        }
        let body = rbody
            .map_frame(move |f| {
                let _ = &guard;
                f
            })
            .boxed();
        Response::from_parts(rparts, body)
    }
}

/// A rule's local answer (the degrade switch).
fn degrade_response(d: &trellis_resources::route::Degrade) -> Response<ProxyBody> {
    let mut r = Response::new(full(d.body.clone()));
    *r.status_mut() = StatusCode::from_u16(d.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    for (k, v) in &d.headers {
        if let (Ok(n), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            r.headers_mut().append(n, v);
        }
    }
    r
}
