//! `trellisd` configuration: a TOML file and/or command-line flags
//! (flags win), validated before anything starts.
//!
//! ```toml
//! id = 1
//! data_dir = "/var/lib/trellis"
//! raft_addr = "10.0.0.1:7380"
//! admin_addr = "10.0.0.1:7379"
//! quic_addr = "10.0.0.1:7381"
//!
//! durability = "fsync"   # or "kill-safe"
//!
//! [tls]                  # or `insecure_dev = true` (plaintext, development only)
//! ca_file = "/etc/trellis/ca.pem"
//! cert_file = "/etc/trellis/node-1.pem"
//! key_file = "/etc/trellis/node-1-key.pem"
//!
//! [sidecars]
//! workload_cert_ttl_ms = 3600000
//! lease_ttl_ms = 10000
//!
//! [raft]
//! heartbeat_ms = 50
//! election_timeout_min_ms = 300
//! election_timeout_max_ms = 600
//! crash_detection = true
//! leader_overlap = false
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Admin gRPC port (next to etcd's 2379 habit, shifted to avoid clashes).
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:7379";
/// Raft peer RPC port.
pub const DEFAULT_RAFT_ADDR: &str = "127.0.0.1:7380";
/// QUIC port for sidecars.
pub const DEFAULT_QUIC_ADDR: &str = "127.0.0.1:7381";

/// Leader heartbeat. 50 ms keeps followers' view of the leader fresh at
/// ~20 small RPCs/s per peer.
pub const DEFAULT_HEARTBEAT_MS: u64 = 50;
/// Election timeout bounds. openraft 0.9 makes a follower wait its leader
/// lease (= the max) plus a random timeout in [min, max] after the last
/// heartbeat, so 300–600 ms notices a silent leader after 0.9–1.2 s (etcd's
/// default is 1 s). A leader whose process died is noticed at once by the
/// crash detector (`crash_detection`), so these only govern hangs and
/// partitions and can be long enough not to flap when a loaded 2-core
/// machine stalls a node for a few hundred milliseconds (150–300 ms, and
/// 100–200 ms more so, lost a healthy leader under saturating writes).
pub const DEFAULT_ELECTION_TIMEOUT_MIN_MS: u64 = 300;
pub const DEFAULT_ELECTION_TIMEOUT_MAX_MS: u64 = 600;
/// Crash detection is on by default: it only acts when the leader's port
/// refuses connections, which a live leader never does.
pub const DEFAULT_CRASH_DETECTION: bool = true;
/// Leader overlap is off by default: then every log append, the leader's
/// included, is durable before openraft hears of it, which is the storage
/// contract openraft 0.9 is written against. On, the leader replicates its
/// appends while they sync (etcd's behaviour), with the rules of
/// `trellis_raft_store::durable` keeping every acknowledged write on a
/// durable majority; measured +25–40% puts/s at one write in flight.
pub const DEFAULT_LEADER_OVERLAP: bool = false;
/// Build a snapshot after this many applied entries: bounds log size and
/// restart replay time without snapshotting constantly under load.
pub const DEFAULT_SNAPSHOT_AFTER_LOGS: u64 = 10_000;
/// Entries kept in the log behind a snapshot, so a briefly lagging
/// follower catches up from the log instead of a full snapshot transfer.
pub const DEFAULT_LOGS_KEPT_AFTER_SNAPSHOT: u64 = 5_000;
/// Time for one snapshot chunk to be accepted. openraft's 200 ms default
/// resends slow chunks forever on a loaded machine (see DEPENDENCIES.md).
pub const DEFAULT_INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 5_000;
/// Entries per AppendEntries message. An entry is a batch of at most
/// ~4 MiB (see `proposer`), so 64 keeps a message under ~256 MiB, half the
/// peer message limit; openraft's default of 300 could exceed it.
pub const MAX_PAYLOAD_ENTRIES: u64 = 64;
/// How long an API call waits for the cluster (leader election, commit)
/// before answering UNAVAILABLE: several election rounds.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 5_000;

/// Lifetime of the certificates sidecars get on join and renewal: short,
/// so a stolen key is worth little (sidecars renew at ~2/3 of it over their
/// open connection; Istio's workload certificates live 24 h, SPIRE's 1 h).
pub const DEFAULT_WORKLOAD_CERT_TTL_MS: u64 = 60 * 60 * 1000;
/// Shortest workload certificate: renewal needs some room to happen.
pub const MIN_WORKLOAD_CERT_TTL_MS: u64 = 10_000;
/// Lease of a sidecar's instance registration when the sidecar asks for
/// none: its keepalives come every third of this, and a dead sidecar's
/// instance leaves the registry within it.
pub const DEFAULT_SIDECAR_LEASE_TTL_MS: u64 = 10_000;

/// TLS files of a node: the cluster CA and this node's certificate
/// (`trellisctl ca create`, `trellisctl cert create --node ID`). With them
/// Raft peer RPC, the admin API and the QUIC endpoint all require mutual
/// TLS.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster's root CA certificate (PEM).
    pub ca_file: PathBuf,
    /// This node's certificate (PEM), issued by the CA for `node/<id>`.
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
}

