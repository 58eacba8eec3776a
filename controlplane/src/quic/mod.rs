//! The sidecars' QUIC endpoint (quinn + rustls, mutual TLS, ALPN
//! `trellis/1`): the protocol of `proto/trellis/sidecar/v1/sidecar.proto`.
//!
//! [`spawn`] binds the endpoint on `quic_addr` and runs one task per
//! connection ([`serve_connection`]) and one per stream. The handshake
//! verifies a client certificate against the cluster CA when one is
//! presented (only workload identities, `ns/<ns>/svc/<svc>`, are served;
//! node and admin certificates are turned away); a connection without one may only `join` (token + CSR), and
//! is refused everything else with UNAUTHENTICATED. Each stream's first
//! frame (`Open`) picks its handler:
//!
//! | stream | handler | needs a certificate |
//! |---|---|---|
//! | join | [`crate::ca::join`] | no (the token authenticates) |
//! | renew | [`crate::ca::renew`] | yes; re-issues the same identity |
//! | watch | [`watch::serve`] | yes |
//! | session | [`session::serve`] | yes; registers the certificate's own service |
//!
//! Connected sidecars are tracked in [`registry::SidecarRegistry`] for
//! `trellisctl proxy-status`. Errors reach the sidecar as one `Error`
//! frame, converted in one place ([`ApiError::to_sidecar`]).

pub mod registry;
pub mod session;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use rustls::pki_types::CertificateDer;
use tokio::sync::watch as tokio_watch;
use tokio::task::JoinHandle;
use trellis_identity::{CertInfo, Identity};
use trellis_proto::frame::{read_frame, write_frame};
use trellis_proto::sidecar as sc;

use crate::error::ApiError;
use crate::node::Node;

/// Largest `Open` frame: a join carries a token and a CSR, a session an
/// instance with labels; 64 KiB is generous for all of them.
const MAX_OPEN_FRAME: usize = 64 * 1024;
/// Connections idle this long are closed. Sidecars send keepalives much
/// more often (and pick a shorter timeout themselves to notice a dead node
/// fast); this bounds what a vanished sidecar costs the node.
const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams a sidecar may have open at once: watch + session + renewals,
/// with room for a few resumed watches.
const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// How long the first frame of a stream may take to arrive.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("QUIC TLS config: {0}")]
    Tls(String),
    #[error("QUIC endpoint: {0}")]
    Io(#[from] std::io::Error),
}

/// Start the endpoint on `socket`; it stops when `shutdown` turns true.
pub fn spawn(
    node: Arc<Node>,
    socket: std::net::UdpSocket,
    tls: rustls::ServerConfig,
    mut shutdown: tokio_watch::Receiver<bool>,
) -> Result<(JoinHandle<()>, SocketAddr), QuicError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(SERVER_IDLE_TIMEOUT.try_into().map_err(
            |e: quinn::VarIntBoundsExceeded| QuicError::Tls(e.to_string()),
        )?))
        .max_concurrent_bidi_streams(MAX_STREAMS_PER_CONNECTION.into())
        .max_concurrent_uni_streams(0u32.into());
    server.transport_config(Arc::new(transport));
    let endpoint = Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let addr = endpoint.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let node = node.clone();
                    tokio::spawn(async move {
                        let remote = incoming.remote_address();
                        match incoming.await {
                            Ok(conn) => serve_connection(node, conn).await,
                            Err(e) => tracing::debug!(%remote, error = %e, "QUIC handshake failed"),
                        }
                    });
                }
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        endpoint.close(0u32.into(), b"control node shutting down");
        endpoint.wait_idle().await;
    });
    Ok((task, addr))
}

/// The verified identity of a connection's client certificate, if any.
fn peer(conn: &Connection) -> Option<Result<CertInfo, String>> {
    let any = conn.peer_identity()?;
    let chain = match any.downcast::<Vec<CertificateDer<'static>>>() {
        Ok(chain) => chain,
        Err(_) => return Some(Err("unexpected peer identity type".into())),
    };
    Some(trellis_identity::peer_cert_info(&chain).map_err(|e| e.to_string()))
}

#[tracing::instrument(level = "info", skip_all, fields(remote = %conn.remote_address(), peer))]
async fn serve_connection(node: Arc<Node>, conn: Connection) {
    let identity = match peer(&conn) {
        None => None,
        Some(Ok(info)) if matches!(info.identity, Identity::Workload { .. }) => {
            Some(Arc::new(info))
        }
        Some(Ok(info)) => {
            tracing::info!(identity = %info.identity, "non-workload certificate on the sidecar port");
            conn.close(
                2u32.into(),
                b"the sidecar endpoint takes workload certificates only",
            );
            return;
        }
        Some(Err(e)) => {
            tracing::info!(error = %e, "client certificate without a usable identity");
            conn.close(1u32.into(), b"client certificate has no Trellis identity");
            return;
        }
    };
    let spiffe = identity
        .as_ref()
        .map_or(String::new(), |i| i.spiffe_id.clone());
    tracing::Span::current().record("peer", spiffe.as_str());
    let registration = identity.as_ref().map(|i| {
        node.sidecars
            .connect(i.spiffe_id.clone(), conn.remote_address().to_string())
    });
    let conn_id = registration.as_ref().map_or(0, |r| r.id);
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(reason = %e, "connection ended");
                break;
            }
        };
        let node = node.clone();
        let identity = identity.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            serve_stream(node, conn, conn_id, identity, send, recv).await;
        });
    }
    drop(registration);
}

