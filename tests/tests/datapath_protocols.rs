//! The sidecar data path for every protocol, end to end, real processes on
//! loopback: a TLS three-node cluster, a client sidecar A (`productpage`,
//! with a dedicated TCP listener and a JSON access log) and server sidecars
//! in front of servers in this process:
//!
//! * gRPC unary and bidirectional streaming (tonic client → A → mTLS →
//!   `echo` sidecar → tonic server, HTTP/2 all the way to the app, the
//!   caller's SPIFFE ID in the metadata); an unknown service answers gRPC
//!   status UNIMPLEMENTED with the reason;
//! * a tunnel to a port not declared `tcp` is refused (403 at the far
//!   side, the client's connection closed);
//! * raw TCP through A's `--tcp-forward` listener and a CONNECT tunnel to
//!   the `db` sidecar (1 MiB echoed byte for byte), counted in A's TCP
//!   metrics;
//! * a port the Service declares `http2` gets HTTP/2 at the app whatever
//!   the caller spoke (the `http` case, HTTP/1.1 at the app, is in
//!   datapath.rs);
//! * the outbound listener used as `HTTP_PROXY` (absolute-form requests);
//! * `traceparent`: the app sees the caller's trace continued through two
//!   hops, and the access logs of both sidecars chain the spans;
//! * latency histograms and per-route request counts in `/metrics`;
//! * balancers from the DestinationPolicy: consistent hash on a header is
//!   sticky, round robin alternates;
//! * `/endpoints` shows the balancer, the endpoints and requests in flight;
//! * SIGTERM to a server sidecar: the request in flight finishes (drain),
//!   its instance leaves the registry, and traffic then goes only to the
//!   other instance, none failing.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status, Streaming};
use trellis_tests::echopb::echo_client::EchoClient;
use trellis_tests::echopb::echo_server::{Echo, EchoServer};
use trellis_tests::echopb::{EchoReply, EchoRequest};
use trellis_tests::http::{h2_client, h2_get, http1, instances_of, tcp_echo};
use trellis_tests::sidecar::{apply, sidecar, SidecarProc};
use trellis_tests::{Cluster, ClusterOptions};

const STEP: Duration = Duration::from_secs(30);
/// The slow path of the web backends: long enough to be in flight while
/// its sidecar drains, well inside the drain deadline.
const SLOW: Duration = Duration::from_millis(1500);

const RESOURCES: &str = r#"
apiVersion: trellis/v1
kind: Service
metadata: {name: echo}
spec:
  ports: [{name: grpc, port: 50051, protocol: grpc}]
---
apiVersion: trellis/v1
kind: Service
metadata: {name: db}
spec:
  ports: [{name: tcp, port: 5432, protocol: tcp}]
---
apiVersion: trellis/v1
kind: Service
metadata: {name: web}
spec:
  ports: [{name: http, port: 8080, protocol: http2}]
---
apiVersion: trellis/v1
kind: Route
metadata: {name: web}
spec:
  hosts: [web]
  http:
    - name: all
      route: [{destination: {service: web}}]
"#;

fn web_policy(lb: &str) -> String {
    format!(
        r#"
apiVersion: trellis/v1
kind: DestinationPolicy
metadata: {{name: web}}
spec:
  host: web
  loadBalancer: {lb}
"#
    )
}

struct EchoSvc;

#[tonic::async_trait]
impl Echo for EchoSvc {
    async fn unary(
        &self,
        req: GrpcRequest<EchoRequest>,
    ) -> Result<GrpcResponse<EchoReply>, Status> {
        let source = req
            .metadata()
            .get("x-trellis-source")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        Ok(GrpcResponse::new(EchoReply {
            text: req.into_inner().text,
            server: "echo".into(),
            source,
        }))
    }

    type ChatStream = tokio_stream_like::Stream;

    async fn chat(
        &self,
        req: GrpcRequest<Streaming<EchoRequest>>,
    ) -> Result<GrpcResponse<Self::ChatStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let reply = EchoReply {
                    text: m.text.to_uppercase(),
                    server: "echo".into(),
                    source: String::new(),
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        Ok(GrpcResponse::new(tokio_stream_like::Stream(rx)))
    }
}

/// A receiver as a `Stream` (what tonic wants for server streaming),
/// without pulling in tokio-stream.
mod tokio_stream_like {
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::sync::mpsc;
    use tonic::Status;
    use trellis_tests::echopb::EchoReply;

