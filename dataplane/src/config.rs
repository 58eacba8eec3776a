//! `trellis-sidecar` configuration: a TOML file (`--config`) and/or flags
//! (flags win, applied by `main.rs`), checked by [`SidecarConfig::validate`]
//! before anything starts. Every error names the field at fault, e.g.
//! `seeds[1]: "x" is not host:port`.
//!
//! ```toml
//! namespace = "default"
//! service = "reviews"
//! seeds = ["10.0.0.1:7381", "10.0.0.2:7381", "10.0.0.3:7381"]
//! data_dir = "/var/lib/trellis-sidecar"
//! ca_file = "/etc/trellis/ca.pem"
//! join_token_file = "/etc/trellis/join-token"   # only read if no valid cert is on disk
//! admin_addr = "127.0.0.1:15000"
//! outbound_addr = "127.0.0.1:15001"   # the app's calls to other services
//! inbound_addr = "0.0.0.0:15006"      # peer sidecars (mutual TLS, HTTP/2)
//! app_addr = "127.0.0.1:9080"         # the local application
//! workers = 0                         # runtime threads; 0: one per usable CPU
//!
//! [instance]
//! name = "reviews-7f9c"
//! address = "10.0.1.7"
//! port = 15006          # optional: default the bound inbound port
//! labels = { version = "v2", zone = "us-east-1a" }
//!
//! [connection]          # optional: connection limits ([`ConnectionConfig`])
//! idle_timeout_ms = 300000
//! ```
//!
//! Files under `data_dir` (all written atomically):
//! `identity/{cert,key,ca}.pem`, `config.json` (last good config, see
//! [`crate::disk`]), `admin.addr`, `outbound.addr` and `inbound.addr` (the
//! bound listener addresses, for tests and tools).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Namespace of a sidecar that does not say: the mesh's default namespace,
/// so a mesh without namespaces never writes one.
pub const DEFAULT_NAMESPACE: &str = trellis_resources::DEFAULT_NAMESPACE;
/// Admin/debug HTTP endpoint: loopback only (it exposes the whole config),
/// on Envoy's familiar admin port.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
/// Outbound listener: loopback only, because anything that can reach it
/// speaks with this workload's identity; 15001 is Istio's familiar port.
pub const DEFAULT_OUTBOUND_ADDR: &str = "127.0.0.1:15001";
/// Inbound listener: every interface, because peer sidecars on other hosts
/// connect here (mutual TLS keeps everyone else out); Istio's 15006.
pub const DEFAULT_INBOUND_ADDR: &str = "0.0.0.0:15006";
/// The local application: the conventional port of the bookinfo services,
/// on loopback because only this sidecar should reach it.
pub const DEFAULT_APP_ADDR: &str = "127.0.0.1:9080";
/// Watch the whole mesh: a sidecar needs services, routes and policies of
/// any namespace it may call.
pub const DEFAULT_WATCH_PREFIX: &str = "/";
/// How long in-flight requests and connections get to finish at shutdown
/// (SIGTERM) after the listeners stop accepting: well inside Kubernetes'
/// default 30 s termination grace, long enough for ordinary requests.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 10_000;
/// Largest drain deadline: shutdown must not hang for hours.
pub const MAX_DRAIN_TIMEOUT_MS: u64 = 600_000;
/// Worker threads: 0 means one per CPU this process may run on
/// (`std::thread::available_parallelism`, which honours CPU affinity and
/// cgroup quotas), like Envoy's `--concurrency` and linkerd2-proxy's
/// `LINKERD2_PROXY_CORES`. With one worker the sidecar runs a
/// single-threaded runtime: every task of a request stays on one thread,
/// with no cross-thread wake-ups, which is what a sidecar limited to one
/// CPU should do.
pub const DEFAULT_WORKERS: usize = 0;
/// Most worker threads accepted: a sidecar beside one instance never needs
/// more, and a typo like 10000 should not start ten thousand threads.
pub const MAX_WORKERS: usize = 256;

/// Lease TTL of the registered instance: keepalives go every ttl/3, so
/// 10 s tolerates two lost keepalives plus a control-plane failover (≤ 1 s)
/// before a healthy instance could expire, while a dead sidecar's instance
/// disappears within 10 s.
pub const DEFAULT_LEASE_TTL_MS: u64 = 10_000;
/// First reconnect delay cap: short, because the usual reason to reconnect
/// is a failed control node and the next seed is probably fine.
pub const DEFAULT_RECONNECT_BASE_MS: u64 = 50;
/// Largest reconnect delay cap: while the whole control plane is down,
/// 2 s keeps a thousand sidecars' retries to ~500 handshakes/s.
pub const DEFAULT_RECONNECT_MAX_MS: u64 = 2_000;
/// QUIC handshake timeout: loopback and LAN handshakes take well under
/// 10 ms; a node that does not answer in 1 s is treated as down.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Ask the server for a Progress at least every second while idle: it
/// advances the acknowledged revision and proves the stream is alive.
pub const DEFAULT_PROGRESS_INTERVAL_MS: u32 = 1_000;
/// Renew the certificate two thirds into its lifetime: a third of it is
/// left for retries through a control-plane outage.
pub const DEFAULT_RENEW_AT_FRACTION: f64 = 0.66;

