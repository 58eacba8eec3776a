//! Command-line syntax of trellisctl (clap derive) and the value parsers for
//! `--timeout` (humane durations such as `5s`, `500ms`, `1m30s`), long
//! durations with days (`--validity 365d`, `--ttl 7d`) and `--endpoints`
//! (`host:port`, `http://host:port` or `https://host:port`).
//!
//! `get`, `delete` and `watch` take either a resource kind or a raw key
//! (prefix) as their first argument; which one is decided after parsing
//! (`commands.rs`): a first argument that `Kind::parse` accepts is a kind.
//! The `kv` group always means the raw key-value form.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

/// Operator CLI for the Trellis control plane (trellisd admin API).
#[derive(Debug, Parser)]
#[command(name = "trellisctl", version, propagate_version = true)]
#[command(
    after_help = "Resource kinds (for apply, diff, get, delete, watch): service (svc), \
instance (inst), route (rt), destinationpolicy (dp), quota, accesspolicy (ap); plurals work too. \
`get`, `delete` and `watch` treat a first argument that names a kind as a kind and anything \
else as a key; `trellisctl kv ...` always means keys.

TLS: --ca-file (the cluster CA) makes trellisctl speak TLS and check the server's certificate; \
--cert-file and --key-file (both or neither) present a client certificate, which clusters with \
mutual TLS require (`trellisctl cert create --admin NAME`). Without --ca-file trellisctl speaks \
plaintext, for clusters started with `trellisd --insecure-dev`.

Exit codes: 0 ok, 1 other error, 2 usage or invalid argument (also unreadable TLS files, or \
TLS/plaintext not matching the server), 3 not found, 4 compare-and-set conflict, 5 unavailable, \
6 degraded (cluster status, proxy-status: some members unreachable), 7 not authorized \
(UNAUTHENTICATED, PERMISSION_DENIED, or a certificate rejected in the TLS handshake). \
`diff` exits 1 when there are differences and 2 for other errors."
)]
pub struct Cli {
    /// Admin addresses of trellisd nodes, tried in order (comma-separated)
    #[arg(
        long,
        global = true,
        env = "TRELLIS_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7379",
        value_parser = parse_endpoint,
        value_name = "HOST:PORT,..."
    )]
    pub endpoints: Vec<String>,

    /// Output format: aligned tables for people, JSON for scripts, YAML
    /// documents (`get KIND` only)
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,

    /// Deadline of each request (e.g. 5s, 500ms, 1m30s)
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,

    /// The cluster CA certificate (PEM): speak TLS and check the server's
    /// certificate against it (without it: plaintext)
    #[arg(long, global = true, env = "TRELLIS_CA_FILE", value_name = "FILE", value_parser = parse_path)]
    pub ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS; needs --key-file and --ca-file
    #[arg(long, global = true, env = "TRELLIS_CERT_FILE", value_name = "FILE", value_parser = parse_path)]
    pub cert_file: Option<PathBuf>,

    /// Private key (PEM) of --cert-file
    #[arg(long, global = true, env = "TRELLIS_KEY_FILE", value_name = "FILE", value_parser = parse_path)]
    pub key_file: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns (or plain lines) for people
    Table,
    /// JSON for scripts (one document; one line per event for streams)
    Json,
    /// YAML documents, re-appliable as they are; only `get KIND [NAME]`
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update mesh resources from files, directories or stdin, all
    /// in one atomic change
    Apply(ApplyArgs),
    /// Show what `apply` would change, as a unified diff of YAML (exit 0: no
    /// changes, 1: changes, 2 or more: error)
    Diff(DiffArgs),
    /// Show resources (`get KIND [NAME]`) or read one key (`get KEY`)
    Get(GetCmdArgs),
    /// Write a value (VALUE `-` reads standard input to EOF)
    Put(PutArgs),
    /// List keys under a prefix (all pages unless --limit)
    List(ListArgs),
    /// Delete a resource (`delete KIND NAME`, `delete -f PATH`) or one key
    /// (`delete KEY`); exit 3 if it did not exist
    #[command(visible_alias = "del")]
    Delete(DeleteCmdArgs),
    /// Forget watch history at and below a revision
    Compact(CompactArgs),
    /// Stream changes to resources of a kind (`watch KIND`) or under a key
    /// prefix (`watch [PREFIX]`), resuming on another endpoint on failure
    Watch(WatchCmdArgs),
    /// The raw key-value commands (for keys that look like kind names)
    #[command(subcommand)]
    Kv(KvCommand),
    /// Grant, keep alive, revoke and list leases
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Form the cluster, show its state, take snapshots
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// List, add and remove Raft members
    #[command(subcommand)]
    Member(MemberCommand),
    /// Leadership operations
    #[command(subcommand)]
    Leader(LeaderCommand),
    /// The cluster CA: create one (offline), load it into the cluster, show it
    #[command(subcommand)]
    Ca(CaCommand),
    /// Certificates: create node and admin certificates from the CA files
    /// (offline), list those the cluster issued
    #[command(subcommand)]
    Cert(CertCommand),
    /// Join tokens that let sidecars of one service get a certificate
    #[command(subcommand)]
    Token(TokenCommand),
    /// Every sidecar connected to the cluster and whether it applied the
    /// cluster's latest revision (exit 6 if some member could not be asked)
    ProxyStatus,
}

