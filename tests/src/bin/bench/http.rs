//! `trellis-bench http`: the sidecar data-path benchmark (issue 5). One run
//! measures three ways to reach the same backend:
//!
//! - `direct`: the load generator talks to the backend itself;
//! - `trellis`: through a Trellis sidecar pair — the client sidecar's
//!   outbound listener (`Host: bench`), HTTP/2 over mutual TLS to the server
//!   sidecar's inbound listener, HTTP/1.1 to the backend. The control plane
//!   is a 3-node TLS cluster started here; the Service `bench` has no Route,
//!   so its default route applies;
//! - `nginx`: through an nginx pair (front proxy → back proxy → backend),
//!   configured as in `shared/PEERS.md`: one worker each, keep-alive
//!   upstreams, no access log, *plaintext* between the proxies. The front
//!   nginx also listens with h2c (prior knowledge) for the HTTP/2 scenarios.
//!
//! The backend is this binary's hidden `backend` subcommand in its own
//! process (HTTP/1.1 and h2c prior knowledge, "hello world\n"), so its CPU
//! is not the load generator's. The load generator runs in this process on
//! a single-threaded runtime; with pinning (the default, `--no-pin` turns it
//! off) it is on core 0 and the backend, sidecars and nginx on core 1 (they
//! are started while this process is pinned to core 1, so they inherit it
//! and size their runtimes to one core, like nginx's single worker; the
//! control-plane nodes are started before and are not pinned).
//!
//! Scenarios, for HTTP/1.1 keep-alive (`h1`) and HTTP/2 prior knowledge
//! (`h2`):
//!
//! - fixed rate, open loop (`--rates`, default 1,000 and 10,000 req/s;
//!   `--no-rates` skips them, e.g. to profile saturation alone):
//!   request *i* is due at `start + i / rate`; latency is measured from that
//!   scheduled time, so a stalled target is charged for the requests it
//!   delayed (no coordinated omission). At ≤ 1,000 req/s there is ONE
//!   connection (the issue's "added latency at one connection"); above that
//!   h1 uses a pool of [`RATE_POOL_H1`] connections and h2 one multiplexed
//!   connection. Send times are hit by spinning (yielding) for the last
//!   stretch, since tokio's timer only has millisecond resolution.
//! - saturation, closed loop (`--no-saturation` skips it):
//!   [`SATURATION_IN_FLIGHT`] requests always in flight (h1: that many
//!   connections; h2: [`SATURATION_H2_CONNECTIONS`] connections sharing
//!   them as streams); reports req/s and service time.
//!
//! Each scenario runs every target once per round, the order rotated each
//! round, for `--rounds` rounds; tables show medians over rounds, "added"
//! latency is target − direct of those medians. A run with errors (non-200,
//! transport error, or no answer within [`REQUEST_TIMEOUT`]) is flagged.
//!
//! Per proxy process (each sidecar; each nginx worker) and for the backend:
//! CPU per request = (utime + stime) delta over the run / requests completed
//! in it (warm-up included on both sides); RSS (`VmRSS`) idle after setup,
//! after the load, and the peak (`VmHWM`). Each run also measures the CPU
//! the rest of the machine used meanwhile (`/proc/stat` minus the above and
//! the load generator) and flags rows above [`OTHER_CPU_WARN`]: on a shared
//! 2-core machine a compiler next to the bench ruins the figures. Results go
//! to stdout as tables, raw figures with `--json FILE`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::ValueEnum;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use trellis_tests::sidecar::{apply, sidecar, SidecarProc};
use trellis_tests::{median, parse_duration, Cluster, ClusterOptions, Latencies};

/// What the backend answers to every request.
const BODY: &str = "hello world\n";
/// Host / :authority of every request: the Service name the client sidecar
/// routes on (the backend and nginx ignore it).
const BENCH_HOST: &str = "bench";
const BENCH_RESOURCES: &str = r#"
apiVersion: trellis/v1
kind: Service
metadata: {name: bench}
spec:
  ports: [{name: http, port: 8080, protocol: http}]
"#;
/// Rates up to this use one connection: the issue's "added latency at one
/// connection" is taken at 1,000 req/s.
const ONE_CONNECTION_MAX_RATE: u64 = 1_000;
/// h1 connections for rates above [`ONE_CONNECTION_MAX_RATE`]: at 10,000
/// req/s one keep-alive connection would have to turn every request around
/// in 100 µs, about the nginx pair's p50 alone, so it would measure
/// queueing; 4 give headroom without turning it into a connection-count
/// test. h2 multiplexes and keeps one connection at every rate.
const RATE_POOL_H1: usize = 4;
/// Requests in flight in the saturation (closed-loop) scenario.
const SATURATION_IN_FLIGHT: usize = 64;
/// h2 connections in the saturation scenario (the in-flight requests are
/// spread over them as streams: 4 × 16 by default).
const SATURATION_H2_CONNECTIONS: usize = 4;
/// A request without a complete answer after this counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The open-loop generator sleeps on tokio's (1 ms resolution) timer until
/// this long before a send time, then spins (yielding) to hit it.
const SPIN_WINDOW: Duration = Duration::from_millis(2);
/// First send time after the connections are up.
const START_DELAY: Duration = Duration::from_millis(20);
/// Pause after a transport error before reconnecting.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(10);
/// Quiet time between two runs (lets closed connections drain).
const RUN_GAP: Duration = Duration::from_millis(500);
/// Deadlines for processes to listen and sidecars to see the config.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);
/// Cores with pinning: load generator / everything it measures.
const LOADGEN_CPU: u32 = 0;
const SERVER_CPU: u32 = 1;
/// Linux's USER_HZ, the unit of /proc/<pid>/stat times (sysconf(_SC_CLK_TCK)
/// is 100 on every Linux ABI; hard-coded to avoid a libc dependency).
const CLOCK_TICKS_PER_SEC: f64 = 100.0;
/// A 1-minute load average above this before setup means something else
/// is using the machine (the bench itself has not started anything yet).
const BUSY_LOADAVG: f64 = 0.5;
/// CPU (in cores) used during a run by processes other than the load
/// generator, the target's and the backend; above this the row is flagged
/// as disturbed. Undisturbed runs measured 0.00–0.2 here (the control
/// plane, idle targets, softirq time not charged to a process); a compiler
/// or test run next to the bench shows up as ≥ 1.
const OTHER_CPU_WARN: f64 = 0.3;
/// Issue 5's targets.
const TARGET_P99_ADDED_US: f64 = 1_000.0;
const TARGET_CPU_US_PER_REQ: f64 = 10.0;
const TARGET_IDLE_RSS_BYTES: f64 = 20e6;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    H1,
    H2,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::H1 => "h1",
            Self::H2 => "h2",
        })
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Direct,
    Trellis,
    Nginx,
}

