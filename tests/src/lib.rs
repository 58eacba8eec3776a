//! End-to-end harness for Trellis: starts real `trellisd` (and, for
//! comparisons, `etcd`) processes on loopback and drives them over gRPC.
//!
//! # Trellis
//!
//! [`Cluster::start`] spawns `n` `trellisd` children in a fresh temporary
//! directory, each bound to `127.0.0.1:0` for its Raft, admin and QUIC ports.
//! A node counts as started when it prints its ready JSON line on stdout
//! (see `docs/CONTRACTS.md`); the reported concrete addresses are kept, so a
//! killed node is restarted with the same addresses and data directory. The
//! cluster is formed through the admin API (`Cluster.Initialize` on node 1,
//! `Cluster.AddMember` for the others) and `start` returns once every node
//! reports the same leader and all `n` members as voters.
//!
//! Each node's stderr goes to `<dir>/node-<id>.log`; errors about a node
//! include the tail of that log. The directory is deleted on drop unless
//! `TRELLIS_KEEP_TEST_DIR=1` is set or the thread is panicking (a failed
//! test), in which case its path is printed on stderr.
//!
//! Binaries are found next to the running executable (see [`bin_path`]):
//! build them first with `cargo build --release --bins` (or without
//! `--release` for debug test runs).
//!
//! # etcd
//!
//! [`EtcdCluster::start`] runs a 3-member etcd on loopback with free ports
//! (as in `/work/shared/PEERS.md`), and [`etcdpb`] holds a minimal client for
//! etcd's v3 gRPC API (KV Put/Range/Compact, Maintenance Status).
//!
//! # Waiting
//!
//! Nothing here sleeps for a fixed time to "let things settle": processes are
//! awaited on their ready line or exit, and cluster states are awaited by
//! polling status APIs at a short interval under an overall deadline.

pub mod backend;
pub mod http;
pub mod quic;
pub mod sidecar;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use trellis_proto::admin::cluster_client::ClusterClient;
use trellis_proto::admin::kv_client::KvClient;
use trellis_proto::admin::lease_client::LeaseClient;
use trellis_proto::admin::resources_client::ResourcesClient;
use trellis_proto::admin::{AddMemberRequest, InitializeRequest, StatusRequest, StatusResponse};

/// Generated client for the subset of etcd's v3 API in `tests/proto/etcd.proto`
/// (package `etcdserverpb`): `kv_client::KvClient` (Put, Range, Compact) and
/// `maintenance_client::MaintenanceClient` (Status).
pub mod etcdpb {
    tonic::include_proto!("etcdserverpb");
}

/// Generated client and server for the test echo service in
/// `tests/proto/echo.proto` (unary `Unary`, bidirectional `Chat`).
pub mod echopb {
    tonic::include_proto!("trellis.test.echo");
}

/// How long a spawned process may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Default overall deadline for cluster-level waits (formation, leader, ...).
pub const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between two polls of a status API.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Timeout of a single status RPC made by the harness.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// Number of log lines included in errors about a process.
const LOG_TAIL_LINES: usize = 40;

// ---------------------------------------------------------------------------
// Binaries, ports, logs
// ---------------------------------------------------------------------------

/// Path of a workspace binary (`trellisd`, `trellisctl`) built in the same
/// target profile directory as the running executable.
///
/// Test executables live in `target/<profile>/deps/`, the bench binary in
/// `target/<profile>/`; binaries are in `target/<profile>/`. The environment
/// variable `TRELLIS_BIN_DIR` overrides the directory.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("TRELLIS_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().context("cannot locate the running executable")?;
            let mut dir = exe
                .parent()
                .with_context(|| format!("executable {} has no parent directory", exe.display()))?
                .to_path_buf();
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    if path.is_file() {
        return Ok(path);
    }
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let hint = if profile == "release" {
        "cargo build --release --bins"
    } else {
        "cargo build --bins"
    };
    bail!(
        "binary `{name}` not found at {}; build it first with `{hint}` \
         (or set TRELLIS_BIN_DIR to the directory holding it)",
        path.display()
    )
}

/// Finds an executable in `PATH`.
pub fn which(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("`{name}` not found in PATH"))
}

/// Reserves `n` distinct free TCP ports on 127.0.0.1 (binds port 0, reads the
/// port, releases it). Another process could take a port in between; that is
/// rare enough for tests on loopback.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| {
            TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a free port")
        })
        .collect::<Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| {
            Ok(l.local_addr()
                .context("local_addr of a probe listener")?
                .port())
        })
        .collect()
}

/// The last `lines` lines of a log file (or a note why it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            let mut out = format!(
                "--- last {} lines of {} ---\n",
                all.len() - start,
                path.display()
            );
            for l in &all[start..] {
                out.push_str(l);
                out.push('\n');
            }
            out
        }
        Err(e) => format!("(cannot read log {}: {e})", path.display()),
    }
}

/// A gRPC channel to `http://addr` that connects on first use and reconnects
/// after failures (so it survives a restart of the node at the same address).
pub fn lazy_channel(addr: SocketAddr) -> Result<Channel> {
    Ok(endpoint(addr, None)?.connect_lazy())
}

/// Like [`lazy_channel`], over mutual TLS when `tls` is given.
pub fn lazy_channel_tls(addr: SocketAddr, tls: Option<&ClientTlsConfig>) -> Result<Channel> {
    Ok(endpoint(addr, tls)?.connect_lazy())
}

/// A gRPC channel to `http://addr`, connected now (one HTTP/2 connection).
pub async fn connect(addr: SocketAddr) -> Result<Channel> {
    endpoint(addr, None)?
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))
}

fn endpoint(addr: SocketAddr, tls: Option<&ClientTlsConfig>) -> Result<Endpoint> {
    let ep = match tls {
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))
            .with_context(|| format!("invalid endpoint address {addr}"))?
            .tls_config(tls.clone())
            .context("client TLS config")?,
        None => Endpoint::from_shared(format!("http://{addr}"))
            .with_context(|| format!("invalid endpoint address {addr}"))?,
    };
    Ok(ep.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true))
}

/// The cluster CA and the certificates of a TLS test cluster, as files
/// under `<cluster dir>/pki` (for `trellisd`, `trellisctl`, sidecars) and
/// in memory (to issue certificates for nodes added later).
pub struct Pki {
    ca: trellis_identity::Ca,
    dir: PathBuf,
    /// The root CA certificate file.
    pub ca_file: PathBuf,
    /// The root CA key file (for `trellisctl ca load`).
    pub ca_key_file: PathBuf,
    /// An admin client certificate (`admin/test`) and its key.
    pub admin_cert_file: PathBuf,
    pub admin_key_file: PathBuf,
}

