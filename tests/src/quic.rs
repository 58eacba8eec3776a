//! A raw client of the sidecar QUIC protocol, for tests that check what
//! the control plane sends frame by frame (the sidecar itself lives in
//! `trellis-dataplane`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use trellis_proto::frame::{read_frame, write_frame, MAX_FRAME_BYTES};
use trellis_proto::sidecar as sc;

/// A client endpoint on loopback trusting `ca_pem`, presenting `cert`
/// (PEM cert, PEM key) if given.
pub fn client_endpoint(ca_pem: &str, cert: Option<(&str, &str)>) -> Result<Endpoint> {
    client_endpoint_with(ca_pem, cert, None)
}

/// Like [`client_endpoint`]; with `liveness = Some((idle_timeout,
/// keep_alive))` connections to a vanished node end after `idle_timeout`
/// (a killed process sends no CONNECTION_CLOSE).
pub fn client_endpoint_with(
    ca_pem: &str,
    cert: Option<(&str, &str)>,
    liveness: Option<(Duration, Duration)>,
) -> Result<Endpoint> {
    let tls = trellis_identity::client_config(ca_pem, cert, &[trellis_identity::ALPN_SIDECAR])?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| anyhow!("QUIC client TLS: {e}"))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    if let Some((idle, keep_alive)) = liveness {
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(Some(idle.try_into().context("idle timeout")?))
            .keep_alive_interval(Some(keep_alive));
        config.transport_config(Arc::new(transport));
    }
    let mut endpoint = Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))
        .context("binding a QUIC client endpoint")?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Connect to a control node's QUIC endpoint (server name: its IP).
pub async fn connect(endpoint: &Endpoint, addr: SocketAddr) -> Result<Connection> {
    let conn = endpoint
        .connect(addr, &addr.ip().to_string())
        .context("starting a QUIC connection")?
        .await
        .with_context(|| format!("QUIC handshake with {addr}"))?;
    Ok(conn)
}

/// Open a stream and send its first frame.
pub async fn open(conn: &Connection, kind: sc::open::Kind) -> Result<(SendStream, RecvStream)> {
    let (mut send, recv) = conn.open_bi().await.context("opening a stream")?;
    write_frame(&mut send, &sc::Open { kind: Some(kind) }).await?;
    Ok((send, recv))
}

/// Read one frame of type `M` (`None`: the server finished the stream).
pub async fn next<M: prost::Message + Default>(recv: &mut RecvStream) -> Result<Option<M>> {
    Ok(read_frame(recv, MAX_FRAME_BYTES, "reply").await?)
}

/// Join with `token` for `namespace`/`service` ("" = the token's scope);
/// returns the answer and the new key.
pub async fn join(
    conn: &Connection,
    token: &str,
    namespace: &str,
    service: &str,
) -> Result<(sc::CertificateResponse, String)> {
    let (csr_pem, key_pem) = trellis_identity::generate_csr()?;
    let (_send, mut recv) = open(
        conn,
        sc::open::Kind::Join(sc::JoinRequest {
            token: token.to_string(),
            csr_pem,
            namespace: namespace.to_string(),
            service: service.to_string(),
        }),
    )
    .await?;
    let resp = next::<sc::CertificateResponse>(&mut recv)
        .await?
        .context("the join stream ended without an answer")?;
    Ok((resp, key_pem))
}

/// A certificate from a join answer, or the error it carried.
pub fn issued(resp: sc::CertificateResponse) -> Result<sc::IssuedCertificate> {
    match resp.result {
        Some(sc::certificate_response::Result::Certificate(c)) => Ok(c),
        Some(sc::certificate_response::Result::Error(e)) => {
            Err(anyhow!("refused ({:?}): {}", e.code(), e.message))
        }
        None => Err(anyhow!("empty certificate response")),
    }
}

/// Open a watch stream.
pub async fn watch(
    conn: &Connection,
    prefix: &str,
    after_revision: Option<u64>,
) -> Result<(SendStream, RecvStream)> {
    open(
        conn,
        sc::open::Kind::Watch(sc::WatchRequest {
            prefix: prefix.to_string(),
            after_revision,
            progress_interval_ms: 0,
        }),
    )
    .await
}
