//! Transparent interception end to end (`trellis-sidecar iptables`), in a
//! network namespace of its own that has only its loopback interface, so
//! the NAT rules cannot touch the host and no traffic can leave.
//!
//! [`transparent_interception_in_a_network_namespace`] checks what it
//! needs (root, `unshare`, `ip`, `iptables`, `python3`) and fails saying
//! what is missing; then it runs this test binary again under
//! `unshare --net`, asking for the `#[ignore]`d [`interception_in_netns`]
//! only (which refuses to run outside, i.e. without `TRELLIS_IN_NETNS`).
//! Inside:
//!
//! * a TLS three-node cluster; sidecars `reviews` (HTTP backend in this
//!   process), `echo` (a TCP echo server in this process, Service port
//!   7001 `protocol: tcp`) and the client `productpage` with its outbound
//!   listener on 127.0.0.1:15001; all of them, and this process, run as
//!   root;
//! * `trellis-sidecar iptables` prints the rules without installing them,
//!   exits 2 naming `--proxy-uid` when it is missing, and
//!   `--apply --proxy-uid 0` installs them (twice: the second run leaves
//!   the same table), so only non-root processes are redirected;
//! * the "application", a `python3` client running as uid 65534, dials
//!   127.0.0.1:9080 (the reviews Service port; nothing listens there) with
//!   `Host: reviews` and gets the backend's 200, and the backend saw
//!   productpage's SPIFFE ID in `x-trellis-source`: app → NAT → outbound
//!   sidecar → mutual TLS → reviews' sidecar → backend;
//! * root (excluded) dialling 127.0.0.1:9080 is refused: nothing listens
//!   there and root is not redirected;
//! * destinations outside the mesh (ports no Service declares) pass
//!   through unchanged: HTTP (the server sees no `x-trellis-source`) and
//!   opaque TCP;
//! * opaque TCP: the application's bytes to 127.0.0.1:7001 come back from
//!   the echo server through the sidecars (the outbound sidecar maps the
//!   original destination port to the `echo` Service);
//! * `--cleanup` removes the chains and the jumps, after which the
//!   application's connection to 9080 is refused too.
//!
//! The inbound side (`PREROUTING`) cannot be exercised on loopback (local
//! traffic is NATed in `OUTPUT` only); the test checks its rules are
//! installed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::process::Command;
use trellis_tests::http::{instances_of, tcp_echo};
use trellis_tests::sidecar::{apply, sidecar};
use trellis_tests::{bin_path, which, Cluster, ClusterOptions};

/// Set for the copy of this binary that runs inside the namespace.
const IN_NETNS: &str = "TRELLIS_IN_NETNS";
/// The inner test's name, for `--exact`.
const INNER: &str = "interception_in_netns";
/// The whole inner run (cluster, three sidecars, the checks).
const INNER_TIMEOUT: Duration = Duration::from_secs(300);
/// One step: config propagation, one client exchange.
const STEP: Duration = Duration::from_secs(30);
/// The client sidecar's outbound port: the namespace is private, so the
/// default port is free, and the rules' default points at it.
const OUTBOUND_ADDR: &str = "127.0.0.1:15001";
/// The application's uid: `nobody`, anything but the excluded root.
const APP_UID: u32 = 65534;
const SOURCE: &str = "spiffe://trellis.local/ns/default/svc/productpage";
const BODY: &str = "hello from reviews";

const RESOURCES: &str = r#"
apiVersion: trellis/v1
kind: Service
metadata: {name: reviews}
spec:
  ports: [{name: http, port: 9080, protocol: http}]
---
apiVersion: trellis/v1
kind: Service
metadata: {name: echo}
spec:
  ports: [{name: tcp, port: 7001, protocol: tcp}]
"#;

/// The application: a plain TCP client. Args: host port mode hex-payload;
/// mode `http` reads to EOF, `echo` until as many bytes as it sent came
/// back. Prints what it read, or `REFUSED`.
const APP: &str = r#"
import socket, sys
host, port, mode, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3], bytes.fromhex(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(20)
try:
    s.connect((host, port))
except ConnectionRefusedError:
    print("REFUSED")
    sys.exit(0)
s.sendall(payload)
got = b""
while not (mode == "echo" and len(got) >= len(payload)):
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
s.close()
sys.stdout.write(got.decode("latin-1"))
"#;

/// The effective uid, from `/proc/self/status` (no libc here).
fn euid() -> Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
        .context("no Uid line in /proc/self/status")
}

/// A python3 that uid 65534 can run: the system's before `PATH`'s (a
/// pyenv shim under /root is not readable by `nobody`).
fn python3() -> Result<PathBuf> {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .map_or_else(|| which("python3"), Ok)
}