impl Pki {
    fn create(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca = trellis_identity::Ca::create(trellis_identity::DEFAULT_TRUST_DOMAIN)?;
        let write = |name: &str, text: &str, private: bool| -> Result<PathBuf> {
            let path = dir.join(name);
            trellis_identity::write_file_atomic(&path, text.as_bytes(), private)
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let ca_file = write("ca.pem", ca.cert_pem(), false)?;
        let ca_key_file = write("ca-key.pem", ca.key_pem(), true)?;
        let (admin, admin_key) = ca.issue_admin("test", trellis_identity::ADMIN_CERT_VALIDITY)?;
        let admin_cert_file = write("admin-test.pem", &admin.cert_pem, false)?;
        let admin_key_file = write("admin-test-key.pem", &admin_key, true)?;
        Ok(Self {
            ca,
            dir,
            ca_file,
            ca_key_file,
            admin_cert_file,
            admin_key_file,
        })
    }

    /// The CA.
    pub fn ca(&self) -> &trellis_identity::Ca {
        &self.ca
    }

    /// Writes node `id`'s certificate and key (SANs 127.0.0.1, ::1,
    /// localhost) unless present; returns the `trellisd` TLS flags.
    pub fn node_args(&self, id: u64) -> Result<Vec<String>> {
        let cert = self.dir.join(format!("node-{id}.pem"));
        let key = self.dir.join(format!("node-{id}-key.pem"));
        if !cert.exists() {
            let sans = ["127.0.0.1", "::1", "localhost"].map(String::from);
            let (issued, key_pem) =
                self.ca
                    .issue_node(id, &sans, trellis_identity::NODE_CERT_VALIDITY)?;
            trellis_identity::write_file_atomic(&cert, issued.cert_pem.as_bytes(), false)?;
            trellis_identity::write_file_atomic(&key, key_pem.as_bytes(), true)?;
        }
        Ok(vec![
            "--ca-file".into(),
            self.ca_file.display().to_string(),
            "--cert-file".into(),
            cert.display().to_string(),
            "--key-file".into(),
            key.display().to_string(),
        ])
    }

    /// tonic client TLS with the admin certificate.
    pub fn admin_client_tls(&self) -> Result<ClientTlsConfig> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca_file)?))
            .identity(Identity::from_pem(
                read(&self.admin_cert_file)?,
                read(&self.admin_key_file)?,
            )))
    }

    /// Environment for `trellisctl` (`TRELLIS_CA_FILE`, `TRELLIS_CERT_FILE`,
    /// `TRELLIS_KEY_FILE`).
    pub fn trellisctl_env(&self) -> Vec<(String, String)> {
        vec![
            ("TRELLIS_CA_FILE".into(), self.ca_file.display().to_string()),
            (
                "TRELLIS_CERT_FILE".into(),
                self.admin_cert_file.display().to_string(),
            ),
            (
                "TRELLIS_KEY_FILE".into(),
                self.admin_key_file.display().to_string(),
            ),
        ]
    }
}

/// Sends a signal to a process with the `kill` utility (the workspace forbids
/// `unsafe`, which `libc::kill` needs).
async fn send_signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .await
        .with_context(|| format!("running `kill -{signal} {pid}`"))?;
    if !status.success() {
        bail!("`kill -{signal} {pid}` failed: {status}");
    }
    Ok(())
}

/// Runs `fut` with a timeout, turning expiry into an error.
async fn with_timeout<T>(
    d: Duration,
    what: impl FnOnce() -> String,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(d, fut).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!("{} timed out after {d:?}", what())),
    }
}

fn keep_dir_requested() -> bool {
    std::env::var("TRELLIS_KEEP_TEST_DIR").is_ok_and(|v| v == "1")
}

fn new_temp_dir(prefix: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("creating a temporary directory")
}

/// Keeps (does not delete) `dir` when asked to by the environment or when the
/// current thread is panicking, and says where it is.
fn maybe_keep_dir(dir: &mut Option<tempfile::TempDir>, what: &str) {
    if keep_dir_requested() || std::thread::panicking() {
        if let Some(d) = dir.take() {
            let path = d.keep();
            eprintln!("{what}: kept logs and data in {}", path.display());
        }
    }
}

// ---------------------------------------------------------------------------
// trellisd processes
// ---------------------------------------------------------------------------

/// The ready line `trellisd` prints on stdout once bound.
#[derive(Debug, Clone, Deserialize)]
pub struct ReadyLine {
    /// Always `"ready"`.
    pub event: String,
    /// The node's id.
    pub node_id: u64,
    /// Bound Raft peer address.
    pub raft_addr: String,
    /// Bound admin gRPC address.
    pub admin_addr: String,
    /// Bound QUIC address, when the node serves one.
    #[serde(default)]
    pub quic_addr: Option<String>,
}

/// Parses a stdout line; `None` unless it is a ready event.
pub fn parse_ready_line(line: &str) -> Option<ReadyLine> {
    let r: ReadyLine = serde_json::from_str(line.trim()).ok()?;
    (r.event == "ready").then_some(r)
}

/// The addresses of a node: what it is started with, and after start what it
/// reported (concrete ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeAddrs {
    /// Raft peer address.
    pub raft: SocketAddr,
    /// Admin gRPC address.
    pub admin: SocketAddr,
    /// QUIC address (`None` when the node did not report one).
    pub quic: Option<SocketAddr>,
}

impl NodeAddrs {
    /// `127.0.0.1:0` for every address.
    pub fn ephemeral() -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            raft: any,
            admin: any,
            quic: Some(any),
        }
    }
}

/// One `trellisd` child process (or a stopped one that can be restarted).
pub struct NodeProc {
    id: u64,
    bin: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    addrs: NodeAddrs,
    extra_args: Vec<String>,
    child: Option<Child>,
    channel: Channel,
    last_exit: Option<ExitStatus>,
}

impl NodeProc {
    /// Spawns `trellisd` and waits (up to [`READY_TIMEOUT`]) for its ready
    /// line. `addrs` may use port 0; the node records the reported addresses.
    pub async fn spawn(
        bin: &Path,
        id: u64,
        data_dir: PathBuf,
        log_path: PathBuf,
        addrs: NodeAddrs,
        extra_args: Vec<String>,
    ) -> Result<Self> {
        Self::spawn_tls(bin, id, data_dir, log_path, addrs, extra_args, None).await
    }

    /// Like [`NodeProc::spawn`]; `tls` is how the harness's admin channel
    /// talks to the node (the node's own TLS flags are in `extra_args`).
    pub async fn spawn_tls(
        bin: &Path,
        id: u64,
        data_dir: PathBuf,
        log_path: PathBuf,
        addrs: NodeAddrs,
        extra_args: Vec<String>,
        tls: Option<ClientTlsConfig>,
    ) -> Result<Self> {
        let (child, reported) = launch(bin, id, &data_dir, &log_path, &addrs, &extra_args).await?;
        let channel = lazy_channel_tls(reported.admin, tls.as_ref())?;
        Ok(Self {
            id,
            bin: bin.to_path_buf(),
            data_dir,
            log_path,
            addrs: reported,
            extra_args,
            child: Some(child),
            channel,
            last_exit: None,
        })
    }