/// How long an error frame may take to be taken by the sidecar.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The answer frame for an error on each kind of stream (given up after
/// [`REFUSE_TIMEOUT`]: a sidecar that does not read gets a reset).
async fn refuse(send: &mut SendStream, open: &Option<sc::open::Kind>, err: &ApiError) {
    if tokio::time::timeout(REFUSE_TIMEOUT, refuse_frame(send, open, err))
        .await
        .is_err()
    {
        let _ = send.reset(0u32.into());
    }
}

async fn refuse_frame(send: &mut SendStream, open: &Option<sc::open::Kind>, err: &ApiError) {
    let error = err.to_sidecar();
    let result = match open {
        Some(sc::open::Kind::Join(_)) | Some(sc::open::Kind::Renew(_)) => {
            write_frame(
                send,
                &sc::CertificateResponse {
                    result: Some(sc::certificate_response::Result::Error(error)),
                },
            )
            .await
        }
        Some(sc::open::Kind::Session(_)) => {
            write_frame(
                send,
                &sc::SessionMessage {
                    kind: Some(sc::session_message::Kind::Error(error)),
                },
            )
            .await
        }
        Some(sc::open::Kind::Watch(_)) | None => {
            write_frame(
                send,
                &sc::WatchMessage {
                    node_id: 0,
                    kind: Some(sc::watch_message::Kind::Error(error)),
                },
            )
            .await
        }
    };
    if result.is_ok() {
        let _ = send.finish();
    }
}

fn require(identity: &Option<Arc<CertInfo>>, what: &str) -> Result<Arc<CertInfo>, ApiError> {
    identity.clone().ok_or_else(|| {
        ApiError::Unauthenticated(format!(
            "a client certificate is required for {what}; a connection without one may only join (token + CSR)"
        ))
    })
}

fn certificate_response(
    issued: trellis_identity::Issued,
    ca_pem: String,
) -> sc::CertificateResponse {
    sc::CertificateResponse {
        result: Some(sc::certificate_response::Result::Certificate(
            sc::IssuedCertificate {
                cert_pem: issued.cert_pem,
                ca_pem,
                spiffe_id: issued.info.spiffe_id,
                serial: issued.info.serial,
                not_before_unix_ms: issued.info.not_before_unix_ms,
                not_after_unix_ms: issued.info.not_after_unix_ms,
            },
        )),
    }
}

async fn serve_stream(
    node: Arc<Node>,
    conn: Connection,
    conn_id: u64,
    identity: Option<Arc<CertInfo>>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let open = match tokio::time::timeout(
        OPEN_TIMEOUT,
        read_frame::<_, sc::Open>(&mut recv, MAX_OPEN_FRAME, "open"),
    )
    .await
    {
        Ok(Ok(Some(open))) => open.kind,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            let err = ApiError::invalid("open", e.to_string());
            refuse(&mut send, &None, &err).await;
            return;
        }
        Err(_) => {
            let err = ApiError::invalid("open", format!("no first frame within {OPEN_TIMEOUT:?}"));
            refuse(&mut send, &None, &err).await;
            return;
        }
    };
    let result: Result<(), ApiError> = async {
        match &open {
            None => Err(ApiError::invalid(
                "open.kind",
                "must be join, renew, watch or session",
            )),
            Some(sc::open::Kind::Join(req)) => {
                let issued = crate::ca::join(&node, req).await?;
                let ca_pem = crate::ca::ca(&node)?.cert_pem().to_string();
                write_frame(&mut send, &certificate_response(issued, ca_pem))
                    .await
                    .map_err(|e| ApiError::internal("join reply", e))?;
                let _ = send.finish();
                Ok(())
            }
            Some(sc::open::Kind::Renew(req)) => {
                let who = require(&identity, "renew")?;
                let issued = crate::ca::renew(&node, &who.identity, &req.csr_pem).await?;
                let ca_pem = crate::ca::ca(&node)?.cert_pem().to_string();
                write_frame(&mut send, &certificate_response(issued, ca_pem))
                    .await
                    .map_err(|e| ApiError::internal("renew reply", e))?;
                let _ = send.finish();
                Ok(())
            }
            Some(sc::open::Kind::Watch(req)) => {
                let who = require(&identity, "watch")?;
                node.sidecars.update(conn_id, |e| e.watches += 1);
                let closed = {
                    let conn = conn.clone();
                    async move {
                        conn.closed().await;
                    }
                };
                let end = watch::serve(&node, req.clone(), &mut send, closed).await;
                node.sidecars
                    .update(conn_id, |e| e.watches = e.watches.saturating_sub(1));
                match end {
                    Err(watch::WatchEnd::Api(e)) => Err(e),
                    Err(watch::WatchEnd::Stuck) => {
                        tracing::info!(
                            spiffe_id = %who.spiffe_id,
                            "watch reset: the sidecar did not read for {:?}",
                            watch::STUCK_WATCHER_TIMEOUT
                        );
                        Ok(())
                    }
                    Err(watch::WatchEnd::Gone) | Ok(()) => Ok(()),
                }
            }
            Some(sc::open::Kind::Session(req)) => {
                let who = require(&identity, "a session")?;
                match session::serve(
                    &node,
                    &node.sidecars,
                    conn_id,
                    &who.identity,
                    &who.spiffe_id,
                    req.clone(),
                    &mut send,
                    &mut recv,
                )
                .await
                {
                    Ok(()) => {
                        let _ = send.finish();
                        Ok(())
                    }
                    Err(session::SessionEnd::Api(e)) => Err(e),
                    Err(session::SessionEnd::Frame(e)) => {
                        Err(ApiError::invalid("session update", e.to_string()))
                    }
                    Err(session::SessionEnd::Gone) => Ok(()),
                }
            }
        }
    }
    .await;
    if let Err(e) = result {
        tracing::info!(error = %e, "sidecar stream refused or ended with an error");
        refuse(&mut send, &open, &e).await;
    }
}