/// Shortest lease TTL accepted: keepalives every ttl/3 must survive a
/// reconnect (≥ 50 ms backoff + handshake).
pub const MIN_LEASE_TTL_MS: u64 = 500;
/// Longest lease TTL accepted: a dead instance should not linger for more
/// than an hour.
pub const MAX_LEASE_TTL_MS: u64 = 3_600_000;

/// Inbound TLS handshake deadline: a peer sidecar completes it in a few
/// ms on a LAN; 5 s tolerates a loaded host, while a client that connects
/// and never sends a ClientHello gives its socket back quickly.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// Deadline for a request's headers: HTTP/1 (both listeners' HTTP/1 server,
/// hyper's `header_read_timeout`) from the moment the server waits for
/// them, and on the inbound listener the HTTP/2 preface plus the first
/// HEADERS after the handshake. Headers are a few hundred bytes a real
/// client sends at once; 10 s still covers a few TCP retransmission
/// timeouts (1 + 2 + 4 s) on a lossy link, while a slowloris client that
/// trickles a byte now and then is cut off (the inbound listener's
/// HTTP/2 preface and first request). The outbound listener's HTTP/1
/// clients (the local app) are bounded by [`DEFAULT_IDLE_TIMEOUT_MS`]
/// instead: a per-request header timer would cost every request and cut
/// keep-alive connections the app's pools still hold.
pub const DEFAULT_REQUEST_HEADER_TIMEOUT_MS: u64 = 10_000;
/// A downstream connection (either listener) with no request in flight for
/// this long is closed gracefully (HTTP/2: GOAWAY). Five minutes is longer
/// than the idle timeouts of common client pools (Go 90 s, the peer
/// sidecars' own [`DEFAULT_UPSTREAM_IDLE_TIMEOUT_MS`]), so the client
/// normally closes first and never races a request against this close; it
/// only reaps forgotten connections.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 300_000;
/// A pooled sidecar-to-sidecar HTTP/2 connection that no new request used
/// for this long leaves the pool and closes once its open streams end:
/// shorter than the peer's [`DEFAULT_IDLE_TIMEOUT_MS`], so the client side
/// closes first; long enough that even a request a minute keeps reusing
/// one connection (no handshake per request).
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Concurrent inbound connections: a peer sidecar keeps one pooled
/// connection per identity, so this is thousands of callers, far beyond
/// any one instance's fan-in, while bounding memory (TLS and HTTP/2
/// buffers, tens of KiB each) when something opens connections without
/// limit. Connections beyond it are closed at once.
pub const DEFAULT_MAX_INBOUND_CONNECTIONS: usize = 4_096;

/// Most inbound connections the setting may allow: a million, past any
/// file-descriptor limit a sidecar runs with (a larger value would only
/// hide a typo).
pub const MAX_MAX_INBOUND_CONNECTIONS: usize = 1_000_000;

/// Most HTTP/1 request header fields the setting may allow: ten thousand,
/// past any real request; more only buys a parser a larger heap vector.
pub const MAX_MAX_REQUEST_HEADERS: usize = 10_000;
/// Largest request header block (both listeners): HTTP/1 request line and
/// headers (hyper's read buffer, 431 beyond), HTTP/2 `max_header_list_size`
/// (uncompressed, RFC 9113 counting). Envoy's default is 60 KiB; 64 KiB
/// fits large cookies and JWTs, while a client cannot make the sidecar
/// buffer hyper's default ~400 KiB per connection.
pub const DEFAULT_MAX_REQUEST_HEADER_BYTES: usize = 64 << 10;
/// Most HTTP/1 request header fields: hyper's own default (and Envoy's
/// `max_headers_count`); 431 beyond. Keeping it at 100 keeps hyper's
/// stack-allocated parse.
pub const DEFAULT_MAX_REQUEST_HEADERS: usize = 100;
/// Largest response header block the sidecar accepts from a peer sidecar
/// (HTTP/2 `max_header_list_size` of the pooled client) and from the local
/// app (HTTP/1 read buffer, HTTP/2 `max_header_list_size`): the same 64 KiB
/// as requests; hyper's HTTP/2 client default is only 16 KiB.
pub const DEFAULT_MAX_RESPONSE_HEADER_BYTES: usize = 64 << 10;
/// HTTP/2 keepalive ping interval on every HTTP/2 connection (both
/// listeners, the pool): finds a dead peer on a quiet connection within
/// interval + timeout instead of at the next request.
pub const DEFAULT_H2_KEEPALIVE_INTERVAL_MS: u64 = 10_000;
/// A connection whose ping is not answered in this long is dead.
pub const DEFAULT_H2_KEEPALIVE_TIMEOUT_MS: u64 = 20_000;
/// Smallest header limit: hyper's HTTP/1 buffer cannot be smaller.
pub const MIN_HEADER_BYTES: usize = 8 << 10;
/// Largest header limit: more is a mistake or an attack.
pub const MAX_HEADER_BYTES: usize = 1 << 20;
/// Longest connection timeout accepted (an hour).
pub const MAX_CONNECTION_TIMEOUT_MS: u64 = 3_600_000;