impl std::fmt::Display for TargetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::Trellis => "trellis",
            Self::Nginx => "nginx",
        })
    }
}

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct HttpArgs {
    /// Measured time per run (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load before each measurement, same scenario, not recorded.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Repetitions of every scenario × target; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Fixed open-loop rates in req/s, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub rates: Vec<u64>,
    /// Skip the fixed-rate scenarios (saturation only, e.g. for profiling).
    #[arg(long)]
    pub no_rates: bool,
    /// Skip the saturation (closed-loop) scenario.
    #[arg(long)]
    pub no_saturation: bool,
    /// Protocols, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "h1,h2")]
    pub protocols: Vec<Proto>,
    /// Targets, comma-separated (`direct` is always included: added
    /// latency is relative to it).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,trellis,nginx"
    )]
    pub targets: Vec<TargetKind>,
    /// Do not pin the load generator and the servers to separate cores.
    #[arg(long)]
    pub no_pin: bool,
    /// Runtime worker threads of both sidecars (`trellis-sidecar
    /// --workers`); default: the sidecar's own (one per usable CPU, so one
    /// when pinned).
    #[arg(long)]
    pub sidecar_workers: Option<usize>,
    /// Write every run, the medians and the process figures as JSON here.
    #[arg(long)]
    #[serde(skip)]
    pub json: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BackendArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub addr: SocketAddr,
    /// Write the bound address here once listening.
    #[arg(long)]
    pub addr_file: PathBuf,
}

// ---------------------------------------------------------------------------
// Backend
// ---------------------------------------------------------------------------

/// The hidden `backend` subcommand: HTTP/1.1 and h2c prior knowledge on one
/// port, "hello world\n" to everything, until killed.
pub async fn backend(a: BackendArgs) -> Result<()> {
    let listener = TcpListener::bind(a.addr)
        .await
        .with_context(|| format!("binding {}", a.addr))?;
    let addr = listener.local_addr().context("local_addr")?;
    let tmp = a.addr_file.with_extension("tmp");
    std::fs::write(&tmp, addr.to_string()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.addr_file)
        .with_context(|| format!("renaming to {}", a.addr_file.display()))?;
    loop {
        let (s, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("backend: accept: {e}");
                tokio::time::sleep(RECONNECT_BACKOFF).await;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                    BODY.as_bytes(),
                ))))
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// A child process that gets SIGTERM (then SIGKILL) when dropped: nginx's
/// master takes its worker down on SIGTERM, not on SIGKILL.
struct Proc {
    name: String,
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Self> {
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        let pid = child.id().with_context(|| format!("{name}: no pid"))?;
        Ok(Self {
            name: name.into(),
            child: Some(child),
            pid,
            log,
        })
    }

    /// Polls `ready` until it holds; fails early if the process exits.
    async fn wait_ready<T>(&mut self, mut ready: impl FnMut() -> Option<T>) -> Result<T> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(v) = ready() {
                return Ok(v);
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait().context("try_wait")? {
                    bail!(
                        "{} exited with {st} before it was ready\n{}",
                        self.name,
                        trellis_tests::log_tail(&self.log, 20)
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready within {START_TIMEOUT:?}\n{}",
                    self.name,
                    trellis_tests::log_tail(&self.log, 20)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(self.pid.to_string())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(POLL);
            }
            let _ = c.start_kill();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// (utime + stime) in clock ticks.
fn proc_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the command: state is [0], ppid [1]; utime (field 14) is [11].
    let num = |i: usize| -> Result<u64> {
        f.get(i)
            .with_context(|| format!("/proc/{pid}/stat: field {i} missing"))?
            .parse::<u64>()
            .with_context(|| format!("/proc/{pid}/stat: field {i}"))
    };
    Ok(num(11)? + num(12)?)
}

/// Busy clock ticks of the whole machine (all cores) from `/proc/stat`.
fn system_busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let cpu = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .context("/proc/stat has no cpu line")?;
    let f: Vec<u64> = cpu
        .split_whitespace()
        .map(|v| v.parse().context("/proc/stat: not a number"))
        .collect::<Result<_>>()?;
    // user nice system idle iowait irq softirq steal: all but idle, iowait.
    Ok([0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum())
}

fn proc_ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(1)?.parse().ok()
}

/// A `/proc/<pid>/status` field's first word (`VmRSS` → "1234" kB).
fn status_field(pid: u32, field: &str) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let prefix = format!("{field}:");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.split_whitespace().next())
        .map(str::to_string)
        .with_context(|| format!("/proc/{pid}/status has no {field}"))
}

fn mem_kib(pid: u32, field: &str) -> Result<u64> {
    status_field(pid, field)?
        .parse()
        .with_context(|| format!("/proc/{pid}/status: {field}"))
}

