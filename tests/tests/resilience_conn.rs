//! Connection-level protection of the sidecar, real processes on loopback:
//! a TLS three-node cluster, sidecar A (`productpage`, client only) and
//! sidecar B (`reviews`) in front of a small HTTP/1.1 backend, both with a
//! `[connection]` table of small limits (1 s deadlines, 1.5 s idle
//! timeout, 16 KiB request headers):
//!
//! * B's inbound listener closes a TCP client that never sends a TLS
//!   ClientHello within the handshake deadline, and one that completes
//!   mutual TLS (a cluster workload certificate) but trickles the HTTP/2
//!   preface a byte at a time within the header deadline;
//! * A's outbound listener answers HTTP/1.1 request headers over the limit
//!   with 431 and closes a client that trickles its headers;
//! * an idle HTTP/2 connection (A's outbound listener, B's inbound
//!   listener) is closed after the idle timeout, while one with a request
//!   in flight for longer than that completes it;
//! * B's inbound listener closes a connection over its cap at once.
//!
//! Every check waits for an event (the peer's EOF, the connection task
//! ending) under a deadline, never a fixed sleep.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_tests::http::{h2_get, instances_of, H2};
use trellis_tests::sidecar::{apply, peer_client_config, sidecar};
use trellis_tests::{Cluster, ClusterOptions};

const STEP: Duration = Duration::from_secs(30);
/// The limits both sidecars run with.
const HANDSHAKE: Duration = Duration::from_millis(1_000);
const HEADERS: Duration = Duration::from_millis(1_000);
const IDLE: Duration = Duration::from_millis(1_500);
const MAX_HEADER_BYTES: usize = 16 << 10;
const MAX_INBOUND: usize = 4;
/// Timer slack allowed on the early side of a deadline.
const EARLY: Duration = Duration::from_millis(500);
/// How late after its deadline a close may come (a loaded 2-core box).
const LATE: Duration = Duration::from_secs(3);
/// How long the backend takes on `/slow`: longer than the idle timeout.
const SLOW_BACKEND: Duration = Duration::from_millis(3_500);
/// Pause between trickled bytes.
const TRICKLE: Duration = Duration::from_millis(150);

const RESOURCES: &str = r#"
apiVersion: trellis/v1
kind: Service
metadata: {name: reviews}
spec:
  ports: [{name: http, port: 9080, protocol: http}]
"#;

fn connection_toml() -> String {
    format!(
        "[connection]\n\
         tls_handshake_timeout_ms = {}\n\
         request_header_timeout_ms = {}\n\
         idle_timeout_ms = {}\n\
         max_request_header_bytes = {MAX_HEADER_BYTES}\n\
         max_inbound_connections = {MAX_INBOUND}\n",
        HANDSHAKE.as_millis(),
        HEADERS.as_millis(),
        IDLE.as_millis(),
    )
}

/// An HTTP/1.1 backend answering "ok" (after [`SLOW_BACKEND`] on `/slow`).
async fn backend() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        if req.uri().path().starts_with("/slow") {
                            tokio::time::sleep(SLOW_BACKEND).await;
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Reads (and drops) whatever `s` sends until it closes (EOF or an error
/// such as a reset); how long that took, or an error after `within`.
async fn until_closed<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> Result<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .context("the connection stayed open")?;
    Ok(start.elapsed())
}

/// Writes `bytes` one at a time, [`TRICKLE`] apart, reading what `s`
/// sends meanwhile, until `s` closes; how long after the start that was.
/// Errors if every byte went out and the connection is still open.
async fn trickle<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) -> Result<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    for b in bytes {
        if s.write_all(&[*b]).await.is_err() || s.flush().await.is_err() {
            return Ok(start.elapsed());
        }
        let deadline = tokio::time::Instant::now() + TRICKLE;
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Err(_) => break,
                Ok(Ok(0) | Err(_)) => return Ok(start.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    }
    bail!(
        "still open after trickling {} bytes over {:?}",
        bytes.len(),
        start.elapsed()
    )
}

