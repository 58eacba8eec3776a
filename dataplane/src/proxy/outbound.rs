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
use std::sync::Arc;
use std::time::Instant;

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
use trellis_identity::Identity;
use trellis_resources::Protocol;

use super::access_log::{self, AccessLog, HttpLine};
use super::balance::{self, Balancer, InFlightGuard};
use super::body::{full, ProxyBody};
use super::detect::{self, Rewind};
use super::drain::{Drain, DrainToken};
use super::error::{is_grpc, ProxyError};
use super::headers;
use super::health_check::HealthChecks;
use super::inbound::ORIG_PROTO_HEADER;
use super::metrics::{Direction, Metrics, RequestLabels};
use super::orig_dst;
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
/// shutdown) until the requests in progress are.
pub(crate) async fn serve_http<I, S>(io: I, svc: S, mut shutdown: Shutdown) -> Result<(), String>
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
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r.map_err(|e| e.to_string()),
        _ = shutdown.wait() => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await.map_err(|e| e.to_string())
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
}

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
            async move { Ok::<_, Infallible>(out.handle(req, &conn).await) }
        });
        if let Err(e) = serve_http(io, svc, shutdown).await {
            tracing::debug!(peer = %peer, error = %e, "outbound connection ended with an error");
        }
    }

    /// The SPIFFE ID the destination's sidecars must present.
    pub(crate) fn expected_identity(&self, target: &Target<'_>) -> Result<String, ProxyError> {
        let trust_domain = self
            .tls
            .current()
            .map_err(|_| ProxyError::NoIdentity)?
            .info
            .trust_domain
            .clone();
        Ok(Identity::Workload {
            namespace: target.namespace.to_string(),
            service: target.service.to_string(),
        }
        .to_spiffe(&trust_domain))
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
                        return self.passthrough.forward(parts, body, orig).await;
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
        let endpoints = balance::endpoints(&cfg, &target)?;
        let policy_spec = cfg
            .destination_policy(target.namespace, target.service)
            .map(|(_, p)| p);
        let lb = policy_spec.and_then(|p| p.load_balancer.as_ref());
        let no_endpoint = || ProxyError::NoHealthyEndpoint {
            service: target.service.to_string(),
            subset: subset.to_string(),
        };
        let (ep, guard) = self
            .balancer
            .pick(lb, &done.destination, &endpoints, &parts.headers)
            .ok_or_else(no_endpoint)?;
        let expected = self.expected_identity(&target)?;

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
        parts.headers.remove(ORIG_PROTO_HEADER);
        if parts.version < Version::HTTP_2 {
            parts
                .headers
                .insert(ORIG_PROTO_HEADER, HeaderValue::from_static("HTTP/1.1"));
        }
        parts.version = Version::HTTP_2;
        span.propagate(&mut parts.headers);
        if let Some(ops) = target.headers.and_then(|h| h.request.as_ref()) {
            headers::apply(ops, &mut parts.headers);
        }
        // Retries (retry.rs): a replayable body is buffered first; the
        // budget counts every request to the destination service.
        let budget_key = format!("{}/{}", target.namespace, target.service);
        self.retry_budgets.deposit(&budget_key);
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
        let mut ep = ep;
        let mut guard = guard;
        let mut failed: Vec<SocketAddr> = Vec::new();
        loop {
            done.upstream = Some(ep);
            let body = match &replay {
                Some(b) => full(b.clone()),
                None => once.take().unwrap_or_else(|| full(Bytes::new())),
            };
            let upstream_req = Request::from_parts(parts.clone(), body);
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let per_try = policy
                .and_then(|p| p.per_try_timeout)
                .map_or(remaining, |t| t.as_std().min(remaining));
            let sent =
                tokio::time::timeout(per_try, self.upstreams.send(ep, &expected, upstream_req))
                    .await;
            let (outcome, result) = match sent {
                Err(_) => {
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
                Ok(Err(UpstreamError::Connect(reason))) => (
                    Outcome::ConnectFailure,
                    Err(ProxyError::Connect {
                        service: target.service.to_string(),
                        subset: subset.to_string(),
                        endpoint: ep.to_string(),
                        reason,
                    }),
                ),
                Ok(Err(e @ (UpstreamError::Reset(_) | UpstreamError::Refused(_)))) => (
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
                Ok(Ok(r)) => (
                    Outcome::of_response(r.status().as_u16(), r.headers()),
                    Ok(r),
                ),
            };
            let again = match policy {
                Some(p) if replay.is_some() && done.retries < p.attempts => {
                    retry::should_retry(p.effective_retry_on(), outcome)
                        && tokio::time::Instant::now() < deadline
                        && self.retry_budgets.withdraw(&budget_key, budget)
                }
                _ => false,
            };
            if !again {
                let resp = result?;
                return Ok(self.respond(resp, &target, guard, done.retries));
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
            let candidates = if fresh.is_empty() { &endpoints } else { &fresh };
            (ep, guard) = self
                .balancer
                .pick(lb, &done.destination, candidates, &parts.headers)
                .ok_or_else(no_endpoint)?;
        }
    }

    /// Step 8: the rule's response header ops; the endpoint stays busy
    /// until the body is done.
    fn respond(
        &self,
        resp: Response<Incoming>,
        target: &Target<'_>,
        guard: InFlightGuard,
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