fn numeric_pids() -> Result<Vec<u32>> {
    Ok(std::fs::read_dir("/proc")
        .context("reading /proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// The sidecar's pid (`SidecarProc` does not expose it): the
/// `trellis-sidecar` process whose command line holds its data dir.
fn sidecar_pid(s: &SidecarProc) -> Result<u32> {
    let dir = s.data_dir().to_string_lossy().to_string();
    for pid in numeric_pids()? {
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("trellis-sidecar")) && args.contains(&dir) {
            return Ok(pid);
        }
    }
    bail!("no trellis-sidecar process with data dir {dir}")
}

fn children_of(parent: u32) -> Result<Vec<u32>> {
    Ok(numeric_pids()?
        .into_iter()
        .filter(|&p| proc_ppid(p) == Some(parent))
        .collect())
}

/// `taskset -a -p -c CPU PID`: every thread of `pid` to core `cpu`.
async fn pin(pid: u32, cpu: u32) -> Result<()> {
    let out = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .output()
        .await
        .context("running taskset (util-linux); use --no-pin without it")?;
    ensure!(
        out.status.success(),
        "taskset -a -p -c {cpu} {pid}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn tcp_listening(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

// ---------------------------------------------------------------------------
// The world: backend, Trellis, nginx
// ---------------------------------------------------------------------------

/// A process whose CPU and memory are reported.
#[derive(Clone, Debug, Serialize)]
struct Watched {
    target: TargetKind,
    role: String,
    pid: u32,
    cpus: String,
}

struct World {
    dir: tempfile::TempDir,
    backend: Proc,
    backend_addr: SocketAddr,
    cluster: Option<Cluster>,
    sidecars: Vec<SidecarProc>,
    trellis_addr: Option<SocketAddr>,
    nginx: Vec<Proc>,
    nginx_addr: Option<SocketAddr>,
    nginx_h2c_addr: Option<SocketAddr>,
    watched: Vec<Watched>,
}

impl World {
    fn addr(&self, t: TargetKind, proto: Proto) -> Result<SocketAddr> {
        match (t, proto) {
            (TargetKind::Direct, _) => Ok(self.backend_addr),
            (TargetKind::Trellis, _) => self.trellis_addr.context("trellis pair not started"),
            (TargetKind::Nginx, Proto::H1) => self.nginx_addr.context("nginx pair not started"),
            (TargetKind::Nginx, Proto::H2) => self
                .nginx_h2c_addr
                .context("nginx pair not started with h2c"),
        }
    }

    /// The processes whose CPU a run of `t` is charged to: the target's
    /// proxies, then the backend (every target's requests end there).
    fn procs(&self, t: TargetKind) -> Vec<&Watched> {
        let mut v: Vec<&Watched> = self
            .watched
            .iter()
            .filter(|w| w.target == t && w.target != TargetKind::Direct)
            .collect();
        v.extend(
            self.watched
                .iter()
                .filter(|w| w.target == TargetKind::Direct),
        );
        v
    }

    async fn shutdown(mut self) {
        for p in &mut self.nginx {
            p.terminate();
        }
        for s in &mut self.sidecars {
            let _ = s.stop(Duration::from_secs(3)).await;
        }
        self.backend.terminate();
        drop(self.cluster.take());
    }
}

async fn start_backend(dir: &Path) -> Result<(Proc, SocketAddr)> {
    let exe = std::env::current_exe().context("locating trellis-bench")?;
    let addr_file = dir.join("backend.addr");
    let mut cmd = Command::new(exe);
    cmd.args(["backend", "--addr", "127.0.0.1:0", "--addr-file"])
        .arg(&addr_file);
    let mut p = Proc::spawn("backend", cmd, dir.join("backend.log"))?;
    let addr = p
        .wait_ready(|| {
            std::fs::read_to_string(&addr_file)
                .ok()?
                .trim()
                .parse::<SocketAddr>()
                .ok()
        })
        .await?;
    Ok((p, addr))
}

fn bench_instances(d: &serde_json::Value) -> usize {
    d["resources"].as_array().map_or(0, |rs| {
        rs.iter()
            .filter(|r| r["kind"] == "Instance" && r["spec"]["service"] == BENCH_HOST)
            .count()
    })
}

/// The Service `bench`, a server sidecar in front of the backend and a
/// client sidecar (`loadgen`); returns them (client first) once the client
/// holds the bench instance, and the client's outbound address.
async fn start_trellis(
    c: &Cluster,
    backend: SocketAddr,
    workers: Option<usize>,
) -> Result<(Vec<SidecarProc>, SocketAddr)> {
    let rev = apply(c, BENCH_RESOURCES)
        .await
        .context("applying the bench Service")?;
    let workers: Vec<String> = workers
        .map(|n| vec!["--workers".into(), n.to_string()])
        .unwrap_or_default();
    let mut server_args = vec![
        "--app-addr".into(),
        backend.to_string(),
        "--instance-address".into(),
        "127.0.0.1".into(),
    ];
    server_args.extend(workers.iter().cloned());
    let server = sidecar(c, "bench-server", BENCH_HOST, &server_args)
        .await
        .context("starting the server sidecar")?;
    let client = sidecar(c, "bench-client", "loadgen", &workers)
        .await
        .context("starting the client sidecar")?;
    client
        .wait_dump(START_TIMEOUT, "config with the bench instance", |d| {
            d["revision"].as_u64().unwrap_or(0) >= rev
                && bench_instances(d) == 1
                && d["identity"].is_string()
        })
        .await?;
    server
        .wait_dump(START_TIMEOUT, "identity", |d| d["identity"].is_string())
        .await?;
    let out = client.outbound_addr()?;
    Ok((vec![client, server], out))
}

/// nginx config as in PEERS.md, plus private temp paths so nothing outside
/// `dir` is touched. It listens on `port` (HTTP/1.1) and, with `h2c_port`,
/// there too with HTTP/2 prior knowledge (nginx 1.22's `listen ... http2`
/// without TLS serves only h2c, hence a second port).
fn nginx_conf(
    dir: &Path,
    name: &str,
    port: u16,
    h2c_port: Option<u16>,
    next_hop: SocketAddr,
) -> String {
    let d = dir.display();
    let h2c = h2c_port.map_or(String::new(), |p| {
        format!("\n    listen 127.0.0.1:{p} http2;")
    });
    format!(
        r#"worker_processes 1;
daemon off;
pid {d}/{name}.pid;
error_log {d}/{name}.err warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
  access_log off; keepalive_requests 10000000; keepalive_timeout 60s;
  client_body_temp_path {d}/{name}-body; proxy_temp_path {d}/{name}-proxy;
  fastcgi_temp_path {d}/{name}-fastcgi; uwsgi_temp_path {d}/{name}-uwsgi; scgi_temp_path {d}/{name}-scgi;
  upstream up {{ server {next_hop}; keepalive 64; keepalive_requests 10000000; }}
  server {{ listen 127.0.0.1:{port};{h2c}
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
}}
"#
    )
}

/// Starts one nginx; returns it, its HTTP/1.1 address and (with `h2c`) its
/// h2c address.
async fn start_nginx(
    dir: &Path,
    name: &str,
    next_hop: SocketAddr,
    h2c: bool,
) -> Result<(Proc, SocketAddr, Option<SocketAddr>)> {
    let ports = trellis_tests::free_ports(2)?;
    let (port, h2c_port) = (ports[0], h2c.then_some(ports[1]));
    let conf = dir.join(format!("{name}.conf"));
    std::fs::write(&conf, nginx_conf(dir, name, port, h2c_port, next_hop))
        .with_context(|| format!("writing {}", conf.display()))?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-e")
        .arg(dir.join(format!("{name}.starterr")))
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir);
    let mut p = Proc::spawn(name, cmd, dir.join(format!("{name}.log")))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let h2c_addr = h2c_port.map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
    p.wait_ready(|| (tcp_listening(addr) && h2c_addr.is_none_or(tcp_listening)).then_some(()))
        .await
        .with_context(|| {
            format!(
                "{name}: {}",
                std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default()
            )
        })?;
    Ok((p, addr, h2c_addr))
}

/// `/proc/loadavg`'s three averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |e| format!("? ({e})"),
        |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

fn nginx_version() -> String {
    std::process::Command::new("nginx")
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_else(|e| format!("nginx -v failed: {e}"))
}

// ---------------------------------------------------------------------------
// Load generator
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
enum Load {
    /// Open loop at this many req/s.
    Rate(u64),
    /// Closed loop with this many requests in flight.
    Saturation(usize),
}

#[derive(Clone, Copy, Debug, Serialize)]
struct Scenario {
    proto: Proto,
    load: Load,
    connections: usize,
}

impl Scenario {
    fn new(proto: Proto, load: Load) -> Self {
        let connections = match (proto, load) {
            (Proto::H2, Load::Rate(_)) => 1,
            (Proto::H1, Load::Rate(r)) if r <= ONE_CONNECTION_MAX_RATE => 1,
            (Proto::H1, Load::Rate(_)) => RATE_POOL_H1,
            (Proto::H1, Load::Saturation(n)) => n,
            (Proto::H2, Load::Saturation(n)) => SATURATION_H2_CONNECTIONS.min(n),
        };
        Self {
            proto,
            load,
            connections,
        }
    }

    fn label(&self) -> String {
        let conns = match (self.proto, self.load) {
            (Proto::H2, Load::Saturation(n)) => format!(
                "{} connections × {} streams",
                self.connections,
                n.div_ceil(self.connections)
            ),
            (_, _) if self.connections == 1 => "1 connection".into(),
            (_, _) => format!("{} connections", self.connections),
        };
        match self.load {
            Load::Rate(r) => format!(
                "{} · {} req/s open loop · {conns}",
                self.proto,
                thousands(r)
            ),
            Load::Saturation(n) => {
                format!("{} · saturation, {n} in flight · {conns}", self.proto)
            }
        }
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let groups: Vec<String> = s
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|g| String::from_utf8_lossy(g).into_owned())
        .collect();
    groups.join(",")
}

/// One HTTP client connection.
enum Conn {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl Conn {
    async fn open(addr: SocketAddr, proto: Proto) -> Result<Self> {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true).context("TCP_NODELAY")?;
        let io = TokioIo::new(s);
        Ok(match proto {
            Proto::H1 => {
                let (send, conn) = http1::handshake(io).await.context("h1 handshake")?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Conn::H1(send)
            }
            Proto::H2 => {
                let (send, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .context("h2 handshake")?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Conn::H2(send)
            }
        })
    }

    /// Another handle on the same connection (h2 only; h1 cannot share).
    fn share(&self) -> Option<Self> {
        match self {
            Conn::H1(_) => None,
            Conn::H2(s) => Some(Conn::H2(s.clone())),
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Conn::H1(s) => s.is_closed(),
            Conn::H2(s) => s.is_closed(),
        }
    }

    /// GET / and read the whole body: Ok(status) or a transport error.
    async fn get(&mut self) -> Result<StatusCode> {
        let resp = match self {
            Conn::H1(s) => {
                s.ready().await.context("h1 connection")?;
                let req = Request::get("/")
                    .header(hyper::header::HOST, BENCH_HOST)
                    .body(Empty::new())
                    .context("building request")?;
                s.send_request(req).await.context("h1 request")?
            }
            Conn::H2(s) => {
                s.ready().await.context("h2 connection")?;
                let req = Request::get(format!("http://{BENCH_HOST}/"))
                    .body(Empty::new())
                    .context("building request")?;
                s.send_request(req).await.context("h2 request")?
            }
        };
        let status = resp.status();
        resp.into_body()
            .collect()
            .await
            .context("reading the body")?;
        Ok(status)
    }
}

/// What one run of the load generator saw.
#[derive(Default)]
struct Stats {
    /// Latencies of measured requests that got a 200.
    lat: Latencies,
    ok: u64,
    errors: u64,
    /// Every completed request (warm-up included, errors included): the
    /// denominator of CPU per request.
    total: u64,
    first_error: Option<String>,
    /// Completion of the last measured request.
    last_done: Option<Instant>,
}

impl Stats {
    fn record(&mut self, measured: bool, from: Instant, outcome: &Outcome) {
        let done = Instant::now();
        self.total += 1;
        if !measured {
            return;
        }
        self.last_done = Some(self.last_done.map_or(done, |l| l.max(done)));
        match outcome {
            Outcome::Ok => {
                self.ok += 1;
                self.lat.record(done.saturating_duration_since(from));
            }
            Outcome::Err(e) | Outcome::Broken(e) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(e.clone());
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

enum Outcome {
    Ok,
    /// An answer other than 200 (the connection is fine).
    Err(String),
    /// Transport error or timeout: reconnect.
    Broken(String),
}

async fn one_request(conn: &mut Conn) -> Outcome {
    match tokio::time::timeout(REQUEST_TIMEOUT, conn.get()).await {
        Ok(Ok(StatusCode::OK)) => Outcome::Ok,
        Ok(Ok(s)) => Outcome::Err(format!("status {s}")),
        Ok(Err(e)) => Outcome::Broken(format!("{e:#}")),
        Err(_) => Outcome::Broken(format!("no answer within {REQUEST_TIMEOUT:?}")),
    }
}

/// Reopens `conn` after a transport error (errors while reconnecting are
/// counted by the next request failing fast).
async fn reconnect(conn: &mut Conn, addr: SocketAddr, proto: Proto) {
    tokio::time::sleep(RECONNECT_BACKOFF).await;
    if let Ok(c) = Conn::open(addr, proto).await {
        *conn = c;
    }
}

/// Waits until `t` precisely: tokio's timer until shortly before, then
/// yielding (which also polls I/O) until the clock passes it.
async fn wait_until(t: Instant) {
    if let Some(far) = t.checked_sub(SPIN_WINDOW) {
        if far > Instant::now() {
            tokio::time::sleep_until(far.into()).await;
        }
    }
    while Instant::now() < t {
        tokio::task::yield_now().await;
    }
}

/// The open-loop schedule: request `i` is due at `start + i / rate`.
#[derive(Clone, Copy)]
struct Plan {
    start: Instant,
    rate: u64,
    n: u64,
    measure_from: u64,
}

impl Plan {
    fn at(&self, i: u64) -> Instant {
        let nanos = u128::from(i) * 1_000_000_000 / u128::from(self.rate);
        self.start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

struct LoadSpec {
    addr: SocketAddr,
    scenario: Scenario,
    warmup: Duration,
    duration: Duration,
}

struct LoadResult {
    stats: Stats,
    /// Seconds the measured requests span (achieved rate = ok / this).
    measured_secs: f64,
}

/// Runs one scenario against one address on a fresh single-threaded
/// runtime (call from a blocking thread).
fn run_load(spec: LoadSpec) -> Result<LoadResult> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the load generator's runtime")?;
    rt.block_on(async move {
        match spec.scenario.load {
            Load::Rate(rate) => open_loop(&spec, rate).await,
            Load::Saturation(n) => closed_loop(&spec, n).await,
        }
    })
}

async fn open_connections(spec: &LoadSpec) -> Result<Vec<Conn>> {
    let mut conns = Vec::new();
    for _ in 0..spec.scenario.connections {
        conns.push(Conn::open(spec.addr, spec.scenario.proto).await?);
    }
    Ok(conns)
}

async fn open_loop(spec: &LoadSpec, rate: u64) -> Result<LoadResult> {
    ensure!(rate > 0, "rate must be positive");
    let (addr, proto) = (spec.addr, spec.scenario.proto);
    let mut conns = open_connections(spec).await?;
    let per_sec = |d: Duration| (d.as_secs_f64() * rate as f64).ceil() as u64;
    let measure_from = per_sec(spec.warmup);
    let plan = Plan {
        start: Instant::now() + START_DELAY,
        rate,
        n: measure_from + per_sec(spec.duration),
        measure_from,
    };
    let stats = Arc::new(Mutex::new(Stats::default()));
    match proto {
        Proto::H1 => {
            // One worker per connection, taking the next due request from a
            // shared counter: a busy connection leaves it to a free one, and
            // when all are busy the request waits (and is charged for it).
            let next = Arc::new(AtomicU64::new(0));
            let mut workers = Vec::new();
            for mut conn in conns {
                let (next, stats) = (next.clone(), stats.clone());
                workers.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= plan.n {
                            break;
                        }
                        let due = plan.at(i);
                        wait_until(due).await;
                        let out = one_request(&mut conn).await;
                        lock(&stats).record(i >= plan.measure_from, due, &out);
                        if matches!(out, Outcome::Broken(_)) || conn.is_closed() {
                            reconnect(&mut conn, addr, proto).await;
                        }
                    }
                }));
            }
            for w in workers {
                w.await.context("load worker panicked")?;
            }
        }
        Proto::H2 => {
            // A dispatcher spawns each request at its due time on the
            // connections in turn; nothing bounds the requests in flight.
            let mut set = tokio::task::JoinSet::new();
            for i in 0..plan.n {
                let due = plan.at(i);
                wait_until(due).await;
                let k = (i % conns.len() as u64) as usize;
                if conns[k].is_closed() {
                    reconnect(&mut conns[k], addr, proto).await;
                }
                let mut conn = conns[k].share().context("h2 connection cannot be shared")?;
                let stats = stats.clone();
                set.spawn(async move {
                    let out = one_request(&mut conn).await;
                    lock(&stats).record(i >= plan.measure_from, due, &out);
                });
                while set.try_join_next().is_some() {}
            }
            while set.join_next().await.is_some() {}
        }
    }
    let stats = Arc::try_unwrap(stats)
        .map_err(|_| anyhow::anyhow!("load tasks still hold the stats"))?
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    let from = plan.at(plan.measure_from);
    let measured_secs = stats
        .last_done
        .map_or(0.0, |l| l.saturating_duration_since(from).as_secs_f64());
    Ok(LoadResult {
        stats,
        measured_secs,
    })
}

async fn closed_loop(spec: &LoadSpec, in_flight: usize) -> Result<LoadResult> {
    let (addr, proto) = (spec.addr, spec.scenario.proto);
    // h1: one connection per request in flight; h2: the in-flight
    // requests share the connections as streams.
    let mut conns = open_connections(spec).await?;
    let mut per_task = Vec::new();
    for k in 0..in_flight {
        per_task.push(match proto {
            Proto::H1 => conns.pop().context("fewer h1 connections than in flight")?,
            Proto::H2 => conns[k % conns.len()]
                .share()
                .context("h2 connection cannot be shared")?,
        });
    }
    drop(conns);
    let start = Instant::now();
    let measure_start = start + spec.warmup;
    let end = measure_start + spec.duration;
    let stats = Arc::new(Mutex::new(Stats::default()));
    let mut tasks = Vec::new();
    for mut conn in per_task {
        let stats = stats.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let out = one_request(&mut conn).await;
                let measured = t >= measure_start && Instant::now() <= end;
                lock(&stats).record(measured, t, &out);
                if matches!(out, Outcome::Broken(_)) || conn.is_closed() {
                    reconnect(&mut conn, addr, proto).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.context("load worker panicked")?;
    }
    let stats = Arc::try_unwrap(stats)
        .map_err(|_| anyhow::anyhow!("load tasks still hold the stats"))?
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    Ok(LoadResult {
        stats,
        measured_secs: spec.duration.as_secs_f64(),
    })
}

// ---------------------------------------------------------------------------
// Runs and summaries
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize)]
struct ProcCpu {
    role: String,
    cpu_us_per_req: f64,
}

#[derive(Clone, Debug, Serialize)]
struct RunResult {
    proto: Proto,
    load: Load,
    connections: usize,
    target: TargetKind,
    round: usize,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    achieved_rps: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// Requests completed over the whole run (warm-up included).
    total_requests: u64,
    cpu: Vec<ProcCpu>,
    /// CPU used by everything but the load generator and the processes of
    /// this target (control-plane nodes, other targets idling, anything
    /// else on the machine), in cores: a check that the run was undisturbed.
    other_cpu_cores: f64,
}

fn us(d: Option<Duration>) -> f64 {
    d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
}

async fn run_one(
    world: &World,
    a: &HttpArgs,
    sc: Scenario,
    target: TargetKind,
    round: usize,
    peak_after: &mut BTreeMap<u32, u64>,
) -> Result<RunResult> {
    let procs = world.procs(target);
    let before = procs
        .iter()
        .map(|p| proc_ticks(p.pid))
        .collect::<Result<Vec<_>>>()?;
    let me = std::process::id();
    let (sys0, me0, t_start) = (system_busy_ticks()?, proc_ticks(me)?, Instant::now());
    let spec = LoadSpec {
        addr: world.addr(target, sc.proto)?,
        scenario: sc,
        warmup: a.warmup,
        duration: a.duration,
    };
    let LoadResult {
        mut stats,
        measured_secs,
    } = tokio::task::spawn_blocking(move || run_load(spec))
        .await
        .context("load generator thread")??;
    let (sys1, me1, wall) = (
        system_busy_ticks()?,
        proc_ticks(me)?,
        t_start.elapsed().as_secs_f64(),
    );
    let mut cpu = Vec::new();
    let mut ours = me1.saturating_sub(me0);
    for (p, t0) in procs.iter().zip(before) {
        let t1 = proc_ticks(p.pid)?;
        ours += t1.saturating_sub(t0);
        let secs = t1.saturating_sub(t0) as f64 / CLOCK_TICKS_PER_SEC;
        cpu.push(ProcCpu {
            role: p.role.clone(),
            cpu_us_per_req: secs * 1e6 / stats.total.max(1) as f64,
        });
        let rss = mem_kib(p.pid, "VmRSS")?;
        let e = peak_after.entry(p.pid).or_insert(0);
        *e = (*e).max(rss);
    }
    let other = sys1.saturating_sub(sys0).saturating_sub(ours) as f64 / CLOCK_TICKS_PER_SEC;
    Ok(RunResult {
        other_cpu_cores: other / wall.max(1e-9),
        proto: sc.proto,
        load: sc.load,
        connections: sc.connections,
        target,
        round,
        ok: stats.ok,
        errors: stats.errors,
        first_error: stats.first_error.take(),
        achieved_rps: if measured_secs > 0.0 {
            stats.ok as f64 / measured_secs
        } else {
            0.0
        },
        p50_us: us(stats.lat.percentile(50.0)),
        p99_us: us(stats.lat.percentile(99.0)),
        max_us: us(stats.lat.percentile(100.0)),
        total_requests: stats.total,
        cpu,
    })
}

#[derive(Clone, Debug, Serialize)]
struct Summary {
    proto: Proto,
    load: Load,
    connections: usize,
    label: String,
    target: TargetKind,
    rounds: usize,
    achieved_rps: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    added_p50_us: Option<f64>,
    added_p99_us: Option<f64>,
    errors: u64,
    first_error: Option<String>,
    cpu: Vec<ProcCpu>,
    /// The highest of the runs' `other_cpu_cores`.
    other_cpu_cores_max: f64,
}

fn med(v: impl Iterator<Item = f64>) -> f64 {
    median(&v.collect::<Vec<_>>()).unwrap_or(f64::NAN)
}

fn summarize(sc: Scenario, target: TargetKind, runs: &[&RunResult]) -> Option<Summary> {
    let first = runs.first()?;
    let cpu = first
        .cpu
        .iter()
        .enumerate()
        .map(|(i, c)| ProcCpu {
            role: c.role.clone(),
            cpu_us_per_req: med(runs
                .iter()
                .filter_map(|r| r.cpu.get(i).map(|c| c.cpu_us_per_req))),
        })
        .collect();
    Some(Summary {
        proto: sc.proto,
        load: sc.load,
        connections: sc.connections,
        label: sc.label(),
        target,
        rounds: runs.len(),
        achieved_rps: med(runs.iter().map(|r| r.achieved_rps)),
        p50_us: med(runs.iter().map(|r| r.p50_us)),
        p99_us: med(runs.iter().map(|r| r.p99_us)),
        max_us: med(runs.iter().map(|r| r.max_us)),
        added_p50_us: None,
        added_p99_us: None,
        errors: runs.iter().map(|r| r.errors).sum(),
        first_error: runs.iter().find_map(|r| r.first_error.clone()),
        cpu,
        other_cpu_cores_max: runs.iter().map(|r| r.other_cpu_cores).fold(0.0, f64::max),
    })
}

#[derive(Clone, Debug, Serialize)]
struct Memory {
    target: TargetKind,
    role: String,
    pid: u32,
    cpus: String,
    rss_idle_kib: u64,
    rss_after_load_max_kib: u64,
    rss_peak_kib: u64,
}

#[derive(Clone, Debug, Serialize)]
struct Check {
    what: String,
    value: String,
    limit: String,
    pass: Option<bool>,
}

#[derive(Serialize)]
struct Report<'a> {
    command: String,
    cores: usize,
    pinning: String,
    nginx_version: String,
    sidecar_rust_log: String,
    config: &'a HttpArgs,
    notes: Vec<String>,
    runs: Vec<RunResult>,
    medians: Vec<Summary>,
    memory: Vec<Memory>,
    checks: Vec<Check>,
}

// ---------------------------------------------------------------------------
// The bench
// ---------------------------------------------------------------------------

/// Sets up every target; with `pin`, everything measured is started while
/// this process is on [`SERVER_CPU`] and so inherits it.
async fn setup(a: &HttpArgs, targets: &[TargetKind], notes: &mut Vec<String>) -> Result<World> {
    let dir = tempfile::Builder::new()
        .prefix("trellis-bench-http-")
        .tempdir()
        .context("creating a temp dir")?;
    let me = std::process::id();
    let cluster = if targets.contains(&TargetKind::Trellis) {
        eprintln!("starting a 3-node Trellis cluster with mutual TLS ...");
        Some(
            Cluster::start_with(ClusterOptions {
                tls: true,
                ..ClusterOptions::default()
            })
            .await
            .context("starting the Trellis cluster")?,
        )
    } else {
        None
    };
    if !a.no_pin {
        pin(me, SERVER_CPU).await?;
    }
    eprintln!("starting the backend ...");
    let (backend, backend_addr) = start_backend(dir.path()).await?;
    let mut world = World {
        dir,
        backend,
        backend_addr,
        cluster,
        sidecars: Vec::new(),
        trellis_addr: None,
        nginx: Vec::new(),
        nginx_addr: None,
        nginx_h2c_addr: None,
        watched: Vec::new(),
    };
    world.watched.push(Watched {
        target: TargetKind::Direct,
        role: "backend".into(),
        pid: world.backend.pid,
        cpus: String::new(),
    });
    if let Some(c) = &world.cluster {
        eprintln!("starting the sidecar pair ...");
        let (sidecars, out) = start_trellis(c, backend_addr, a.sidecar_workers).await?;
        for (s, role) in sidecars.iter().zip(["client sidecar", "server sidecar"]) {
            world.watched.push(Watched {
                target: TargetKind::Trellis,
                role: role.into(),
                pid: sidecar_pid(s)?,
                cpus: String::new(),
            });
        }
        world.sidecars = sidecars;
        world.trellis_addr = Some(out);
    }
    if targets.contains(&TargetKind::Nginx) {
        eprintln!("starting the nginx pair ...");
        let dir = world.dir.path().to_path_buf();
        let (back, back_addr, _) = start_nginx(&dir, "nginx-back", backend_addr, false).await?;
        world.nginx.push(back);
        let h2c = a.protocols.contains(&Proto::H2);
        let (front, front_addr, front_h2c) =
            start_nginx(&dir, "nginx-front", back_addr, h2c).await?;
        world.nginx.push(front);
        world.nginx_addr = Some(front_addr);
        world.nginx_h2c_addr = front_h2c;
        for (p, role) in world.nginx.iter_mut().zip(["nginx back", "nginx front"]) {
            // The master listens before it forks its worker: wait for it.
            let master = p.pid;
            let workers = p
                .wait_ready(|| children_of(master).ok().filter(|w| w.len() == 1))
                .await
                .with_context(|| format!("{role}: waiting for one worker under master {master}"))?;
            world.watched.push(Watched {
                target: TargetKind::Nginx,
                role: format!("{role} worker"),
                pid: workers[0],
                cpus: String::new(),
            });
        }
        notes.push(format!(
            "nginx masters (idle, not counted): RSS {} KiB",
            world
                .nginx
                .iter()
                .map(|p| mem_kib(p.pid, "VmRSS").map_or("?".into(), |k| k.to_string()))
                .collect::<Vec<_>>()
                .join(" / ")
        ));
    }
    // Tables list direct, trellis, nginx (stable: roles keep their order).
    world.watched.sort_by_key(|w| w.target);
    if !a.no_pin {
        pin(me, LOADGEN_CPU).await?;
    }
    for w in &mut world.watched {
        w.cpus = status_field(w.pid, "Cpus_allowed_list")?;
    }
    Ok(world)
}

/// One request per target and protocol; a target that cannot serve a
/// protocol is reported and skipped for it.
async fn sanity(
    world: &World,
    a: &HttpArgs,
    targets: &[TargetKind],
    notes: &mut Vec<String>,
) -> Result<Vec<(Proto, TargetKind)>> {
    let mut ok = Vec::new();
    for &proto in &a.protocols {
        for &t in targets {
            let r = async {
                let addr = world.addr(t, proto)?;
                let mut c = Conn::open(addr, proto).await?;
                match one_request(&mut c).await {
                    Outcome::Ok => Ok(()),
                    Outcome::Err(e) | Outcome::Broken(e) => Err(anyhow::anyhow!(e)),
                }
            }
            .await;
            match r {
                Ok(()) => ok.push((proto, t)),
                Err(e) if t == TargetKind::Direct => {
                    bail!("the backend does not answer {proto}: {e:#}")
                }
                Err(e) => {
                    let n = format!("{t} over {proto}: n/a — a test request failed: {e:#}");
                    eprintln!("{n}");
                    notes.push(n);
                }
            }
        }
    }
    Ok(ok)
}

fn fmt_us(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.0}")
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:+.0}"))
}