/// Connection-level protection of the data path (`[connection]`): deadlines
/// against slow or silent clients, idle timeouts, HTTP/2 keepalive pings
/// and header size limits. Applied by [`crate::proxy::conn`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionConfig {
    /// Inbound: the TLS handshake must finish within this (ms).
    pub tls_handshake_timeout_ms: u64,
    /// The inbound listener's HTTP/2 preface and first request must
    /// arrive within this (ms).
    pub request_header_timeout_ms: u64,
    /// Close a downstream connection with no request in flight for this
    /// long (ms); 0: never.
    pub idle_timeout_ms: u64,
    /// Drop a pooled upstream connection no request used for this long
    /// (ms); 0: never.
    pub upstream_idle_timeout_ms: u64,
    /// Most concurrent inbound connections; more are closed at once.
    pub max_inbound_connections: usize,
    /// Largest request header block (bytes), HTTP/1 and HTTP/2.
    pub max_request_header_bytes: usize,
    /// Most HTTP/1 request header fields.
    pub max_request_headers: usize,
    /// Largest response header block (bytes) from peers and the app.
    pub max_response_header_bytes: usize,
    /// HTTP/2 keepalive ping interval (ms).
    pub h2_keepalive_interval_ms: u64,
    /// HTTP/2 keepalive ping timeout (ms).
    pub h2_keepalive_timeout_ms: u64,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            tls_handshake_timeout_ms: DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS,
            request_header_timeout_ms: DEFAULT_REQUEST_HEADER_TIMEOUT_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            upstream_idle_timeout_ms: DEFAULT_UPSTREAM_IDLE_TIMEOUT_MS,
            max_inbound_connections: DEFAULT_MAX_INBOUND_CONNECTIONS,
            max_request_header_bytes: DEFAULT_MAX_REQUEST_HEADER_BYTES,
            max_request_headers: DEFAULT_MAX_REQUEST_HEADERS,
            max_response_header_bytes: DEFAULT_MAX_RESPONSE_HEADER_BYTES,
            h2_keepalive_interval_ms: DEFAULT_H2_KEEPALIVE_INTERVAL_MS,
            h2_keepalive_timeout_ms: DEFAULT_H2_KEEPALIVE_TIMEOUT_MS,
        }
    }
}

impl ConnectionConfig {
    /// Checks every field; errors name it as `connection.<field>`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let field = |f: &str| format!("connection.{f}");
        for (name, v, zero_ok) in [
            (
                "tls_handshake_timeout_ms",
                self.tls_handshake_timeout_ms,
                false,
            ),
            (
                "request_header_timeout_ms",
                self.request_header_timeout_ms,
                false,
            ),
            ("idle_timeout_ms", self.idle_timeout_ms, true),
            (
                "upstream_idle_timeout_ms",
                self.upstream_idle_timeout_ms,
                true,
            ),
            (
                "h2_keepalive_interval_ms",
                self.h2_keepalive_interval_ms,
                false,
            ),
            (
                "h2_keepalive_timeout_ms",
                self.h2_keepalive_timeout_ms,
                false,
            ),
        ] {
            let min = u64::from(!zero_ok);
            if !(min..=MAX_CONNECTION_TIMEOUT_MS).contains(&v) {
                let off = if zero_ok { " (0: never)" } else { "" };
                return Err(invalid(
                    field(name),
                    format!("must be in {min}..={MAX_CONNECTION_TIMEOUT_MS}{off}, got {v}"),
                ));
            }
        }
        for (name, v) in [
            ("max_request_header_bytes", self.max_request_header_bytes),
            ("max_response_header_bytes", self.max_response_header_bytes),
        ] {
            if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&v) {
                return Err(invalid(
                    field(name),
                    format!("must be in {MIN_HEADER_BYTES}..={MAX_HEADER_BYTES}, got {v}"),
                ));
            }
        }
        if !(1..=MAX_MAX_REQUEST_HEADERS).contains(&self.max_request_headers) {
            return Err(invalid(
                field("max_request_headers"),
                format!(
                    "must be in 1..={MAX_MAX_REQUEST_HEADERS}, got {}",
                    self.max_request_headers
                ),
            ));
        }
        if !(1..=MAX_MAX_INBOUND_CONNECTIONS).contains(&self.max_inbound_connections) {
            return Err(invalid(
                field("max_inbound_connections"),
                format!(
                    "must be in 1..={MAX_MAX_INBOUND_CONNECTIONS}, got {}",
                    self.max_inbound_connections
                ),
            ));
        }
        Ok(())
    }
}

/// The instance this sidecar registers (through the session stream) while
/// it is connected. Namespace and service come from its certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// Instance name, unique in the namespace (DNS-1123 label); default:
    /// the sidecar's name.
    #[serde(default)]
    pub name: Option<String>,
    /// IP literal where this instance's sidecar accepts traffic.
    pub address: String,
    /// Port at `address`; 0 (or absent) means the bound port of
    /// `inbound_addr`, where peer sidecars reach this instance.
    #[serde(default)]
    pub port: u16,
    /// Instance labels (`version`, `zone`, ...) used by subsets and locality.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Relative weight for weighted balancing; 0 means the default
    /// ([`trellis_resources::service::DEFAULT_INSTANCE_WEIGHT`]).
    #[serde(default)]
    pub weight: u32,
}

/// One dedicated outbound TCP listener (`[[tcp_forward]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpForwardConfig {
    /// Listen address (`IP:port`; loopback unless the app is elsewhere).
    pub listen: String,
    /// Destination service: `svc` (this namespace) or `svc.ns`.
    pub service: String,
    /// Destination service port (selects the Route's `tcp` rule).
    pub port: u16,
}