/// What the node offers sidecars.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SidecarSettings {
    /// Validity of certificates issued on join and renewal (ms).
    pub workload_cert_ttl_ms: u64,
    /// Instance lease TTL when a sidecar asks for none (ms).
    pub lease_ttl_ms: u64,
}

impl Default for SidecarSettings {
    fn default() -> Self {
        SidecarSettings {
            workload_cert_ttl_ms: DEFAULT_WORKLOAD_CERT_TTL_MS,
            lease_ttl_ms: DEFAULT_SIDECAR_LEASE_TTL_MS,
        }
    }
}

/// Raft timing and log-compaction knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftTiming {
    /// Leader heartbeat interval in milliseconds.
    pub heartbeat_ms: u64,
    /// Lower bound of the randomized election timeout (ms).
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomized election timeout (ms); also openraft's
    /// leader lease.
    pub election_timeout_max_ms: u64,
    /// Snapshot after this many entries since the last snapshot.
    pub snapshot_after_logs: u64,
    /// Log entries kept behind the last snapshot.
    pub logs_kept_after_snapshot: u64,
    /// Per-chunk snapshot install timeout (ms).
    pub install_snapshot_timeout_ms: u64,
    /// Followers hold a stream open to the leader and start an election as
    /// soon as it breaks and the leader's Raft port refuses connections
    /// (its process is gone), instead of waiting out the election timeout.
    pub crash_detection: bool,
    /// The leader sends its appends to followers while its own sync runs
    /// (see [`DEFAULT_LEADER_OVERLAP`]).
    pub leader_overlap: bool,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            election_timeout_min_ms: DEFAULT_ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max_ms: DEFAULT_ELECTION_TIMEOUT_MAX_MS,
            snapshot_after_logs: DEFAULT_SNAPSHOT_AFTER_LOGS,
            logs_kept_after_snapshot: DEFAULT_LOGS_KEPT_AFTER_SNAPSHOT,
            install_snapshot_timeout_ms: DEFAULT_INSTALL_SNAPSHOT_TIMEOUT_MS,
            crash_detection: DEFAULT_CRASH_DETECTION,
            leader_overlap: DEFAULT_LEADER_OVERLAP,
        }
    }
}