#[tokio::test]
async fn transparent_interception_in_a_network_namespace() -> Result<()> {
    let needs = "this test needs root and util-linux `unshare`, iproute2 `ip`, \
                 `iptables` and `python3` (Debian: apt-get install -y iptables iproute2 python3)";
    let uid = euid()?;
    ensure!(
        uid == 0,
        "running as uid {uid}: {needs}; it creates a network namespace"
    );
    for tool in ["unshare", "ip", "iptables"] {
        which(tool).with_context(|| needs.to_string())?;
    }
    python3().with_context(|| needs.to_string())?;
    bin_path("trellis-sidecar")?;

    let exe = std::env::current_exe()?;
    let child = Command::new(which("unshare")?)
        .arg("--net")
        .arg(&exe)
        .args([
            "--exact",
            INNER,
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(IN_NETNS, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning unshare --net")?;
    let out = tokio::time::timeout(INNER_TIMEOUT, child.wait_with_output())
        .await
        .with_context(|| format!("the in-namespace test did not finish in {INNER_TIMEOUT:?}"))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "the in-namespace test failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    Ok(())
}

/// Runs `program args`; (exit code, stdout, stderr).
async fn run(program: &Path, args: &[&str]) -> Result<(i32, String, String)> {
    let out = tokio::time::timeout(STEP, Command::new(program).args(args).output())
        .await
        .with_context(|| format!("{} {args:?}: timeout", program.display()))?
        .with_context(|| format!("running {}", program.display()))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs `program args`, which must succeed; its stdout.
async fn run_ok(program: &Path, args: &[&str]) -> Result<String> {
    let (code, stdout, stderr) = run(program, args).await?;
    ensure!(
        code == 0,
        "{} {args:?} exited {code}: {stderr}",
        program.display()
    );
    Ok(stdout)
}

/// The nat table as `iptables -S` prints it.
async fn nat_table() -> Result<String> {
    run_ok(&which("iptables")?, &["-w", "-t", "nat", "-S"]).await
}

/// The application's exchange, as uid 65534: what it read, or `REFUSED`.
async fn app(port: u16, mode: &str, payload: &[u8]) -> Result<String> {
    let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    let port = port.to_string();
    let out = tokio::time::timeout(
        STEP,
        Command::new(python3()?)
            .args(["-c", APP, "127.0.0.1", &port, mode, &hex])
            .uid(APP_UID)
            .gid(APP_UID)
            .current_dir("/")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .context("the application did not finish")??;
    ensure!(
        out.status.success(),
        "the application failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The reviews backend: answers [`BODY`], and what it saw (`x-trellis-source`,
/// the path) in `x-seen-*` headers.
async fn backend() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let mut r = Response::new(http_body_util::Full::new(Bytes::from(BODY)));
                        let h = r.headers_mut();
                        if let Some(v) = req.headers().get("x-trellis-source") {
                            h.insert("x-seen-source", v.clone());
                        }
                        if let Ok(v) = req.uri().path().parse() {
                            h.insert("x-seen-path", v);
                        }
                        Ok::<_, Infallible>(r)
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs inside the network namespace made by transparent_interception_in_a_network_namespace"]
async fn interception_in_netns() -> Result<()> {
    ensure!(
        std::env::var_os(IN_NETNS).is_some(),
        "{INNER} changes the NAT table: it only runs inside the network namespace \
         that transparent_interception_in_a_network_namespace makes"
    );
    run_ok(&which("ip")?, &["link", "set", "lo", "up"]).await?;
    let sidecar_bin = bin_path("trellis-sidecar")?;

    // The world: reviews (HTTP) and echo (TCP) behind their sidecars, and
    // productpage's sidecar on the outbound port the rules point at.
    let c = Cluster::start_with(ClusterOptions {
        tls: true,
        ..ClusterOptions::default()
    })
    .await?;
    let rev = apply(&c, RESOURCES).await?;
    let web = backend().await?;
    let echo = tcp_echo().await?;
    let mut upstreams = Vec::new();
    for (name, service, app_addr) in [("reviews-1", "reviews", web), ("echo-1", "echo", echo)] {
        let s = sidecar(
            &c,
            name,
            service,
            &[
                "--app-addr".into(),
                app_addr.to_string(),
                "--instance-address".into(),
                "127.0.0.1".into(),
            ],
        )
        .await?;
        s.wait_dump(STEP, "identity", |d| d["identity"].is_string())
            .await?;
        upstreams.push(s);
    }
    let pp = sidecar(
        &c,
        "productpage",
        "productpage",
        &["--outbound-addr".into(), OUTBOUND_ADDR.into()],
    )
    .await?;
    pp.wait_dump(STEP, "both services' instances", |d| {
        d["revision"].as_u64().unwrap_or(0) >= rev
            && instances_of(d, "reviews") == 1
            && instances_of(d, "echo") == 1
            && d["identity"].is_string()
    })
    .await?;
    ensure!(pp.outbound_addr()?.to_string() == OUTBOUND_ADDR);

    // Printing installs nothing; a missing --proxy-uid is exit 2 naming it.
    let printed = run_ok(
        &sidecar_bin,
        &["iptables", "--proxy-uid", "0", "--inbound-ports", "9999"],
    )
    .await?;
    for want in [
        "iptables -t nat -N TRELLIS_OUTPUT",
        "iptables -t nat -A TRELLIS_OUTPUT -m owner --uid-owner 0 -j RETURN",
        "iptables -t nat -A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "iptables -t nat -A OUTPUT -p tcp -j TRELLIS_OUTPUT",
    ] {
        ensure!(
            printed.lines().any(|l| l == want),
            "printed rules lack {want:?}:\n{printed}"
        );
    }
    ensure!(!nat_table().await?.contains("TRELLIS"), "printing applied");
    let (code, _, stderr) = run(&sidecar_bin, &["iptables", "--apply"]).await?;
    ensure!(
        code == 2 && stderr.contains("--proxy-uid"),
        "{code}: {stderr}"
    );
    let (code, _, stderr) = run(
        &sidecar_bin,
        &[
            "iptables",
            "--proxy-uid",
            "0",
            "--exclude-outbound-ports",
            "x",
        ],
    )
    .await?;
    ensure!(
        code == 2 && stderr.contains("--exclude-outbound-ports"),
        "{code}: {stderr}"
    );

    // Install, twice (idempotent).
    let install = [
        "iptables",
        "--apply",
        "--proxy-uid",
        "0",
        "--inbound-ports",
        "9999",
    ];
    run_ok(&sidecar_bin, &install).await?;
    let table = nat_table().await?;
    for want in [
        "-N TRELLIS_OUTPUT",
        "-N TRELLIS_REDIRECT",
        "-N TRELLIS_INBOUND",
        "-N TRELLIS_IN_REDIRECT",
        "-A OUTPUT -p tcp -j TRELLIS_OUTPUT",
        "-A PREROUTING -p tcp -j TRELLIS_INBOUND",
        "-A TRELLIS_OUTPUT -m owner --uid-owner 0 -j RETURN",
        "-A TRELLIS_INBOUND -p tcp -m tcp --dport 9999 -j TRELLIS_IN_REDIRECT",
        "-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    ] {
        ensure!(
            table.lines().any(|l| l == want),
            "nat table lacks {want:?}:\n{table}"
        );
    }
    run_ok(&sidecar_bin, &install).await?;
    let again = nat_table().await?;
    ensure!(
        again == table,
        "a second --apply changed the table:\n{table}\n---\n{again}"
    );

    // HTTP: the application dials the Service port; the sidecars carry it.
    let request = b"GET /x HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n";
    let answer = app(9080, "http", request).await?;
    let lower = answer.to_ascii_lowercase();
    ensure!(
        lower.starts_with("http/1.1 200") && answer.contains(BODY),
        "the application got:\n{answer}\n--- productpage\n{}",
        pp.log_tail()
    );
    ensure!(
        lower.contains(&format!("x-seen-source: {SOURCE}")) && lower.contains("x-seen-path: /x"),
        "the backend did not see productpage's identity:\n{answer}"
    );

    // Root is not redirected, and nothing listens on 9080.
    match tokio::net::TcpStream::connect("127.0.0.1:9080").await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => bail!("root's connection to 127.0.0.1:9080: {other:?}, expected refused"),
    }

    // Outside the mesh: HTTP and opaque TCP to ports no Service declares
    // pass through unchanged (no mTLS hop, so no x-trellis-source).
    let outside = backend().await?;
    let request = b"GET /ext HTTP/1.1\r\nHost: example.org\r\nConnection: close\r\n\r\n";
    let answer = app(outside.port(), "http", request).await?;
    let lower = answer.to_ascii_lowercase();
    ensure!(
        lower.starts_with("http/1.1 200") && answer.contains(BODY),
        "passthrough HTTP got:\n{answer}\n--- productpage\n{}",
        pp.log_tail()
    );
    ensure!(
        !lower.contains("x-seen-source") && lower.contains("x-seen-path: /ext"),
        "passthrough HTTP went through the mesh:\n{answer}"
    );
    let outside_echo = tcp_echo().await?;
    let payload = format!("outside bytes {:016x}\n", rand::random::<u64>());
    let got = app(outside_echo.port(), "echo", payload.as_bytes()).await?;
    ensure!(
        got == payload,
        "passthrough TCP: sent {payload:?}, got {got:?}"
    );
    let request = b"GET /x HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n";

    // Opaque TCP to the echo Service's port. Checked after the rest so a
    // failure here still lets cleanup be verified; reported at the end.
    let payload = format!("opaque bytes {:016x}\n", rand::random::<u64>());
    let tcp = match app(7001, "echo", payload.as_bytes()).await {
        Ok(got) if got == payload => Ok(()),
        Ok(got) => Err(anyhow::anyhow!(
            "opaque TCP through the sidecars: sent {payload:?}, got {got:?}\n--- productpage\n{}",
            pp.log_tail()
        )),
        Err(e) => Err(e.context("opaque TCP through the sidecars")),
    };

    // Cleanup removes everything; the application is refused like root.
    run_ok(&sidecar_bin, &["iptables", "--cleanup"]).await?;
    let table = nat_table().await?;
    ensure!(!table.contains("TRELLIS"), "left after --cleanup:\n{table}");
    run_ok(&sidecar_bin, &["iptables", "--cleanup"]).await?;
    let answer = app(9080, "http", request).await?;
    ensure!(answer.trim() == "REFUSED", "after cleanup: {answer}");
    tcp
}
