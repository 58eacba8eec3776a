//! `trellisd`: one Trellis control node.
//!
//! Reads a TOML config (`--config`) and/or flags (flags win), validates
//! them, starts the node, prints one JSON "ready" line with the bound
//! addresses to stdout, logs to stderr, and shuts down cleanly on SIGTERM
//! or Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The node allocates and frees many small buffers per request (tonic,
/// openraft entries, sled pages); glibc malloc was ~10% of all CPU under
/// write load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use trellis_controlplane::config::NodeConfig;
use trellis_controlplane::node::RunningNode;

#[derive(Parser, Debug)]
#[command(
    name = "trellisd",
    version,
    about = "Trellis control node (Raft member, admin API)"
)]
struct Args {
    /// TOML config file; flags override its values.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Raft node id (positive, unique, never reused).
    #[arg(long)]
    id: Option<u64>,
    /// Data directory (database and snapshots).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Raft peer listen address (port 0 picks a free port).
    #[arg(long)]
    raft_addr: Option<String>,
    /// Admin gRPC listen address.
    #[arg(long)]
    admin_addr: Option<String>,
    /// QUIC (sidecar) listen address (UDP).
    #[arg(long)]
    quic_addr: Option<String>,
    /// Raft address advertised to peers (default: the bound raft address).
    #[arg(long)]
    advertise_raft_addr: Option<String>,
    /// Admin address advertised to peers (default: the bound admin address).
    #[arg(long)]
    advertise_admin_addr: Option<String>,
    /// Dial a peer at another address than its advertised one: ID=HOST:PORT
    /// (repeatable; for fault-injection proxies).
    #[arg(long = "peer-dial", value_parser = parse_override)]
    peer_dial: Vec<(u64, String)>,
    /// Leader heartbeat interval (ms).
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Election timeout lower bound (ms).
    #[arg(long)]
    election_timeout_min_ms: Option<u64>,
    /// Election timeout upper bound (ms).
    #[arg(long)]
    election_timeout_max_ms: Option<u64>,
    /// Do not start elections early when the leader's process is gone;
    /// wait out the election timeout instead.
    #[arg(long)]
    no_crash_detection: bool,
    /// As leader, replicate log appends while they sync instead of after
    /// (etcd-style; see the README's "Leader overlap").
    #[arg(long)]
    leader_overlap: bool,
    /// Snapshot after this many log entries.
    #[arg(long)]
    snapshot_after_logs: Option<u64>,
    /// `fsync` (default; survives power loss) or `kill-safe` (sled flush
    /// only; survives process crashes).
    #[arg(long, value_parser = parse_durability)]
    durability: Option<trellis_raft_store::Durability>,
    /// How long API calls wait for a leader / commit (ms).
    #[arg(long)]
    request_timeout_ms: Option<u64>,
    /// Turn on a deliberate bug for the Jepsen harness (stale-read,
    /// early-ack); only in builds with the `bug-injection` feature.
    #[cfg(feature = "bug-injection")]
    #[arg(long = "inject-bug", value_parser = parse_bug)]
    inject_bug: Vec<trellis_controlplane::bugs::Bug>,
    /// The cluster CA certificate (PEM); with --cert-file and --key-file
    /// every listener requires mutual TLS.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// This node's certificate (`trellisctl cert create --node ID`).
    #[arg(long)]
    cert_file: Option<PathBuf>,
    /// This node's private key.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// DEVELOPMENT ONLY: plaintext, unauthenticated admin API and Raft RPC,
    /// and no QUIC endpoint for sidecars.
    #[arg(long)]
    insecure_dev: bool,
    /// Validity of certificates issued to sidecars (ms).
    #[arg(long)]
    workload_cert_ttl_ms: Option<u64>,
    /// Instance lease TTL for sidecars that ask for none (ms).
    #[arg(long)]
    sidecar_lease_ttl_ms: Option<u64>,
    /// tracing filter (also RUST_LOG).
    #[arg(long)]
    log_level: Option<String>,
}

