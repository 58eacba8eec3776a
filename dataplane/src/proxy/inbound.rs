//! The inbound listener: peer sidecars connect with mutual TLS (client
//! certificate required, chained to the cluster CA, else the handshake
//! fails) and speak HTTP/2. Each request goes to the local application
//! (`app_addr`) over a pooled connection:
//!
//! * in the HTTP version the app speaks: the protocol this sidecar's
//!   `Service` declares for the port (the request authority's port, or the
//!   only port): `http` → HTTP/1.1, `http2`/`grpc` → HTTP/2 (h2c prior
//!   knowledge); when the Service says nothing, the version the caller's
//!   application used: a request the calling sidecar marked
//!   `x-trellis-orig-proto: HTTP/1.1` is restored to HTTP/1.1, anything
//!   else (HTTP/2, gRPC) stays HTTP/2;
//! * with `x-trellis-source` set to the caller's verified SPIFFE ID and
//!   `traceparent` continued with this hop's span;
//! * a `CONNECT` stream is a TCP tunnel ([`super::tcp::inbound`]).
//!
//! Connection limits ([`super::conn`]): at most `max_inbound_connections`
//! at once (more are closed right after accept: a fast, visible refusal
//! the calling sidecar can retry elsewhere, rather than a connect that
//! hangs in the listen backlog); the TLS handshake within
//! `tls_handshake_timeout`; the HTTP/2 preface and first request's headers
//! within `request_header_timeout` after it (a peer that trickles bytes is
//! dropped); then closed with GOAWAY after `idle_timeout` without a request
//! in flight. A CONNECT tunnel counts as in flight only until its 200: an
//! idle GOAWAY leaves open tunnels running to their end (the caller's pool
//! opens a new connection for new requests).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, Request, Response, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::Instrument;

use super::access_log::{self, AccessLog, HttpLine};
use super::app_pool::AppPool;
use super::body::ProxyBody;
use super::conn::{self, Limits};
use super::drain::{Drain, DrainToken};
use super::error::{is_grpc, ProxyError};
use super::headers;
use super::metrics::{Direction, Metrics, RequestLabels};
use super::route::NO_RULE;
use super::tls::TlsSource;
use super::{tcp, trace};
use crate::shutdown::Shutdown;

/// The header carrying the verified caller identity to the application.
/// (Header names are statics: a `HeaderName` skips parsing the name on
/// every request.)
pub static SOURCE_HEADER: HeaderName = HeaderName::from_static("x-trellis-source");
/// Set by the calling sidecar on requests its application sent as
/// HTTP/1.x, so this side restores HTTP/1.1; never reaches the app.
pub static ORIG_PROTO_HEADER: HeaderName = HeaderName::from_static("x-trellis-orig-proto");

/// Everything the inbound path shares.
#[derive(Debug)]
pub struct Inbound {
    /// Server configs from the current identity.
    pub tls: Arc<TlsSource>,
    /// The local application.
    pub app_addr: SocketAddr,
    /// This sidecar's namespace and service (named in errors).
    pub namespace: String,
    pub service: String,
    /// The compiled config (this service's declared port protocols).
    pub config: tokio::sync::watch::Receiver<Arc<crate::mesh::MeshConfig>>,
    /// This sidecar's service as metrics name it: `namespace/service`.
    pub destination: String,
    /// Pooled HTTP/1.1 and HTTP/2 (h2c) connections to the application.
    pub app: Arc<AppPool>,
    /// Request counters.
    pub metrics: Arc<Metrics>,
    /// The JSON access log (maybe disabled).
    pub access_log: AccessLog,
    /// Live connections, for the drain at shutdown.
    pub drain: Drain,
    /// Connection limits (deadlines, idle timeout, header sizes, the cap).
    pub limits: Arc<Limits>,
}