#[derive(Debug, Args)]
pub struct PutArgs {
    /// The key (UTF-8, at most 1 KiB)
    #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub key: String,
    /// The value; `-` reads it from standard input
    pub value: String,
    /// Apply only if the key's mod_revision equals N (0: only if the key does not exist)
    #[arg(long, value_name = "N")]
    pub expected_revision: Option<u64>,
    /// Show the previous value
    #[arg(long)]
    pub prev_kv: bool,
    /// Attach the key to lease ID (deleted when the lease expires)
    #[arg(long, value_name = "ID", default_value_t = 0)]
    pub lease: u64,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// The key (UTF-8, at most 1 KiB)
    #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub key: String,
    /// Read this node's applied state (may be stale; no leader round trip)
    #[arg(long)]
    pub serializable: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Key prefix (default: every key)
    #[arg(default_value = "")]
    pub prefix: String,
    /// Return at most N keys
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    /// Leave values out
    #[arg(long)]
    pub keys_only: bool,
    /// Read this node's applied state (may be stale; no leader round trip)
    #[arg(long)]
    pub serializable: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The key (UTF-8, at most 1 KiB)
    #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub key: String,
    /// Delete only if the key's mod_revision equals N
    #[arg(long, value_name = "N")]
    pub expected_revision: Option<u64>,
}

#[derive(Debug, Args)]
pub struct CompactArgs {
    /// Forget watch history at and below this revision
    #[arg(value_name = "REV")]
    pub revision: u64,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Key prefix (default: every key)
    #[arg(default_value = "")]
    pub prefix: String,
    /// Deliver every event from this revision on (default: from now)
    #[arg(long, value_name = "N")]
    pub rev: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Write a value (VALUE `-` reads standard input to EOF)
    Put(PutArgs),
    /// Read one key (prints the value only; `-o json` adds revisions)
    Get(GetArgs),
    /// List keys under a prefix (all pages unless --limit)
    List(ListArgs),
    /// Delete one key (exit 3 if it did not exist)
    #[command(visible_alias = "del")]
    Delete(DeleteArgs),
    /// Forget watch history at and below a revision
    Compact(CompactArgs),
    /// Stream changes under a prefix, resuming on another endpoint on failure
    Watch(WatchArgs),
}

/// Where resource documents come from.
#[derive(Debug, Args)]
pub struct FileArgs {
    /// A file, a directory (its *.yaml, *.yml and *.json files, in name
    /// order) or `-` for standard input; repeat for more
    #[arg(short = 'f', long = "filename", value_name = "PATH", required = true)]
    pub filenames: Vec<PathBuf>,
    /// Also read the subdirectories of directories given with -f
    #[arg(short = 'R', long)]
    pub recursive: bool,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub files: FileArgs,
    /// Validate and show what would change; change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Apply only if no resource of the set changed after revision N (exit 4 otherwise)
    #[arg(long, value_name = "N")]
    pub expected_revision: Option<u64>,
    /// Attach every resource of the set to lease ID (deleted when it expires)
    #[arg(long, value_name = "ID", default_value_t = 0)]
    pub lease: u64,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    #[command(flatten)]
    pub files: FileArgs,
    /// Compare with an apply that attaches the resources to lease ID
    #[arg(long, value_name = "ID", default_value_t = 0)]
    pub lease: u64,
}

