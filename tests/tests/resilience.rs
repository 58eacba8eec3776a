//! Resilience in the sidecar, end to end with real processes: a 3-node TLS
//! control plane, a caller sidecar in zone `a`, and three instances of
//! `reviews` — each its own sidecar and its own misbehaving-on-command
//! backend ([`trellis_tests::backend::Backend`]) — in zones `a`, `b` and
//! `c`. Every policy change goes through the control plane, and each phase
//! waits until the caller has applied its revision.
//!
//! Phases, in order:
//! * locality: the caller's zone only; one apply shifts zone `a`'s traffic
//!   to `b`, removing it shifts it back;
//! * outlier detection: a backend answering 500 is ejected after 3 in a
//!   row, gets no traffic until its ejection ends, then comes back;
//!   ejection and return show in metrics and the access log;
//! * circuit breaking: past `maxConcurrentRequests` requests are refused at
//!   once with 503 `circuit open`, and served again once load drops; a TCP
//!   service's second connection is closed under `maxConnections: 1` until
//!   the first ends;
//! * backup requests: the p99 of backends with a slow tail, before and
//!   after, and backups within the 15 % budget;
//! * fault injection: 10 % aborts and 5 % delays measured over 10,000
//!   requests within ±1 point, aborted requests never reaching a backend;
//!   a gRPC-status abort;
//! * degrade: on and off by apply, effective at the next request;
//! * zone outage: zone `a` dies (sidecar killed) and traffic moves to `c`,
//!   the first zone of its failover list; then `c` fails and traffic moves
//!   to `b`;
//! * pending requests: requests waiting for a connection that never
//!   completes its handshake, past `maxPendingRequests`, are refused at
//!   once.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_tests::backend::{Backend, Mode};
use trellis_tests::http::{h2_client, h2_get, instances_of, tcp_echo, Answer, H2};
use trellis_tests::sidecar::{apply, sidecar, SidecarProc};
use trellis_tests::{Cluster, ClusterOptions};

/// Bound on waiting for any one condition.
const STEP: Duration = Duration::from_secs(30);

const SERVICES: &str = r#"
apiVersion: trellis/v1
kind: Service
metadata: {name: reviews}
spec:
  ports: [{name: http, port: 9080, protocol: http}]
---
apiVersion: trellis/v1
kind: Service
metadata: {name: productpage}
spec:
  ports: [{name: http, port: 9080, protocol: http}]
---
apiVersion: trellis/v1
kind: Service
metadata: {name: db}
spec:
  ports: [{name: tcp, port: 5432, protocol: tcp}]
"#;

/// The Route for `reviews` with `extra` appended to its one rule.
fn route(extra: &str) -> String {
    format!(
        r#"
apiVersion: trellis/v1
kind: Route
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
    - name: all
      route: [{{destination: {{service: reviews}}}}]
{extra}
"#
    )
}

/// The DestinationPolicy for `reviews` with `spec` lines (indented two).
fn policy(spec: &str) -> String {
    format!(
        r#"
apiVersion: trellis/v1
kind: DestinationPolicy
metadata: {{name: reviews}}
spec:
  host: reviews
{spec}
"#
    )
}

/// Every instance in the pool, regardless of zone.
const ANY_ZONE: &str = "  locality: {preferLocal: false}\n";

struct Mesh {
    c: Cluster,
    caller: SidecarProc,
    /// Held so their processes live as long as the test.
    instances: Vec<SidecarProc>,
    backends: Vec<Backend>,
    h2: H2,
    access_log: std::path::PathBuf,
    /// The caller's `tcp_forward` listener to `db:5432` (a TCP echo).
    db_forward: SocketAddr,
}

impl Mesh {
    /// Applies `docs` and waits until the caller runs that revision.
    async fn apply(&self, docs: &str) -> Result<()> {
        let rev = apply(&self.c, docs).await?;
        self.caller
            .wait_dump(STEP, "the applied revision", |d| {
                d["revision"].as_u64().unwrap_or(0) >= rev
            })
            .await?;
        Ok(())
    }

