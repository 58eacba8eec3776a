//! The inbound listener: peer sidecars connect with mutual TLS (client
//! certificate required, chained to the cluster CA, else the handshake
//! fails) and speak HTTP/2; each request is restored to HTTP/1.1 and
//! forwarded to the local application (`app_addr`) over a pooled
//! connection, with `x-trellis-source` set to the caller's verified SPIFFE
//! ID.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, HOST};
use hyper::{Request, Response, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::Instrument;

use super::body::ProxyBody;
use super::error::{is_grpc, ProxyError};
use super::headers;
use super::metrics::{Direction, Metrics};
use super::tls::TlsSource;
use crate::shutdown::Shutdown;

/// The header carrying the verified caller identity to the application.
pub const SOURCE_HEADER: &str = "x-trellis-source";
/// A peer has this long to finish the TLS handshake; a slow or silent
/// client must not hold a task and a socket forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything the inbound path shares.
#[derive(Debug)]
pub struct Inbound {
    /// Server configs from the current identity.
    pub tls: Arc<TlsSource>,
    /// The local application.
    pub app_addr: SocketAddr,
    /// This sidecar's service (named in errors).
    pub service: String,
    /// Pooled HTTP/1.1 connections to the application.
    pub client: Client<HttpConnector, ProxyBody>,
    /// Request counters.
    pub metrics: Arc<Metrics>,
}

impl Inbound {
    /// An inbound path forwarding to `app_addr`.
    pub fn new(
        tls: Arc<TlsSource>,
        app_addr: SocketAddr,
        service: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .build(http);
        Inbound {
            tls,
            app_addr,
            service,
            client,
            metrics,
        }
    }
}

/// Accepts on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, inbound: Arc<Inbound>, mut shutdown: Shutdown) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "inbound accept failed");
                    if shutdown.sleep(Duration::from_millis(100)).await {
                        return;
                    }
                    continue;
                }
            },
            _ = shutdown.wait() => return,
        };
        let _ = stream.set_nodelay(true);
        let inbound = Arc::clone(&inbound);
        tokio::spawn(async move {
            if let Err(e) = connection(stream, peer, inbound).await {
                tracing::debug!(peer = %peer, error = %e, "inbound connection refused or failed");
            }
        });
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    inbound: Arc<Inbound>,
) -> Result<(), String> {
    // The config of the certificate current *now*: rotation applies to new
    // connections, existing ones keep theirs.
    let cfg = inbound.tls.server_config().map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(cfg).accept(stream),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| format!("TLS handshake: {e}"))?;
    let source = {
        let (_, conn) = tls.get_ref();
        let chain = conn.peer_certificates().ok_or("no client certificate")?;
        trellis_identity::peer_cert_info(chain)
            .map_err(|e| e.to_string())?
            .spiffe_id
    };
    let source = HeaderValue::from_str(&source).map_err(|e| e.to_string())?;
    let span = tracing::debug_span!("inbound", peer = %peer, source = ?source);
    let svc = hyper::service::service_fn(move |req| {
        let inbound = Arc::clone(&inbound);
        let source = source.clone();
        async move { Ok::<_, Infallible>(inbound.handle(req, source).await) }
    });
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(tls), svc)
        .instrument(span)
        .await
        .map_err(|e| e.to_string())
}

impl Inbound {
    /// One request from a peer sidecar to the application.
    pub async fn handle(&self, req: Request<Incoming>, source: HeaderValue) -> Response<ProxyBody> {
        let resp = self.forward(req, source).await;
        self.metrics
            .request(Direction::Inbound, &self.service, resp.status().as_u16());
        resp
    }

    async fn forward(&self, req: Request<Incoming>, source: HeaderValue) -> Response<ProxyBody> {
        let grpc = is_grpc(req.headers());
        let (mut parts, body) = req.into_parts();
        // The authority the caller used becomes the Host header again.
        if !parts.headers.contains_key(HOST) {
            if let Some(a) = parts.uri.authority() {
                if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                    parts.headers.insert(HOST, v);
                }
            }
        }
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = Uri::builder()
            .scheme("http")
            .authority(self.app_addr.to_string())
            .path_and_query(pq)
            .build();
        let Ok(uri) = uri else {
            return ProxyError::NoHost.into_response(grpc);
        };
        parts.uri = uri;
        // Restored to HTTP/1.1 for the application (gRPC to the app, which
        // needs HTTP/2, is a later slice).
        parts.version = Version::HTTP_11;
        headers::strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(SOURCE_HEADER, source);
        let req = Request::from_parts(parts, body.boxed());
        match self.client.request(req).await {
            Ok(resp) => resp.map(|b| b.boxed()),
            Err(e) => {
                let reason = match std::error::Error::source(&e) {
                    Some(s) => format!("{e}: {s}"),
                    None => e.to_string(),
                };
                let err = if e.is_connect() {
                    ProxyError::Connect {
                        service: self.service.clone(),
                        subset: "-".into(),
                        endpoint: self.app_addr.to_string(),
                        reason,
                    }
                } else {
                    ProxyError::Reset {
                        service: self.service.clone(),
                        subset: "-".into(),
                        endpoint: self.app_addr.to_string(),
                        reason,
                    }
                };
                err.into_response(grpc)
            }
        }
    }
}