impl Inbound {
    /// An inbound path forwarding to `app_addr`, with the default
    /// connection limits ([`Inbound::with_limits`] sets others).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tls: Arc<TlsSource>,
        app_addr: SocketAddr,
        namespace: &str,
        service: String,
        config: tokio::sync::watch::Receiver<Arc<crate::mesh::MeshConfig>>,
        metrics: Arc<Metrics>,
        access_log: AccessLog,
        drain: Drain,
    ) -> Self {
        let limits = Arc::new(Limits::default());
        let app = AppPool::new(app_addr, &limits);
        Inbound {
            tls,
            app_addr,
            destination: format!("{namespace}/{service}"),
            namespace: namespace.to_string(),
            service,
            config,
            app,
            metrics,
            access_log,
            drain,
            limits,
        }
    }

    /// The same path under `limits` (the app clients' response header
    /// limits included).
    pub fn with_limits(mut self, limits: Arc<Limits>) -> Self {
        self.app = AppPool::new(self.app_addr, &limits);
        self.limits = limits;
        self
    }

    /// The protocol the Service declares for `port` (exactly that port;
    /// with `only_port`, the Service's only port when `port` is not one),
    /// and whether `port` itself is declared.
    fn declared_protocol(
        &self,
        port: Option<u16>,
        only_port: bool,
    ) -> (Option<trellis_resources::Protocol>, bool) {
        let cfg = self.config.borrow();
        let Some((_, svc)) = cfg.service(&self.namespace, &self.service) else {
            return (None, false);
        };
        match port.and_then(|p| svc.ports.iter().find(|x| x.port == p)) {
            Some(p) => (Some(p.protocol), true),
            None if only_port && svc.ports.len() == 1 => (Some(svc.ports[0].protocol), false),
            None => (None, false),
        }
    }

    /// The authority requests to the app carry over HTTP/2 (and as Host
    /// over HTTP/1.1 when the caller sent none): `service.namespace`, with
    /// the port only when the Service declares it (`port_declared`), so
    /// the app sees its own canonical name whatever the caller wrote.
    fn app_authority(&self, port: Option<u16>, port_declared: bool) -> String {
        match port.filter(|_| port_declared) {
            Some(p) => format!("{}.{}:{p}", self.service, self.namespace),
            None => format!("{}.{}", self.service, self.namespace),
        }
    }

    /// The answer when the app cannot be reached.
    pub(crate) fn app_unreachable(&self, reason: String) -> Response<ProxyBody> {
        ProxyError::Connect {
            service: self.service.clone(),
            subset: "-".into(),
            endpoint: self.app_addr.to_string(),
            reason,
        }
        .into_response(false)
    }
}

/// Accepts on `listener` until `shutdown`; open connections then finish
/// their streams (GOAWAY) under the drain. Beyond `max_inbound_connections`
/// open ones, a new connection is closed as soon as it is accepted.
pub async fn serve(listener: TcpListener, inbound: Arc<Inbound>, mut shutdown: Shutdown) {
    let slots = Arc::new(Semaphore::new(inbound.limits.max_inbound_connections));
    while let Some((stream, peer)) = super::outbound::accept(&listener, &mut shutdown).await {
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(peer = %peer,
                max = inbound.limits.max_inbound_connections,
                "inbound connection limit reached; closing the new connection");
            drop(stream);
            continue;
        };
        let inbound = Arc::clone(&inbound);
        let token = inbound.drain.token();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = connection(stream, peer, inbound, sd, token).await {
                tracing::debug!(peer = %peer, error = %e, "inbound connection refused or failed");
            }
        });
    }
}