fn parse_override(s: &str) -> Result<(u64, String), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ID=HOST:PORT"))?;
    let id = id
        .parse::<u64>()
        .map_err(|e| format!("{s:?}: bad node id: {e}"))?;
    Ok((id, addr.to_string()))
}

#[cfg(feature = "bug-injection")]
fn parse_bug(s: &str) -> Result<trellis_controlplane::bugs::Bug, String> {
    trellis_controlplane::bugs::Bug::parse(s).ok_or_else(|| {
        let names: Vec<&str> = trellis_controlplane::bugs::Bug::ALL
            .iter()
            .map(|(_, n)| *n)
            .collect();
        format!("{s:?}: expected one of {}", names.join(", "))
    })
}

fn parse_durability(s: &str) -> Result<trellis_raft_store::Durability, String> {
    match s {
        "fsync" => Ok(trellis_raft_store::Durability::Fsync),
        "kill-safe" => Ok(trellis_raft_store::Durability::KillSafe),
        other => Err(format!("{other:?}: expected fsync or kill-safe")),
    }
}

fn build_config(args: Args) -> Result<NodeConfig, String> {
    let mut c = match &args.config {
        Some(path) => NodeConfig::from_file(path).map_err(|e| e.to_string())?,
        None => NodeConfig::default(),
    };
    macro_rules! set {
        ($($field:ident).+ <- $arg:expr) => {
            if let Some(v) = $arg {
                c.$($field).+ = v;
            }
        };
    }
    set!(id <- args.id);
    set!(data_dir <- args.data_dir);
    set!(raft_addr <- args.raft_addr);
    set!(admin_addr <- args.admin_addr);
    set!(quic_addr <- args.quic_addr);
    set!(raft.heartbeat_ms <- args.heartbeat_ms);
    set!(raft.election_timeout_min_ms <- args.election_timeout_min_ms);
    set!(raft.election_timeout_max_ms <- args.election_timeout_max_ms);
    set!(raft.snapshot_after_logs <- args.snapshot_after_logs);
    if args.no_crash_detection {
        c.raft.crash_detection = false;
    }
    if args.leader_overlap {
        c.raft.leader_overlap = true;
    }
    set!(request_timeout_ms <- args.request_timeout_ms);
    set!(durability <- args.durability);
    set!(log_level <- args.log_level);
    if args.advertise_raft_addr.is_some() {
        c.advertise_raft_addr = args.advertise_raft_addr;
    }
    if args.advertise_admin_addr.is_some() {
        c.advertise_admin_addr = args.advertise_admin_addr;
    }
    c.peer_dial_overrides.extend(args.peer_dial);
    set!(sidecars.workload_cert_ttl_ms <- args.workload_cert_ttl_ms);
    set!(sidecars.lease_ttl_ms <- args.sidecar_lease_ttl_ms);
    match (args.ca_file, args.cert_file, args.key_file) {
        (None, None, None) => {}
        (Some(ca_file), Some(cert_file), Some(key_file)) => {
            c.tls = Some(trellis_controlplane::config::TlsConfig {
                ca_file,
                cert_file,
                key_file,
            })
        }
        _ => return Err("--ca-file, --cert-file and --key-file go together".to_string()),
    }
    if args.insecure_dev {
        c.insecure_dev = true;
    }
    c.validate().map_err(|e| e.to_string())?;
    Ok(c)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the node");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    #[cfg(feature = "bug-injection")]
    let bugs = args.inject_bug.clone();
    let config = match build_config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trellisd: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log_level.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // Colour only on a terminal: log files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    #[cfg(feature = "bug-injection")]
    trellis_controlplane::bugs::enable(bugs);

    let running = match RunningNode::start(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("trellisd: {e}");
            return ExitCode::from(1);
        }
    };
    let ready = serde_json::json!({
        "event": "ready",
        "node_id": running.node.id,
        "raft_addr": running.addrs.raft.to_string(),
        "admin_addr": running.addrs.admin.to_string(),
        // Empty in --insecure-dev mode, which serves no QUIC endpoint.
        "quic_addr": running.addrs.quic.map_or(String::new(), |a| a.to_string()),
    });
    println!("{ready}");
    wait_for_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    ExitCode::SUCCESS
}
