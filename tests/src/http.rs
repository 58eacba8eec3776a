//! Small HTTP and TCP clients and servers shared by the data-path tests:
//! an HTTP/2 prior-knowledge client ([`h2_client`], [`h2_request`],
//! [`h2_get`]), one raw HTTP/1.1 exchange ([`http1`]), a TCP echo server
//! ([`tcp_echo`]), and a count of a service's instances in a sidecar's
//! `/config_dump` ([`instances_of`]).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long one raw HTTP/1.1 exchange may take.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// A multiplexed HTTP/2 client connection.
pub type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// A response, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

/// An HTTP/2 prior-knowledge connection to `addr` (e.g. a sidecar's
/// outbound listener).
pub async fn h2_client(addr: SocketAddr) -> Result<H2> {
    let s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// Sends `req` on `send` and reads the whole answer.
pub async fn h2_request(send: &H2, req: Request<Full<Bytes>>) -> Result<Answer> {
    let mut send = send.clone();
    send.ready().await?;
    let resp = send.send_request(req).await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).to_string();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// `GET http://{authority}{path}` with `headers`.
pub async fn h2_get(
    send: &H2,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer> {
    let mut b = Request::get(format!("http://{authority}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    h2_request(send, b.body(Full::new(Bytes::new()))?).await
}

/// One HTTP/1.1 `GET target` with `Host: host` and `Connection: close` on a
/// fresh connection: (lower-cased head, body). `target` may be a path or
/// an absolute URI (the proxy form).
pub async fn http1(addr: SocketAddr, host: &str, target: &str) -> Result<(String, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(EXCHANGE_TIMEOUT, s.read_to_end(&mut buf))
        .await
        .context("HTTP/1.1 read timeout")??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
    Ok((head.to_ascii_lowercase(), body.to_string()))
}

/// A TCP echo server on 127.0.0.1 (port 0); its address.
pub async fn tcp_echo() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// How many `Instance` resources of `service` a sidecar's `/config_dump`
/// (`dump`) holds.
pub fn instances_of(dump: &Value, service: &str) -> usize {
    dump["resources"].as_array().map_or(0, |rs| {
        rs.iter()
            .filter(|r| r["kind"] == "Instance" && r["spec"]["service"] == service)
            .count()
    })
}
