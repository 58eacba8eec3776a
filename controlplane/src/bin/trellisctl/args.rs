//! Command-line syntax of trellisctl (clap derive) and the value parsers for
//! `--timeout` (humane durations such as `5s`, `500ms`, `1m30s`) and
//! `--endpoints` (`host:port` or `http://host:port`).
//!
//! `get`, `delete` and `watch` take either a resource kind or a raw key
//! (prefix) as their first argument; which one is decided after parsing
//! (`commands.rs`): a first argument that `Kind::parse` accepts is a kind.
//! The `kv` group always means the raw key-value form.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Operator CLI for the Trellis control plane (trellisd admin API).
#[derive(Debug, Parser)]
#[command(name = "trellisctl", version, propagate_version = true)]
#[command(
    after_help = "Resource kinds (for apply, diff, get, delete, watch): service (svc), \
instance (inst), route (rt), destinationpolicy (dp), quota, accesspolicy (ap); plurals work too. \
`get`, `delete` and `watch` treat a first argument that names a kind as a kind and anything \
else as a key; `trellisctl kv ...` always means keys.

Exit codes: 0 ok, 1 other error, 2 usage or invalid argument, \
3 not found, 4 compare-and-set conflict, 5 unavailable, 6 degraded (cluster status). \
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
    /// Form a cluster of every --endpoints node (Initialize on the first, AddMember for the rest)
    Init,
    /// Ask every member for its Raft and store state
    Status,
    /// Build a snapshot on every member now and purge the log it covers
    Snapshot,
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

/// Longest accepted `--timeout`.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Parses a humane duration: one or more `<number><unit>` parts, where the
/// number may have a fraction and the unit is `ns`, `us`, `µs`, `ms`, `s`,
/// `m` or `h` (`5s`, `500ms`, `1.5s`, `1m30s`). Zero is rejected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
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
            "" => {
                return Err(format!(
                    "invalid duration {text:?}: missing unit (try {number}s or {number}ms)"
                ))
            }
            other => {
                return Err(format!(
                    "invalid duration {text:?}: unknown unit {other:?} (use ms, s, m or h)"
                ))
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
    if duration > MAX_TIMEOUT {
        return Err(format!("invalid duration {text:?}: at most 24h"));
    }
    Ok(duration)
}

/// Validates one `--endpoints` entry and returns it trimmed. Accepts
/// `host:port` and `http://host:port` (no TLS).
pub fn parse_endpoint(text: &str) -> Result<String, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty endpoint (expected HOST:PORT)".into());
    }
    if s.starts_with("https://") {
        return Err(format!(
            "{s:?}: TLS is not supported; use HOST:PORT or http://HOST:PORT"
        ));
    }
    let uri = crate::client::endpoint_uri(s);
    let parsed: tonic::transport::Uri = uri
        .parse()
        .map_err(|e| format!("{s:?} is not a valid HOST:PORT address: {e}"))?;
    if parsed.scheme_str() != Some("http") {
        return Err(format!("{s:?}: only http:// endpoints are supported"));
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
    fn endpoints_parse() {
        assert_eq!(
            parse_endpoint(" 127.0.0.1:7379 ").as_deref(),
            Ok("127.0.0.1:7379")
        );
        assert!(parse_endpoint("http://node-1:7379").is_ok());
        assert!(parse_endpoint("[::1]:7379").is_ok());
        for bad in [
            "",
            "  ",
            "node-1",
            "https://a:1",
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
