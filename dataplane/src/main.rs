//! `trellis-sidecar run`: reads a TOML config (`--config`) and/or flags
//! (flags win), validates them (exit 2 with the field at fault), logs to
//! stderr (`RUST_LOG`, default `info`), runs the sidecar
//! ([`trellis_dataplane::run`]) until SIGTERM or Ctrl-C, then says goodbye
//! to the control plane. Exit 1 if it cannot run (e.g. the join was
//! refused).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use trellis_dataplane::{InstanceConfig, SidecarConfig};

/// Small allocations dominate (protobuf frames, config maps); mimalloc is
/// what the control-plane binaries use too.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "trellis-sidecar", version, about = "Trellis sidecar proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the sidecar.
    Run(RunArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// TOML config file; flags override its values.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Control nodes' QUIC addresses, comma-separated host:port.
    #[arg(long, value_delimiter = ',')]
    seeds: Vec<String>,
    /// Data directory (certificate, last good config, admin.addr).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The cluster root CA certificate (PEM).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Join token (only used when no valid certificate is stored).
    #[arg(long, env = "TRELLIS_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// File holding the join token.
    #[arg(long)]
    join_token_file: Option<PathBuf>,
    /// The sidecar's name (default <service>-<pid>).
    #[arg(long)]
    name: Option<String>,
    /// Namespace of the service.
    #[arg(long)]
    namespace: Option<String>,
    /// The service this sidecar fronts.
    #[arg(long)]
    service: Option<String>,
    /// Admin HTTP address (port 0 picks one; see <data_dir>/admin.addr).
    #[arg(long)]
    admin_addr: Option<String>,
    /// Key prefix to watch.
    #[arg(long)]
    watch_prefix: Option<String>,
    /// Outbound listener for the application's calls (port 0 picks one;
    /// see <data_dir>/outbound.addr).
    #[arg(long)]
    outbound_addr: Option<String>,
    /// Inbound listener for peer sidecars (port 0 picks one; see
    /// <data_dir>/inbound.addr).
    #[arg(long)]
    inbound_addr: Option<String>,
    /// The local application inbound requests go to (IP:port).
    #[arg(long)]
    app_addr: Option<String>,
    /// Register an instance with this name (default: the sidecar's name).
    #[arg(long)]
    instance_name: Option<String>,
    /// Register an instance at this IP address.
    #[arg(long)]
    instance_address: Option<String>,
    /// ... and port.
    #[arg(long)]
    instance_port: Option<u16>,
    /// ... with this weight (0: default).
    #[arg(long)]
    instance_weight: Option<u32>,
    /// ... and this label (repeatable): k=v.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Lease TTL of the registration (ms).
    #[arg(long)]
    lease_ttl_ms: Option<u64>,
    /// First reconnect backoff cap (ms).
    #[arg(long)]
    reconnect_base_ms: Option<u64>,
    /// Largest reconnect backoff cap (ms).
    #[arg(long)]
    reconnect_max_ms: Option<u64>,
    /// QUIC connect timeout (ms).
    #[arg(long)]
    connect_timeout_ms: Option<u64>,
    /// Idle Progress interval asked of the server (ms).
    #[arg(long)]
    progress_interval_ms: Option<u32>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

/// The config from the file (if any) with the flags applied, validated.
fn build_config(args: RunArgs) -> Result<SidecarConfig, String> {
    let origin = match &args.config {
        Some(p) => format!("config {}", p.display()),
        None => "config".to_string(),
    };
    let mut c = match &args.config {
        Some(path) => SidecarConfig::from_file(path).map_err(|e| match e {
            trellis_dataplane::ConfigError::Invalid { .. } => format!("{origin}: {e}"),
            other => other.to_string(),
        })?,
        None => SidecarConfig::default(),
    };
    macro_rules! set {
        ($field:ident <- $arg:expr) => {
            if let Some(v) = $arg {
                c.$field = v;
            }
        };
    }
    if !args.seeds.is_empty() {
        c.seeds = args.seeds.into_iter().filter(|s| !s.is_empty()).collect();
    }
    set!(data_dir <- args.data_dir);
    set!(ca_file <- args.ca_file);
    if args.join_token.is_some() {
        c.join_token = args.join_token;
        c.join_token_file = None;
    }
    if args.join_token_file.is_some() {
        c.join_token_file = args.join_token_file;
        c.join_token = None;
    }
    if args.name.is_some() {
        c.name = args.name;
    }
    set!(namespace <- args.namespace);
    set!(service <- args.service);
    set!(admin_addr <- args.admin_addr);
    set!(watch_prefix <- args.watch_prefix);
    set!(outbound_addr <- args.outbound_addr);
    set!(inbound_addr <- args.inbound_addr);
    set!(app_addr <- args.app_addr);
    set!(lease_ttl_ms <- args.lease_ttl_ms);
    set!(reconnect_base_ms <- args.reconnect_base_ms);
    set!(reconnect_max_ms <- args.reconnect_max_ms);
    set!(connect_timeout_ms <- args.connect_timeout_ms);
    set!(progress_interval_ms <- args.progress_interval_ms);
    let wants_instance = args.instance_name.is_some()
        || args.instance_address.is_some()
        || args.instance_port.is_some()
        || args.instance_weight.is_some()
        || !args.labels.is_empty();
    if wants_instance {
        let inst = c.instance.get_or_insert_with(|| InstanceConfig {
            name: None,
            address: String::new(),
            port: 0,
            labels: Default::default(),
            weight: 0,
        });
        if args.instance_name.is_some() {
            inst.name = args.instance_name;
        }
        if let Some(a) = args.instance_address {
            inst.address = a;
        }
        if let Some(p) = args.instance_port {
            inst.port = p;
        }
        if let Some(w) = args.instance_weight {
            inst.weight = w;
        }
        inst.labels.extend(args.labels);
    }
    c.validate().map_err(|e| format!("{origin}: {e}"))?;
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
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the sidecar");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown requested");
}

fn main() -> ExitCode {
    let Command::Run(args) = Cli::parse().command;
    let config = match build_config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trellis-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("trellis-sidecar: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(trellis_dataplane::run(config, wait_for_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-sidecar: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