    /// Node id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Concrete addresses the node reported.
    pub fn addrs(&self) -> NodeAddrs {
        self.addrs
    }

    /// Data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// stderr log file (appended across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The tail of the node's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path, LOG_TAIL_LINES)
    }

    /// OS process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Exit status of the last run that ended (kill, stop or crash).
    pub fn last_exit(&self) -> Option<ExitStatus> {
        self.last_exit
    }

    /// A lazily connected channel to the node's admin address.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Whether the process is alive (reaps it if it exited on its own).
    pub fn is_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                self.last_exit = Some(status);
                self.child = None;
                false
            }
            // Cannot tell: treat as running; kill/stop will find out.
            Err(_) => true,
        }
    }

    /// Whether the harness believes the process is up (not killed/stopped by
    /// it); unlike [`NodeProc::is_running`] this does not look at the OS.
    pub fn is_started(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL and wait for the exit.
    pub async fn kill(&mut self) -> Result<ExitStatus> {
        let id = self.id;
        let mut child = self
            .child
            .take()
            .with_context(|| format!("node {id} is not running"))?;
        child
            .start_kill()
            .with_context(|| format!("sending SIGKILL to node {id}"))?;
        let status = with_timeout(
            Duration::from_secs(10),
            || format!("waiting for node {id} to exit after SIGKILL"),
            async {
                child
                    .wait()
                    .await
                    .with_context(|| format!("waiting for node {id}"))
            },
        )
        .await?;
        self.last_exit = Some(status);
        Ok(status)
    }

    /// SIGTERM and wait (up to `grace`) for a clean exit; on expiry the node
    /// is SIGKILLed and an error is returned.
    pub async fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        let id = self.id;
        let mut child = self
            .child
            .take()
            .with_context(|| format!("node {id} is not running"))?;
        if let Some(pid) = child.id() {
            send_signal(pid, "TERM").await?;
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(r) => {
                let status = r.with_context(|| format!("waiting for node {id} to exit"))?;
                self.last_exit = Some(status);
                Ok(status)
            }
            Err(_) => {
                let _ = child.start_kill();
                let status = child.wait().await.ok();
                self.last_exit = status;
                bail!(
                    "node {id} did not exit within {grace:?} of SIGTERM (killed it)\n{}",
                    self.log_tail()
                )
            }
        }
    }

    /// Starts the (stopped) node again with the same addresses, data dir and
    /// arguments; returns after its ready line.
    pub async fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("node {} is still running; kill or stop it first", self.id);
        }
        let (child, reported) = launch(
            &self.bin,
            self.id,
            &self.data_dir,
            &self.log_path,
            &self.addrs,
            &self.extra_args,
        )
        .await?;
        if reported.raft != self.addrs.raft || reported.admin != self.addrs.admin {
            bail!(
                "node {} restarted on different addresses: {:?} (was {:?})",
                self.id,
                reported,
                self.addrs
            );
        }
        self.child = Some(child);
        Ok(())
    }
}

/// Spawns one `trellisd`, returns it with the addresses from its ready line.
async fn launch(
    bin: &Path,
    id: u64,
    data_dir: &Path,
    log_path: &Path,
    addrs: &NodeAddrs,
    extra_args: &[String],
) -> Result<(Child, NodeAddrs)> {
    let mut args: Vec<String> = vec![
        "--id".into(),
        id.to_string(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--raft-addr".into(),
        addrs.raft.to_string(),
        "--admin-addr".into(),
        addrs.admin.to_string(),
    ];
    if let Some(q) = addrs.quic {
        args.push("--quic-addr".into());
        args.push(q.to_string());
    }
    args.extend(extra_args.iter().cloned());

    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening log file {}", log_path.display()))?;
    {
        use std::io::Write as _;
        writeln!(
            log,
            "=== harness: starting {} {} ===",
            bin.display(),
            args.join(" ")
        )
        .with_context(|| format!("writing to {}", log_path.display()))?;
    }
    let mut child = Command::new(bin)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {} for node {id}", bin.display()))?;
    let stdout = child
        .stdout
        .take()
        .with_context(|| format!("node {id}: stdout was not captured"))?;
    let mut lines = BufReader::new(stdout).lines();

    let wait_ready = async {
        loop {
            match lines.next_line().await.context("reading stdout")? {
                Some(line) => {
                    if let Some(r) = parse_ready_line(&line) {
                        return Ok::<_, anyhow::Error>(r);
                    }
                }
                None => bail!("stdout closed before the ready line"),
            }
        }
    };
    let outcome = match tokio::time::timeout(READY_TIMEOUT, wait_ready).await {
        Ok(Ok(ready)) => parse_reported(id, &ready),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow!("no ready line within {READY_TIMEOUT:?}")),
    };
    match outcome {
        Ok(reported) => {
            // Keep draining stdout so the node never blocks on (or dies from)
            // a full or closed pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Ok((child, reported))
        }
        Err(e) => {
            let _ = child.start_kill();
            let exit = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                Ok(Ok(s)) => format!("exited with {s}"),
                _ => "exit status unknown".to_string(),
            };
            Err(e.context(format!(
                "node {id} failed to start ({exit}); command: {} {}\n{}",
                bin.display(),
                args.join(" "),
                log_tail(log_path, LOG_TAIL_LINES)
            )))
        }
    }
}

fn parse_reported(id: u64, r: &ReadyLine) -> Result<NodeAddrs> {
    if r.node_id != id {
        bail!("ready line reports node_id {} (expected {id})", r.node_id);
    }
    let parse = |what: &str, s: &str| -> Result<SocketAddr> {
        s.parse()
            .with_context(|| format!("ready line has a bad {what} {s:?}"))
    };
    Ok(NodeAddrs {
        raft: parse("raft_addr", &r.raft_addr)?,
        admin: parse("admin_addr", &r.admin_addr)?,
        quic: r
            .quic_addr
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| parse("quic_addr", s))
            .transpose()?,
    })
}

// ---------------------------------------------------------------------------
// Trellis cluster
// ---------------------------------------------------------------------------

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of nodes (ids 1..=nodes).
    pub nodes: usize,
    /// `--heartbeat-ms`; `None` keeps trellisd's default.
    pub heartbeat_ms: Option<u64>,
    /// `--election-timeout-min-ms`; `None` keeps trellisd's default.
    pub election_min_ms: Option<u64>,
    /// `--election-timeout-max-ms`; `None` keeps trellisd's default.
    pub election_max_ms: Option<u64>,
    /// More arguments for every node (e.g. `["--log-level", "debug"]`).
    pub extra_args: Vec<String>,
    /// Mutual TLS everywhere, with a CA made for the cluster ([`Pki`]),
    /// loaded into the store after formation; the QUIC endpoint serves
    /// sidecars. `false`: `--insecure-dev` (plaintext, no QUIC).
    pub tls: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            heartbeat_ms: None,
            election_min_ms: None,
            election_max_ms: None,
            extra_args: Vec::new(),
            tls: false,
        }
    }
}