fn ensure_around(what: &str, took: Duration, deadline: Duration) -> Result<()> {
    eprintln!("{what}: closed after {took:?} (deadline {deadline:?})");
    ensure!(
        took + EARLY >= deadline && took <= deadline + LATE,
        "{what}: closed after {took:?}, deadline {deadline:?}"
    );
    Ok(())
}

/// Mutual TLS to `inbound` as `productpage` (a cluster workload
/// certificate), expecting `reviews`, ALPN h2.
async fn mtls(
    c: &Cluster,
    inbound: SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let cfg = peer_client_config(c, "productpage", "reviews")?;
    let tcp = TcpStream::connect(inbound).await?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::IpAddress(inbound.ip().into()),
            tcp,
        )
        .await?)
}

/// An HTTP/2 client on `io` and its connection task (ends when the
/// connection closes).
async fn h2_on<I>(io: I) -> Result<(H2, tokio::task::JoinHandle<()>)>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((send, task))
}

/// One GET that must answer 200 "ok".
async fn get_ok(send: &H2, path: &str) -> Result<()> {
    let a = tokio::time::timeout(STEP, h2_get(send, "reviews", path, &[]))
        .await
        .context("request timed out")??;
    ensure!(
        a.status == 200 && a.body == "ok",
        "{path}: {} {:?} {:?}",
        a.status,
        a.body,
        a.headers
    );
    Ok(())
}

