//! `trellis-sidecar run`: reads a TOML config (`--config`) and/or flags
//! (flags win), validates them (exit 2 with the field at fault), logs to
//! stderr (`RUST_LOG`, default `info`), runs the sidecar
//! ([`trellis_dataplane::run`]) until SIGTERM or Ctrl-C, then says goodbye
//! to the control plane. Exit 1 if it cannot run (e.g. the join was
//! refused).
//!
//! `trellis-sidecar iptables`: prints the NAT rules for transparent
//! interception ([`trellis_dataplane::iptables`]) as shell lines to review;
//! `--apply` installs them (replacing earlier ones), `--cleanup` removes
//! them. Exit 2 on invalid options, 1 when iptables fails.

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
// Parsed once at start-up; boxing `RunArgs` would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the sidecar.
    Run(RunArgs),
    /// Print (or --apply / --cleanup) the iptables NAT rules that send the
    /// app's TCP through the sidecar.
    Iptables(IptablesArgs),
}

/// Comma-separated lists, parsed whole (an alias, so clap takes one value).
type PortList = Vec<u16>;
type CidrList = Vec<trellis_dataplane::iptables::Cidr>;

/// `trellis-sidecar iptables`; see `trellis_dataplane::iptables`.
#[derive(Args, Debug)]
struct IptablesArgs {
    /// Install the rules (as root), replacing earlier ones; without it the
    /// commands are only printed.
    #[arg(long, conflicts_with = "cleanup")]
    apply: bool,
    /// Remove every rule and chain an earlier --apply installed.
    #[arg(long)]
    cleanup: bool,
    /// The uid the sidecar runs as (required): its traffic is never
    /// redirected.
    #[arg(long)]
    proxy_uid: Option<u32>,
    /// Also never redirect traffic of this gid.
    #[arg(long)]
    proxy_gid: Option<u32>,
    /// The sidecar's outbound listener port.
    #[arg(long, default_value_t = trellis_dataplane::iptables::DEFAULT_OUTBOUND_PORT)]
    outbound_port: u16,
    /// The sidecar's inbound listener port.
    #[arg(long, default_value_t = trellis_dataplane::iptables::DEFAULT_INBOUND_PORT)]
    inbound_port: u16,
    /// Inbound ports to capture: a list (9080,9443) or '*' for all but
    /// --exclude-inbound-ports; default none.
    #[arg(long, value_name = "LIST|*", default_value = "", hide_default_value = true,
          value_parser = str::parse::<trellis_dataplane::iptables::InboundPorts>)]
    inbound_ports: trellis_dataplane::iptables::InboundPorts,
    /// With --inbound-ports '*': ports not captured (e.g. 22).
    #[arg(long, value_name = "LIST", default_value = "", hide_default_value = true,
          value_parser = trellis_dataplane::iptables::parse_ports)]
    exclude_inbound_ports: PortList,
    /// Destination ports the app reaches directly.
    #[arg(long, value_name = "LIST", default_value = "", hide_default_value = true,
          value_parser = trellis_dataplane::iptables::parse_ports)]
    exclude_outbound_ports: PortList,
    /// Destination networks the app reaches directly (a.b.c.d/n, ...).
    #[arg(long, value_name = "LIST", default_value = "", hide_default_value = true,
          value_parser = trellis_dataplane::iptables::parse_cidrs)]
    exclude_outbound_cidrs: CidrList,
    /// Only redirect these destination networks (default: all).
    #[arg(long, value_name = "LIST", default_value = "", hide_default_value = true,
          value_parser = trellis_dataplane::iptables::parse_cidrs)]
    include_outbound_cidrs: CidrList,
    /// Program ip6tables too.
    #[arg(long)]
    ipv6: bool,
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
    /// A dedicated outbound TCP listener (repeatable):
    /// LISTEN=SERVICE:PORT, e.g. 127.0.0.1:15432=db:5432.
    #[arg(long = "tcp-forward", value_parser = trellis_dataplane::config::TcpForwardConfig::parse_flag)]
    tcp_forward: Vec<trellis_dataplane::config::TcpForwardConfig>,
    /// JSON access log: a file path, or - for stdout.
    #[arg(long)]
    access_log: Option<String>,
    /// Drain deadline at shutdown (ms).
    #[arg(long)]
    drain_timeout_ms: Option<u64>,
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
    /// Runtime worker threads (0: one per usable CPU; 1: single-threaded).
    #[arg(long)]
    workers: Option<usize>,
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
    c.tcp_forward.extend(args.tcp_forward);
    if args.access_log.is_some() {
        c.access_log = args.access_log;
    }
    set!(drain_timeout_ms <- args.drain_timeout_ms);
    set!(lease_ttl_ms <- args.lease_ttl_ms);
    set!(reconnect_base_ms <- args.reconnect_base_ms);
    set!(reconnect_max_ms <- args.reconnect_max_ms);
    set!(connect_timeout_ms <- args.connect_timeout_ms);
    set!(progress_interval_ms <- args.progress_interval_ms);
    set!(workers <- args.workers);
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

/// `trellis-sidecar iptables`: print, apply or clean up.
fn iptables(args: IptablesArgs) -> ExitCode {
    use trellis_dataplane::iptables as ipt;
    init_logging();
    if args.cleanup {
        return match ipt::cleanup() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("trellis-sidecar iptables: {e}");
                ExitCode::from(e.exit_code())
            }
        };
    }
    let opts = ipt::IptablesOptions {
        proxy_uid: args.proxy_uid,
        proxy_gid: args.proxy_gid,
        outbound_port: args.outbound_port,
        inbound_port: args.inbound_port,
        inbound_ports: args.inbound_ports,
        exclude_inbound_ports: args.exclude_inbound_ports,
        exclude_outbound_ports: args.exclude_outbound_ports,
        exclude_outbound_cidrs: args.exclude_outbound_cidrs,
        include_outbound_cidrs: args.include_outbound_cidrs,
        ipv6: args.ipv6,
    };
    let result = opts.validate().and_then(|()| {
        if args.apply {
            ipt::apply(&opts)
        } else {
            for argv in ipt::rules(&opts) {
                println!("{}", ipt::shell_line(&argv));
            }
            Ok(())
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-sidecar iptables: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: log files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let args = match Cli::parse().command {
        Command::Run(args) => args,
        Command::Iptables(args) => return iptables(args),
    };
    let config = match build_config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trellis-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging();
    // One worker: a single-threaded runtime, so a request's tasks (the
    // app's connection, the pooled peer connection, the access log) never
    // wake each other across threads. More: a work-stealing runtime.
    let workers = config.worker_threads();
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = match builder.enable_all().build() {
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
