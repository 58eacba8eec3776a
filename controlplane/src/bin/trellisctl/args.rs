//! Command-line syntax of trellisctl (clap derive) and the value parsers for
//! `--timeout` (humane durations such as `5s`, `500ms`, `1m30s`) and
//! `--endpoints` (`host:port` or `http://host:port`).

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Operator CLI for the Trellis control plane (trellisd admin API).
#[derive(Debug, Parser)]
#[command(name = "trellisctl", version, propagate_version = true)]
#[command(
    after_help = "Exit codes: 0 ok, 1 other error, 2 usage or invalid argument, \
3 not found, 4 compare-and-set conflict, 5 unavailable, 6 degraded (cluster status)."
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

    /// Output format: aligned tables for people, one JSON document for scripts
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
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