fn print_scenario(out: &mut String, sc: Scenario, rows: &[&Summary]) -> Result<()> {
    writeln!(
        out,
        "\n{}   (median of {} rounds)",
        sc.label(),
        rows.first().map_or(0, |r| r.rounds)
    )?;
    let head_rate = match sc.load {
        Load::Rate(_) => "achieved/s",
        Load::Saturation(_) => "req/s",
    };
    writeln!(
        out,
        "  {:<8} {:>10} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7}  CPU µs/req per process",
        "target", head_rate, "p50 µs", "p99 µs", "max µs", "+p50 µs", "+p99 µs", "errors"
    )?;
    for r in rows {
        let cpu = r
            .cpu
            .iter()
            .map(|c| format!("{} {:.1}", c.role, c.cpu_us_per_req))
            .collect::<Vec<_>>()
            .join(", ");
        let flag = if r.errors > 0 { " !" } else { "" };
        writeln!(
            out,
            "  {:<8} {:>10.0} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7}{flag}  {cpu}",
            r.target.to_string(),
            r.achieved_rps,
            fmt_us(r.p50_us),
            fmt_us(r.p99_us),
            fmt_us(r.max_us),
            fmt_opt(r.added_p50_us),
            fmt_opt(r.added_p99_us),
            r.errors,
        )?;
        if let Some(e) = &r.first_error {
            writeln!(out, "           ! first error: {e}")?;
        }
        if r.other_cpu_cores_max > OTHER_CPU_WARN {
            writeln!(
                out,
                "           ! up to {:.2} cores used by other processes during a run: noisy",
                r.other_cpu_cores_max
            )?;
        }
    }
    Ok(())
}