/// `get KIND [NAME] [-n NS | -A]` or `get KEY`.
#[derive(Debug, Args)]
pub struct GetCmdArgs {
    /// A resource kind (route, routes, rt, svc, ...) or, if it is none, a key
    #[arg(value_name = "KIND|KEY", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub target: String,
    /// The resource's name (with KIND; all resources of the kind without it)
    #[arg(value_name = "NAME")]
    pub name: Option<String>,
    /// Namespace of the resources (with KIND) [default: default]
    #[arg(short = 'n', long, value_name = "NS", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub namespace: Option<String>,
    /// Resources of every namespace (with KIND, without NAME)
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    /// Read this node's applied state (may be stale; no leader round trip)
    #[arg(long)]
    pub serializable: bool,
}

/// `delete KIND NAME [-n NS]`, `delete -f PATH` or `delete KEY`.
#[derive(Debug, Args)]
pub struct DeleteCmdArgs {
    /// A resource kind (route, rt, svc, ...) or, if it is none, a key
    #[arg(
        value_name = "KIND|KEY",
        required_unless_present = "filenames",
        conflicts_with = "filenames",
        value_parser = clap::builder::NonEmptyStringValueParser::new()
    )]
    pub target: Option<String>,
    /// The resource's name (with KIND)
    #[arg(value_name = "NAME")]
    pub name: Option<String>,
    /// Namespace of the resource (with KIND) [default: default]
    #[arg(short = 'n', long, value_name = "NS", value_parser = clap::builder::NonEmptyStringValueParser::new(), conflicts_with = "filenames")]
    pub namespace: Option<String>,
    /// Delete the resources named in these files, directories (*.yaml,
    /// *.yml, *.json) or `-` (stdin); repeat for more
    #[arg(short = 'f', long = "filename", value_name = "PATH")]
    pub filenames: Vec<PathBuf>,
    /// Also read the subdirectories of directories given with -f
    #[arg(short = 'R', long, requires = "filenames")]
    pub recursive: bool,
    /// Delete only if the key's (resource's) mod_revision equals N
    #[arg(long, value_name = "N", conflicts_with = "filenames")]
    pub expected_revision: Option<u64>,
    /// Resources that do not exist are not an error (with KIND or -f)
    #[arg(long)]
    pub ignore_not_found: bool,
}

/// `watch KIND [-n NS | -A]` or `watch [PREFIX]`.
#[derive(Debug, Args)]
pub struct WatchCmdArgs {
    /// A resource kind (routes, svc, ...) or, if it is none, a key prefix
    /// (default: every key)
    #[arg(value_name = "KIND|PREFIX", default_value = "")]
    pub target: String,
    /// Namespace to watch (with KIND) [default: default]
    #[arg(short = 'n', long, value_name = "NS", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub namespace: Option<String>,
    /// Watch every namespace (with KIND)
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    /// Deliver every event from this revision on (default: from now)
    #[arg(long, value_name = "N")]
    pub rev: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Grant a lease with a time to live (e.g. 10s); prints its id
    Grant(LeaseGrantArgs),
    /// Restart a lease's TTL: once, or every TTL/3 until interrupted (exit 3
    /// once the lease is gone)
    #[command(visible_alias = "keep-alive")]
    Keepalive(LeaseKeepAliveArgs),
    /// Revoke a lease and delete the keys attached to it
    Revoke(LeaseIdArgs),
    /// List leases with their remaining time and keys
    List,
}

#[derive(Debug, Args)]
pub struct LeaseGrantArgs {
    /// Time to live, 1s to 24h (e.g. 10s, 1m)
    #[arg(value_name = "TTL", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Use this id instead of a random one (exit 4 if it is taken)
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
    pub id: Option<u64>,
}