    async fn get(&self) -> Result<Answer> {
        h2_get(&self.h2, "reviews", "/reviews/1", &[]).await
    }

    /// `n` requests, `concurrency` at a time: each answer and its latency.
    async fn run(&self, n: usize, concurrency: usize) -> Result<Vec<(Answer, Duration)>> {
        futures::stream::iter(0..n)
            .map(|_| async {
                let t = Instant::now();
                let a = self.get().await?;
                Ok((a, t.elapsed()))
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<Result<(Answer, Duration)>>>()
            .await
            .into_iter()
            .collect()
    }

    fn hits(&self) -> Vec<u64> {
        self.backends.iter().map(Backend::hits).collect()
    }

    fn set_all(&self, mode: Mode) {
        for b in &self.backends {
            b.set(mode);
        }
    }

    async fn metric(&self, line_prefix: &str) -> Result<f64> {
        let (_, text) = self.caller.get("/metrics").await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(line_prefix))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum())
    }

    async fn access_log(&self) -> Result<Vec<Value>> {
        let text = tokio::fs::read_to_string(&self.access_log)
            .await
            .unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).context("access-log line is not JSON"))
            .collect()
    }
}

/// Which backend answered (`r1`, `r2`, `r3`), by its body.
fn by(a: &Answer) -> &str {
    a.body.as_str()
}

fn p99(mut lat: Vec<Duration>) -> Duration {
    lat.sort();
    lat[(lat.len() * 99).div_ceil(100) - 1]
}

async fn start() -> Result<Mesh> {
    let c = Cluster::start_with(ClusterOptions {
        tls: true,
        ..ClusterOptions::default()
    })
    .await?;
    let rev = apply(&c, &format!("{SERVICES}---{}", route(""))).await?;
    let mut backends = Vec::new();
    let mut instances = Vec::new();
    for (i, zone) in ["a", "b", "c"].iter().enumerate() {
        let b = Backend::start(&format!("r{}", i + 1)).await?;
        let s = sidecar(
            &c,
            &format!("reviews-{}", i + 1),
            "reviews",
            &[
                "--app-addr".into(),
                b.addr.to_string(),
                "--instance-address".into(),
                "127.0.0.1".into(),
                "--label".into(),
                format!("zone={zone}"),
            ],
        )
        .await?;
        backends.push(b);
        instances.push(s);
    }
    // A TCP service: an echo server behind its own sidecar.
    let echo = tcp_echo().await?;
    instances.push(
        sidecar(
            &c,
            "db-1",
            "db",
            &[
                "--app-addr".into(),
                echo.to_string(),
                "--instance-address".into(),
                "127.0.0.1".into(),
            ],
        )
        .await?,
    );
    let db_forward = SocketAddr::from(([127, 0, 0, 1], trellis_tests::free_ports(1)?[0]));
    let access_log = c.dir().join("caller-access.log");
    // The caller registers too, so it has a zone; nothing calls it.
    let caller = sidecar(
        &c,
        "productpage",
        "productpage",
        &[
            "--app-addr".into(),
            "127.0.0.1:9".into(),
            "--instance-address".into(),
            "127.0.0.1".into(),
            "--label".into(),
            "zone=a".into(),
            "--access-log".into(),
            access_log.display().to_string(),
            "--tcp-forward".into(),
            format!("{db_forward}=db:5432"),
        ],
    )
    .await?;
    caller
        .wait_dump(STEP, "three reviews instances and the db", |d| {
            d["revision"].as_u64().unwrap_or(0) >= rev
                && instances_of(d, "reviews") == 3
                && instances_of(d, "db") == 1
                && d["identity"].is_string()
        })
        .await?;
    for s in &instances {
        s.wait_dump(STEP, "identity", |d| d["identity"].is_string())
            .await?;
    }
    let h2 = h2_client(caller.outbound_addr()?).await?;
    Ok(Mesh {
        c,
        caller,
        instances,
        backends,
        h2,
        access_log,
        db_forward,
    })
}