    pub struct Stream(pub mpsc::Receiver<Result<EchoReply, Status>>);

    impl futures::Stream for Stream {
        type Item = Result<EchoReply, Status>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.0.poll_recv(cx)
        }
    }
}

async fn grpc_server() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoSvc))
            .serve_with_incoming(incoming),
    );
    Ok(addr)
}

/// An HTTP/1.1 + h2c backend named `name`: echoes the HTTP version,
/// `traceparent` and `x-trellis-source` it saw; `/slow` takes [`SLOW`] and
/// first adds a permit to `arrived`.
async fn web_backend(name: &'static str, arrived: Arc<Semaphore>) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let arrived = Arc::clone(&arrived);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let arrived = Arc::clone(&arrived);
                    async move {
                        if req.uri().path() == "/slow" {
                            arrived.add_permits(1);
                            tokio::time::sleep(SLOW).await;
                        }
                        let mut r = Response::new(Full::new(Bytes::from(name)));
                        let h = r.headers_mut();
                        h.insert(
                            "x-seen-version",
                            format!("{:?}", req.version()).parse().expect("header"),
                        );
                        for (from, to) in [
                            ("traceparent", "x-seen-traceparent"),
                            ("x-trellis-source", "x-seen-source"),
                        ] {
                            if let Some(v) = req.headers().get(from) {
                                h.insert(to, v.clone());
                            }
                        }
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn server_args(app: SocketAddr, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--app-addr",
        &app.to_string(),
        "--instance-address",
        "127.0.0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Access-log lines of `path` (JSON objects), once `pred` holds for them.
async fn access_log_until(
    path: &std::path::Path,
    what: &str,
    pred: impl Fn(&[Value]) -> bool,
) -> Result<Vec<Value>> {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let text = tokio::fs::read_to_string(path).await.unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .with_context(|| format!("access log {} is not JSON lines", path.display()))?;
        if pred(&lines) {
            return Ok(lines);
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "access log {}: {what} not seen; has {lines:?}",
                path.display()
            );
        }
        // The writer flushes per batch; poll the file.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_tcp_http2_traces_balancers_and_drain_through_sidecar_pairs() -> Result<()> {
    let c = Cluster::start_with(ClusterOptions {
        tls: true,
        ..ClusterOptions::default()
    })
    .await?;
    let rev = apply(
        &c,
        &format!("{RESOURCES}---{}", web_policy("{policy: roundRobin}")),
    )
    .await?;

    let grpc_app = grpc_server().await?;
    let db_app = tcp_echo().await?;
    let arrived = Arc::new(Semaphore::new(0));
    let web1_app = web_backend("web-1", Arc::clone(&arrived)).await?;
    let web2_app = web_backend("web-2", Arc::clone(&arrived)).await?;
    // The gRPC server's sidecar and the caller's run single-threaded (as
    // a sidecar limited to one CPU does by default); the others use their
    // default, one worker per CPU.
    let echo = sidecar(
        &c,
        "echo",
        "echo",
        &server_args(grpc_app, &["--workers", "1"]),
    )
    .await?;
    let db = sidecar(&c, "db", "db", &server_args(db_app, &[])).await?;
    let web1_log = c.dir().join("web-1-access.log");
    let web1 = sidecar(
        &c,
        "web-1",
        "web",
        &server_args(web1_app, &["--access-log", &web1_log.display().to_string()]),
    )
    .await?;
    let mut web2 = sidecar(
        &c,
        "web-2",
        "web",
        &server_args(web2_app, &["--drain-timeout-ms", "10000"]),
    )
    .await?;
    let tcp_ports = trellis_tests::free_ports(2)?;
    let tcp_listen = SocketAddr::from(([127, 0, 0, 1], tcp_ports[0]));
    let bad_tcp_listen = SocketAddr::from(([127, 0, 0, 1], tcp_ports[1]));
    let a_log = c.dir().join("productpage-access.log");
    let a = sidecar(
        &c,
        "productpage",
        "productpage",
        &[
            "--tcp-forward".into(),
            format!("{tcp_listen}=db:5432"),
            "--tcp-forward".into(),
            format!("{bad_tcp_listen}=web:8080"),
            "--access-log".into(),
            a_log.display().to_string(),
            "--workers".into(),
            "1".into(),
        ],
    )
    .await?;
    a.wait_dump(STEP, "config with every instance", |d| {
        d["revision"].as_u64().unwrap_or(0) >= rev
            && instances_of(d, "echo") == 1
            && instances_of(d, "db") == 1
            && instances_of(d, "web") == 2
            && d["identity"].is_string()
    })
    .await?;
    for s in [&echo, &db, &web1, &web2] {
        s.wait_dump(STEP, "identity", |d| d["identity"].is_string())
            .await?;
    }
    // web-1 has no --workers: one per CPU this test may use.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (name, workers) in [("productpage", 1), ("echo", 1), ("web-1", cpus)] {
        let log = std::fs::read_to_string(c.dir().join(format!("{name}.log")))?;
        assert!(
            log.contains(&format!("workers={workers}")),
            "{name} should run {workers} worker(s): {log}"
        );
    }
    let out = a.outbound_addr()?;

    // gRPC unary: HTTP/2 to the app, the caller's identity in metadata.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{out}"))?
        .origin("http://echo:50051".parse()?)
        .connect()
        .await?;
    let mut client = EchoClient::new(channel.clone());
    let r = client
        .unary(EchoRequest { text: "hi".into() })
        .await
        .map_err(|s| anyhow::anyhow!("unary: {s:?}\n{}", a.log_tail()))?
        .into_inner();
    ensure!(r.text == "hi" && r.server == "echo", "{r:?}");
    ensure!(
        r.source == "spiffe://trellis.local/ns/default/svc/productpage",
        "{r:?}"
    );

    // gRPC bidirectional streaming: 50 messages each way, in order.
    let (tx, rx) = mpsc::channel(8);
    let outgoing = futures::stream::unfold(rx, |mut rx: mpsc::Receiver<EchoRequest>| async move {
        rx.recv().await.map(|m| (m, rx))
    });
    let mut replies = client.chat(outgoing).await?.into_inner();
    for i in 0..50 {
        tx.send(EchoRequest {
            text: format!("msg-{i}"),
        })
        .await?;
        let m = tokio::time::timeout(STEP, replies.message())
            .await
            .context("stream reply timeout")??
            .context("stream ended early")?;
        ensure!(m.text == format!("MSG-{i}"), "reply {i}: {m:?}");
    }
    drop(tx);
    ensure!(
        tokio::time::timeout(STEP, replies.message())
            .await??
            .is_none(),
        "stream did not end with the client's"
    );

    // gRPC to an unknown service: a gRPC status, not an HTTP error.
    let ch404 = tonic::transport::Endpoint::from_shared(format!("http://{out}"))?
        .origin("http://nosuch:50051".parse()?)
        .connect()
        .await?;
    let st = EchoClient::new(ch404)
        .unary(EchoRequest { text: "x".into() })
        .await
        .err()
        .context("a call to an unknown service succeeded")?;
    ensure!(st.code() == tonic::Code::Unimplemented, "{st:?}");
    ensure!(st.message() == "no route for host nosuch:50051", "{st:?}");
    // Unrouted requests share one metrics label, whatever host they named.
    let m = a.get("/metrics").await?.1;
    ensure!(
        m.contains("trellis_requests_total{direction=\"outbound\",source=\"default/productpage\",destination=\"unknown\",route=\"-\",code=\"200\"} 1"),
        "{m}"
    );
    ensure!(!m.contains("nosuch"), "{m}");

    // Raw TCP: 1 MiB through the tunnel, echoed byte for byte.
    let payload: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut s = TcpStream::connect(tcp_listen).await?;
    let (mut r, mut w) = s.split();
    let mut echoed = Vec::with_capacity(payload.len());
    let (wrote, read) = tokio::join!(
        async {
            w.write_all(&payload).await?;
            w.shutdown().await
        },
        tokio::time::timeout(STEP, r.read_to_end(&mut echoed))
    );
    wrote?;
    read.context("TCP echo timeout")??;
    ensure!(
        echoed == payload,
        "TCP echo differs ({} bytes back)",
        echoed.len()
    );
    drop(s);
    let m = a.get("/metrics").await?.1;
    ensure!(
        m.contains(
            "trellis_tcp_sent_bytes_total{direction=\"outbound\",source=\"default/productpage\",destination=\"default/db/-\"} 1048576"
        ),
        "{m}"
    );
    ensure!(
        m.contains(
            "trellis_tcp_connections_total{direction=\"outbound\",source=\"default/productpage\",destination=\"default/db/-\"} 1"
        ),
        "{m}"
    );

    // A tunnel to a port not declared `tcp` is refused by the far side
    // (a raw stream to an HTTP app could forge x-trellis-source): the
    // client sees its connection closed without a byte.
    let mut s = TcpStream::connect(bad_tcp_listen).await?;
    let _ = s
        .write_all(b"GET / HTTP/1.1\r\nx-trellis-source: forged\r\n\r\n")
        .await;
    let mut got = Vec::new();
    // Closed with our bytes unread, the socket may well be reset.
    match tokio::time::timeout(STEP, s.read_to_end(&mut got))
        .await
        .context("refused tunnel not closed")?
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => return Err(e.into()),
    }
    ensure!(
        got.is_empty(),
        "refused tunnel answered {:?}",
        String::from_utf8_lossy(&got)
    );
    drop(s);

    // `web` declares http2: HTTP/2 stays HTTP/2 and HTTP/1.1 is converted
    // to HTTP/2 for the app; traceparent is continued.
    let h2 = h2_client(out).await?;
    let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let ans = h2_get(&h2, "web", "/t", &[("traceparent", trace)]).await?;
    ensure!(ans.status == 200, "{} {:?}", ans.status, ans.headers);
    ensure!(
        ans.headers["x-seen-version"] == "HTTP/2.0",
        "{:?}",
        ans.headers
    );
    let seen = ans.headers["x-seen-traceparent"].to_str()?.to_string();
    ensure!(
        seen.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && seen.ends_with("-01"),
        "{seen}"
    );
    ensure!(
        !seen.contains("b7ad6b7169203331"),
        "parent not replaced: {seen}"
    );
    let (head, _) = http1(out, "web", "/h1").await?;
    ensure!(head.starts_with("http/1.1 200"), "{head}");
    ensure!(head.contains("x-seen-version: http/2.0"), "{head}");
    // The outbound listener as the app's HTTP_PROXY: absolute-form target.
    let (head, body) = http1(out, "web:8080", "http://web:8080/proxied").await?;
    ensure!(head.starts_with("http/1.1 200"), "{head}");
    ensure!(body.starts_with("web-"), "{body}");

    // Round robin over two instances alternates.
    let mut bodies = Vec::new();
    for _ in 0..10 {
        bodies.push(h2_get(&h2, "web", "/rr", &[]).await?.body);
    }
    for pair in bodies.windows(2) {
        ensure!(pair[0] != pair[1], "round robin repeated: {bodies:?}");
    }

    // Consistent hash on x-user: each user sticks to one instance, and
    // users spread over both.
    let rev = apply(
        &c,
        &web_policy("{policy: consistentHash, hashHeader: x-user}"),
    )
    .await?;
    a.wait_dump(STEP, "consistent-hash policy", |d| {
        d["revision"].as_u64().unwrap_or(0) >= rev
    })
    .await?;
    let mut seen_backends = std::collections::HashSet::new();
    for user in 0..20 {
        let u = format!("user-{user}");
        let first = h2_get(&h2, "web", "/u", &[("x-user", &u)]).await?.body;
        for _ in 0..5 {
            let again = h2_get(&h2, "web", "/u", &[("x-user", &u)]).await?.body;
            ensure!(again == first, "{u} moved from {first} to {again}");
        }
        seen_backends.insert(first);
    }
    ensure!(seen_backends.len() == 2, "users all on {seen_backends:?}");

    // The access logs chain the spans: the app saw web-1's span as parent,
    // web-1's parent is A's span, A's parent is the caller's.
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let has_trace = |ls: &[Value]| ls.iter().any(|l| l["trace_id"] == trace_id);
    let a_lines = access_log_until(&a_log, "the traced request", has_trace).await?;
    let a_line = a_lines
        .iter()
        .find(|l| l["trace_id"] == trace_id)
        .context("no A line")?;
    ensure!(
        a_line["parent_span_id"] == "b7ad6b7169203331"
            && a_line["direction"] == "outbound"
            && a_line["destination"] == "default/web/-"
            && a_line["route"] == "all"
            && a_line["code"] == 200
            && a_line["protocol"] == "HTTP/2",
        "{a_line}"
    );
    ensure!(
        a_lines.iter().any(|l| l["protocol"] == "TCP"
            && l["destination"] == "default/web/-"
            && l["error"]
                .as_str()
                .is_some_and(|e| e.contains("forbidden: default/web declares no tcp port 8080"))),
        "no refused-tunnel line: {a_lines:?}"
    );
    ensure!(
        a_lines.iter().any(|l| l["protocol"] == "TCP"
            && l["destination"] == "default/db/-"
            && l["bytes_sent"] == 1 << 20
            && l["bytes_received"] == 1 << 20),
        "no TCP line: {a_lines:?}"
    );
    // Round robin: the traced request went to web-1 or web-2; only web-1
    // logs. If it went to web-2, the chain check is A → app directly.
    let served_by = ans.body;
    if served_by == "web-1" {
        let w_lines = access_log_until(&web1_log, "the traced request", has_trace).await?;
        let w = w_lines
            .iter()
            .find(|l| l["trace_id"] == trace_id)
            .context("no web-1 line")?;
        ensure!(w["parent_span_id"] == a_line["span_id"], "{w} vs {a_line}");
        ensure!(
            w["source"] == "default/productpage" && w["direction"] == "inbound",
            "{w}"
        );
        ensure!(
            seen == format!("00-{trace_id}-{}-01", w["span_id"].as_str().unwrap_or("?")),
            "{seen} vs {w}"
        );
    } else {
        ensure!(
            seen.split('-').nth(2) != a_line["span_id"].as_str(),
            "the app must see the inbound hop's span, not A's: {seen}"
        );
    }

    // Histograms and per-route counts.
    let m = a.get("/metrics").await?.1;
    ensure!(
        m.contains("trellis_request_duration_seconds_bucket{direction=\"outbound\",source=\"default/productpage\",destination=\"default/web/-\",route=\"all\",code=\"200\",le=\"+Inf\"}"),
        "{m}"
    );
    ensure!(
        m.contains("trellis_requests_total{direction=\"outbound\",source=\"default/productpage\",destination=\"default/echo/-\",route=\"-\",code=\"200\"}"),
        "{m}"
    );

    // Drain: a slow request is in flight to web-2 when its sidecar gets
    // SIGTERM; it still completes, the instance leaves the registry, and
    // every later request goes to web-1.
    let rev = apply(&c, &web_policy("{policy: roundRobin}")).await?;
    a.wait_dump(STEP, "round robin again", |d| {
        d["revision"].as_u64().unwrap_or(0) >= rev
    })
    .await?;
    let (slow_tx, mut slow_rx) = mpsc::channel(4);
    let mut slow_tasks = Vec::new();
    // Two slow requests: round robin sends one to each instance.
    for _ in 0..2 {
        let h2 = h2.clone();
        let slow_tx = slow_tx.clone();
        slow_tasks.push(tokio::spawn(async move {
            let r = h2_get(&h2, "web", "/slow", &[]).await;
            let _ = slow_tx.send(()).await;
            r
        }));
    }
    arrived.acquire_many(2).await?.forget();
    // Both are in flight: A's /endpoints shows one request on each.
    let eps = a.get_json("/endpoints").await?;
    let web = eps["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["service"] == "web"))
        .context("no web in /endpoints")?;
    ensure!(web["load_balancer"] == "roundRobin", "{web}");
    let in_flight: Vec<u64> = web["endpoints"]
        .as_array()
        .context("endpoints")?
        .iter()
        .map(|e| e["in_flight"].as_u64().unwrap_or(99))
        .collect();
    ensure!(in_flight == [1, 1], "{web}");
    let stop = tokio::spawn(async move {
        web2.stop(Duration::from_secs(20)).await?;
        Ok::<SidecarProc, anyhow::Error>(web2)
    });
    let mut served = Vec::new();
    for t in slow_tasks {
        let r = t.await??;
        ensure!(
            r.status == 200,
            "in-flight request failed: {} {:?}",
            r.status,
            r.headers
        );
        served.push(r.body);
    }
    served.sort();
    ensure!(served == ["web-1", "web-2"], "{served:?}");
    let _ = slow_rx.recv().await;
    let _web2 = stop.await??;
    a.wait_dump(STEP, "web-2 gone from the registry", |d| {
        instances_of(d, "web") == 1
    })
    .await?;
    for _ in 0..50 {
        let r = h2_get(&h2, "web", "/after", &[]).await?;
        ensure!(
            r.status == 200 && r.body == "web-1",
            "{} {} {:?}",
            r.status,
            r.body,
            r.headers
        );
    }
    drop(channel);
    Ok(())
}
