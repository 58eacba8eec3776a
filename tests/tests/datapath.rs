//! The sidecar data path end to end, real processes on loopback: a TLS
//! three-node cluster, sidecar A (`productpage`, client only) and sidecars
//! B1/B2 (`reviews` v1/v2) in front of two tiny HTTP backends in this
//! process. Through A's outbound listener with `Host: reviews`:
//!
//! * HTTP/1.1 and HTTP/2 prior knowledge reach a backend over the sidecar
//!   pair (HTTP/2 + mutual TLS between them; the backend sees HTTP/1.1,
//!   `Host: reviews` and A's SPIFFE ID in `x-trellis-source`);
//! * a 90/10 weighted split measured over 10,000 requests (±2 points);
//! * header-based routing (`x-canary: yes` → v2 only);
//! * a Route change applied while running takes effect without a restart;
//! * unknown host → 404, a subset without instances → 503, both with
//!   `x-trellis-error` naming the cause;
//! * B1's inbound refuses a client certificate from another CA, and a
//!   client expecting another service's identity refuses B1;
//! * a Route's `retries` against a backend failing with 503: `attempts`
//!   bounds the tries, a small POST body is buffered and replayed, and
//!   the DestinationPolicy's retry budget caps retries when all fail.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use trellis_identity::Ca;
use trellis_tests::http::{h2_client, h2_get, h2_request, http1, instances_of, Answer, H2};
use trellis_tests::sidecar::{apply, peer_client_config, sidecar, workload_cert};
use trellis_tests::{Cluster, ClusterOptions};

const STEP: Duration = Duration::from_secs(30);
const SPLIT_REQUESTS: usize = 10_000;
const CONCURRENCY: usize = 16;
/// How long the backends take on `/slow` (the route's timeout is 300 ms).
const SLOW_BACKEND: Duration = Duration::from_secs(3);

const RESOURCES: &str = r#"
apiVersion: trellis/v1
kind: Service
metadata: {name: reviews}
spec:
  ports: [{name: http, port: 9080, protocol: http}]
---
apiVersion: trellis/v1
kind: DestinationPolicy
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
    - {name: v3, labels: {version: v3}}
"#;

fn route(v1: u32, v2: u32) -> String {
    format!(
        r#"
apiVersion: trellis/v1
kind: Route
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
    - name: canary-header
      match: [{{headers: {{x-canary: {{exact: "yes"}}}}}}]
      route: [{{destination: {{service: reviews, subset: v2}}}}]
    - name: slow
      match: [{{path: {{prefix: /slow}}}}]
      route: [{{destination: {{service: reviews, subset: v1}}}}]
      timeout: 300ms
    - name: v3
      match: [{{path: {{prefix: /v3}}}}]
      route: [{{destination: {{service: reviews, subset: v3}}}}]
    - name: split
      route:
        - destination: {{service: reviews, subset: v1}}
          weight: {v1}
        - destination: {{service: reviews, subset: v2}}
          weight: {v2}
"#
    )
}