/// Waits for an HTTP/2 connection task to end; how long that took.
async fn until_task_ends(task: tokio::task::JoinHandle<()>, within: Duration) -> Result<Duration> {
    let start = Instant::now();
    tokio::time::timeout(within, task)
        .await
        .context("the connection stayed open")??;
    Ok(start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_silent_oversized_and_idle_connections_are_closed() -> Result<()> {
    let c = Cluster::start_with(ClusterOptions {
        tls: true,
        ..ClusterOptions::default()
    })
    .await?;
    let rev = apply(&c, RESOURCES).await?;
    let conf = c.dir().join("connection.toml");
    std::fs::write(&conf, connection_toml())?;
    let config_flag = || ["--config".to_string(), conf.display().to_string()];

    let app = backend().await?;
    let mut b_args = vec![
        "--app-addr".to_string(),
        app.to_string(),
        "--instance-address".into(),
        "127.0.0.1".into(),
    ];
    b_args.extend(config_flag());
    let b = sidecar(&c, "reviews-1", "reviews", &b_args).await?;
    let a = sidecar(&c, "productpage", "productpage", &config_flag()).await?;
    a.wait_dump(STEP, "config with the reviews instance", |d| {
        d["revision"].as_u64().unwrap_or(0) >= rev
            && instances_of(d, "reviews") == 1
            && d["identity"].is_string()
    })
    .await?;
    b.wait_dump(STEP, "identity", |d| d["identity"].is_string())
        .await?;
    let inbound = b.inbound_addr()?;
    let out = a.outbound_addr()?;
    let logs = || format!("A:\n{}\nB:\n{}", a.log_tail(), b.log_tail());

    // The path works (and A pools a connection to B).
    let (h2, _task) = h2_on(TcpStream::connect(out).await?).await?;
    get_ok(&h2, "/").await.with_context(logs)?;

    // (a) B's inbound: a client that never sends a ClientHello is closed
    // at the handshake deadline.
    let mut silent = TcpStream::connect(inbound).await?;
    let took = until_closed(&mut silent, HANDSHAKE + LATE).await?;
    ensure_around("silent TLS client", took, HANDSHAKE)?;

    // A client that completes mutual TLS, then trickles the HTTP/2
    // preface, is closed at the header deadline.
    let mut tls = mtls(&c, inbound).await?;
    let took = trickle(&mut tls, hyper_h2_preface()).await?;
    ensure_around("trickling HTTP/2 client", took, HEADERS)?;

    // (b) A's outbound: request headers over the limit → 431.
    let mut s = TcpStream::connect(out).await?;
    let big = "x".repeat(MAX_HEADER_BYTES + 1024);
    s.write_all(format!("GET / HTTP/1.1\r\nHost: reviews\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await?;
    let mut head = vec![0u8; 64];
    let n = tokio::time::timeout(STEP, s.read(&mut head))
        .await
        .context("no answer to oversized headers")??;
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    ensure!(
        head.starts_with("HTTP/1.1 431"),
        "oversized headers: {head:?}"
    );
    // Headers just under the limit still pass.
    let mut s = TcpStream::connect(out).await?;
    let fits = "x".repeat(MAX_HEADER_BYTES / 2);
    s.write_all(
        format!("GET / HTTP/1.1\r\nHost: reviews\r\nX-Big: {fits}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut answer))
        .await
        .context("no answer to headers within the limit")??;
    let answer = String::from_utf8_lossy(&answer).to_string();
    ensure!(answer.starts_with("HTTP/1.1 200"), "{answer}\n{}", logs());

    // A client that trickles its request headers is closed: on the
    // outbound listener it has no request in flight, so the idle timeout
    // closes it, dropped 1 s (the sidecar's IDLE_CLOSE_GRACE) after the
    // graceful close it cannot act on mid-header.
    let mut s = TcpStream::connect(out).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: reviews\r\n").await?;
    let took = trickle(
        &mut s,
        "X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".as_bytes(),
    )
    .await?;
    ensure_around(
        "trickling HTTP/1.1 client",
        took,
        IDLE + Duration::from_secs(1),
    )?;

    // (c) A's outbound: an idle HTTP/2 connection is closed after the idle
    // timeout; one with a request in flight for longer is not.
    let (idle, idle_task) = h2_on(TcpStream::connect(out).await?).await?;
    let (busy, busy_task) = h2_on(TcpStream::connect(out).await?).await?;
    get_ok(&idle, "/").await?;
    // (A clone stays here: a client connection closes with its last handle.)
    let busy2 = busy.clone();
    let slow = tokio::spawn(async move {
        let start = Instant::now();
        get_ok(&busy2, "/slow").await.map(|_| start.elapsed())
    });
    let took = until_task_ends(idle_task, IDLE + LATE).await?;
    ensure_around("idle HTTP/2 connection (outbound)", took, IDLE)?;
    let slow_took = slow
        .await?
        .with_context(|| format!("the request in flight failed\n{}", logs()))?;
    ensure!(slow_took >= SLOW_BACKEND, "slow answered in {slow_took:?}");
    ensure!(
        !busy_task.is_finished(),
        "the busy connection was closed with its request"
    );
    // ... and once it is done, it idles out too.
    let took = until_task_ends(busy_task, IDLE + LATE).await?;
    ensure_around("HTTP/2 connection idle after its request", took, IDLE)?;
    drop(busy);

    // B's inbound: an mTLS HTTP/2 connection idle after a request is
    // closed after the idle timeout.
    let (direct, direct_task) = h2_on(mtls(&c, inbound).await?).await?;
    get_ok(&direct, "/").await?;
    let took = until_task_ends(direct_task, IDLE + LATE).await?;
    ensure_around("idle HTTP/2 connection (inbound)", took, IDLE)?;

    // B's inbound takes at most MAX_INBOUND connections at once: with that
    // many silent clients holding slots, one more is closed at once (long
    // before the handshake deadline); the slots come back as the silent
    // ones are closed.
    let mut holders = Vec::new();
    for _ in 0..MAX_INBOUND {
        holders.push(TcpStream::connect(inbound).await?);
    }
    let mut extra = TcpStream::connect(inbound).await?;
    let took = until_closed(&mut extra, HANDSHAKE).await?;
    eprintln!("connection over the cap: closed after {took:?}");
    ensure!(took < HANDSHAKE / 2, "over the cap: closed after {took:?}");
    for mut h in holders {
        until_closed(&mut h, HANDSHAKE + LATE).await?;
    }

    // The mesh still works after all of it (A's pooled connection to B was
    // closed idle by B and is replaced).
    let (h2, _task) = h2_on(TcpStream::connect(out).await?).await?;
    get_ok(&h2, "/").await.with_context(logs)?;
    Ok(())
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
fn hyper_h2_preface() -> &'static [u8] {
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
}