fn find(
    ms: &[Summary],
    proto: Proto,
    load: impl Fn(Load) -> bool,
    t: TargetKind,
) -> Option<&Summary> {
    ms.iter()
        .find(|s| s.proto == proto && load(s.load) && s.target == t)
}

fn checks(ms: &[Summary], memory: &[Memory]) -> Vec<Check> {
    let mut out = Vec::new();
    let one_conn = |l: Load| matches!(l, Load::Rate(r) if r == ONE_CONNECTION_MAX_RATE);
    let sat = |l: Load| matches!(l, Load::Saturation(_));
    for proto in [Proto::H1, Proto::H2] {
        let tr = find(ms, proto, one_conn, TargetKind::Trellis);
        let ng = find(ms, proto, one_conn, TargetKind::Nginx);
        if let Some(tr) = tr {
            let (tv, nv) = (tr.added_p50_us, ng.and_then(|n| n.added_p50_us));
            out.push(Check {
                what: format!("{proto}: added p50 at 1 connection, 1,000 req/s ≤ nginx pair's"),
                value: fmt_opt(tv) + " µs",
                limit: fmt_opt(nv) + " µs",
                pass: tv.zip(nv).map(|(t, n)| t <= n),
            });
            out.push(Check {
                what: format!("{proto}: added p99 at 1,000 req/s ≤ 1 ms"),
                value: fmt_opt(tr.added_p99_us) + " µs",
                limit: format!("{TARGET_P99_ADDED_US:.0} µs"),
                pass: tr.added_p99_us.map(|v| v <= TARGET_P99_ADDED_US),
            });
        }
        let tr = find(ms, proto, sat, TargetKind::Trellis);
        let ng = find(ms, proto, sat, TargetKind::Nginx);
        if let Some(tr) = tr {
            out.push(Check {
                what: format!("{proto}: saturation throughput ≥ nginx pair's"),
                value: format!("{:.0} req/s", tr.achieved_rps),
                limit: ng.map_or("-".into(), |n| format!("{:.0} req/s", n.achieved_rps)),
                pass: ng.map(|n| tr.achieved_rps >= n.achieved_rps),
            });
            // The target's own processes (the backend is listed too).
            for c in tr.cpu.iter().filter(|c| c.role.contains("sidecar")) {
                out.push(Check {
                    what: format!("{proto}: CPU per request, {} (saturation)", c.role),
                    value: format!("{:.1} µs", c.cpu_us_per_req),
                    limit: format!("{TARGET_CPU_US_PER_REQ:.0} µs"),
                    pass: Some(c.cpu_us_per_req <= TARGET_CPU_US_PER_REQ),
                });
            }
        }
    }
    for m in memory.iter().filter(|m| m.target == TargetKind::Trellis) {
        let bytes = m.rss_idle_kib as f64 * 1024.0;
        out.push(Check {
            what: format!("RSS idle, {}", m.role),
            value: format!("{:.1} MB", bytes / 1e6),
            limit: format!("{:.0} MB", TARGET_IDLE_RSS_BYTES / 1e6),
            pass: Some(bytes <= TARGET_IDLE_RSS_BYTES),
        });
    }
    out
}