impl ClusterOptions {
    fn node_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        for (flag, v) in [
            ("--heartbeat-ms", self.heartbeat_ms),
            ("--election-timeout-min-ms", self.election_min_ms),
            ("--election-timeout-max-ms", self.election_max_ms),
        ] {
            if let Some(v) = v {
                a.push(flag.to_string());
                a.push(v.to_string());
            }
        }
        if !self.tls {
            a.push("--insecure-dev".to_string());
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// A set of `trellisd` processes in one temporary directory.
///
/// Dropping it kills every node (`kill_on_drop`) and deletes the directory
/// (see the module docs for keeping it).
pub struct Cluster {
    // Field order matters for drop: processes first, then the directory.
    nodes: BTreeMap<u64, NodeProc>,
    opts: ClusterOptions,
    bin: PathBuf,
    root: PathBuf,
    pki: Option<std::sync::Arc<Pki>>,
    dir: Option<tempfile::TempDir>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        maybe_keep_dir(&mut self.dir, "trellis cluster");
    }
}

impl Cluster {
    /// Starts and forms an `n`-node cluster with default options.
    pub async fn start(n: usize) -> Result<Self> {
        Self::start_with(ClusterOptions {
            nodes: n,
            ..ClusterOptions::default()
        })
        .await
    }

    /// Starts `opts.nodes` nodes, forms the cluster (Initialize on node 1,
    /// AddMember for the others) and waits until every node reports the same
    /// leader and all nodes as voters.
    pub async fn start_with(opts: ClusterOptions) -> Result<Self> {
        if opts.nodes == 0 {
            bail!("a cluster needs at least one node");
        }
        let mut cluster = Self::spawn_unformed(opts).await?;
        cluster.form().await?;
        Ok(cluster)
    }

    /// Starts the nodes but does not form a cluster (all uninitialized).
    pub async fn spawn_unformed(opts: ClusterOptions) -> Result<Self> {
        let bin = bin_path("trellisd")?;
        let dir = new_temp_dir("trellis-cluster-")?;
        let root = dir.path().to_path_buf();
        let pki = if opts.tls {
            Some(std::sync::Arc::new(Pki::create(root.join("pki"))?))
        } else {
            None
        };
        let mut cluster = Self {
            nodes: BTreeMap::new(),
            opts,
            bin,
            root,
            pki,
            dir: Some(dir),
        };
        let ids: Vec<u64> = (1..=cluster.opts.nodes as u64).collect();
        let spawns = ids.iter().map(|&id| cluster.spawn_node_proc(id));
        let procs = futures::future::join_all(spawns).await;
        for p in procs {
            let p = p?;
            cluster.nodes.insert(p.id, p);
        }
        Ok(cluster)
    }

    fn spawn_node_proc(
        &self,
        id: u64,
    ) -> impl std::future::Future<Output = Result<NodeProc>> + 'static {
        let bin = self.bin.clone();
        let data_dir = self.root.join(format!("node-{id}"));
        let log_path = self.root.join(format!("node-{id}.log"));
        let mut args = self.opts.node_args();
        let pki = self.pki.clone();
        async move {
            let tls = match &pki {
                Some(p) => {
                    args.extend(p.node_args(id)?);
                    Some(p.admin_client_tls()?)
                }
                None => None,
            };
            NodeProc::spawn_tls(
                &bin,
                id,
                data_dir,
                log_path,
                NodeAddrs::ephemeral(),
                args,
                tls,
            )
            .await
        }
    }

    /// Initialize on the lowest id, AddMember for the rest, wait for agreement.
    async fn form(&mut self) -> Result<()> {
        let ids = self.ids();
        let first = *ids.first().context("no nodes")?;
        let mut c = self.cluster_client(first);
        c.initialize(InitializeRequest {}).await.with_context(|| {
            format!(
                "Cluster.Initialize on node {first}\n{}",
                self.node(first).log_tail()
            )
        })?;
        for &id in &ids[1..] {
            let addrs = self.node(id).addrs;
            let req = AddMemberRequest {
                node_id: id,
                raft_addr: addrs.raft.to_string(),
                admin_addr: addrs.admin.to_string(),
                learner: false,
            };
            self.add_member_with_retry(first, req).await?;
        }
        let expected: BTreeSet<u64> = ids.iter().copied().collect();
        self.wait_for(CLUSTER_TIMEOUT, "cluster formation", |sts| {
            converged(sts, Some(&expected))
        })
        .await?;
        if let Some(pki) = &self.pki {
            let mut id = self.identity_client(first);
            id.load_ca(trellis_proto::admin::LoadCaRequest {
                cert_pem: pki.ca().cert_pem().to_string(),
                key_pem: pki.ca().key_pem().to_string(),
            })
            .await
            .context("Identity.LoadCa")?;
        }
        Ok(())
    }

    /// The cluster's CA and certificates (TLS clusters only).
    pub fn pki(&self) -> Option<&Pki> {
        self.pki.as_deref()
    }

    /// Identity client for node `id` (lazily connected).
    ///
    /// # Panics
    /// If there is no node `id` (a bug in the test).
    pub fn identity_client(
        &self,
        id: u64,
    ) -> trellis_proto::admin::identity_client::IdentityClient<Channel> {
        trellis_proto::admin::identity_client::IdentityClient::new(self.node(id).channel())
    }

    /// QUIC (sidecar) address of node `id` (TLS clusters only).
    ///
    /// # Panics
    /// If there is no node `id`, or it serves no QUIC endpoint.
    pub fn quic_addr(&self, id: u64) -> SocketAddr {
        self.node(id)
            .addrs
            .quic
            .expect("node serves no QUIC endpoint (start the cluster with tls: true)")
    }

