//! Errors become responses here, and only here: every synthetic response
//! the data path produces comes from [`ProxyError::into_response`], with an
//! `x-trellis-error` header naming the cause and the service/subset, so
//! "why 503?" has an answer. gRPC callers (`content-type:
//! application/grpc...`) also get the matching `grpc-status` (and
//! `grpc-message`), because gRPC clients read those, not the HTTP status.

use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use super::body::{full, ProxyBody};
use super::fault::Abort;

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Abort::Http(s) => write!(f, "HTTP {s}"),
            Abort::Grpc(c) => write!(f, "grpc-status {c}"),
        }
    }
}

/// gRPC's mapping of an HTTP status a gRPC client receives to the status
/// code it reports (gRPC's "HTTP to gRPC status code mapping"), for
/// HTTP-status aborts answered to gRPC callers.
fn grpc_of_http(status: u16) -> u8 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

/// The header that says why the sidecar answered instead of the upstream.
pub const ERROR_HEADER: &str = "x-trellis-error";

/// Why a request could not be forwarded. `service`/`subset` name the
/// destination (`subset` is `-` for "all instances").
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request named no host (no `Host` header, no authority).
    #[error("request has no host")]
    NoHost,
    /// No Route and no Service for the host.
    #[error("no route for host {host}")]
    NoRoute { host: String },
    /// Routes exist for the host but none of their rules matches.
    #[error("no route rule matched for host {host}")]
    NoRuleMatched { host: String },
    /// The destination has no healthy instance (or the subset is unknown).
    #[error("no healthy endpoint for {service}/{subset}")]
    NoHealthyEndpoint { service: String, subset: String },
    /// The route's deadline passed before the upstream answered.
    #[error("upstream timeout after {timeout_ms} ms for {service}/{subset}")]
    Timeout {
        service: String,
        subset: String,
        timeout_ms: u64,
    },
    /// Could not connect (TCP, TLS, HTTP/2 handshake) to the endpoint.
    #[error("upstream connect failure for {service}/{subset} at {endpoint}: {reason}")]
    Connect {
        service: String,
        subset: String,
        endpoint: String,
        reason: String,
    },
    /// The upstream reset the stream or the connection broke mid-request.
    #[error("upstream reset for {service}/{subset} at {endpoint}: {reason}")]
    Reset {
        service: String,
        subset: String,
        endpoint: String,
        reason: String,
    },
    /// The caller's request body broke while it was being buffered for
    /// retries ([`super::retry`]).
    #[error("request body: {reason}")]
    RequestBody { reason: String },
    /// The request is not allowed here (e.g. a tunnel to a port that is
    /// not declared `tcp`).
    #[error("forbidden: {reason}")]
    Forbidden { reason: String },
    /// The outbound listener does not do this (e.g. HTTP/1.1 CONNECT).
    #[error("not supported: {what}")]
    Unsupported { what: String },
    /// This sidecar has no certificate yet (still joining).
    #[error("sidecar has no identity yet")]
    NoIdentity,
    /// A `connectionPool` limit of the destination is full
    /// ([`super::circuit`]): refused at once instead of queued.
    #[error("circuit open: {limit} of {max} reached for {service}")]
    CircuitOpen {
        service: String,
        limit: &'static str,
        max: u32,
    },
    /// The Route rule's fault injection aborted the request
    /// ([`super::fault`]); the destination was not called.
    #[error("fault injected: abort with {abort} for {service}")]
    FaultAbort { service: String, abort: Abort },
}

impl ProxyError {
    /// A hyper-util client's failure to get an answer from `endpoint` of
    /// `service`: [`ProxyError::Connect`] if it never connected, else
    /// [`ProxyError::Reset`]; the reason includes the cause.
    pub fn from_client(
        e: &hyper_util::client::legacy::Error,
        service: &str,
        endpoint: std::net::SocketAddr,
    ) -> ProxyError {
        ProxyError::upstream(e.is_connect(), e, service, endpoint)
    }

    /// The local app's failure to answer the inbound side (step 11), as
    /// [`ProxyError::from_client`] sorts it.
    pub fn from_app(
        e: &super::app_pool::AppError,
        service: &str,
        endpoint: std::net::SocketAddr,
    ) -> ProxyError {
        ProxyError::upstream(e.is_connect(), e, service, endpoint)
    }