/// Everything a control node needs to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Raft node id: unique in the cluster, never reused, not 0.
    pub id: u64,
    /// Where the database and snapshots live.
    pub data_dir: PathBuf,
    /// Listen address for Raft peer RPC (port 0 picks one).
    pub raft_addr: String,
    /// Listen address for the admin gRPC API (port 0 picks one).
    pub admin_addr: String,
    /// Listen address of the sidecars' QUIC endpoint (UDP).
    pub quic_addr: String,
    /// Raft address other nodes dial, if not the listen address (e.g. when
    /// listening on 0.0.0.0).
    pub advertise_raft_addr: Option<String>,
    /// Admin address other nodes forward to, if not the listen address.
    pub advertise_admin_addr: Option<String>,
    /// Local override of the address dialed for a peer id (test harnesses
    /// that put a fault proxy on each link). Membership is not changed.
    pub peer_dial_overrides: BTreeMap<u64, String>,
    /// How long API calls wait for the cluster before UNAVAILABLE (ms).
    pub request_timeout_ms: u64,
    /// `fsync` (default): log appends are fdatasync'ed, surviving power
    /// loss. `kill-safe`: sled's flush only, surviving process crashes.
    pub durability: trellis_raft_store::Durability,
    /// Raft timing.
    pub raft: RaftTiming,
    /// Mutual TLS on every listener. Required unless `insecure_dev`.
    pub tls: Option<TlsConfig>,
    /// DEVELOPMENT ONLY: plaintext admin API and Raft RPC, no
    /// authentication, and no QUIC endpoint for sidecars (QUIC needs TLS).
    pub insecure_dev: bool,
    /// Sidecar certificates and registrations.
    pub sidecars: SidecarSettings,
    /// tracing filter, e.g. `info` or `trellis=debug,openraft=warn`.
    pub log_level: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: 0,
            data_dir: PathBuf::new(),
            raft_addr: DEFAULT_RAFT_ADDR.to_string(),
            admin_addr: DEFAULT_ADMIN_ADDR.to_string(),
            quic_addr: DEFAULT_QUIC_ADDR.to_string(),
            advertise_raft_addr: None,
            advertise_admin_addr: None,
            peer_dial_overrides: BTreeMap::new(),
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            durability: trellis_raft_store::Durability::default(),
            raft: RaftTiming::default(),
            tls: None,
            insecure_dev: false,
            sidecars: SidecarSettings::default(),
            log_level: "info,openraft=warn".to_string(),
        }
    }
}

/// A configuration problem, naming the field (and file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// toml's message carries the line and column.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn check_addr(field: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse::<SocketAddr>().map_err(|e| {
        invalid(
            field,
            format!("{value:?} is not host:port with an IP address ({e})"),
        )
    })
}