    /// QUIC addresses of every node, comma-separated (a sidecar's seeds).
    pub fn quic_seeds(&self) -> String {
        self.ids()
            .into_iter()
            .filter_map(|id| self.node(id).addrs.quic)
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Sends `AddMember` to node `via`, retrying UNAVAILABLE / DEADLINE_EXCEEDED
    /// (e.g. no leader yet) until [`CLUSTER_TIMEOUT`]. On a retry,
    /// ALREADY_EXISTS counts as success (the earlier attempt went through).
    pub async fn add_member_with_retry(&self, via: u64, req: AddMemberRequest) -> Result<()> {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut c = self.cluster_client(via);
            let mut r = tonic::Request::new(req.clone());
            r.set_timeout(Duration::from_secs(15));
            match c.add_member(r).await {
                Ok(_) => return Ok(()),
                Err(s) if attempt > 1 && s.code() == tonic::Code::AlreadyExists => return Ok(()),
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(POLL_INTERVAL * 5).await;
                }
                Err(s) => bail!(
                    "Cluster.AddMember(node {}) via node {via} failed: {s}\n{}\n{}",
                    req.node_id,
                    self.node(via).log_tail(),
                    self.nodes
                        .get(&req.node_id)
                        .map(NodeProc::log_tail)
                        .unwrap_or_default()
                ),
            }
        }
    }

    fn node(&self, id: u64) -> &NodeProc {
        match self.nodes.get(&id) {
            Some(n) => n,
            None => panic!("no node {id} in this cluster (ids: {:?})", self.ids()),
        }
    }

    fn node_mut(&mut self, id: u64) -> Result<&mut NodeProc> {
        let ids = self.ids();
        self.nodes
            .get_mut(&id)
            .with_context(|| format!("no node {id} in this cluster (ids: {ids:?})"))
    }

    /// Every node id, started or not, ascending.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// The cluster's directory (data dirs `node-<id>/`, logs `node-<id>.log`).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The node's process handle.
    ///
    /// # Panics
    /// If there is no node `id` (a bug in the test).
    pub fn node_proc(&self, id: u64) -> &NodeProc {
        self.node(id)
    }

    /// KV client for node `id` (lazily connected; reconnects after restarts).
    ///
    /// # Panics
    /// If there is no node `id` (a bug in the test).
    pub fn kv(&self, id: u64) -> KvClient<Channel> {
        KvClient::new(self.node(id).channel())
    }

    /// Cluster client for node `id` (lazily connected).
    ///
    /// # Panics
    /// If there is no node `id` (a bug in the test).
    pub fn cluster_client(&self, id: u64) -> ClusterClient<Channel> {
        ClusterClient::new(self.node(id).channel())
    }

    /// Lease client for node `id` (lazily connected).
    ///
    /// # Panics
    /// If there is no node `id` (a bug in the test).
    pub fn lease_client(&self, id: u64) -> LeaseClient<Channel> {
        LeaseClient::new(self.node(id).channel())
    }

    /// Resources client for node `id` (lazily connected).
    ///
    /// # Panics
    /// If there is no node `id` (a bug in the test).
    pub fn resources_client(&self, id: u64) -> ResourcesClient<Channel> {
        ResourcesClient::new(self.node(id).channel())
    }

    /// Admin gRPC address of node `id`.
    ///
    /// # Panics
    /// If there is no node `id` (a bug in the test).
    pub fn admin_addr(&self, id: u64) -> SocketAddr {
        self.node(id).addrs.admin
    }

    /// Raft address of node `id`.
    ///
    /// # Panics
    /// If there is no node `id` (a bug in the test).
    pub fn raft_addr(&self, id: u64) -> SocketAddr {
        self.node(id).addrs.raft
    }

    /// Admin addresses of every node, comma-separated (for `trellisctl --endpoints`).
    pub fn endpoints(&self) -> String {
        self.nodes
            .values()
            .map(|n| n.addrs.admin.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Log tail of node `id`.
    pub fn log_tail(&self, id: u64) -> String {
        self.nodes
            .get(&id)
            .map(NodeProc::log_tail)
            .unwrap_or_else(|| format!("(no node {id})"))
    }

    /// Whether node `id`'s process is alive.
    pub fn is_running(&mut self, id: u64) -> bool {
        self.nodes.get_mut(&id).is_some_and(NodeProc::is_running)
    }

    /// Node `id`'s own Status (one RPC, [`RPC_TIMEOUT`]).
    pub async fn status(&self, id: u64) -> Result<StatusResponse> {
        let node = self
            .nodes
            .get(&id)
            .with_context(|| format!("no node {id} in this cluster"))?;
        status_of(node.channel(), id).await
    }

    async fn statuses(&self) -> BTreeMap<u64, Result<StatusResponse>> {
        let futs = self.nodes.values().filter(|n| n.is_started()).map(|n| {
            let ch = n.channel();
            let id = n.id;
            async move { (id, status_of(ch, id).await) }
        });
        futures::future::join_all(futs).await.into_iter().collect()
    }

    /// Polls every started node's Status until `check` returns `Some`, or
    /// fails after `timeout` with the last statuses seen.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut(&BTreeMap<u64, Result<StatusResponse>>) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let sts = self.statuses().await;
            if let Some(t) = check(&sts) {
                return Ok(t);
            }
            if Instant::now() >= deadline {
                let mut msg =
                    format!("timed out after {timeout:?} waiting for {what}; last statuses:\n");
                for (id, s) in &sts {
                    let _ = writeln!(msg, "  node {id}: {}", describe_status(s));
                }
                for id in sts.keys() {
                    msg.push_str(&self.log_tail(*id));
                }
                bail!(msg);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until every started node that is in a cluster agrees on one leader and
    /// one membership; returns the leader id.
    pub async fn wait_converged(&self) -> Result<u64> {
        self.wait_for(
            CLUSTER_TIMEOUT,
            "the nodes to agree on a leader and membership",
            |s| converged(s, None),
        )
        .await
    }

    /// The current leader: waits until a live majority of the voters (as the
    /// leader itself lists them) reports the same leader, and that leader
    /// answers and reports itself as leader.
    pub async fn leader(&self) -> Result<u64> {
        self.wait_for(
            CLUSTER_TIMEOUT,
            "a leader agreed by a majority",
            majority_leader,
        )
        .await
    }

    /// Waits until node `id` reports an applied store revision `>= rev`.
    pub async fn wait_for_revision(&self, id: u64, rev: u64) -> Result<StatusResponse> {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        let mut last: String;
        loop {
            match self.status(id).await {
                Ok(s) if s.revision >= rev => return Ok(s),
                Ok(s) => last = format!("revision {}", s.revision),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                bail!(
                    "node {id} did not reach revision {rev} within {CLUSTER_TIMEOUT:?} (last: {last})\n{}",
                    self.log_tail(id)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// SIGKILL node `id` and wait for it to exit.
    pub async fn kill(&mut self, id: u64) -> Result<()> {
        self.node_mut(id)?.kill().await.map(|_| ())
    }

    /// SIGTERM node `id` and wait (up to 10 s) for it to exit; returns its
    /// exit status.
    pub async fn stop(&mut self, id: u64) -> Result<ExitStatus> {
        self.node_mut(id)?.stop(Duration::from_secs(10)).await
    }

    /// Starts the stopped node `id` again (same addresses, data dir and
    /// arguments); returns after its ready line.
    pub async fn restart(&mut self, id: u64) -> Result<()> {
        self.node_mut(id)?.restart().await
    }

    /// Deletes the data dir of the stopped node `id` (it restarts empty,
    /// uninitialized, at the same addresses).
    pub fn wipe(&mut self, id: u64) -> Result<()> {
        let node = self.node_mut(id)?;
        if node.is_running() {
            bail!("node {id} is running; kill or stop it before wiping its data");
        }
        match std::fs::remove_dir_all(&node.data_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", node.data_dir.display())),
        }
    }

    /// Starts a new node (next free id, new data dir, port 0) that is not a
    /// member of anything; returns its id once it is ready. Add it with
    /// `cluster_client(x).add_member(...)` or [`Cluster::add_member_with_retry`].
    pub async fn spawn_fresh_node(&mut self) -> Result<u64> {
        let id = self.nodes.keys().next_back().copied().unwrap_or(0) + 1;
        let p = self.spawn_node_proc(id).await?;
        self.nodes.insert(id, p);
        Ok(id)
    }

    /// `AddMemberRequest` for node `id` (as a voter).
    ///
    /// # Panics
    /// If there is no node `id` (a bug in the test).
    pub fn add_member_request(&self, id: u64) -> AddMemberRequest {
        let a = self.node(id).addrs;
        AddMemberRequest {
            node_id: id,
            raft_addr: a.raft.to_string(),
            admin_addr: a.admin.to_string(),
            learner: false,
        }
    }
}

async fn status_of(ch: Channel, id: u64) -> Result<StatusResponse> {
    let mut c = ClusterClient::new(ch);
    let mut req = tonic::Request::new(StatusRequest {});
    req.set_timeout(RPC_TIMEOUT);
    match tokio::time::timeout(RPC_TIMEOUT, c.status(req)).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(anyhow!(
            "Status on node {id}: {}: {}",
            s.code(),
            s.message()
        )),
        Err(_) => Err(anyhow!(
            "Status on node {id} timed out after {RPC_TIMEOUT:?}"
        )),
    }
}

fn describe_status(s: &Result<StatusResponse>) -> String {
    match s {
        Ok(s) => format!(
            "init={} state={} leader={} term={} commit={} applied={} rev={} members=[{}]",
            s.initialized,
            s.state,
            s.leader_id,
            s.term,
            s.commit_index,
            s.applied_index,
            s.revision,
            s.members
                .iter()
                .map(|m| format!("{}{}", m.node_id, if m.voter { "" } else { "(learner)" }))
                .collect::<Vec<_>>()
                .join(",")
        ),
        Err(e) => format!("error: {e:#}"),
    }
}

/// Whether a node is part of a cluster: initialized, or (in case a node that
/// joined through AddMember does not set `initialized`) it knows a leader or
/// members.
fn in_cluster(s: &StatusResponse) -> bool {
    s.initialized || s.leader_id != 0 || !s.members.is_empty()
}

fn voters(s: &StatusResponse) -> BTreeSet<u64> {
    s.members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.node_id)
        .collect()
}

fn all_members(s: &StatusResponse) -> BTreeSet<(u64, bool)> {
    s.members.iter().map(|m| (m.node_id, m.voter)).collect()
}

/// All answering, initialized nodes agree on a non-zero leader and on the
/// membership; the leader answers; with `expected`, the voters are exactly it
/// and every expected node answered. Returns the leader.
fn converged(
    sts: &BTreeMap<u64, Result<StatusResponse>>,
    expected: Option<&BTreeSet<u64>>,
) -> Option<u64> {
    let ok: Vec<&StatusResponse> = sts.values().filter_map(|s| s.as_ref().ok()).collect();
    let inited: Vec<&StatusResponse> = ok.iter().copied().filter(|s| in_cluster(s)).collect();
    let first = inited.first()?;
    let leader = first.leader_id;
    if leader == 0 {
        return None;
    }
    let members = all_members(first);
    if !inited
        .iter()
        .all(|s| s.leader_id == leader && all_members(s) == members)
    {
        return None;
    }
    if !inited.iter().any(|s| s.node_id == leader) {
        return None;
    }
    if let Some(exp) = expected {
        if &voters(first) != exp {
            return None;
        }
        let answered: BTreeSet<u64> = inited.iter().map(|s| s.node_id).collect();
        if !exp.is_subset(&answered) {
            return None;
        }
    }
    Some(leader)
}

/// A leader L that answers, says it leads (leader_id == L), and is named by
/// more than half of the voters L lists.
fn majority_leader(sts: &BTreeMap<u64, Result<StatusResponse>>) -> Option<u64> {
    let ok: Vec<&StatusResponse> = sts.values().filter_map(|s| s.as_ref().ok()).collect();
    for l in ok
        .iter()
        .filter(|s| in_cluster(s) && s.leader_id == s.node_id && s.node_id != 0)
    {
        let vs = voters(l);
        if vs.is_empty() {
            continue;
        }
        let agree = ok
            .iter()
            .filter(|s| vs.contains(&s.node_id) && s.leader_id == l.node_id && s.term == l.term)
            .count();
        if agree * 2 > vs.len() {
            return Some(l.node_id);
        }
    }
    None
}

// ---------------------------------------------------------------------------
// etcd
// ---------------------------------------------------------------------------

/// One etcd member process.
struct EtcdMember {
    name: String,
    client_port: u16,
    args: Vec<String>,
    log_path: PathBuf,
    member_id: u64,
    child: Option<Child>,
    channel: Channel,
}

/// A multi-member etcd cluster on loopback (free ports, temp data dir).
/// Members are numbered 1..=n (names `e1`, `e2`, ...).
pub struct EtcdCluster {
    members: BTreeMap<u64, EtcdMember>,
    bin: PathBuf,
    root: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        maybe_keep_dir(&mut self.dir, "etcd cluster");
    }
}

impl EtcdCluster {
    /// Starts `n` members (`etcd` from PATH or `$ETCD_BIN`) with etcd's
    /// default timing (heartbeat 100 ms, election 1000 ms) and waits until
    /// every member reports the same leader.
    pub async fn start(n: usize) -> Result<Self> {
        if n == 0 {
            bail!("an etcd cluster needs at least one member");
        }
        let bin = match std::env::var_os("ETCD_BIN") {
            Some(p) => PathBuf::from(p),
            None => which("etcd")
                .context("etcd is needed: apt-get install -y etcd-server etcd-client")?,
        };
        let dir = new_temp_dir("trellis-etcd-")?;
        let root = dir.path().to_path_buf();
        let ports = free_ports(2 * n)?;
        let token = format!("trellis-bench-{}", rand::random::<u32>());
        let initial_cluster = (0..n)
            .map(|i| format!("e{}=http://127.0.0.1:{}", i + 1, ports[2 * i + 1]))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = BTreeMap::new();
        for i in 0..n {
            let id = i as u64 + 1;
            let name = format!("e{id}");
            let (cport, pport) = (ports[2 * i], ports[2 * i + 1]);
            let client = format!("http://127.0.0.1:{cport}");
            let peer = format!("http://127.0.0.1:{pport}");
            let args: Vec<String> = [
                "--name",
                &name,
                "--data-dir",
                &root.join(&name).display().to_string(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &initial_cluster,
                "--initial-cluster-token",
                &token,
                "--initial-cluster-state",
                "new",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let log_path = root.join(format!("{name}.log"));
            let child = spawn_etcd(&bin, &args, &log_path)?;
            let channel = lazy_channel(SocketAddr::from(([127, 0, 0, 1], cport)))?;
            members.insert(
                id,
                EtcdMember {
                    name,
                    client_port: cport,
                    args,
                    log_path,
                    member_id: 0,
                    child: Some(child),
                    channel,
                },
            );
        }
        let mut c = Self {
            members,
            bin,
            root,
            dir: Some(dir),
        };
        c.wait_healthy(None).await?;
        Ok(c)
    }

    /// Member numbers 1..=n.
    pub fn ids(&self) -> Vec<u64> {
        self.members.keys().copied().collect()
    }

    /// The cluster's directory (data `e<n>/`, logs `e<n>.log`).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    fn member(&self, m: u64) -> Result<&EtcdMember> {
        self.members
            .get(&m)
            .with_context(|| format!("no etcd member {m} (have {:?})", self.ids()))
    }

    fn member_mut(&mut self, m: u64) -> Result<&mut EtcdMember> {
        let ids = self.ids();
        self.members
            .get_mut(&m)
            .with_context(|| format!("no etcd member {m} (have {ids:?})"))
    }

    /// Client address (`127.0.0.1:port`) of member `m`.
    pub fn client_addr(&self, m: u64) -> Result<SocketAddr> {
        Ok(SocketAddr::from((
            [127, 0, 0, 1],
            self.member(m)?.client_port,
        )))
    }

    /// Client URL (`http://127.0.0.1:port`) of member `m`.
    pub fn client_endpoint(&self, m: u64) -> Result<String> {
        Ok(format!("http://{}", self.client_addr(m)?))
    }

    /// Lazily connected channel to member `m`.
    pub fn channel(&self, m: u64) -> Result<Channel> {
        Ok(self.member(m)?.channel.clone())
    }

    /// etcd KV client for member `m`.
    pub fn kv(&self, m: u64) -> Result<etcdpb::kv_client::KvClient<Channel>> {
        Ok(etcdpb::kv_client::KvClient::new(self.channel(m)?))
    }

    /// Whether the harness believes member `m` is up.
    pub fn is_started(&self, m: u64) -> bool {
        self.members.get(&m).is_some_and(|x| x.child.is_some())
    }

    /// Log tail of member `m`.
    pub fn log_tail(&self, m: u64) -> String {
        self.members
            .get(&m)
            .map(|x| log_tail(&x.log_path, LOG_TAIL_LINES))
            .unwrap_or_default()
    }

    /// Maintenance.Status of member `m` (one RPC, [`RPC_TIMEOUT`]).
    pub async fn status(&self, m: u64) -> Result<etcdpb::StatusResponse> {
        etcd_status(self.channel(m)?, m).await
    }

    /// Polls started members until all agree on a non-zero leader that is one
    /// of them (if `must_answer` is given, that member must answer too).
    /// Records etcd member ids; returns the leader's member number.
    async fn wait_healthy(&mut self, must_answer: Option<u64>) -> Result<u64> {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let started: Vec<u64> = self
                .members
                .iter()
                .filter(|(_, x)| x.child.is_some())
                .map(|(id, _)| *id)
                .collect();
            let futs = started.iter().map(|&m| {
                let ch = self.members[&m].channel.clone();
                async move { (m, etcd_status(ch, m).await) }
            });
            let sts: Vec<(u64, Result<etcdpb::StatusResponse>)> =
                futures::future::join_all(futs).await;
            for (m, s) in &sts {
                if let Ok(s) = s {
                    if let Some(h) = &s.header {
                        if let Some(x) = self.members.get_mut(m) {
                            x.member_id = h.member_id;
                        }
                    }
                }
            }
            let ok: Vec<(u64, &etcdpb::StatusResponse)> = sts
                .iter()
                .filter_map(|(m, s)| s.as_ref().ok().map(|s| (*m, s)))
                .collect();
            let all_answer = ok.len() == sts.len();
            let must_ok = must_answer.is_none_or(|m| ok.iter().any(|(x, _)| *x == m));
            if let Some((_, first)) = ok.first() {
                let leader = first.leader;
                if all_answer
                    && must_ok
                    && leader != 0
                    && ok.iter().all(|(_, s)| s.leader == leader)
                {
                    if let Some(m) = self.member_by_etcd_id(leader) {
                        return Ok(m);
                    }
                }
            }
            if Instant::now() >= deadline {
                let mut msg = format!("etcd did not become healthy within {CLUSTER_TIMEOUT:?}:\n");
                for (m, s) in &sts {
                    match s {
                        Ok(s) => {
                            let _ =
                                writeln!(msg, "  e{m}: leader={:x} term={}", s.leader, s.raft_term);
                        }
                        Err(e) => {
                            let _ = writeln!(msg, "  e{m}: {e:#}");
                        }
                    }
                }
                for m in &started {
                    msg.push_str(&self.log_tail(*m));
                }
                bail!(msg);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn member_by_etcd_id(&self, etcd_id: u64) -> Option<u64> {
        self.members
            .iter()
            .find(|(_, x)| x.member_id == etcd_id && x.member_id != 0)
            .map(|(m, _)| *m)
    }

    /// The leader's member number: waits until every started member answers
    /// and names the same leader.
    pub async fn leader(&mut self) -> Result<u64> {
        self.wait_healthy(None).await
    }

    /// Client URL of the current leader.
    pub async fn leader_client_endpoint(&mut self) -> Result<String> {
        let l = self.leader().await?;
        self.client_endpoint(l)
    }

    /// SIGKILL member `m` and wait for it to exit.
    pub async fn kill(&mut self, m: u64) -> Result<()> {
        let member = self.member_mut(m)?;
        let name = member.name.clone();
        let mut child = member
            .child
            .take()
            .with_context(|| format!("etcd {name} is not running"))?;
        child
            .start_kill()
            .with_context(|| format!("sending SIGKILL to etcd {name}"))?;
        with_timeout(
            Duration::from_secs(10),
            || format!("waiting for etcd {name} to exit"),
            async {
                child
                    .wait()
                    .await
                    .with_context(|| format!("waiting for etcd {name}"))
            },
        )
        .await?;
        Ok(())
    }

    /// Finds the leader, SIGKILLs it, returns its member number.
    pub async fn kill_leader(&mut self) -> Result<u64> {
        let l = self.leader().await?;
        self.kill(l).await?;
        Ok(l)
    }

    /// Starts the stopped member `m` again (same data dir and ports) and waits
    /// until it answers and agrees with the others on the leader.
    pub async fn restart(&mut self, m: u64) -> Result<()> {
        let bin = self.bin.clone();
        let member = self.member_mut(m)?;
        if member.child.is_some() {
            bail!("etcd {} is still running", member.name);
        }
        member.child = Some(spawn_etcd(&bin, &member.args, &member.log_path)?);
        self.wait_healthy(Some(m)).await?;
        Ok(())
    }
}

fn spawn_etcd(bin: &Path, args: &[String], log_path: &Path) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let log2 = log
        .try_clone()
        .with_context(|| format!("duplicating the handle of {}", log_path.display()))?;
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {} {}", bin.display(), args.join(" ")))
}

async fn etcd_status(ch: Channel, m: u64) -> Result<etcdpb::StatusResponse> {
    let mut c = etcdpb::maintenance_client::MaintenanceClient::new(ch);
    let mut req = tonic::Request::new(etcdpb::StatusRequest {});
    req.set_timeout(RPC_TIMEOUT);
    match tokio::time::timeout(RPC_TIMEOUT, c.status(req)).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(anyhow!("etcd e{m} Status: {}: {}", s.code(), s.message())),
        Err(_) => Err(anyhow!("etcd e{m} Status timed out after {RPC_TIMEOUT:?}")),
    }
}

// ---------------------------------------------------------------------------
// Latency statistics
// ---------------------------------------------------------------------------

/// Latency samples (nanoseconds), summarized by nearest-rank percentiles.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    samples: Vec<u64>,
    sorted: bool,
}

impl Latencies {
    /// Empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sample.
    pub fn record(&mut self, d: Duration) {
        self.samples
            .push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        self.sorted = false;
    }

    /// Appends all samples of `other`.
    pub fn merge(&mut self, other: Latencies) {
        self.samples.extend(other.samples);
        self.sorted = false;
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// No samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Nearest-rank percentile `p` (0 < p <= 100); `None` when empty.
    pub fn percentile(&mut self, p: f64) -> Option<Duration> {
        if !self.sorted {
            self.samples.sort_unstable();
            self.sorted = true;
        }
        percentile_sorted(&self.samples, p).map(Duration::from_nanos)
    }
}

/// Nearest-rank percentile of ascending `sorted`: the smallest sample with at
/// least `p`% of the samples at or below it. `None` when empty.
pub fn percentile_sorted(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let p = p.clamp(0.0, 100.0);
    // The epsilon keeps float error (0.999 * 1000 = 999.0000000000001) from
    // bumping an exact rank to the next sample.
    let rank = ((p / 100.0) * sorted.len() as f64 - 1e-9).ceil() as usize;
    let idx = rank.clamp(1, sorted.len()) - 1;
    Some(sorted[idx])
}

/// Median of `values` (mean of the middle two for an even count); `None`
/// when empty. NaNs sort last.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Parses a duration like `10s`, `500ms`, `2m`, `1h`, `250us` or a bare
/// number of seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("bad duration {s:?} (expected e.g. 10s, 500ms, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => bail!("bad duration unit {u:?} in {s:?} (use us, ms, s, m or h)"),
    };
    if !secs.is_finite() || secs < 0.0 {
        bail!("bad duration {s:?}");
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::admin::Member;

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile_sorted(&v, 50.0), Some(50));
        assert_eq!(percentile_sorted(&v, 99.0), Some(99));
        assert_eq!(percentile_sorted(&v, 99.9), Some(100));
        assert_eq!(percentile_sorted(&v, 100.0), Some(100));
        assert_eq!(percentile_sorted(&v, 0.0), Some(1));
        assert_eq!(percentile_sorted(&[7], 99.9), Some(7));
        assert_eq!(percentile_sorted(&[], 50.0), None);
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile_sorted(&v, 99.9), Some(999));
    }

    #[test]
    fn latencies_sort_lazily() {
        let mut l = Latencies::new();
        for ms in [5u64, 1, 3, 2, 4] {
            l.record(Duration::from_millis(ms));
        }
        assert_eq!(l.percentile(50.0), Some(Duration::from_millis(3)));
        let mut o = Latencies::new();
        o.record(Duration::from_millis(10));
        l.merge(o);
        assert_eq!(l.len(), 6);
        assert_eq!(l.percentile(100.0), Some(Duration::from_millis(10)));
    }

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn durations() -> Result<()> {
        assert_eq!(parse_duration("10s")?, Duration::from_secs(10));
        assert_eq!(parse_duration("500ms")?, Duration::from_millis(500));
        assert_eq!(parse_duration("2m")?, Duration::from_secs(120));
        assert_eq!(parse_duration("1.5")?, Duration::from_millis(1500));
        assert_eq!(parse_duration("600s")?, Duration::from_secs(600));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("").is_err());
        Ok(())
    }

    #[test]
    fn ready_line() {
        let l = r#"{"event":"ready","node_id":1,"raft_addr":"127.0.0.1:41234","admin_addr":"127.0.0.1:41235","quic_addr":"127.0.0.1:41236"}"#;
        let r = parse_ready_line(l);
        assert!(r.is_some());
        let a = r.and_then(|r| parse_reported(1, &r).ok());
        assert_eq!(
            a.map(|a| (a.raft.port(), a.admin.port(), a.quic.map(|q| q.port()))),
            Some((41234, 41235, Some(41236)))
        );
        assert!(parse_ready_line("2024-01-01 INFO starting").is_none());
        assert!(parse_ready_line(r#"{"event":"stopping","node_id":1}"#).is_none());
    }

    fn st(id: u64, leader: u64, term: u64, voters: &[u64]) -> Result<StatusResponse> {
        Ok(StatusResponse {
            node_id: id,
            leader_id: leader,
            term,
            initialized: true,
            members: voters
                .iter()
                .map(|&v| Member {
                    node_id: v,
                    voter: true,
                    ..Member::default()
                })
                .collect(),
            ..StatusResponse::default()
        })
    }

    #[test]
    fn majority_and_convergence() {
        let mut s = BTreeMap::new();
        s.insert(1, st(1, 2, 3, &[1, 2, 3]));
        s.insert(2, st(2, 2, 3, &[1, 2, 3]));
        s.insert(3, Err(anyhow!("down")));
        assert_eq!(majority_leader(&s), Some(2));
        assert_eq!(converged(&s, None), Some(2));
        let exp: BTreeSet<u64> = [1, 2, 3].into();
        assert_eq!(converged(&s, Some(&exp)), None, "node 3 did not answer");
        s.insert(3, st(3, 1, 2, &[1, 2, 3]));
        assert_eq!(
            converged(&s, Some(&exp)),
            None,
            "node 3 names a stale leader"
        );
        assert_eq!(majority_leader(&s), Some(2));
        s.insert(3, st(3, 2, 3, &[1, 2, 3]));
        assert_eq!(converged(&s, Some(&exp)), Some(2));
        // The leader itself down: no majority leader.
        s.insert(2, Err(anyhow!("down")));
        assert_eq!(majority_leader(&s), None);
    }
}