    /// `Connect` or `Reset`, the reason being `e` and every cause under it
    /// that its message does not already include.
    fn upstream(
        connect: bool,
        e: &dyn std::error::Error,
        service: &str,
        endpoint: std::net::SocketAddr,
    ) -> ProxyError {
        let mut reason = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !reason.contains(&text) {
                reason = format!("{reason}: {text}");
            }
            cause = c.source();
        }
        let (service, subset, endpoint) =
            (service.to_string(), "-".to_string(), endpoint.to_string());
        if connect {
            ProxyError::Connect {
                service,
                subset,
                endpoint,
                reason,
            }
        } else {
            ProxyError::Reset {
                service,
                subset,
                endpoint,
                reason,
            }
        }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoHost | ProxyError::RequestBody { .. } => StatusCode::BAD_REQUEST,
            ProxyError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ProxyError::Unsupported { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::NoRoute { .. } | ProxyError::NoRuleMatched { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoHealthyEndpoint { .. }
            | ProxyError::NoIdentity
            | ProxyError::CircuitOpen { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::FaultAbort {
                abort: Abort::Http(s),
                ..
            } => StatusCode::from_u16(*s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            ProxyError::FaultAbort {
                abort: Abort::Grpc(_),
                ..
            } => StatusCode::OK,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Connect { .. } | ProxyError::Reset { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The gRPC status code matching [`ProxyError::status`] (gRPC's own
    /// HTTP-to-gRPC mapping: 404 UNIMPLEMENTED, 503/502 UNAVAILABLE, 504
    /// DEADLINE_EXCEEDED, 400 INTERNAL, 403 PERMISSION_DENIED, 405
    /// UNIMPLEMENTED).
    pub fn grpc_status(&self) -> u8 {
        match self {
            ProxyError::NoHost | ProxyError::RequestBody { .. } => 13,
            ProxyError::NoRoute { .. } | ProxyError::NoRuleMatched { .. } => 12,
            ProxyError::Forbidden { .. } => 7,
            ProxyError::Unsupported { .. } => 12,
            ProxyError::Timeout { .. } => 4,
            ProxyError::FaultAbort {
                abort: Abort::Grpc(c),
                ..
            } => *c,
            ProxyError::FaultAbort {
                abort: Abort::Http(s),
                ..
            } => grpc_of_http(*s),
            _ => 14,
        }
    }

    /// The response: status, `x-trellis-error: <cause>`, a text body with
    /// the same words, and for gRPC callers `grpc-status`/`grpc-message`.
    pub fn into_response(self, grpc: bool) -> Response<ProxyBody> {
        // An injected gRPC status is a gRPC answer whoever asked.
        let grpc = grpc
            || matches!(
                self,
                ProxyError::FaultAbort {
                    abort: Abort::Grpc(_),
                    ..
                }
            );
        let text = self.to_string();
        tracing::debug!(status = self.status().as_u16(), error = %text, "synthetic response");
        // Header values must be visible ASCII; names and reasons are, but
        // never fail here over a stray byte.
        let value = HeaderValue::from_str(&text)
            .unwrap_or_else(|_| HeaderValue::from_static("invalid error text"));
        // gRPC: a trailers-only response, no body (a text body would be
        // read as a malformed message).
        let body = if grpc {
            full(Bytes::new())
        } else {
            full(format!("{text}\n"))
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = if grpc { StatusCode::OK } else { self.status() };
        let h = resp.headers_mut();
        h.insert(ERROR_HEADER, value.clone());
        if grpc {
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert(
                "grpc-status",
                HeaderValue::from(u16::from(self.grpc_status())),
            );
            h.insert("grpc-message", value);
        } else {
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
        }
        resp
    }
}

/// True if the request is gRPC (its errors need `grpc-status`).
pub fn is_grpc(headers: &hyper::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_has_its_status_and_header() {
        let e = ProxyError::NoHealthyEndpoint {
            service: "reviews".into(),
            subset: "v2".into(),
        };
        let r = e.into_response(false);
        assert_eq!(r.status(), 503);
        assert_eq!(
            r.headers()[ERROR_HEADER],
            "no healthy endpoint for reviews/v2"
        );
        let r = ProxyError::NoRoute { host: "x".into() }.into_response(true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "12");
        assert_eq!(r.headers()[ERROR_HEADER], "no route for host x");
        let r = ProxyError::Timeout {
            service: "a".into(),
            subset: "-".into(),
            timeout_ms: 5,
        }
        .into_response(false);
        assert_eq!(r.status(), 504);
        let r = ProxyError::CircuitOpen {
            service: "reviews".into(),
            limit: "maxConcurrentRequests",
            max: 3,
        }
        .into_response(false);
        assert_eq!(r.status(), 503);
        assert_eq!(
            r.headers()[ERROR_HEADER],
            "circuit open: maxConcurrentRequests of 3 reached for reviews"
        );
        let abort = |abort| ProxyError::FaultAbort {
            service: "reviews".into(),
            abort,
        };
        let r = abort(Abort::Http(418)).into_response(false);
        assert_eq!(r.status(), 418);
        assert_eq!(
            r.headers()[ERROR_HEADER],
            "fault injected: abort with HTTP 418 for reviews"
        );
        let r = abort(Abort::Http(503)).into_response(true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "14");
        // A gRPC abort is a gRPC answer even to a plain HTTP caller.
        let r = abort(Abort::Grpc(8)).into_response(false);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "8");
    }
}
