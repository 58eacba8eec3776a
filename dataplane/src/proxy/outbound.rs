//! The outbound listener: the application's calls to other services, plain
//! HTTP/1.1 or HTTP/2 prior knowledge (one listener, detected per
//! connection by hyper-util's auto server), the target service as `Host` or
//! `:authority`. Each request goes through the path written in
//! [`crate::proxy`] and out over a pooled HTTP/2 mTLS connection to the
//! chosen instance's sidecar.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::{Body as _, Bytes, Incoming};
use hyper::header::{HeaderValue, HOST};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;
use trellis_identity::Identity;

use super::balance::{self, InFlight, InFlightGuard};
use super::body::{full, ProxyBody};
use super::error::{is_grpc, ProxyError};
use super::headers;
use super::metrics::{Direction, Metrics};
use super::retry::{self, Outcome, ReplayPlan, RetryBudgets};
use super::route::{self, Decision, Target};
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
    /// Retry budgets per destination service.
    pub retry_budgets: RetryBudgets,
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
        let mut retried = 0;
        let resp = match self
            .forward(req, host, &mut destination, &mut retried)
            .instrument(span)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let mut r = e.into_response(grpc);
                if retried > 0 {
                    r.headers_mut()
                        .insert(retry::RETRIES_HEADER, HeaderValue::from(retried));
                }
                r
            }
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
        retried: &mut u32,
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
        let budget = cfg
            .destination_policy(target.namespace, target.service)
            .and_then(|(_, p)| p.retry_budget.as_ref());
        let mut ep = ep;
        let mut guard = guard;
        let mut failed: Vec<SocketAddr> = Vec::new();
        let mut retries: u32 = 0;
        loop {
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
                        *retried = retries;
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
                Some(p) if replay.is_some() && retries < p.attempts => {
                    retry::should_retry(p.effective_retry_on(), outcome)
                        && tokio::time::Instant::now() < deadline
                        && self.retry_budgets.withdraw(&budget_key, budget)
                }
                _ => false,
            };
            if !again {
                *retried = retries;
                let resp = result?;
                return Ok(self.respond(resp, &target, guard, retries));
            }
            retries += 1;
            self.metrics.retry(destination);
            tracing::debug!(endpoint = %ep, ?outcome, retries, "retrying");
            // A fresh pick, away from the endpoints that failed when
            // there are others.
            failed.push(ep);
            drop(result);
            let fresh: Vec<SocketAddr> = endpoints
                .iter()
                .copied()
                .filter(|e| !failed.contains(e))
                .collect();
            let candidates = if fresh.is_empty() { &endpoints } else { &fresh };
            (ep, guard) =
                self.inflight
                    .pick(candidates)
                    .ok_or_else(|| ProxyError::NoHealthyEndpoint {
                        service: target.service.to_string(),
                        subset: subset.to_string(),
                    })?;
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