impl TcpForwardConfig {
    /// Parses the flag form `LISTEN=SERVICE:PORT`
    /// (`127.0.0.1:15432=db:5432`).
    pub fn parse_flag(s: &str) -> Result<TcpForwardConfig, String> {
        let (listen, to) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not LISTEN=SERVICE:PORT"))?;
        let (service, port) = to
            .rsplit_once(':')
            .ok_or_else(|| format!("{to:?} is not SERVICE:PORT"))?;
        let port = port
            .parse()
            .map_err(|_| format!("{port:?} is not a port number"))?;
        Ok(TcpForwardConfig {
            listen: listen.to_string(),
            service: service.to_string(),
            port,
        })
    }
}

/// Everything the sidecar's control-plane side needs to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SidecarConfig {
    /// The sidecar's own name (shown by `trellisctl proxy-status`); default
    /// `<service>-<pid>` (or `sidecar-<pid>`), see [`SidecarConfig::resolved_name`].
    pub name: Option<String>,
    /// Namespace of the service this sidecar fronts.
    pub namespace: String,
    /// The service this sidecar fronts; required when `instance` is set.
    pub service: String,
    /// Control nodes' QUIC addresses, `host:port`; at least one. The sidecar
    /// starts at a random one and moves to the next on failure.
    pub seeds: Vec<String>,
    /// Where the certificate, the last good config and `admin.addr` live.
    pub data_dir: PathBuf,
    /// The cluster's root CA certificate (PEM), which every control node's
    /// certificate chains to.
    pub ca_file: PathBuf,
    /// Join token (`trellisctl token create`), used only when no valid
    /// certificate is on disk. At most one of `join_token`, `join_token_file`.
    pub join_token: Option<String>,
    /// File holding the join token (read only when a join is needed).
    pub join_token_file: Option<PathBuf>,
    /// Admin HTTP listen address; port 0 picks a free port (written to
    /// `<data_dir>/admin.addr`).
    pub admin_addr: String,
    /// Key prefix to watch (`/` for the whole mesh).
    pub watch_prefix: String,
    /// Where the application sends its calls to other services (plain
    /// HTTP/1.1 or HTTP/2 prior knowledge, the target service as Host);
    /// port 0 picks a free port (written to `<data_dir>/outbound.addr`).
    pub outbound_addr: String,
    /// Where peer sidecars connect (mutual TLS, HTTP/2); port 0 picks a
    /// free port (written to `<data_dir>/inbound.addr`).
    pub inbound_addr: String,
    /// The local application inbound requests are forwarded to (HTTP/1.1
    /// or HTTP/2, as the caller sent them; TCP tunnels too).
    pub app_addr: String,
    /// Dedicated outbound TCP listeners ("protocol conversion" for opaque
    /// TCP): every connection to `listen` goes to `service` (`svc` or
    /// `svc.ns`) on `port`, through the sidecar pair.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_forward: Vec<TcpForwardConfig>,
    /// JSON access log: a file path (appended to), `-` for stdout, absent
    /// for none.
    pub access_log: Option<String>,
    /// Drain deadline at shutdown (ms), see [`DEFAULT_DRAIN_TIMEOUT_MS`].
    pub drain_timeout_ms: u64,
    /// The instance to register; absent for a client-only sidecar.
    pub instance: Option<InstanceConfig>,
    /// Lease TTL of the registration (ms).
    pub lease_ttl_ms: u64,
    /// First reconnect backoff cap (ms); doubles per failure up to the max.
    pub reconnect_base_ms: u64,
    /// Largest reconnect backoff cap (ms).
    pub reconnect_max_ms: u64,
    /// QUIC connect (handshake) timeout (ms).
    pub connect_timeout_ms: u64,
    /// Idle Progress interval asked of the server (ms; 0: only when needed).
    pub progress_interval_ms: u32,
    /// Renew the certificate at this fraction of its lifetime (0.1..=0.9).
    pub renew_at_fraction: f64,
    /// Worker threads of the runtime (0: one per usable CPU; 1: a
    /// single-threaded runtime), see [`DEFAULT_WORKERS`].
    pub workers: usize,
    /// Connection limits of the data path (`[connection]`).
    pub connection: ConnectionConfig,
}

impl Default for SidecarConfig {
    fn default() -> Self {
        SidecarConfig {
            name: None,
            namespace: DEFAULT_NAMESPACE.to_string(),
            service: String::new(),
            seeds: Vec::new(),
            data_dir: PathBuf::new(),
            ca_file: PathBuf::new(),
            join_token: None,
            join_token_file: None,
            admin_addr: DEFAULT_ADMIN_ADDR.to_string(),
            watch_prefix: DEFAULT_WATCH_PREFIX.to_string(),
            outbound_addr: DEFAULT_OUTBOUND_ADDR.to_string(),
            inbound_addr: DEFAULT_INBOUND_ADDR.to_string(),
            app_addr: DEFAULT_APP_ADDR.to_string(),
            tcp_forward: Vec::new(),
            access_log: None,
            drain_timeout_ms: DEFAULT_DRAIN_TIMEOUT_MS,
            instance: None,
            lease_ttl_ms: DEFAULT_LEASE_TTL_MS,
            reconnect_base_ms: DEFAULT_RECONNECT_BASE_MS,
            reconnect_max_ms: DEFAULT_RECONNECT_MAX_MS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            progress_interval_ms: DEFAULT_PROGRESS_INTERVAL_MS,
            renew_at_fraction: DEFAULT_RENEW_AT_FRACTION,
            workers: DEFAULT_WORKERS,
            connection: ConnectionConfig::default(),
        }
    }
}