#[derive(Debug, Args)]
pub struct LeaseKeepAliveArgs {
    /// The lease id
    #[arg(value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
    pub id: u64,
    /// Keep the lease alive once and exit
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, Args)]
pub struct LeaseIdArgs {
    /// The lease id
    #[arg(value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
    pub id: u64,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Form a cluster of every --endpoints node (Initialize on the first,
    /// AddMember for the rest), then load the CA of --ca-dir if given
    Init(ClusterInitArgs),
    /// Ask every member for its Raft and store state
    Status,
    /// Build a snapshot on every member now and purge the log it covers
    Snapshot,
}

#[derive(Debug, Args)]
pub struct ClusterInitArgs {
    /// Load the CA in DIR (ca.pem, ca-key.pem) into the cluster once it is
    /// formed, so that it can issue certificates
    #[arg(long, value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// List members (voters and learners)
    List,
    /// Add a node (as a learner, then a voter unless --learner)
    Add(MemberAddArgs),
    /// Remove a node from the membership
    Remove(MemberRemoveArgs),
}

#[derive(Debug, Args)]
pub struct MemberAddArgs {
    /// The new node's id
    #[arg(long, value_name = "N")]
    pub id: u64,
    /// The new node's Raft address
    #[arg(long, value_name = "HOST:PORT", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub raft_addr: String,
    /// The new node's admin address
    #[arg(long, value_name = "HOST:PORT", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub admin_addr: String,
    /// Keep the node a non-voting learner
    #[arg(long)]
    pub learner: bool,
}

#[derive(Debug, Args)]
pub struct MemberRemoveArgs {
    /// The node to remove
    #[arg(long, value_name = "N")]
    pub id: u64,
}

#[derive(Debug, Subcommand)]
pub enum LeaderCommand {
    /// Hand leadership to another voter
    Transfer(LeaderTransferArgs),
}

#[derive(Debug, Args)]
pub struct LeaderTransferArgs {
    /// The node that should become leader
    #[arg(long, value_name = "N")]
    pub to: u64,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a new root CA in DIR: ca.pem and ca-key.pem (mode 0600);
    /// offline, no cluster needed
    Create(CaCreateArgs),
    /// Store the CA of DIR (ca.pem, ca-key.pem) in the cluster so that it
    /// can issue certificates (exit 4 if another CA is loaded)
    Load(CaDirArgs),
    /// Print the cluster's CA certificate (PEM; never the key) and its
    /// trust domain
    Show,
}

#[derive(Debug, Args)]
pub struct CaCreateArgs {
    /// Directory for ca.pem and ca-key.pem (created if missing)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The SPIFFE trust domain of every identity the CA issues
    #[arg(long, value_name = "TD", default_value = trellis_identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Overwrite existing files
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct CaDirArgs {
    /// Directory with ca.pem and ca-key.pem (from `trellisctl ca create`)
    #[arg(long, value_name = "DIR")]
    pub ca_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Issue a node (`--node ID`) or admin (`--admin NAME`) certificate
    /// from the CA files; offline, no cluster needed
    Create(CertCreateArgs),
    /// List the certificates the cluster issued that have not expired
    List,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("subject").required(true).args(["node", "admin"])))]
pub struct CertCreateArgs {
    /// Directory with ca.pem and ca-key.pem (from `trellisctl ca create`)
    #[arg(long, value_name = "DIR")]
    pub ca_dir: PathBuf,
    /// A certificate for trellisd node ID (node-ID.pem, node-ID-key.pem)
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
    pub node: Option<u64>,
    /// An IP address or DNS name the node is reached at; repeat or
    /// separate with commas [default: 127.0.0.1, ::1, localhost]
    #[arg(
        long = "san",
        value_name = "IP|DNS",
        conflicts_with = "admin",
        value_delimiter = ','
    )]
    pub sans: Vec<String>,
    /// A certificate for operator NAME, for trellisctl's --cert-file
    /// (admin-NAME.pem, admin-NAME-key.pem)
    #[arg(long, value_name = "NAME", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub admin: Option<String>,
    /// Directory for the files [default: --ca-dir]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// How long the certificate is valid (e.g. 365d, 720h) [default: the
    /// node or admin default of trellis-identity]
    #[arg(long, value_name = "DURATION", value_parser = parse_long_duration)]
    pub validity: Option<Duration>,
    /// Overwrite existing files
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a join token for the sidecars of one service; the token is
    /// shown only now (`-q` prints nothing else)
    Create(TokenCreateArgs),
    /// List join tokens (never the secrets)
    List,
    /// Revoke a join token by its id (exit 3 if there is none)
    Revoke(TokenRevokeArgs),
}

