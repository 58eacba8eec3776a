//! `trellis-sidecar` processes for end-to-end tests: spawn one against a
//! TLS [`crate::Cluster`], find its admin address (the sidecar writes it to
//! `<data dir>/admin.addr` once it listens), read its admin endpoints, kill
//! and restart it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// How long a sidecar may take to bind its admin listener.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Poll interval for files and admin state under a deadline.
const POLL: Duration = Duration::from_millis(20);

/// One sidecar process (or a stopped one that can be started again).
pub struct SidecarProc {
    bin: PathBuf,
    args: Vec<String>,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    admin: Option<SocketAddr>,
}

impl SidecarProc {
    /// Start `trellis-sidecar run` with `args` (plus `--data-dir` and an
    /// ephemeral admin port); returns once the admin endpoint listens.
    pub async fn spawn(data_dir: PathBuf, log_path: PathBuf, args: Vec<String>) -> Result<Self> {
        let mut p = Self {
            bin: crate::bin_path("trellis-sidecar")?,
            args,
            data_dir,
            log_path,
            child: None,
            admin: None,
        };
        p.start().await?;
        Ok(p)
    }

    /// Start (again) with the same arguments and data dir.
    pub async fn start(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.data_dir)?;
        let addr_file = self.data_dir.join("admin.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        // Ephemeral data-path ports too, unless the test chose them, so
        // several sidecars can run side by side.
        let mut listeners = Vec::new();
        for flag in ["--outbound-addr", "--inbound-addr"] {
            if !self.args.iter().any(|a| a == flag) {
                listeners.extend([flag.to_string(), "127.0.0.1:0".to_string()]);
            }
        }
        for f in ["outbound.addr", "inbound.addr"] {
            let _ = std::fs::remove_file(self.data_dir.join(f));
        }
        let mut child = Command::new(&self.bin)
            .arg("run")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--admin-addr")
            .arg("127.0.0.1:0")
            .args(&listeners)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        let admin = loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file) {
                if let Ok(a) = text.trim().parse::<SocketAddr>() {
                    break a;
                }
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "sidecar exited with {status} before listening\n{}",
                    crate::log_tail(&self.log_path, 30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "sidecar did not listen within {START_TIMEOUT:?}\n{}",
                    crate::log_tail(&self.log_path, 30)
                );
            }
            tokio::time::sleep(POLL).await;
        };
        self.child = Some(child);
        self.admin = Some(admin);
        Ok(())
    }

    /// SIGKILL the process.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// SIGTERM, and wait (up to `grace`) for it to exit.
    pub async fn stop(&mut self, grace: Duration) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .status()
                    .await;
            }
            if tokio::time::timeout(grace, c.wait()).await.is_err() {
                c.kill().await?;
            }
        }
        Ok(())
    }

    /// The bound outbound (application-facing) address, from
    /// `<data dir>/outbound.addr` (written before `admin.addr`).
    pub fn outbound_addr(&self) -> Result<SocketAddr> {
        self.read_addr("outbound.addr")
    }

    /// The bound inbound (peer-sidecar-facing) address.
    pub fn inbound_addr(&self) -> Result<SocketAddr> {
        self.read_addr("inbound.addr")
    }

    fn read_addr(&self, file: &str) -> Result<SocketAddr> {
        let path = self.data_dir.join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{}: not an address: {text:?}", path.display()))
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn log_tail(&self) -> String {
        crate::log_tail(&self.log_path, 40)
    }

    /// GET `path` on the admin endpoint: (status code, body).
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        let addr = self.admin.context("sidecar not started")?;
        http_get(addr, path).await
    }

    /// GET `path` and parse the body as JSON (status must be 200).
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        let (code, body) = self.get(path).await?;
        if code != 200 {
            bail!("GET {path}: {code} {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))
    }

    /// Poll `/config_dump` until `check` holds (or `timeout`); returns the
    /// dump that satisfied it.
    pub async fn wait_dump(
        &self,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            match self.get_json("/config_dump").await {
                Ok(d) if check(&d) => return Ok(d),
                Ok(d) => last = Some(d),
                Err(_) => {}
            }
            if Instant::now() > deadline {
                bail!(
                    "sidecar: {what} not reached within {timeout:?}; last dump: {}\n{}",
                    last.map_or("none".into(), |d| d.to_string()),
                    self.log_tail()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// A minimal HTTP/1.1 GET (the admin endpoint is plain HTTP on loopback).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timeout")??;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .context("read timeout")??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status code")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Applies `content` (YAML documents) through node 1's resource API;
/// returns the revision of the write.
pub async fn apply(c: &crate::Cluster, content: &str) -> Result<u64> {
    let r = c
        .resources_client(1)
        .apply(trellis_proto::admin::ApplyRequest {
            documents: vec![trellis_proto::admin::SourceDocument {
                source: "test.yaml".into(),
                content: content.into(),
            }],
            dry_run: false,
            expected_revision: None,
            lease: 0,
        })
        .await?
        .into_inner();
    Ok(r.revision)
}

/// Starts a sidecar named `name` for `service` in namespace `default`
/// against the TLS cluster `c`: a fresh join token, the cluster's seeds and
/// CA, data under `<cluster dir>/<name>`, log at `<cluster dir>/<name>.log`;
/// `extra` flags are appended (e.g. `--app-addr`, `--instance-address`).
pub async fn sidecar(
    c: &crate::Cluster,
    name: &str,
    service: &str,
    extra: &[String],
) -> Result<SidecarProc> {
    let token = c
        .identity_client(1)
        .create_token(trellis_proto::admin::CreateTokenRequest {
            namespace: "default".into(),
            service: service.into(),
            ttl_ms: 0,
            description: name.into(),
        })
        .await?
        .into_inner()
        .token;
    let pki = c
        .pki()
        .context("the cluster has no PKI (start it with tls: true)")?;
    let mut args: Vec<String> = [
        "--seeds",
        &c.quic_seeds(),
        "--ca-file",
        &pki.ca_file.display().to_string(),
        "--join-token",
        &token,
        "--name",
        name,
        "--namespace",
        "default",
        "--service",
        service,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().cloned());
    SidecarProc::spawn(
        c.dir().join(name),
        c.dir().join(format!("{name}.log")),
        args,
    )
    .await
}

/// A workload certificate and key for `service` in namespace `default`,
/// signed by `ca` (a peer sidecar's identity, for tests that talk mutual
/// TLS to a sidecar directly): (certificate PEM, key PEM).
pub fn workload_cert(ca: &trellis_identity::Ca, service: &str) -> Result<(String, String)> {
    let (csr, key) = trellis_identity::generate_csr()?;
    let issued = ca.sign_csr(
        &csr,
        &trellis_identity::Identity::Workload {
            namespace: "default".into(),
            service: service.into(),
        },
        &[],
        trellis_identity::WORKLOAD_CERT_VALIDITY,
    )?;
    Ok((issued.cert_pem, key))
}

/// A client config of a peer sidecar of `from` (namespace `default`), with
/// a fresh certificate from the TLS cluster `c`'s CA, that expects the
/// server to be `to` and offers ALPN h2: for tests that speak mutual TLS
/// to a sidecar's inbound listener directly.
pub fn peer_client_config(
    c: &crate::Cluster,
    from: &str,
    to: &str,
) -> Result<rustls::ClientConfig> {
    let pki = c
        .pki()
        .context("the cluster has no PKI (start it with tls: true)")?;
    let ca_pem = std::fs::read_to_string(&pki.ca_file)?;
    let (cert, key) = workload_cert(pki.ca(), from)?;
    Ok(trellis_identity::workload_client_config(
        &ca_pem,
        &cert,
        &key,
        Some(format!("spiffe://trellis.local/ns/default/svc/{to}")),
        &[b"h2"],
    )?)
}