impl NodeConfig {
    /// Load a TOML file (unknown fields are errors).
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
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Check every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(invalid("id", "must be set to a positive integer"));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must be set"));
        }
        let raft = check_addr("raft_addr", &self.raft_addr)?;
        let admin = check_addr("admin_addr", &self.admin_addr)?;
        let quic = check_addr("quic_addr", &self.quic_addr)?;
        if raft.port() != 0 && raft.port() == admin.port() && raft.ip() == admin.ip() {
            return Err(invalid("admin_addr", "must differ from raft_addr"));
        }
        let _ = quic;
        if let Some(a) = &self.advertise_raft_addr {
            check_addr("advertise_raft_addr", a)?;
        }
        if let Some(a) = &self.advertise_admin_addr {
            check_addr("advertise_admin_addr", a)?;
        }
        for addr in self.peer_dial_overrides.values() {
            check_addr("peer_dial_overrides", addr)?;
        }
        if self.request_timeout_ms == 0 {
            return Err(invalid("request_timeout_ms", "must be positive"));
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 {
            return Err(invalid("raft.heartbeat_ms", "must be positive"));
        }
        if r.election_timeout_min_ms <= r.heartbeat_ms * 2 {
            return Err(invalid(
                "raft.election_timeout_min_ms",
                format!(
                    "{} ms must be more than twice raft.heartbeat_ms ({} ms), or followers start elections while the leader is healthy",
                    r.election_timeout_min_ms, r.heartbeat_ms
                ),
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(invalid(
                "raft.election_timeout_max_ms",
                format!(
                    "{} ms must be greater than raft.election_timeout_min_ms ({} ms)",
                    r.election_timeout_max_ms, r.election_timeout_min_ms
                ),
            ));
        }
        if r.snapshot_after_logs == 0 {
            return Err(invalid("raft.snapshot_after_logs", "must be positive"));
        }
        if r.install_snapshot_timeout_ms == 0 {
            return Err(invalid(
                "raft.install_snapshot_timeout_ms",
                "must be positive",
            ));
        }
        match (&self.tls, self.insecure_dev) {
            (None, false) => {
                return Err(invalid(
                    "tls",
                    "no TLS files: set [tls] ca_file, cert_file and key_file (make them with `trellisctl ca create` and `trellisctl cert create --node ID`), or pass --insecure-dev for a plaintext development cluster",
                ))
            }
            (Some(_), true) => {
                return Err(invalid(
                    "insecure_dev",
                    "cannot be combined with [tls]: choose mutual TLS or plaintext",
                ))
            }
            (Some(t), false) => {
                for (field, path) in [
                    ("tls.ca_file", &t.ca_file),
                    ("tls.cert_file", &t.cert_file),
                    ("tls.key_file", &t.key_file),
                ] {
                    if path.as_os_str().is_empty() {
                        return Err(invalid(field, "must be set"));
                    }
                }
            }
            (None, true) => {}
        }
        if self.sidecars.workload_cert_ttl_ms < MIN_WORKLOAD_CERT_TTL_MS {
            return Err(invalid(
                "sidecars.workload_cert_ttl_ms",
                format!(
                    "{} ms is below the minimum {MIN_WORKLOAD_CERT_TTL_MS} ms",
                    self.sidecars.workload_cert_ttl_ms
                ),
            ));
        }
        if !(crate::leases::MIN_LEASE_TTL_MS..=crate::leases::MAX_LEASE_TTL_MS)
            .contains(&self.sidecars.lease_ttl_ms)
        {
            return Err(invalid(
                "sidecars.lease_ttl_ms",
                format!(
                    "{} ms is outside {}..={} ms",
                    self.sidecars.lease_ttl_ms,
                    crate::leases::MIN_LEASE_TTL_MS,
                    crate::leases::MAX_LEASE_TTL_MS
                ),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_level)
            .map_err(|e| invalid("log_level", format!("{:?}: {e}", self.log_level)))?;
        Ok(())
    }

    /// The openraft configuration these settings mean.
    pub fn openraft_config(&self) -> Result<openraft::Config, ConfigError> {
        let r = &self.raft;
        openraft::Config {
            cluster_name: "trellis".to_string(),
            heartbeat_interval: r.heartbeat_ms,
            election_timeout_min: r.election_timeout_min_ms,
            election_timeout_max: r.election_timeout_max_ms,
            install_snapshot_timeout: r.install_snapshot_timeout_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_after_logs),
            max_in_snapshot_log_to_keep: r.logs_kept_after_snapshot,
            max_payload_entries: MAX_PAYLOAD_ENTRIES,
            ..Default::default()
        }
        .validate()
        .map_err(|e| invalid("raft", e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> NodeConfig {
        NodeConfig {
            id: 1,
            data_dir: "/tmp/x".into(),
            insecure_dev: true,
            ..NodeConfig::default()
        }
    }

    #[test]
    fn defaults_with_id_and_dir_are_valid() {
        base().validate().expect("valid");
        base().openraft_config().expect("openraft accepts it");
    }

    #[test]
    fn errors_name_the_field() {
        let mut c = base();
        c.id = 0;
        assert!(c.validate().unwrap_err().to_string().contains("id"));
        let mut c = base();
        c.admin_addr = "localhost".into();
        assert!(c.validate().unwrap_err().to_string().contains("admin_addr"));
        let mut c = base();
        c.raft.election_timeout_min_ms = 100;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("raft.election_timeout_min_ms"));
    }

    #[test]
    fn tls_or_an_explicit_insecure_flag_is_required() {
        let mut c = base();
        c.insecure_dev = false;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("tls") && err.contains("--insecure-dev"),
            "{err}"
        );
        c.tls = Some(TlsConfig {
            ca_file: "ca.pem".into(),
            cert_file: "n.pem".into(),
            key_file: PathBuf::new(),
        });
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("tls.key_file"), "{err}");
        c.insecure_dev = true;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("insecure_dev"), "{err}");
    }

    #[test]
    fn toml_errors_carry_line_and_unknown_fields_are_rejected() {
        let err = NodeConfig::from_toml("id = 1\n[raft]\nheartbeat = 5\n").unwrap_err();
        assert!(err.contains("heartbeat"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        let err = NodeConfig::from_toml("id = \"one\"\n").unwrap_err();
        assert!(err.contains("line 1"), "{err}");
        let c = NodeConfig::from_toml("id = 2\ndata_dir = \"/d\"\n[raft]\nheartbeat_ms = 20\n")
            .expect("parse");
        assert_eq!(c.raft.heartbeat_ms, 20);
        assert_eq!(
            c.raft.election_timeout_max_ms,
            DEFAULT_ELECTION_TIMEOUT_MAX_MS
        );
    }
}