/// A configuration problem. Never retry-safe: the same config fails again.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// toml's message carries the line, column and field.
    #[error("config {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// A value is missing or wrong; `field` is its path (`seeds[1]`,
    /// `instance.port`).
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Checks that `s` is `host:port` (IP literal, `[v6]:port` or DNS name)
/// with a non-zero port.
fn is_host_port(s: &str) -> bool {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return a.port() != 0;
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let port_ok = matches!(port.parse::<u16>(), Ok(p) if p != 0);
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    port_ok && host_ok
}

/// DNS-1123 label: the rule the registry applies to the same names.
pub(crate) use trellis_resources::validate::is_dns_label;

impl SidecarConfig {
    /// The runtime's worker threads: `workers`, or one per CPU this process
    /// may run on when it is 0 (at least one).
    pub fn worker_threads(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// Load a TOML file (unknown fields are errors); not yet validated.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parse TOML text; the error string names line, column and field.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// The sidecar's name: `name`, else `<service>-<host>-<pid>`, else
    /// `sidecar-<host>-<pid>`. The host part keeps replicas in containers
    /// (where every pid is 1) from registering the same instance name.
    pub fn resolved_name(&self) -> String {
        if let Some(n) = self.name.as_ref().filter(|n| !n.is_empty()) {
            return n.clone();
        }
        let prefix = if self.service.is_empty() {
            "sidecar"
        } else {
            self.service.as_str()
        };
        let pid = std::process::id().to_string();
        // A DNS label holds 63 characters: the host part takes what is left.
        let room = 63usize.saturating_sub(prefix.len() + pid.len() + 2);
        match hostname_label().map(|h| h.chars().take(room).collect::<String>()) {
            Some(h) if !h.trim_end_matches('-').is_empty() => {
                format!("{prefix}-{}-{pid}", h.trim_end_matches('-'))
            }
            _ => format!("{prefix}-{pid}"),
        }
    }

    /// `<data_dir>/identity`: cert.pem, key.pem (0600), ca.pem.
    pub fn identity_dir(&self) -> PathBuf {
        self.data_dir.join("identity")
    }

    /// `<data_dir>/config.json`: the last good config.
    pub fn config_cache_path(&self) -> PathBuf {
        self.data_dir.join("config.json")
    }

    /// `<data_dir>/admin.addr`: the bound admin address, for tests and tools.
    pub fn admin_addr_path(&self) -> PathBuf {
        self.data_dir.join("admin.addr")
    }

    /// `<data_dir>/outbound.addr`: the bound outbound listener address.
    pub fn outbound_addr_path(&self) -> PathBuf {
        self.data_dir.join("outbound.addr")
    }

    /// `<data_dir>/inbound.addr`: the bound inbound listener address.
    pub fn inbound_addr_path(&self) -> PathBuf {
        self.data_dir.join("inbound.addr")
    }

    /// Checks every field; the first problem found is returned, naming its
    /// field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(name) = &self.name {
            if name.is_empty()
                || name.len() > 253
                || name.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(invalid(
                    "name",
                    format!("{name:?} must be 1..=253 characters without spaces"),
                ));
            }
        }
        if !is_dns_label(&self.namespace) {
            return Err(invalid(
                "namespace",
                format!("{:?} is not a DNS-1123 label", self.namespace),
            ));
        }
        if !self.service.is_empty() && !is_dns_label(&self.service) {
            return Err(invalid(
                "service",
                format!("{:?} is not a DNS-1123 label", self.service),
            ));
        }
        if self.seeds.is_empty() {
            return Err(invalid(
                "seeds",
                "at least one control-node address is required",
            ));
        }
        for (i, s) in self.seeds.iter().enumerate() {
            if !is_host_port(s) {
                return Err(invalid(
                    format!("seeds[{i}]"),
                    format!("{s:?} is not host:port"),
                ));
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "required"));
        }
        if self.ca_file.as_os_str().is_empty() {
            return Err(invalid(
                "ca_file",
                "required (the cluster root CA certificate, PEM)",
            ));
        }
        match (&self.join_token, &self.join_token_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "join_token",
                    "set only one of join_token and join_token_file",
                ))
            }
            (Some(t), None) => {
                if let Err(e) = trellis_identity::JoinToken::parse(t.trim()) {
                    return Err(invalid("join_token", e.to_string()));
                }
            }
            (None, Some(p)) if p.as_os_str().is_empty() => {
                return Err(invalid("join_token_file", "empty path"));
            }
            _ => {}
        }
        if let Err(e) = self.admin_addr.parse::<SocketAddr>() {
            return Err(invalid(
                "admin_addr",
                format!(
                    "{:?} is not IP:port ({e}); port 0 picks a free port",
                    self.admin_addr
                ),
            ));
        }
        for (field, value, zero_ok) in [
            ("outbound_addr", &self.outbound_addr, true),
            ("inbound_addr", &self.inbound_addr, true),
            ("app_addr", &self.app_addr, false),
        ] {
            match value.parse::<SocketAddr>() {
                Ok(a) if a.port() == 0 && !zero_ok => {
                    return Err(invalid(
                        field,
                        format!("{value:?}: port must be in 1..=65535"),
                    ))
                }
                Ok(_) => {}
                Err(e) => {
                    let hint = if zero_ok {
                        "; port 0 picks a free port"
                    } else {
                        ""
                    };
                    return Err(invalid(
                        field,
                        format!("{value:?} is not IP:port ({e}){hint}"),
                    ));
                }
            }
        }
        for (i, f) in self.tcp_forward.iter().enumerate() {
            let field = |x: &str| format!("tcp_forward[{i}].{x}");
            if let Err(e) = f.listen.parse::<SocketAddr>() {
                return Err(invalid(
                    field("listen"),
                    format!("{:?} is not IP:port ({e})", f.listen),
                ));
            }
            let mut parts = f.service.splitn(2, '.');
            let ok =
                parts.next().is_some_and(is_dns_label) && parts.next().is_none_or(is_dns_label);
            if !ok {
                return Err(invalid(
                    field("service"),
                    format!("{:?} is not `svc` or `svc.ns`", f.service),
                ));
            }
            if f.port == 0 {
                return Err(invalid(field("port"), "must be in 1..=65535"));
            }
        }
        if let Some(a) = &self.access_log {
            if a.is_empty() {
                return Err(invalid(
                    "access_log",
                    "empty; use a file path or - for stdout",
                ));
            }
        }
        if !(1..=MAX_DRAIN_TIMEOUT_MS).contains(&self.drain_timeout_ms) {
            return Err(invalid(
                "drain_timeout_ms",
                format!(
                    "must be in 1..={MAX_DRAIN_TIMEOUT_MS}, got {}",
                    self.drain_timeout_ms
                ),
            ));
        }
        if !self.watch_prefix.starts_with('/') {
            return Err(invalid(
                "watch_prefix",
                format!("{:?} must start with \"/\"", self.watch_prefix),
            ));
        }
        if let Some(inst) = &self.instance {
            self.validate_instance(inst)?;
        }
        if !(MIN_LEASE_TTL_MS..=MAX_LEASE_TTL_MS).contains(&self.lease_ttl_ms) {
            return Err(invalid(
                "lease_ttl_ms",
                format!(
                    "must be in {MIN_LEASE_TTL_MS}..={MAX_LEASE_TTL_MS}, got {}",
                    self.lease_ttl_ms
                ),
            ));
        }
        if self.reconnect_base_ms == 0 {
            return Err(invalid("reconnect_base_ms", "must be at least 1"));
        }
        if self.reconnect_max_ms < self.reconnect_base_ms {
            return Err(invalid(
                "reconnect_max_ms",
                format!(
                    "must be at least reconnect_base_ms ({}), got {}",
                    self.reconnect_base_ms, self.reconnect_max_ms
                ),
            ));
        }
        if self.connect_timeout_ms == 0 {
            return Err(invalid("connect_timeout_ms", "must be at least 1"));
        }
        if !(self.renew_at_fraction.is_finite() && (0.1..=0.9).contains(&self.renew_at_fraction)) {
            return Err(invalid(
                "renew_at_fraction",
                format!("must be in 0.1..=0.9, got {}", self.renew_at_fraction),
            ));
        }
        if self.workers > MAX_WORKERS {
            return Err(invalid(
                "workers",
                format!(
                    "must be at most {MAX_WORKERS} (0 for one per CPU), got {}",
                    self.workers
                ),
            ));
        }
        self.connection.validate()
    }

    fn validate_instance(&self, inst: &InstanceConfig) -> Result<(), ConfigError> {
        if self.service.is_empty() {
            return Err(invalid(
                "service",
                "required when an instance is registered ([instance] is set)",
            ));
        }
        if let Some(name) = &inst.name {
            if !is_dns_label(name) {
                return Err(invalid(
                    "instance.name",
                    format!("{name:?} is not a DNS-1123 label"),
                ));
            }
        } else if !is_dns_label(&self.resolved_name()) {
            return Err(invalid(
                "instance.name",
                format!(
                    "required: the sidecar name {:?} is not a DNS-1123 label",
                    self.resolved_name()
                ),
            ));
        }
        match inst.address.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() || ip.is_multicast() => {
                return Err(invalid(
                    "instance.address",
                    format!("{ip} is not a unicast address an instance can listen on"),
                ))
            }
            Ok(_) => {}
            Err(_) => {
                return Err(invalid(
                    "instance.address",
                    format!("{:?} is not an IP address", inst.address),
                ))
            }
        }
        let max_weight = trellis_resources::service::MAX_INSTANCE_WEIGHT;
        if inst.weight > max_weight {
            return Err(invalid(
                "instance.weight",
                format!(
                    "must be in 0..={max_weight} (0: default), got {}",
                    inst.weight
                ),
            ));
        }
        for k in inst.labels.keys() {
            if k.is_empty() || k.len() > 63 || k.chars().any(|c| c.is_whitespace()) {
                return Err(invalid(
                    format!("instance.labels.{k}"),
                    "label names are 1..=63 characters without spaces",
                ));
            }
        }
        Ok(())
    }

    /// The instance name to register: `instance.name`, else the sidecar's.
    pub fn instance_name(&self) -> Option<String> {
        self.instance
            .as_ref()
            .map(|i| i.name.clone().unwrap_or_else(|| self.resolved_name()))
    }
}