#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// The namespace of the service whose sidecars may join
    #[arg(short = 'n', long, value_name = "NS", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub namespace: String,
    /// The service whose sidecars may join
    #[arg(long, value_name = "SVC", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub service: String,
    /// How long the token can be used (e.g. 1h, 7d) [default: the server's]
    #[arg(long, value_name = "DURATION", value_parser = parse_long_duration)]
    pub ttl: Option<Duration>,
    /// A note for `token list`
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub description: String,
    /// Print only the token
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct TokenRevokeArgs {
    /// The token's id (the ID column of `token list`)
    #[arg(value_name = "ID", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub id: String,
}

/// A path flag; empty means "not given" (so that `TRELLIS_CA_FILE=` in the
/// environment turns TLS off instead of failing).
fn parse_path(text: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(text))
}

/// Longest accepted `--timeout`.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Longest accepted `--validity` / `--ttl` (100 years).
const MAX_LONG_DURATION: Duration = Duration::from_secs(36_500 * 24 * 3600);

/// Parses a humane duration: one or more `<number><unit>` parts, where the
/// number may have a fraction and the unit is `ns`, `us`, `µs`, `ms`, `s`,
/// `m` or `h` (`5s`, `500ms`, `1.5s`, `1m30s`). Zero is rejected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    parse_duration_up_to(text, MAX_TIMEOUT, false)
}

/// Like [`parse_duration`], with days (`d`) too and up to 100 years: for
/// certificate validity and token TTLs (`365d`, `7d12h`, `90m`).
pub fn parse_long_duration(text: &str) -> Result<Duration, String> {
    parse_duration_up_to(text, MAX_LONG_DURATION, true)
}

fn parse_duration_up_to(text: &str, max: Duration, days: bool) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration (try 5s or 500ms)".into());
    }
    let mut total_nanos = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        if number.is_empty() || number.starts_with('.') && number.len() == 1 {
            return Err(format!("invalid duration {text:?}: expected a number"));
        }
        let value: f64 = number
            .parse()
            .map_err(|_| format!("invalid duration {text:?}: bad number {number:?}"))?;
        let unit_nanos = match unit {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "d" if days => 86_400e9,
            "" => {
                return Err(format!(
                    "invalid duration {text:?}: missing unit (try {number}s or {number}ms)"
                ))
            }
            other => {
                let units = if days {
                    "ms, s, m, h or d"
                } else {
                    "ms, s, m or h"
                };
                return Err(format!(
                    "invalid duration {text:?}: unknown unit {other:?} (use {units})"
                ));
            }
        };
        total_nanos += value * unit_nanos;
        rest = next;
    }
    let duration = Duration::try_from_secs_f64(total_nanos / 1e9)
        .map_err(|_| format!("invalid duration {text:?}: out of range"))?;
    if duration.is_zero() {
        return Err(format!(
            "invalid duration {text:?}: must be greater than zero"
        ));
    }
    if duration > max {
        let limit = if days { "36500d" } else { "24h" };
        return Err(format!("invalid duration {text:?}: at most {limit}"));
    }
    Ok(duration)
}

