//! Dispatch of the parsed command line to the command implementations, and
//! the context they share (endpoints with failover, output format).
//!
//! `get`, `delete` and `watch` serve two forms: when the first argument
//! names a resource kind (`Kind::parse`: `Route`, `routes`, `rt`, ...) it is
//! the resource form, otherwise the raw key form, exactly as before kinds
//! existed. `kv ...` is always the raw form.
//!
//! `ca create` and `cert create` run offline, before any connection is set
//! up (the TLS flags are checked for consistency but their files are not
//! read).

use trellis_resources::Kind;

use crate::args::{
    CaCommand, CertCommand, Cli, ClusterCommand, Command, DeleteArgs, DeleteCmdArgs, Format,
    GetArgs, GetCmdArgs, KvCommand, LeaderCommand, LeaseCommand, MemberCommand, TokenCommand,
    WatchArgs, WatchCmdArgs,
};
use crate::client::{hostport, Client};
use crate::error::{exit, CliError};
use crate::tls::TlsFlags;
use crate::{cluster, identity, kv, lease, proxy_status, resources, watch};

/// What every command gets.
pub struct Ctx {
    pub client: Client,
    pub format: Format,
}

impl Ctx {
    pub fn json(&self) -> bool {
        self.format == Format::Json
    }
}

/// The kinds and their short names, for messages.
const KINDS_HELP: &str = "service (svc), instance (inst), route (rt), \
destinationpolicy (dp), quota, accesspolicy (ap)";

pub async fn run(cli: Cli) -> Result<(), CliError> {
    let yaml_ok = matches!(&cli.command, Command::Get(a) if Kind::parse(&a.target).is_some());
    if cli.output == Format::Yaml && !yaml_ok {
        return Err(CliError::new(
            exit::USAGE,
            "-o yaml is supported only by `get KIND [NAME]`; use -o json or -o table",
        ));
    }
    // An empty variable (TRELLIS_CA_FILE=) means "not set".
    let given = |p: Option<std::path::PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
    let flags = TlsFlags {
        ca_file: given(cli.ca_file),
        cert_file: given(cli.cert_file),
        key_file: given(cli.key_file),
    };
    flags.check()?;
    let json = cli.output == Format::Json;
    let command = match cli.command {
        // Offline: files only.
        Command::Ca(CaCommand::Create(args)) => return identity::ca_create(json, args),
        Command::Cert(CertCommand::Create(args)) => return identity::cert_create(json, args),
        command => command,
    };
    let tls = flags.load()?;
    let endpoints = dedup_endpoints(cli.endpoints);
    check_schemes(&endpoints, tls.is_some())?;
    let ctx = Ctx {
        client: Client::new(endpoints, cli.timeout, tls),
        format: cli.output,
    };
    match command {
        Command::Apply(args) => resources::apply(&ctx, args).await,
        Command::Diff(args) => resources::diff(&ctx, args).await,
        Command::Get(args) => match Kind::parse(&args.target) {
            Some(kind) => resources::get(&ctx, kind, args).await,
            None => {
                let key = args.target.clone();
                kv::get(&ctx, raw_get(args)?)
                    .await
                    .map_err(|e| hint_not_a_kind(e, &key))
            }
        },
        Command::Put(args) => kv::put(&ctx, args).await,
        Command::List(args) => kv::list(&ctx, args).await,
        Command::Delete(args) => {
            if !args.filenames.is_empty() {
                return resources::delete_files(&ctx, args).await;
            }
            match args.target.as_deref().and_then(Kind::parse) {
                Some(kind) => resources::delete(&ctx, kind, args).await,
                None => {
                    let key = args.target.clone().unwrap_or_default();
                    kv::delete(&ctx, raw_delete(args)?)
                        .await
                        .map_err(|e| hint_not_a_kind(e, &key))
                }
            }
        }
        Command::Compact(args) => kv::compact(&ctx, args).await,
        Command::Watch(args) => match Kind::parse(&args.target) {
            Some(kind) => {
                let namespace = if args.all_namespaces {
                    None
                } else {
                    Some(
                        args.namespace
                            .as_deref()
                            .unwrap_or(trellis_resources::DEFAULT_NAMESPACE),
                    )
                };
                watch::watch_resources(&ctx, kind, namespace, args.rev).await
            }
            None => watch::watch(&ctx, raw_watch(args)?).await,
        },
        Command::Kv(command) => match command {
            KvCommand::Put(args) => kv::put(&ctx, args).await,
            KvCommand::Get(args) => kv::get(&ctx, args).await,
            KvCommand::List(args) => kv::list(&ctx, args).await,
            KvCommand::Delete(args) => kv::delete(&ctx, args).await,
            KvCommand::Compact(args) => kv::compact(&ctx, args).await,
            KvCommand::Watch(args) => watch::watch(&ctx, args).await,
        },
        Command::Lease(command) => match command {
            LeaseCommand::Grant(args) => lease::grant(&ctx, args).await,
            LeaseCommand::Keepalive(args) => lease::keep_alive(&ctx, args).await,
            LeaseCommand::Revoke(args) => lease::revoke(&ctx, args).await,
            LeaseCommand::List => lease::list(&ctx).await,
        },
        Command::Cluster(ClusterCommand::Init(args)) => cluster::init(&ctx, args).await,
        Command::Cluster(ClusterCommand::Status) => cluster::status(&ctx).await,
        Command::Cluster(ClusterCommand::Snapshot) => cluster::snapshot(&ctx).await,
        Command::Member(MemberCommand::List) => cluster::member_list(&ctx).await,
        Command::Member(MemberCommand::Add(args)) => cluster::member_add(&ctx, args).await,
        Command::Member(MemberCommand::Remove(args)) => cluster::member_remove(&ctx, args).await,
        Command::Leader(LeaderCommand::Transfer(args)) => {
            cluster::leader_transfer(&ctx, args).await
        }
        Command::Ca(CaCommand::Create(args)) => identity::ca_create(json, args),
        Command::Ca(CaCommand::Load(args)) => identity::ca_load(&ctx, args).await,
        Command::Ca(CaCommand::Show) => identity::ca_show(&ctx).await,
        Command::Cert(CertCommand::Create(args)) => identity::cert_create(json, args),
        Command::Cert(CertCommand::List) => identity::cert_list(&ctx).await,
        Command::Token(TokenCommand::Create(args)) => identity::token_create(&ctx, args).await,
        Command::Token(TokenCommand::List) => identity::token_list(&ctx).await,
        Command::Token(TokenCommand::Revoke(args)) => identity::token_revoke(&ctx, args).await,
        Command::ProxyStatus => proxy_status::proxy_status(&ctx).await,
    }
}