/// A backend answering every request with its name; it echoes what it saw
/// (`Host`, `x-trellis-source`, HTTP version) in response headers.
async fn backend(name: &'static str) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: Request<hyper::body::Incoming>| async move {
                        if req.uri().path().starts_with("/slow") {
                            tokio::time::sleep(SLOW_BACKEND).await;
                        }
                        let mut r = Response::new(http_body_util::Full::new(Bytes::from(name)));
                        let h = r.headers_mut();
                        for (from, to) in [
                            ("host", "x-seen-host"),
                            ("x-trellis-source", "x-seen-source"),
                        ] {
                            if let Some(v) = req.headers().get(from) {
                                h.insert(to, v.clone());
                            }
                        }
                        h.insert(
                            "x-seen-version",
                            format!("{:?}", req.version())
                                .parse()
                                .expect("header value"),
                        );
                        Ok::<_, Infallible>(r)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn reviews_instances(d: &Value) -> usize {
    instances_of(d, "reviews")
}

/// Counts answers per backend over `n` requests, `CONCURRENCY` at a time.
async fn split(send: &H2, n: usize) -> Result<(usize, usize)> {
    let results: Vec<Result<Answer>> = futures::stream::iter(0..n)
        .map(|_| h2_get(send, "reviews", "/reviews/1", &[]))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let (mut v1, mut v2) = (0, 0);
    for r in results {
        let a = r?;
        ensure!(
            a.status == 200,
            "status {} body {:?} {:?}",
            a.status,
            a.body,
            a.headers
        );
        match a.body.as_str() {
            "v1" => v1 += 1,
            "v2" => v2 += 1,
            other => bail!("unexpected body {other:?}"),
        }
    }
    Ok((v1, v2))
}

/// Connects to `inbound` with mutual TLS and sends one HTTP/2 request;
/// Ok(body) if the whole exchange worked.
async fn direct_to_inbound(inbound: SocketAddr, config: rustls::ClientConfig) -> Result<String> {
    let tcp = TcpStream::connect(inbound).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::IpAddress(inbound.ip().into()),
            tcp,
        )
        .await?;
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let a = tokio::time::timeout(Duration::from_secs(10), h2_get(&send, "reviews", "/", &[]))
        .await
        .context("timeout")??;
    ensure!(a.status == 200, "status {}", a.status);
    Ok(a.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_through_a_sidecar_pair_routed_balanced_over_mtls() -> Result<()> {
    let c = Cluster::start_with(ClusterOptions {
        tls: true,
        ..ClusterOptions::default()
    })
    .await?;
    let rev = apply(&c, &format!("{RESOURCES}---{}", route(90, 10))).await?;

    let v1 = backend("v1").await?;
    let v2 = backend("v2").await?;
    let b1 = sidecar(
        &c,
        "reviews-v1",
        "reviews",
        &[
            "--app-addr".into(),
            v1.to_string(),
            "--instance-address".into(),
            "127.0.0.1".into(),
            "--label".into(),
            "version=v1".into(),
        ],
    )
    .await?;
    let b2 = sidecar(
        &c,
        "reviews-v2",
        "reviews",
        &[
            "--app-addr".into(),
            v2.to_string(),
            "--instance-address".into(),
            "127.0.0.1".into(),
            "--label".into(),
            "version=v2".into(),
        ],
    )
    .await?;
    let a = sidecar(&c, "productpage", "productpage", &[]).await?;
    a.wait_dump(STEP, "config with both reviews instances", |d| {
        d["revision"].as_u64().unwrap_or(0) >= rev
            && reviews_instances(d) == 2
            && d["identity"].is_string()
    })
    .await?;
    for b in [&b1, &b2] {
        b.wait_dump(STEP, "identity", |d| d["identity"].is_string())
            .await?;
    }
    let out = a.outbound_addr()?;

    // HTTP/1.1 end to end, restored to HTTP/1.1 with Host at the far side.
    let (head, body) = http1(out, "reviews:9080", "/reviews/1").await?;
    ensure!(
        head.starts_with("http/1.1 200"),
        "{head}\n{body}\n{}",
        a.log_tail()
    );
    ensure!(body == "v1" || body == "v2", "{body}");
    ensure!(head.contains("x-seen-host: reviews:9080"), "{head}");
    ensure!(head.contains("x-seen-version: http/1.1"), "{head}");
    ensure!(
        head.contains("x-seen-source: spiffe://trellis.local/ns/default/svc/productpage"),
        "{head}"
    );
    let (head, _) = http1(out, "reviews.default", "/").await?;
    ensure!(head.starts_with("http/1.1 200"), "{head}");

    // HTTP/2 prior knowledge.
    let h2 = h2_client(out).await?;
    let ans = h2_get(&h2, "reviews", "/reviews/1", &[]).await?;
    ensure!(
        ans.status == 200 && (ans.body == "v1" || ans.body == "v2"),
        "{}",
        ans.body
    );

    // 90/10 over 10,000 requests.
    let (n1, n2) = split(&h2, SPLIT_REQUESTS).await?;
    let share = n2 as f64 * 100.0 / (n1 + n2) as f64;
    eprintln!("split: v1 {n1}, v2 {n2} ({share:.2}% v2)");
    ensure!(
        (8.0..=12.0).contains(&share),
        "v2 share {share:.2}% not within 10 ± 2"
    );

    // Header-based routing.
    for _ in 0..50 {
        let a = h2_get(&h2, "reviews", "/", &[("x-canary", "yes")]).await?;
        ensure!(
            a.status == 200 && a.body == "v2",
            "canary went to {:?}",
            a.body
        );
    }

    // Unknown host → 404; subset without instances → 503; both say why.
    let a404 = h2_get(&h2, "nosuch", "/", &[]).await?;
    ensure!(a404.status == 404, "status {}", a404.status);
    ensure!(
        a404.headers["x-trellis-error"] == "no route for host nosuch",
        "{:?}",
        a404.headers
    );
    let a503 = h2_get(&h2, "reviews", "/v3/x", &[]).await?;
    ensure!(a503.status == 503, "status {}", a503.status);
    ensure!(
        a503.headers["x-trellis-error"] == "no healthy endpoint for reviews/v3",
        "{:?}",
        a503.headers
    );
    let grpc = h2_get(
        &h2,
        "nosuch",
        "/pkg.Svc/Call",
        &[("content-type", "application/grpc")],
    )
    .await?;
    ensure!(
        grpc.headers.get("grpc-status").is_some_and(|v| v == "12"),
        "{:?}",
        grpc.headers
    );
    let (head, _) = http1(out, "nosuch", "/").await?;
    ensure!(
        head.starts_with("http/1.1 404")
            && head.contains("x-trellis-error: no route for host nosuch"),
        "{head}"
    );

    // The route's timeout: 504 naming the destination.
    let started = std::time::Instant::now();
    let slow = h2_get(&h2, "reviews", "/slow", &[]).await?;
    ensure!(slow.status == 504, "status {}", slow.status);
    ensure!(
        slow.headers["x-trellis-error"] == "upstream timeout after 300 ms for reviews/v1",
        "{:?}",
        slow.headers
    );
    ensure!(
        started.elapsed() < SLOW_BACKEND,
        "took {:?}",
        started.elapsed()
    );

    // Metrics on both sides.
    let (_, m) = a.get("/metrics").await?;
    for want in [
        "trellis_requests_total{direction=\"outbound\",source=\"default/productpage\",destination=\"default/reviews/v2\",route=\"split\",code=\"200\"}",
        "trellis_requests_total{direction=\"outbound\",source=\"default/productpage\",destination=\"default/reviews/v3\",route=\"v3\",code=\"503\"} 1",
        "trellis_requests_total{direction=\"outbound\",source=\"default/productpage\",destination=\"default/reviews/v1\",route=\"slow\",code=\"504\"} 1",
        "trellis_config_revision ",
    ] {
        ensure!(m.contains(want), "A's /metrics lacks {want}:\n{m}");
    }
    let (_, m) = b1.get("/metrics").await?;
    ensure!(
        m.contains(
            "trellis_requests_total{direction=\"inbound\",source=\"default/productpage\",destination=\"default/reviews\",route=\"-\",code=\"200\"}"
        ),
        "B1's /metrics:\n{m}"
    );

    // A route change takes effect without a restart.
    let rev = apply(&c, &route(0, 100)).await?;
    a.wait_dump(STEP, "the new route", |d| {
        d["revision"].as_u64().unwrap_or(0) >= rev
    })
    .await?;
    let (n1, n2) = split(&h2, 500).await?;
    ensure!(n1 == 0 && n2 == 500, "after the change: v1 {n1}, v2 {n2}");
    let rev = apply(&c, &route(100, 0)).await?;
    a.wait_dump(STEP, "the route back", |d| {
        d["revision"].as_u64().unwrap_or(0) >= rev
    })
    .await?;
    let (n1, n2) = split(&h2, 500).await?;
    ensure!(
        n1 == 500 && n2 == 0,
        "after the change back: v1 {n1}, v2 {n2}"
    );

    // B1's inbound: a cluster workload certificate works (and B1 proves
    // it is reviews); another CA's certificate is refused in the handshake;
    // a client expecting ratings refuses B1.
    let inbound = b1.inbound_addr()?;
    let pki = c.pki().context("pki")?;
    let ca_pem = std::fs::read_to_string(&pki.ca_file)?;
    let (cert, key) = workload_cert(pki.ca(), "productpage")?;
    let want = |svc: &str| Some(format!("spiffe://trellis.local/ns/default/svc/{svc}"));
    let ok =
        trellis_identity::workload_client_config(&ca_pem, &cert, &key, want("reviews"), &[b"h2"])?;
    ensure!(direct_to_inbound(inbound, ok).await? == "v1");
    let other = Ca::create(trellis_identity::DEFAULT_TRUST_DOMAIN)?;
    let (fcert, fkey) = workload_cert(&other, "productpage")?;
    let foreign = trellis_identity::workload_client_config(
        &ca_pem,
        &fcert,
        &fkey,
        want("reviews"),
        &[b"h2"],
    )?;
    match direct_to_inbound(inbound, foreign).await {
        Ok(body) => bail!("a certificate from another CA was accepted: {body}"),
        Err(e) => eprintln!("foreign client refused: {e:#}"),
    }
    let wrong =
        trellis_identity::workload_client_config(&ca_pem, &cert, &key, want("ratings"), &[b"h2"])?;
    let e = direct_to_inbound(inbound, wrong)
        .await
        .err()
        .context("a client expecting ratings accepted reviews' sidecar")?;
    ensure!(format!("{e:#}").contains("UnexpectedPeer"), "{e:#}");
    Ok(())
}

/// Certificates rotate without dropping connections: with 12 s workload
/// certificates both sidecars renew while requests flow over one client
/// connection; none fails, including after the first certificates have
/// expired, and a new connection to B1 gets its renewed certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_traffic() -> Result<()> {
    const CERT_TTL: Duration = Duration::from_secs(12);
    let c = Cluster::start_with(ClusterOptions {
        tls: true,
        extra_args: vec![
            "--workload-cert-ttl-ms".into(),
            CERT_TTL.as_millis().to_string(),
        ],
        ..ClusterOptions::default()
    })
    .await?;
    let rev = apply(&c, RESOURCES).await?;
    let v1 = backend("v1").await?;
    let b1 = sidecar(
        &c,
        "reviews-v1",
        "reviews",
        &[
            "--app-addr".into(),
            v1.to_string(),
            "--instance-address".into(),
            "127.0.0.1".into(),
            "--label".into(),
            "version=v1".into(),
        ],
    )
    .await?;
    let a = sidecar(&c, "productpage", "productpage", &[]).await?;
    let d = a
        .wait_dump(STEP, "config with the reviews instance", |d| {
            d["revision"].as_u64().unwrap_or(0) >= rev
                && reviews_instances(d) == 1
                && d["cert_serial"].is_string()
        })
        .await?;
    let a_first = d["cert_serial"].as_str().unwrap_or_default().to_string();
    let d = b1
        .wait_dump(STEP, "identity", |d| d["cert_serial"].is_string())
        .await?;
    let b_first = d["cert_serial"].as_str().unwrap_or_default().to_string();
    let started = std::time::Instant::now();
    let h2 = h2_client(a.outbound_addr()?).await?;
    let serial = |d: Value| d["cert_serial"].as_str().unwrap_or_default().to_string();
    let mut requests = 0u64;
    loop {
        let ans = h2_get(&h2, "reviews", "/", &[]).await?;
        ensure!(
            ans.status == 200 && ans.body == "v1",
            "request {requests} failed during rotation: {} {:?} {:?}\n{}",
            ans.status,
            ans.headers,
            ans.body,
            a.log_tail()
        );
        requests += 1;
        if requests.is_multiple_of(50) {
            let rotated = serial(a.get_json("/config_dump").await?) != a_first
                && serial(b1.get_json("/config_dump").await?) != b_first;
            if rotated && started.elapsed() > CERT_TTL + Duration::from_secs(1) {
                break;
            }
            ensure!(
                started.elapsed() < STEP * 2,
                "no rotation within {:?}",
                STEP * 2
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("{requests} requests across the rotation, none failed");

    // A new connection to B1 gets B1's renewed certificate (the first one
    // has expired by now, so an old config would fail the handshake).
    let cfg = peer_client_config(&c, "productpage", "reviews")?;
    ensure!(direct_to_inbound(b1.inbound_addr()?, cfg).await? == "v1");
    Ok(())
}

const FLAKY_RESOURCES: &str = r#"
apiVersion: trellis/v1
kind: Service
metadata: {name: flaky}
spec:
  ports: [{name: http, port: 8080, protocol: http}]
---
apiVersion: trellis/v1
kind: DestinationPolicy
metadata: {name: flaky}
spec:
  host: flaky
  retryBudget: {percent: 10, minPerSecond: 1}
---
apiVersion: trellis/v1
kind: Route
metadata: {name: flaky}
spec:
  hosts: [flaky]
  http:
    - name: one
      match: [{path: {prefix: /one}}]
      route: [{destination: {service: flaky}}]
      retries: {attempts: 1, retryOn: [5xx]}
    - name: rest
      route: [{destination: {service: flaky}}]
      retries: {attempts: 2, retryOn: [gateway-error, connect-failure]}
"#;

/// Paths of the flaky backend, each with its own request counter.
const FLAKY_PATHS: [&str; 4] = ["/two", "/one", "/post", "/always"];

/// A backend that answers 503 to the first two requests of each path in
/// `FLAKY_PATHS` (always on `/always`), then 200 with the request body.
async fn flaky_backend(counts: Arc<[std::sync::atomic::AtomicUsize; 4]>) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let counts = Arc::clone(&counts);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let counts = Arc::clone(&counts);
                    async move {
                        let path = req.uri().path().to_string();
                        let body = req.into_body().collect().await?.to_bytes();
                        let i = FLAKY_PATHS.iter().position(|p| *p == path);
                        let n = i.map_or(0, |i| {
                            counts[i].fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                        });
                        let mut r = Response::new(http_body_util::Full::new(body));
                        if n < 2 || path == "/always" {
                            *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, hyper::Error>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// One HTTP/2 request with a body through `send`.
async fn h2_send(send: &H2, method: &str, path: &str, body: &'static str) -> Result<Answer> {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://flaky{path}"))
        .header("content-length", body.len())
        .body(http_body_util::Full::new(Bytes::from(body)))?;
    h2_request(send, req).await
}

/// Retries end to end: a rule's `retries` re-send failed tries (bodies
/// included, buffered), `attempts` bounds them, and the destination's retry
/// budget caps them when everything fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_follow_the_rule_and_the_budget() -> Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let c = Cluster::start_with(ClusterOptions {
        tls: true,
        ..ClusterOptions::default()
    })
    .await?;
    let rev = apply(&c, FLAKY_RESOURCES).await?;
    let counts: Arc<[AtomicUsize; 4]> = Arc::new(Default::default());
    let count = |path: &str| {
        let i = FLAKY_PATHS.iter().position(|p| *p == path).expect("path");
        counts[i].load(Ordering::SeqCst)
    };
    let app = flaky_backend(Arc::clone(&counts)).await?;
    let b = sidecar(
        &c,
        "flaky-1",
        "flaky",
        &[
            "--app-addr".into(),
            app.to_string(),
            "--instance-address".into(),
            "127.0.0.1".into(),
        ],
    )
    .await?;
    let a = sidecar(&c, "caller", "productpage", &[]).await?;
    a.wait_dump(STEP, "config with the flaky instance", |d| {
        d["revision"].as_u64().unwrap_or(0) >= rev
            && d["identity"].is_string()
            && d["resources"].as_array().is_some_and(|rs| {
                rs.iter()
                    .any(|r| r["kind"] == "Instance" && r["spec"]["service"] == "flaky")
            })
    })
    .await?;
    b.wait_dump(STEP, "identity", |d| d["identity"].is_string())
        .await?;
    let s = TcpStream::connect(a.outbound_addr()?).await?;
    let (h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await?;
    tokio::spawn(conn);

    // attempts: 2 — two 503s, then 200: three requests at the backend.
    let r = h2_send(&h2, "GET", "/two", "").await?;
    ensure!(
        r.status == 200,
        "status {} {:?}\n{}",
        r.status,
        r.headers,
        a.log_tail()
    );
    ensure!(count("/two") == 3, "backend saw {}", count("/two"));
    ensure!(r.headers["x-trellis-retries"] == "2", "{:?}", r.headers);

    // attempts: 1 — the second 503 is the answer, two requests seen.
    let r = h2_send(&h2, "GET", "/one", "").await?;
    ensure!(r.status == 503, "status {}", r.status);
    ensure!(count("/one") == 2, "backend saw {}", count("/one"));
    ensure!(r.headers["x-trellis-retries"] == "1", "{:?}", r.headers);

    // A POST with a small body is buffered and retried with its body.
    let r = h2_send(&h2, "POST", "/post", "order=42").await?;
    ensure!(r.status == 200, "status {}", r.status);
    ensure!(r.body == "order=42", "body {:?}", r.body);
    ensure!(count("/post") == 3, "backend saw {}", count("/post"));

    // Everything fails: 200 requests, retries capped by the budget
    // (10 % of the window's requests + 1/s × 10 s), not 2 per request.
    const N: usize = 200;
    let results: Vec<Result<Answer>> = futures::stream::iter(0..N)
        .map(|_| h2_send(&h2, "GET", "/always", ""))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    for r in results {
        let r = r?;
        ensure!(r.status == 503, "status {}", r.status);
    }
    let retries = count("/always") - N;
    // Requests in the window: at most these N and the 3 above (a request
    // counts once, whatever its tries).
    let cap = (N + 3) / 10 + 10;
    eprintln!("budget: {retries} retries for {N} failing requests (cap {cap})");
    ensure!(
        retries <= cap && retries > 0,
        "{retries} retries, cap {cap}"
    );

    let (_, m) = a.get("/metrics").await?;
    ensure!(
        m.contains("trellis_retries_total{destination=\"default/flaky/-\"}"),
        "{m}"
    );
    Ok(())
}