/// The machine's host name as a DNS label (lower case, `[a-z0-9-]`, at
/// most 40 characters), if the kernel says it.
fn hostname_label() -> Option<String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let label: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    let label = label.trim_matches('-').to_string();
    (!label.is_empty()).then_some(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> SidecarConfig {
        SidecarConfig::from_toml(
            r#"
            seeds = ["127.0.0.1:7381"]
            data_dir = "/tmp/x"
            ca_file = "/tmp/ca.pem"
            "#,
        )
        .unwrap()
    }

    /// A change that breaks one field.
    type Mutation<T> = fn(&mut T);

    fn field_of(e: ConfigError) -> String {
        match e {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("not a field error: {other}"),
        }
    }

    #[test]
    fn tcp_forward_flags_and_fields_are_checked() {
        let f = TcpForwardConfig::parse_flag("127.0.0.1:15432=db.data:5432").unwrap();
        assert_eq!(
            f,
            TcpForwardConfig {
                listen: "127.0.0.1:15432".into(),
                service: "db.data".into(),
                port: 5432
            }
        );
        for bad in ["127.0.0.1:1", "a=db", "a=db:x"] {
            assert!(TcpForwardConfig::parse_flag(bad).is_err(), "{bad}");
        }
        let base = || SidecarConfig {
            seeds: vec!["127.0.0.1:1".into()],
            data_dir: "/tmp/x".into(),
            ca_file: "/tmp/ca.pem".into(),
            ..SidecarConfig::default()
        };
        assert!(base().validate().is_ok());
        let mut c = base();
        c.tcp_forward = vec![TcpForwardConfig {
            listen: "nope".into(),
            service: "db".into(),
            port: 1,
        }];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("tcp_forward[0].listen:"), "{e}");
        c.tcp_forward[0].listen = "127.0.0.1:0".into();
        c.tcp_forward[0].service = "Bad_Name".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("tcp_forward[0].service:"), "{e}");
        let mut c = base();
        c.drain_timeout_ms = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("drain_timeout_ms:"), "{e}");
        let mut c = base();
        c.access_log = Some(String::new());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("access_log:"), "{e}");
    }

    #[test]
    fn defaults_are_the_named_constants() {
        let c = minimal();
        c.validate().unwrap();
        assert_eq!(c.namespace, "default");
        assert_eq!(c.admin_addr, DEFAULT_ADMIN_ADDR);
        assert_eq!(c.watch_prefix, "/");
        assert_eq!(c.lease_ttl_ms, 10_000);
        assert_eq!(c.reconnect_base_ms, 50);
        assert_eq!(c.reconnect_max_ms, 2_000);
        assert_eq!(c.connect_timeout_ms, 1_000);
        assert_eq!(c.progress_interval_ms, 1_000);
        assert!((c.renew_at_fraction - 0.66).abs() < f64::EPSILON);
        assert!(c.instance.is_none());
        assert!(c.resolved_name().starts_with("sidecar-"));
        assert_eq!(c.config_cache_path(), PathBuf::from("/tmp/x/config.json"));
    }

    #[test]
    fn full_file_parses() {
        let c = SidecarConfig::from_toml(
            r#"
            name = "reviews-a"
            namespace = "shop"
            service = "reviews"
            seeds = ["10.0.0.1:7381", "[::1]:7381", "node-3.example:7381"]
            data_dir = "/var/lib/s"
            ca_file = "/etc/ca.pem"
            join_token_file = "/etc/token"
            admin_addr = "127.0.0.1:0"
            watch_prefix = "/route/"
            lease_ttl_ms = 3000
            [instance]
            address = "10.0.1.7"
            port = 9080
            labels = { version = "v2" }
            weight = 10
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.instance_name().as_deref(), Some("reviews-a"));
        assert_eq!(c.instance.as_ref().unwrap().labels["version"], "v2");
    }

    #[test]
    fn unknown_fields_are_errors() {
        let e = SidecarConfig::from_toml("seedz = []").unwrap_err();
        assert!(e.contains("seedz"), "{e}");
        let e = SidecarConfig::from_toml("[instance]\naddress=\"1.2.3.4\"\nport=1\nwieght=3")
            .unwrap_err();
        assert!(e.contains("wieght"), "{e}");
    }

    #[test]
    fn validate_names_the_field() {
        let mut c = minimal();
        c.seeds.clear();
        let e = c.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "seeds: at least one control-node address is required"
        );

        let mut c = minimal();
        c.seeds.push("x".into());
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            r#"seeds[1]: "x" is not host:port"#
        );

        let cases: Vec<(&str, Mutation<SidecarConfig>)> = vec![
            ("data_dir", |c| c.data_dir = PathBuf::new()),
            ("ca_file", |c| c.ca_file = PathBuf::new()),
            ("namespace", |c| c.namespace = "Bad_NS".into()),
            ("service", |c| c.service = "no spaces".into()),
            ("admin_addr", |c| c.admin_addr = "localhost".into()),
            ("outbound_addr", |c| c.outbound_addr = "x:1".into()),
            ("inbound_addr", |c| c.inbound_addr = "15006".into()),
            ("app_addr", |c| c.app_addr = "127.0.0.1:0".into()),
            ("watch_prefix", |c| c.watch_prefix = "route/".into()),
            ("lease_ttl_ms", |c| c.lease_ttl_ms = 1),
            ("reconnect_base_ms", |c| c.reconnect_base_ms = 0),
            ("reconnect_max_ms", |c| c.reconnect_max_ms = 10),
            ("connect_timeout_ms", |c| c.connect_timeout_ms = 0),
            ("renew_at_fraction", |c| c.renew_at_fraction = 1.5),
            ("renew_at_fraction", |c| c.renew_at_fraction = f64::NAN),
            ("workers", |c| c.workers = MAX_WORKERS + 1),
            ("join_token", |c| c.join_token = Some("not-a-token".into())),
            ("join_token_file", |c| {
                c.join_token_file = Some(PathBuf::new())
            }),
            ("join_token", |c| {
                c.join_token = Some("t".into());
                c.join_token_file = Some("/f".into());
            }),
            ("service", |c| {
                c.instance = Some(InstanceConfig {
                    name: None,
                    address: "10.0.0.1".into(),
                    port: 80,
                    labels: BTreeMap::new(),
                    weight: 0,
                })
            }),
        ];
        for (field, mutate) in cases {
            let mut c = minimal();
            mutate(&mut c);
            assert_eq!(field_of(c.validate().unwrap_err()), field);
        }
    }

    #[test]
    fn instance_fields_are_checked() {
        let base = || {
            let mut c = minimal();
            c.service = "reviews".into();
            c.instance = Some(InstanceConfig {
                name: Some("reviews-1".into()),
                address: "10.0.0.1".into(),
                port: 9080,
                labels: BTreeMap::new(),
                weight: 0,
            });
            c
        };
        base().validate().unwrap();
        let cases: Vec<(&str, Mutation<InstanceConfig>)> = vec![
            ("instance.address", |i| i.address = "host".into()),
            ("instance.address", |i| i.address = "0.0.0.0".into()),
            ("instance.weight", |i| i.weight = 1_000_000),
            ("instance.name", |i| i.name = Some("UPPER".into())),
            ("instance.labels. x", |i| {
                i.labels.insert(" x".into(), "y".into());
            }),
        ];
        for (field, mutate) in cases {
            let mut c = base();
            mutate(c.instance.as_mut().unwrap());
            assert_eq!(field_of(c.validate().unwrap_err()), field);
        }
    }

    #[test]
    fn connection_table_parses_and_is_checked() {
        let c = SidecarConfig::from_toml(
            r#"
            seeds = ["127.0.0.1:7381"]
            data_dir = "/tmp/x"
            ca_file = "/tmp/ca.pem"
            [connection]
            idle_timeout_ms = 0
            request_header_timeout_ms = 500
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.connection.idle_timeout_ms, 0);
        assert_eq!(c.connection.request_header_timeout_ms, 500);
        assert_eq!(
            c.connection.tls_handshake_timeout_ms,
            DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS
        );
        assert_eq!(minimal().connection, ConnectionConfig::default());
        let e = SidecarConfig::from_toml("[connection]\nidle_timeout=1").unwrap_err();
        assert!(e.contains("idle_timeout"), "{e}");
        let cases: Vec<(&str, Mutation<ConnectionConfig>)> = vec![
            ("connection.tls_handshake_timeout_ms", |c| {
                c.tls_handshake_timeout_ms = 0
            }),
            ("connection.request_header_timeout_ms", |c| {
                c.request_header_timeout_ms = 0
            }),
            ("connection.idle_timeout_ms", |c| {
                c.idle_timeout_ms = MAX_CONNECTION_TIMEOUT_MS + 1
            }),
            ("connection.h2_keepalive_interval_ms", |c| {
                c.h2_keepalive_interval_ms = 0
            }),
            ("connection.h2_keepalive_timeout_ms", |c| {
                c.h2_keepalive_timeout_ms = 0
            }),
            ("connection.max_request_header_bytes", |c| {
                c.max_request_header_bytes = 100
            }),
            ("connection.max_response_header_bytes", |c| {
                c.max_response_header_bytes = 100 << 20
            }),
            ("connection.max_request_headers", |c| {
                c.max_request_headers = 0
            }),
            ("connection.max_inbound_connections", |c| {
                c.max_inbound_connections = 0
            }),
            ("connection.max_inbound_connections", |c| {
                c.max_inbound_connections = usize::MAX
            }),
        ];
        for (field, mutate) in cases {
            let mut c = minimal();
            mutate(&mut c.connection);
            assert_eq!(field_of(c.validate().unwrap_err()), field);
        }
    }

    #[test]
    fn host_port_forms() {
        for ok in ["1.2.3.4:1", "[::1]:7381", "a.b-c.d:80", "localhost:7381"] {
            assert!(is_host_port(ok), "{ok}");
        }
        for bad in [
            "x",
            "1.2.3.4",
            "1.2.3.4:0",
            ":80",
            "a..b:80",
            "a:b:c",
            "h:99999",
        ] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sidecar.toml");
        let e = SidecarConfig::from_file(&p).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        std::fs::write(&p, "seeds = 3").unwrap();
        let e = SidecarConfig::from_file(&p).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("config {}: ", p.display())),
            "{e}"
        );
    }
}