/// An endpoint's explicit scheme must agree with the TLS flags.
fn check_schemes(endpoints: &[String], tls: bool) -> Result<(), CliError> {
    for endpoint in endpoints {
        let e = endpoint.trim();
        if tls && e.starts_with("http://") {
            return Err(CliError::new(
                exit::USAGE,
                format!(
                    "endpoint {e} is plaintext (http://) but --ca-file asks for TLS; use \
                     HOST:PORT or https://HOST:PORT"
                ),
            ));
        }
        if !tls && e.starts_with("https://") {
            return Err(CliError::new(
                exit::USAGE,
                format!(
                    "endpoint {e} is TLS (https://): pass --ca-file (TRELLIS_CA_FILE), the \
                     cluster CA, and for mutual TLS --cert-file/--key-file"
                ),
            ));
        }
    }
    Ok(())
}

/// The usage error for resource-only flags on a raw key.
fn not_a_kind(command: &str, target: &str, extra: &str) -> CliError {
    CliError::new(
        exit::USAGE,
        format!(
            "{command}: {target:?} is not a resource kind ({KINDS_HELP}), so it is read as a \
             key, and `{command} KEY` takes no {extra}"
        ),
    )
}

/// `get KEY`: the resource-only arguments must be absent.
fn raw_get(args: GetCmdArgs) -> Result<GetArgs, CliError> {
    if args.name.is_some() || args.namespace.is_some() || args.all_namespaces {
        return Err(not_a_kind("get", &args.target, "NAME, -n or -A"));
    }
    Ok(GetArgs {
        key: args.target,
        serializable: args.serializable,
    })
}

/// `delete KEY`: the resource-only arguments must be absent.
fn raw_delete(args: DeleteCmdArgs) -> Result<DeleteArgs, CliError> {
    let key = args.target.unwrap_or_default();
    if args.name.is_some() || args.namespace.is_some() || args.ignore_not_found {
        return Err(not_a_kind("delete", &key, "NAME, -n or --ignore-not-found"));
    }
    Ok(DeleteArgs {
        key,
        expected_revision: args.expected_revision,
    })
}

/// `watch [PREFIX]`: the resource-only arguments must be absent.
fn raw_watch(args: WatchCmdArgs) -> Result<WatchArgs, CliError> {
    if args.namespace.is_some() || args.all_namespaces {
        if args.target.is_empty() {
            return Err(CliError::new(
                exit::USAGE,
                format!("watch: -n and -A need a resource KIND ({KINDS_HELP})"),
            ));
        }
        return Err(not_a_kind("watch", &args.target, "-n or -A"));
    }
    Ok(WatchArgs {
        prefix: args.target,
        rev: args.rev,
    })
}