pub async fn http_bench(a: HttpArgs) -> Result<()> {
    ensure!(a.rounds > 0, "--rounds must be positive");
    ensure!(!a.rates.contains(&0), "--rates must be positive");
    ensure!(!a.protocols.is_empty(), "no --protocols");
    ensure!(
        !(a.no_rates && a.no_saturation),
        "--no-rates with --no-saturation leaves nothing to measure"
    );
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut targets = vec![TargetKind::Direct];
    for t in &a.targets {
        if !targets.contains(t) {
            targets.push(*t);
        }
    }
    let rust_log =
        std::env::var("RUST_LOG").unwrap_or_else(|_| "unset (sidecar default: info)".into());
    if rust_log.contains("debug") || rust_log.contains("trace") {
        eprintln!(
            "warning: RUST_LOG={rust_log} is inherited by the sidecars and will slow them down"
        );
    }
    let mut notes = vec![
        "the nginx pair is plaintext HTTP/1.1 between the proxies; the Trellis pair is HTTP/2 over mutual TLS".to_string(),
        "the load generator is one thread (tokio current_thread) in trellis-bench".to_string(),
    ];
    let pinning = if a.no_pin {
        "off".to_string()
    } else {
        format!(
            "load generator on core {LOADGEN_CPU}; backend, sidecars and nginx on core {SERVER_CPU} (control-plane nodes not pinned)"
        )
    };
    let load_before = loadavg();
    if load_before
        .split_whitespace()
        .next()
        .and_then(|l| l.parse::<f64>().ok())
        .is_some_and(|l| l > BUSY_LOADAVG)
    {
        eprintln!("warning: load average {load_before} before starting: something else is running, figures will be noisy");
    }
    notes.push(format!("load average before setup: {load_before}"));
    let world = setup(&a, &targets, &mut notes).await?;
    let result = measure(
        &world, &a, &targets, &mut notes, cores, &command, &pinning, &rust_log,
    )
    .await;
    world.shutdown().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    world: &World,
    a: &HttpArgs,
    targets: &[TargetKind],
    notes: &mut Vec<String>,
    cores: usize,
    command: &str,
    pinning: &str,
    rust_log: &str,
) -> Result<()> {
    let idle: Vec<u64> = world
        .watched
        .iter()
        .map(|w| mem_kib(w.pid, "VmRSS"))
        .collect::<Result<_>>()?;
    let usable = sanity(world, a, targets, notes).await?;

    let mut scenarios = Vec::new();
    for &proto in &a.protocols {
        for &r in a.rates.iter().filter(|_| !a.no_rates) {
            scenarios.push(Scenario::new(proto, Load::Rate(r)));
        }
        if !a.no_saturation {
            scenarios.push(Scenario::new(proto, Load::Saturation(SATURATION_IN_FLIGHT)));
        }
    }
    let mut runs = Vec::new();
    let mut peak_after = BTreeMap::new();
    for &sc in &scenarios {
        let ts: Vec<TargetKind> = targets
            .iter()
            .copied()
            .filter(|t| usable.contains(&(sc.proto, *t)))
            .collect();
        for round in 0..a.rounds {
            for k in 0..ts.len() {
                let t = ts[(k + round) % ts.len()];
                tokio::time::sleep(RUN_GAP).await;
                let r = run_one(world, a, sc, t, round, &mut peak_after)
                    .await
                    .with_context(|| format!("{} against {t}", sc.label()))?;
                eprintln!(
                    "{:<52} round {} {:<8} {:>8.0}/s p50 {:>6} µs p99 {:>6} µs max {:>6} µs errors {} other CPU {:.2} cores",
                    sc.label(),
                    round + 1,
                    t.to_string(),
                    r.achieved_rps,
                    fmt_us(r.p50_us),
                    fmt_us(r.p99_us),
                    fmt_us(r.max_us),
                    r.errors,
                    r.other_cpu_cores
                );
                runs.push(r);
            }
        }
    }

    let mut medians = Vec::new();
    for &sc in &scenarios {
        let mut direct: Option<(f64, f64)> = None;
        for &t in targets {
            let rs: Vec<&RunResult> = runs
                .iter()
                .filter(|r| r.proto == sc.proto && r.load == sc.load && r.target == t)
                .collect();
            if let Some(mut s) = summarize(sc, t, &rs) {
                if t == TargetKind::Direct {
                    direct = Some((s.p50_us, s.p99_us));
                } else if let Some((d50, d99)) = direct {
                    s.added_p50_us = Some(s.p50_us - d50);
                    s.added_p99_us = Some(s.p99_us - d99);
                }
                medians.push(s);
            }
        }
    }
    let memory: Vec<Memory> = world
        .watched
        .iter()
        .zip(idle)
        .map(|(w, idle)| {
            Ok(Memory {
                target: w.target,
                role: w.role.clone(),
                pid: w.pid,
                cpus: w.cpus.clone(),
                rss_idle_kib: idle,
                rss_after_load_max_kib: peak_after.get(&w.pid).copied().unwrap_or(0),
                rss_peak_kib: mem_kib(w.pid, "VmHWM")?,
            })
        })
        .collect::<Result<_>>()?;
    let checks = checks(&medians, &memory);

    let mut out = String::new();
    writeln!(
        out,
        "trellis-bench http: added latency, throughput and cost of a proxy pair"
    )?;
    writeln!(out, "command: {command}")?;
    writeln!(out, "cores: {cores}; pinning: {pinning}")?;
    writeln!(
        out,
        "{}; sidecar RUST_LOG: {rust_log}; measured {:?} after {:?} warm-up per run",
        nginx_version(),
        a.duration,
        a.warmup
    )?;
    for n in notes.iter() {
        writeln!(out, "note: {n}")?;
    }
    for &sc in &scenarios {
        let rows: Vec<&Summary> = medians
            .iter()
            .filter(|m| m.proto == sc.proto && m.load == sc.load)
            .collect();
        print_scenario(&mut out, sc, &rows)?;
    }
    writeln!(
        out,
        "\nprocesses (RSS in MiB; CPU µs/req above is (utime+stime) / requests of the run)"
    )?;
    writeln!(
        out,
        "  {:<22} {:>8} {:>6} {:>9} {:>15} {:>10}",
        "process", "pid", "cores", "RSS idle", "RSS after load", "peak RSS"
    )?;
    let mib = |k: u64| k as f64 / 1024.0;
    for m in &memory {
        writeln!(
            out,
            "  {:<22} {:>8} {:>6} {:>9.1} {:>15.1} {:>10.1}",
            m.role,
            m.pid,
            m.cpus,
            mib(m.rss_idle_kib),
            mib(m.rss_after_load_max_kib),
            mib(m.rss_peak_kib)
        )?;
    }
    writeln!(
        out,
        "\nissue 5 targets (Trellis, mTLS on between the sidecars)"
    )?;
    for c in &checks {
        let verdict = match c.pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "n/a ",
        };
        writeln!(
            out,
            "  {verdict}  {:<58} {:>14}  (limit {})",
            c.what, c.value, c.limit
        )?;
    }
    let errors: u64 = runs.iter().map(|r| r.errors).sum();
    if errors > 0 {
        writeln!(
            out,
            "\n!! {errors} failed requests in total: figures of the flagged rows are suspect"
        )?;
    }
    writeln!(out, "load average at the end: {}", loadavg())?;
    print!("{out}");

    if let Some(path) = &a.json {
        let report = Report {
            command: command.into(),
            cores,
            pinning: pinning.into(),
            nginx_version: nginx_version(),
            sidecar_rust_log: rust_log.into(),
            config: a,
            notes: notes.clone(),
            runs,
            medians,
            memory,
            checks,
        };
        let text = serde_json::to_string_pretty(&report).context("encoding JSON")?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