/// `ns/svc` of a workload SPIFFE ID (`spiffe://<td>/ns/<ns>/svc/<svc>`), or
/// the ID itself.
fn source_name(spiffe: &str) -> String {
    let path = spiffe
        .strip_prefix("spiffe://")
        .and_then(|r| r.split_once('/'))
        .map(|(_, p)| p);
    match path.map(|p| p.split('/').collect::<Vec<_>>()).as_deref() {
        Some(["ns", ns, "svc", svc]) => format!("{ns}/{svc}"),
        _ => spiffe.to_string(),
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    inbound: Arc<Inbound>,
    shutdown: Shutdown,
    token: DrainToken,
) -> Result<(), String> {
    let _token = token;
    // The config of the certificate current *now*: rotation applies to new
    // connections, existing ones keep theirs.
    let cfg = inbound.tls.server_config().map_err(|e| e.to_string())?;
    let limits = Arc::clone(&inbound.limits);
    let tls = tokio::time::timeout(
        limits.tls_handshake_timeout,
        tokio_rustls::TlsAcceptor::from(cfg).accept(stream),
    )
    .await
    .map_err(|_| {
        format!(
            "TLS handshake timed out after {:?}",
            limits.tls_handshake_timeout
        )
    })?
    .map_err(|e| format!("TLS handshake: {e}"))?;
    let spiffe = {
        let (_, conn) = tls.get_ref();
        let chain = conn.peer_certificates().ok_or("no client certificate")?;
        trellis_identity::peer_cert_info(chain)
            .map_err(|e| e.to_string())?
            .spiffe_id
    };
    let source = Arc::new(Caller {
        header: HeaderValue::from_str(&spiffe).map_err(|e| e.to_string())?,
        name: source_name(&spiffe),
    });
    let span = tracing::debug_span!("inbound", peer = %peer, source = %spiffe);
    let svc = hyper::service::service_fn(move |req| {
        let inbound = Arc::clone(&inbound);
        let source = Arc::clone(&source);
        // Boxed once: hyper and conn::track move the request's future;
        // moving a pointer is cheaper than its kilobytes.
        Box::pin(async move { Ok::<_, Infallible>(inbound.handle(req, &source).await) })
    });
    // The first request's deadline runs from here: the handshake is done.
    let activity = conn::Activity::new();
    let conn = limits
        .http2_server()
        .serve_connection(TokioIo::new(tls), conn::track(svc, &activity));
    tokio::pin!(conn);
    conn::drive(
        conn,
        |c| c.graceful_shutdown(),
        &activity,
        Some(limits.request_header_timeout),
        limits.idle_timeout,
        shutdown,
    )
    .instrument(span)
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// The verified caller of a connection.
#[derive(Debug)]
pub struct Caller {
    /// Its SPIFFE ID, as the app sees it in `x-trellis-source`.
    pub header: HeaderValue,
    /// `ns/svc`, as metrics name it.
    pub name: String,
}

impl Inbound {
    /// One request from a peer sidecar to the application.
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        caller: &Caller,
    ) -> Response<ProxyBody> {
        if req.method() == Method::CONNECT {
            // Tunnels only to ports declared `tcp`: a raw stream to an HTTP
            // port would let the caller write its own x-trellis-source.
            let port = req.uri().port_u16();
            if self.declared_protocol(port, false).0 != Some(trellis_resources::Protocol::Tcp) {
                return ProxyError::Forbidden {
                    reason: format!(
                        "{}/{} declares no tcp port {}",
                        self.namespace,
                        self.service,
                        port.map_or("(none)".to_string(), |p| p.to_string())
                    ),
                }
                .into_response(false);
            }
            return tcp::inbound(self, req, caller.name.clone()).await;
        }
        let start = Instant::now();
        let logging = self.access_log.enabled();
        let start_time = if logging {
            access_log::now_rfc3339()
        } else {
            String::new()
        };
        let span = trace::Span::from_headers(req.headers());
        let (declared, port_declared) = self.declared_protocol(req.uri().port_u16(), true);
        let restore_h1 = match declared {
            Some(trellis_resources::Protocol::Http) => true,
            Some(trellis_resources::Protocol::Http2 | trellis_resources::Protocol::Grpc) => false,
            Some(trellis_resources::Protocol::Tcp) | None => {
                req.headers().contains_key(&ORIG_PROTO_HEADER)
            }
        };
        let logged = logging.then(|| {
            (
                req.method().to_string(),
                req.uri().authority().map(|a| a.to_string()),
                req.uri().path().to_string(),
            )
        });
        let tspan = tracing::debug_span!("inbound_request", method = %req.method(),
            path = %req.uri().path(), trace_id = %format_args!("{:032x}", span.trace_id),
            span_id = %format_args!("{:016x}", span.span_id));
        let resp = self
            .forward(req, caller, &span, restore_h1, port_declared)
            .instrument(tspan)
            .await;
        let code = resp.status().as_u16();
        let elapsed = start.elapsed();
        if let Some((method, authority, path)) = logged {
            self.access_log.log(
                HttpLine {
                    start_time,
                    direction: Direction::Inbound.as_str(),
                    protocol: if restore_h1 { "HTTP/1.1" } else { "HTTP/2" },
                    method,
                    authority,
                    path,
                    source: caller.name.clone(),
                    destination: self.destination.clone(),
                    route: NO_RULE.to_string(),
                    upstream: Some(self.app_addr.to_string()),
                    retries: 0,
                    notes: Vec::new(),
                }
                .finish(code, resp.headers(), elapsed, &span),
            );
        }
        self.metrics.request(
            &RequestLabels {
                direction: Direction::Inbound,
                source: caller.name.clone(),
                destination: self.destination.clone(),
                route: NO_RULE.to_string(),
                code,
            },
            elapsed,
        );
        resp
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        caller: &Caller,
        span: &trace::Span,
        restore_h1: bool,
        port_declared: bool,
    ) -> Response<ProxyBody> {
        let grpc = is_grpc(req.headers());
        let (mut parts, body) = req.into_parts();
        if restore_h1 {
            // HTTP/1.1 keeps the Host the caller used, else its :authority
            // (the pool sends the request in origin form and moves the
            // authority into Host), else the canonical app authority.
            if !parts.headers.contains_key(HOST) && parts.uri.authority().is_none() {
                let host = self.app_authority(parts.uri.port_u16(), port_declared);
                if let Ok(v) = HeaderValue::from_str(&host) {
                    parts.headers.insert(HOST, v);
                }
            }
        } else {
            // HTTP/2's :authority is the canonical app authority.
            let pq = parts.uri.path_and_query().cloned();
            let uri = Uri::builder()
                .scheme("http")
                .authority(self.app_authority(parts.uri.port_u16(), port_declared))
                .path_and_query(pq.unwrap_or_else(|| PathAndQuery::from_static("/")))
                .build();
            let Ok(uri) = uri else {
                return ProxyError::NoHost.into_response(grpc);
            };
            parts.uri = uri;
        }
        headers::strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(&ORIG_PROTO_HEADER);
        parts.headers.insert(&SOURCE_HEADER, caller.header.clone());
        span.propagate(&mut parts.headers);
        let sent = if restore_h1 {
            parts.version = Version::HTTP_11;
            self.app
                .send_http1(Request::from_parts(parts, body.boxed()))
                .await
        } else {
            // HTTP/2 to the app keeps gRPC (trailers, streams) intact; the
            // Host header is the :authority there.
            parts.version = Version::HTTP_2;
            parts.headers.remove(HOST);
            self.app
                .send_http2(Request::from_parts(parts, body.boxed()))
                .await
        };
        match sent {
            Ok(resp) => resp,
            Err(e) => ProxyError::from_app(&e, &self.service, self.app_addr).into_response(grpc),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_names() {
        assert_eq!(
            source_name("spiffe://trellis.local/ns/default/svc/productpage"),
            "default/productpage"
        );
        assert_eq!(source_name("spiffe://x/node/3"), "spiffe://x/node/3");
    }
}