/// A raw key without `/` that was not found is probably a mistyped kind:
/// say so.
fn hint_not_a_kind(mut e: CliError, key: &str) -> CliError {
    if e.code == exit::NOT_FOUND && !key.contains('/') {
        if let Some(message) = &mut e.message {
            message.push_str(&format!(
                "; note: {key:?} is not a resource kind either ({KINDS_HELP})"
            ));
        }
    }
    e
}

/// Drops repeated endpoints (same address with or without a scheme),
/// keeping the first occurrence and the order.
fn dedup_endpoints(endpoints: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    endpoints
        .into_iter()
        .filter(|e| seen.insert(hostport(e).to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("trellisctl").chain(args.iter().copied()))
    }

    #[test]
    fn kinds_and_keys_are_told_apart() -> Result<(), clap::Error> {
        let Command::Get(get) = parse(&["get", "routes", "-A"])?.command else {
            panic!("not a get");
        };
        assert_eq!(Kind::parse(&get.target), Some(Kind::Route));
        let Command::Get(get) = parse(&["get", "/routes/x"])?.command else {
            panic!("not a get");
        };
        assert_eq!(Kind::parse(&get.target), None);
        let raw =
            raw_get(get).map_err(|_| clap::Error::new(clap::error::ErrorKind::InvalidValue))?;
        assert_eq!(raw.key, "/routes/x");
        let Command::Get(get) = parse(&["get", "/a", "b"])?.command else {
            panic!("not a get");
        };
        assert_eq!(raw_get(get).err().map(|e| e.code), Some(exit::USAGE));
        let Command::Delete(del) = parse(&["del", "/a", "--expected-revision", "3"])?.command
        else {
            panic!("not a delete");
        };
        let raw =
            raw_delete(del).map_err(|_| clap::Error::new(clap::error::ErrorKind::InvalidValue))?;
        assert_eq!((raw.key.as_str(), raw.expected_revision), ("/a", Some(3)));
        assert!(parse(&["delete"]).is_err());
        assert!(parse(&["delete", "rt", "x", "-f", "a.yaml"]).is_err());
        assert!(parse(&["delete", "-f", "a.yaml", "-R"]).is_ok());
        assert!(parse(&["get", "rt", "-n", "a", "-A"]).is_err());
        let Command::Watch(w) = parse(&["watch"])?.command else {
            panic!("not a watch");
        };
        assert_eq!(w.target, "");
        assert!(parse(&["kv", "get", "routes"]).is_ok());
        assert!(parse(&["apply"]).is_err());
        assert!(parse(&["apply", "-f", "-", "--dry-run", "--lease", "5"]).is_ok());
        assert!(parse(&["lease", "keepalive", "0"]).is_err());
        assert!(parse(&["lease", "grant", "10s", "--id", "7"]).is_ok());
        assert!(parse(&["-o", "yaml", "get", "rt"]).is_ok());
        Ok(())
    }

    #[test]
    fn not_found_raw_keys_hint_at_kinds() {
        let e = hint_not_a_kind(
            CliError::new(exit::NOT_FOUND, "get \"rotues\": key not found"),
            "rotues",
        );
        assert!(e
            .message
            .unwrap_or_default()
            .contains("not a resource kind"));
        let e = hint_not_a_kind(CliError::new(exit::NOT_FOUND, "x"), "/a/b");
        assert_eq!(e.message.as_deref(), Some("x"));
    }

    #[test]
    fn endpoints_are_deduplicated_in_order() {
        let got = dedup_endpoints(vec![
            "b:1".into(),
            "a:1".into(),
            "http://b:1".into(),
            "a:1".into(),
        ]);
        assert_eq!(got, vec!["b:1".to_string(), "a:1".to_string()]);
    }

    #[test]
    fn schemes_must_match_the_tls_flags() {
        let e = |s: &str| vec![s.to_string()];
        assert!(check_schemes(&e("a:1"), true).is_ok());
        assert!(check_schemes(&e("a:1"), false).is_ok());
        assert!(check_schemes(&e("https://a:1"), true).is_ok());
        assert!(check_schemes(&e("http://a:1"), false).is_ok());
        assert_eq!(
            check_schemes(&e("http://a:1"), true).err().map(|e| e.code),
            Some(exit::USAGE)
        );
        assert_eq!(
            check_schemes(&e("https://a:1"), false)
                .err()
                .map(|e| e.code),
            Some(exit::USAGE)
        );
    }
}
