//! The outbound listener: the application's calls to other services, plain
//! HTTP/1.1 or HTTP/2 prior knowledge (one listener, detected per
//! connection by hyper-util's auto server), the target service as `Host` or
//! `:authority`. Each request goes through the path written in
//! [`crate::proxy`] and out over a pooled HTTP/2 mTLS connection to the
//! chosen instance's sidecar.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, HOST};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;
use trellis_identity::Identity;

use super::balance::{self, InFlight};
use super::body::{full, ProxyBody};
use super::error::{is_grpc, ProxyError};
use super::headers;
use super::metrics::{Direction, Metrics};
use super::route::{self, Decision};
use super::tls::TlsSource;
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
    /// This instance's labels, for `sourceLabels` matches.
    pub labels: BTreeMap<String, String>,
    /// Requests in flight per endpoint.
    pub inflight: InFlight,
    /// Pooled connections to peer sidecars.
    pub upstreams: Upstreams,
    /// The identity (for the trust domain of expected peer IDs).
    pub tls: Arc<TlsSource>,
    /// Request counters.
    pub metrics: Arc<Metrics>,
}

/// Accepts on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, out: Arc<Outbound>, mut shutdown: Shutdown) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "outbound accept failed");
                    if shutdown.sleep(std::time::Duration::from_millis(100)).await {
                        return;
                    }
                    continue;
                }
            },
            _ = shutdown.wait() => return,
        };
        let _ = stream.set_nodelay(true);
        let out = Arc::clone(&out);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let out = Arc::clone(&out);
                async move { Ok::<_, Infallible>(out.handle(req).await) }
            });
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(peer = %peer, error = %e, "outbound connection ended with an error");
            }
        });
    }
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

impl Outbound {
    /// One request, start to end; errors become responses here via
    /// [`ProxyError::into_response`].
    pub async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let grpc = is_grpc(req.headers());
        let host = host_of(&req).unwrap_or_default();
        let span = tracing::debug_span!("outbound", method = %req.method(), host = %host, path = %req.uri().path());
        // The destination as metrics name it: the host until one is chosen.
        let mut destination = host.clone();
        let resp = match self
            .forward(req, host, &mut destination)
            .instrument(span)
            .await
        {
            Ok(r) => r,
            Err(e) => e.into_response(grpc),
        };
        self.metrics
            .request(Direction::Outbound, &destination, resp.status().as_u16());
        resp
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        host: String,
        destination: &mut String,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if host.is_empty() {
            return Err(ProxyError::NoHost);
        }
        // One snapshot for the whole request: no locks held, no torn view.
        let cfg = Arc::clone(&self.config.borrow());
        let (mut parts, body) = req.into_parts();
        let target = match route::decide(&cfg, &host, &self.namespace, &parts, &self.labels)? {
            Decision::Forward(t) => t,
            Decision::Degrade(d) => return Ok(degrade_response(d)),
        };
        let subset = target.subset.unwrap_or("-");
        *destination = format!("{}/{subset}", target.service);
        let endpoints = balance::endpoints(&cfg, &target)?;
        let (ep, guard) =
            self.inflight
                .pick(&endpoints)
                .ok_or_else(|| ProxyError::NoHealthyEndpoint {
                    service: target.service.to_string(),
                    subset: subset.to_string(),
                })?;
        let trust_domain = self
            .tls
            .current()
            .map_err(|_| ProxyError::NoIdentity)?
            .info
            .trust_domain
            .clone();
        let expected = Identity::Workload {
            namespace: target.namespace.to_string(),
            service: target.service.to_string(),
        }
        .to_spiffe(&trust_domain);

        // HTTP/1.1 or HTTP/2 in, HTTP/2 out: absolute URI carries the
        // authority (restored as Host at the far side).
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(host.as_str())
            .path_and_query(pq)
            .build()
            .map_err(|_| ProxyError::NoHost)?;
        parts.version = Version::HTTP_2;
        headers::strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(HOST);
        if let Some(ops) = target.headers.and_then(|h| h.request.as_ref()) {
            headers::apply(ops, &mut parts.headers);
        }
        let upstream_req = Request::from_parts(parts, body.boxed());

        let sent = tokio::time::timeout(
            target.timeout,
            self.upstreams.send(ep, &expected, upstream_req),
        )
        .await;
        let resp = match sent {
            Err(_) => {
                return Err(ProxyError::Timeout {
                    service: target.service.to_string(),
                    subset: subset.to_string(),
                    timeout_ms: target.timeout.as_millis() as u64,
                })
            }
            Ok(Err(UpstreamError::Connect(reason))) => {
                return Err(ProxyError::Connect {
                    service: target.service.to_string(),
                    subset: subset.to_string(),
                    endpoint: ep.to_string(),
                    reason,
                })
            }
            Ok(Err(UpstreamError::Reset(reason))) => {
                return Err(ProxyError::Reset {
                    service: target.service.to_string(),
                    subset: subset.to_string(),
                    endpoint: ep.to_string(),
                    reason,
                })
            }
            Ok(Ok(r)) => r,
        };
        let (mut rparts, rbody) = resp.into_parts();
        if let Some(ops) = target.headers.and_then(|h| h.response.as_ref()) {
            headers::apply(ops, &mut rparts.headers);
        }
        // The endpoint counts as busy until the body is done.
        let body = rbody
            .map_frame(move |f| {
                let _ = &guard;
                f
            })
            .boxed();
        Ok(Response::from_parts(rparts, body))
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