/// One TCP connection through the caller to `db`: `Some(stream)` once it
/// echoed a line, `None` when the sidecar closed it instead.
async fn db_connection(m: &Mesh) -> Result<Option<TcpStream>> {
    let mut s = TcpStream::connect(m.db_forward).await?;
    s.write_all(b"ping\n").await?;
    let mut buf = [0u8; 5];
    match tokio::time::timeout(STEP, s.read_exact(&mut buf)).await {
        Ok(Ok(_)) if &buf == b"ping\n" => Ok(Some(s)),
        Ok(Ok(_)) => bail!("db echoed {buf:?}"),
        // Closed without an echo: refused.
        Ok(Err(_)) => Ok(None),
        Err(_) => bail!("db connection neither echoed nor closed"),
    }
}

/// `maxConnections` on a TCP service: the second connection is closed at
/// once while the first is open; after the first closes, connections work
/// again.
async fn tcp_connections(m: &Mesh) -> Result<()> {
    m.apply(
        r#"
apiVersion: trellis/v1
kind: DestinationPolicy
metadata: {name: db}
spec:
  host: db
  connectionPool: {maxConnections: 1}
"#,
    )
    .await?;
    let first = db_connection(m).await?.context("the first connection")?;
    ensure!(
        db_connection(m).await?.is_none(),
        "a second connection got through maxConnections: 1"
    );
    drop(first);
    let deadline = Instant::now() + STEP;
    while db_connection(m).await?.is_none() {
        ensure!(
            Instant::now() < deadline,
            "connections still refused after the first closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        m.metric("trellis_circuit_open_total{destination=\"default/db\",limit=\"maxConnections\"}")
            .await?
            >= 1.0
    );
    Ok(())
}

async fn locality(m: &Mesh) -> Result<()> {
    // No policy: the caller's own zone (a) only.
    for (a, _) in m.run(30, 4).await? {
        ensure!(a.status == 200 && by(&a) == "r1", "zone a first: {a:?}");
    }
    // One apply moves zone a's traffic to zone b.
    m.apply(&policy("  locality:\n    shift: [{from: a, to: b}]\n"))
        .await?;
    let before = m.hits();
    for (a, _) in m.run(30, 4).await? {
        ensure!(a.status == 200 && by(&a) == "r2", "shifted to b: {a:?}");
    }
    ensure!(m.hits()[0] == before[0], "zone a got traffic while shifted");
    // Removing the shift brings it back.
    m.apply(&policy("  locality: {preferLocal: true}\n"))
        .await?;
    for (a, _) in m.run(30, 4).await? {
        ensure!(by(&a) == "r1", "back to zone a: {a:?}");
    }
    Ok(())
}

async fn outlier_ejection(m: &Mesh) -> Result<()> {
    m.apply(&policy(&format!(
        "{ANY_ZONE}  outlierDetection:\n    consecutive5xxErrors: 3\n    baseEjectionTime: 2s\n    maxEjectionPercent: 50\n"
    )))
    .await?;
    m.backends[1].set(Mode::Status(500));
    // Sequential requests until r2 has failed three times in a row.
    let mut fives = 0;
    let deadline = Instant::now() + STEP;
    while fives < 3 {
        ensure!(Instant::now() < deadline, "r2 never failed 3 times");
        let a = m.get().await?;
        if a.status == 500 {
            ensure!(by(&a) == "r2", "only r2 fails: {a:?}");
            fives += 1;
        }
    }
    let ejected_at = Instant::now();
    let r2_hits = m.backends[1].hits();
    // Ejected: no request reaches r2 while the ejection lasts.
    while ejected_at.elapsed() < Duration::from_millis(1200) {
        let a = m.get().await?;
        ensure!(a.status == 200, "an ejected endpoint still answered: {a:?}");
    }
    ensure!(
        m.backends[1].hits() == r2_hits,
        "r2 got {} requests while ejected",
        m.backends[1].hits() - r2_hits
    );
    // It comes back when the ejection ends (and now answers well).
    m.backends[1].set(Mode::Ok);
    loop {
        ensure!(ejected_at.elapsed() < STEP, "r2 never came back");
        let a = m.get().await?;
        if by(&a) == "r2" {
            break;
        }
    }
    let back_after = ejected_at.elapsed();
    ensure!(
        back_after >= Duration::from_millis(1500),
        "r2 came back after {back_after:?}, before its 2 s ejection ended"
    );
    // The ejection and the return, in metrics and in the access log. A
    // return is noticed by the next request, so keep sending.
    let deadline = Instant::now() + STEP;
    loop {
        m.get().await?;
        let ejections = m
            .metric("trellis_outlier_ejections_total{destination=\"default/reviews\"}")
            .await?;
        let returns = m
            .metric("trellis_outlier_returns_total{destination=\"default/reviews\"}")
            .await?;
        let notes: Vec<String> = m
            .access_log()
            .await?
            .iter()
            .filter_map(|l| l["resilience"].as_array())
            .flatten()
            .filter_map(|n| n.as_str().map(str::to_string))
            .collect();
        let logged = notes.iter().any(|n| n.starts_with("ejected "))
            && notes.iter().any(|n| n.starts_with("returned "));
        if ejections == 1.0 && returns == 1.0 && logged {
            break;
        }
        ensure!(
            Instant::now() < deadline && ejections <= 1.0,
            "ejections {ejections}, returns {returns}, access-log notes {notes:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("outlier: r2 ejected after 3 × 500, back after {back_after:?}");
    Ok(())
}

async fn circuit_breaking(m: &Mesh) -> Result<()> {
    m.apply(&policy(&format!(
        "{ANY_ZONE}  connectionPool: {{maxConcurrentRequests: 4}}\n"
    )))
    .await?;
    m.set_all(Mode::Delay(Duration::from_secs(2)));
    let answers = m.run(10, 10).await?;
    let ok = answers.iter().filter(|(a, _)| a.status == 200).count();
    let open: Vec<&(Answer, Duration)> = answers
        .iter()
        .filter(|(a, _)| {
            a.status == 503
                && a.headers
                    .get("x-trellis-error")
                    .and_then(|v| v.to_str().ok())
                    == Some("circuit open: maxConcurrentRequests of 4 reached for reviews")
        })
        .collect();
    ensure!(
        ok == 4 && open.len() == 6,
        "want 4 served and 6 refused, got {ok} and {}: {answers:?}",
        open.len()
    );
    // Refused fast, not after waiting for the backends.
    for (a, t) in &open {
        ensure!(*t < Duration::from_millis(250), "refusal took {t:?}: {a:?}");
    }
    // Under the limit again: every request is served. (Two at a time: a
    // request's unit is given back when the sidecar has sent the last of
    // its body, which may be just after the client has read it.)
    m.set_all(Mode::Ok);
    for (a, _) in m.run(40, 2).await? {
        ensure!(a.status == 200, "after recovery: {a:?}");
    }
    ensure!(
        m.metric("trellis_circuit_open_total{destination=\"default/reviews\",limit=\"maxConcurrentRequests\"}")
            .await?
            == 6.0
    );
    Ok(())
}

async fn backup_requests(m: &Mesh) -> Result<()> {
    const N: usize = 1000;
    const CONCURRENCY: usize = 8;
    let tail = Mode::SlowTail {
        every: 20,
        delay: Duration::from_millis(200),
    };
    m.apply(&policy(ANY_ZONE)).await?;
    m.set_all(tail);
    let before: Vec<Duration> = m
        .run(N, CONCURRENCY)
        .await?
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    let p99_before = p99(before);

    m.apply(&policy(&format!(
        "{ANY_ZONE}  backupRequest: {{afterPercentile: 90, maxPercent: 15, minDelay: 10ms}}\n"
    )))
    .await?;
    let sent0 = m.metric("trellis_backup_requests_total").await?;
    let hits0: u64 = m.hits().iter().sum();
    // The first answers teach the sidecar the latency; then measure.
    let warm = m.run(200, CONCURRENCY).await?;
    let after = m.run(N, CONCURRENCY).await?;
    for (a, _) in warm.iter().chain(&after) {
        ensure!(a.status == 200, "{a:?}");
    }
    let p99_after = p99(after.into_iter().map(|(_, t)| t).collect());
    let requests = (N + 200) as f64;
    let backups = m.metric("trellis_backup_requests_total").await? - sent0;
    let won = m.metric("trellis_backup_wins_total").await?;
    let extra = (m.hits().iter().sum::<u64>() - hits0) as f64 - requests;
    eprintln!(
        "backup requests: p99 {p99_before:?} without, {p99_after:?} with; {backups} backups \
         ({:.1} % of {requests} requests, {won} answered first); backend load +{:.1} %",
        backups * 100.0 / requests,
        extra * 100.0 / requests
    );
    ensure!(
        p99_after * 2 < p99_before,
        "backups did not cut the p99: {p99_before:?} → {p99_after:?}"
    );
    ensure!(backups > 0.0 && won > 0.0, "no backup was sent or won");
    ensure!(
        backups <= requests * 0.15 && extra <= requests * 0.15,
        "over budget: {backups} backups, {extra} extra backend requests for {requests}"
    );
    m.set_all(Mode::Ok);
    Ok(())
}

async fn fault_injection(m: &Mesh) -> Result<()> {
    const N: usize = 10_000;
    let delay = Duration::from_millis(200);
    m.apply(&format!(
        "{}---{}",
        policy(ANY_ZONE),
        route(
            "      fault:\n        delay: {percent: 5, fixedDelay: 200ms}\n        abort: {percent: 10, httpStatus: 503}\n"
        )
    ))
    .await?;
    let hits0: u64 = m.hits().iter().sum();
    let answers = m.run(N, 64).await?;
    let aborted = answers
        .iter()
        .filter(|(a, _)| {
            a.status == 503
                && a.headers
                    .get("x-trellis-error")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("fault injected: abort with HTTP 503"))
        })
        .count();
    let delayed = answers.iter().filter(|(_, t)| *t >= delay).count();
    let served = answers.iter().filter(|(a, _)| a.status == 200).count();
    let pct = |x: usize| x as f64 * 100.0 / N as f64;
    eprintln!(
        "fault injection over {N} requests: {:.2} % aborted (want 10), {:.2} % delayed (want 5)",
        pct(aborted),
        pct(delayed)
    );
    ensure!(
        served + aborted == N,
        "other answers: {served} + {aborted} != {N}"
    );
    ensure!(
        (pct(aborted) - 10.0).abs() <= 1.0,
        "aborted {:.2} %",
        pct(aborted)
    );
    ensure!(
        (pct(delayed) - 5.0).abs() <= 1.0,
        "delayed {:.2} %",
        pct(delayed)
    );
    let reached = m.hits().iter().sum::<u64>() - hits0;
    ensure!(
        reached == served as u64,
        "{reached} requests reached backends, {served} were served: aborts must not"
    );
    // A gRPC status abort is a trailers-only gRPC answer.
    m.apply(&route(
        "      fault:\n        abort: {percent: 100, grpcStatus: UNAVAILABLE}\n",
    ))
    .await?;
    let a = m.get().await?;
    ensure!(
        a.status == 200 && a.headers.get("grpc-status").is_some_and(|v| v == "14"),
        "gRPC abort: {a:?}"
    );
    Ok(())
}

async fn degrade(m: &Mesh) -> Result<()> {
    // The switch: the rule answers locally instead of routing.
    m.apply(
        r#"
apiVersion: trellis/v1
kind: Route
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
    - name: all
      degrade: {status: 503, body: "reviews are resting", headers: {content-type: text/plain}}
"#,
    )
    .await?;
    let hits0 = m.hits();
    let a = m.get().await?;
    ensure!(
        a.status == 503 && a.body == "reviews are resting",
        "degraded answer: {a:?}"
    );
    ensure!(m.hits() == hits0, "a degraded request reached a backend");
    m.apply(&route("")).await?;
    let a = m.get().await?;
    ensure!(
        a.status == 200 && a.body.starts_with('r'),
        "degrade off: {a:?}"
    );
    Ok(())
}

async fn zone_outage(m: &mut Mesh) -> Result<()> {
    m.apply(&policy(
        "  locality:\n    failover: [{from: a, to: [c, b]}]\n  outlierDetection:\n    consecutive5xxErrors: 2\n    baseEjectionTime: 30s\n    maxEjectionPercent: 100\n",
    ))
    .await?;
    for (a, _) in m.run(10, 2).await? {
        ensure!(by(&a) == "r1", "zone a first: {a:?}");
    }
    // Zone a goes away: its only instance's sidecar dies.
    m.instances[0].kill().await?;
    let failures = until_served_by(m, "r3").await?;
    eprintln!("zone a outage: {failures} failed requests before zone c took over");
    for (a, _) in m.run(30, 2).await? {
        ensure!(by(&a) == "r3", "zone c is next for zone a: {a:?}");
    }
    // Zone c fails too (its app answers 503): zone b is next.
    m.backends[2].set(Mode::Status(503));
    let failures = until_served_by(m, "r2").await?;
    eprintln!("zone c outage: {failures} failed requests before zone b took over");
    for (a, _) in m.run(30, 2).await? {
        ensure!(by(&a) == "r2", "zone b is last: {a:?}");
    }
    Ok(())
}

/// `maxPendingRequests`: an instance whose "sidecar" accepts TCP and never
/// answers the TLS handshake keeps requests waiting for a connection; past
/// the limit they are refused at once.
async fn pending_requests(m: &Mesh) -> Result<()> {
    let stall = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = stall.local_addr()?.port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = stall.accept().await {
            held.push(s);
        }
    });
    m.apply(&format!(
        r#"
apiVersion: trellis/v1
kind: Instance
metadata: {{name: stalled}}
spec: {{service: reviews, address: 127.0.0.1, port: {port}, labels: {{role: stalled}}}}
---
{}---
{}"#,
        policy(
            "  subsets: [{name: stalled, labels: {role: stalled}}]\n  connectionPool: {maxPendingRequests: 2}\n"
        ),
        route("").replace(
            "destination: {service: reviews}",
            "destination: {service: reviews, subset: stalled}"
        )
    ))
    .await?;
    let answers = m.run(5, 5).await?;
    let refused = answers
        .iter()
        .filter(|(a, t)| {
            a.status == 503
                && *t < Duration::from_millis(500)
                && a.headers.get("x-trellis-error").is_some_and(|v| {
                    v == "circuit open: maxPendingRequests of 2 reached for reviews"
                })
        })
        .count();
    let waited = answers
        .iter()
        .filter(|(a, t)| a.status == 502 && *t >= Duration::from_millis(900))
        .count();
    ensure!(
        refused == 3 && waited == 2,
        "want 3 refused at once and 2 failing after the connect timeout: {answers:?}"
    );
    Ok(())
}

/// Sends requests until `backend` answers one; returns the failures seen.
async fn until_served_by(m: &Mesh, backend: &str) -> Result<usize> {
    let mut failures = 0;
    let deadline = Instant::now() + STEP;
    loop {
        if Instant::now() > deadline {
            bail!("{backend} never answered ({failures} failures)");
        }
        let a = m.get().await?;
        if a.status == 200 && by(&a) == backend {
            return Ok(failures);
        }
        failures += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outliers_circuits_backups_faults_degrade_and_locality() -> Result<()> {
    let mut m = start().await?;
    locality(&m).await.context("locality")?;
    outlier_ejection(&m).await.context("outlier ejection")?;
    circuit_breaking(&m).await.context("circuit breaking")?;
    tcp_connections(&m).await.context("maxConnections")?;
    backup_requests(&m).await.context("backup requests")?;
    fault_injection(&m).await.context("fault injection")?;
    degrade(&m).await.context("degrade")?;
    zone_outage(&mut m).await.context("zone outage")?;
    pending_requests(&m).await.context("pending requests")?;
    Ok(())
}