/// Validates one `--endpoints` entry and returns it trimmed. Accepts
/// `host:port`, `http://host:port` and `https://host:port`; whether TLS is
/// used is decided by `--ca-file` (an explicit scheme must agree with it,
/// checked in `commands.rs`).
pub fn parse_endpoint(text: &str) -> Result<String, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty endpoint (expected HOST:PORT)".into());
    }
    let uri = crate::client::endpoint_uri(s);
    let parsed: tonic::transport::Uri = uri
        .parse()
        .map_err(|e| format!("{s:?} is not a valid HOST:PORT address: {e}"))?;
    if !matches!(parsed.scheme_str(), Some("http" | "https")) {
        return Err(format!(
            "{s:?}: only http:// and https:// endpoints are supported"
        ));
    }
    if parsed.host().is_none_or(str::is_empty) || parsed.port_u16().is_none() {
        return Err(format!(
            "{s:?} is not a valid HOST:PORT address (missing host or port)"
        ));
    }
    if parsed.path() != "/" && !parsed.path().is_empty() {
        return Err(format!("{s:?}: an endpoint cannot have a path"));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        let ok = [
            ("5s", Duration::from_secs(5)),
            ("500ms", Duration::from_millis(500)),
            ("1.5s", Duration::from_millis(1500)),
            ("1m30s", Duration::from_secs(90)),
            ("2h", Duration::from_secs(7200)),
            (" 250us ", Duration::from_micros(250)),
            ("10ns", Duration::from_nanos(10)),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_durations_are_rejected() {
        for text in [
            "", "5", "s", "abc", "5x", "0s", "0ms", "-5s", "1..5s", ".s", "25h", "1e400s", "5 s",
        ] {
            assert!(parse_duration(text).is_err(), "{text:?} was accepted");
        }
    }

    #[test]
    fn long_durations_parse() {
        assert_eq!(
            parse_long_duration("365d"),
            Ok(Duration::from_secs(365 * 86_400))
        );
        assert_eq!(
            parse_long_duration("1d12h"),
            Ok(Duration::from_secs(36 * 3600))
        );
        assert_eq!(parse_long_duration("90m"), Ok(Duration::from_secs(5400)));
        assert!(parse_long_duration("36501d").is_err());
        assert!(parse_long_duration("0d").is_err());
        assert!(parse_long_duration("5y").is_err());
        assert!(parse_duration("2d").is_err());
    }

    #[test]
    fn identity_commands_parse() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("trellisctl").chain(args.iter().copied()))
        };
        assert!(parse(&["cert", "create", "--ca-dir", "d", "--node", "1"]).is_ok());
        assert!(parse(&[
            "cert",
            "create",
            "--ca-dir",
            "d",
            "--node",
            "1",
            "--san",
            "10.0.0.1,node-1",
            "--san",
            "::1"
        ])
        .is_ok());
        assert!(parse(&[
            "cert",
            "create",
            "--ca-dir",
            "d",
            "--admin",
            "ops",
            "--validity",
            "30d"
        ])
        .is_ok());
        assert!(parse(&["cert", "create", "--ca-dir", "d"]).is_err());
        assert!(
            parse(&["cert", "create", "--ca-dir", "d", "--node", "1", "--admin", "ops"]).is_err()
        );
        assert!(
            parse(&["cert", "create", "--ca-dir", "d", "--admin", "ops", "--san", "x"]).is_err()
        );
        assert!(parse(&["cert", "create", "--ca-dir", "d", "--node", "0"]).is_err());
        assert!(parse(&[
            "ca",
            "create",
            "--out",
            "d",
            "--trust-domain",
            "example.org",
            "--force"
        ])
        .is_ok());
        assert!(parse(&[
            "token",
            "create",
            "-n",
            "default",
            "--service",
            "reviews",
            "--ttl",
            "7d",
            "-q"
        ])
        .is_ok());
        assert!(parse(&["token", "create", "--service", "reviews"]).is_err());
        assert!(parse(&["cluster", "init", "--ca-dir", "d"]).is_ok());
        assert!(parse(&["--ca-file", "ca.pem", "proxy-status"]).is_ok());
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            parse_endpoint(" 127.0.0.1:7379 ").as_deref(),
            Ok("127.0.0.1:7379")
        );
        assert!(parse_endpoint("http://node-1:7379").is_ok());
        assert!(parse_endpoint("https://node-1:7379").is_ok());
        assert!(parse_endpoint("[::1]:7379").is_ok());
        for bad in [
            "",
            "  ",
            "node-1",
            "https://a",
            "a:b",
            "a:1/x",
            "ftp://a:1",
            ":7379",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
