//! Mesh resource commands: `apply`, `diff`, `get KIND`, `delete KIND NAME`
//! and `delete -f`, on the admin API's `Resources` service.
//!
//! The server parses and validates documents itself (`apply`, `diff`), so
//! its INVALID_ARGUMENT message (one line per problem, naming file,
//! resource and field) is printed as is. `delete -f` parses the files here
//! with `trellis_resources::parse_documents`, only to learn what to delete.

use serde::Serialize;
use serde_json::{json, Value};
use tonic::transport::Channel;
use trellis_proto::admin::apply_result::Action;
use trellis_proto::admin::resources_client::ResourcesClient;
use trellis_proto::admin::{
    ApplyRequest, ApplyResponse, ApplyResult, ResourceDeleteRequest, ResourceGetRequest,
    ResourceListRequest, SourceDocument,
};
use trellis_resources::{
    parse_documents, Health, Kind, LbPolicy, Protocol, Resource, Spec, DEFAULT_NAMESPACE,
};

use crate::args::{ApplyArgs, DeleteCmdArgs, DiffArgs, FileArgs, Format, GetCmdArgs};
use crate::client::with_deadline;
use crate::commands::Ctx;
use crate::error::{exit, CliError};
use crate::files::{read_sources, Source};
use crate::output::{escape_text, print_json, print_line, write_stdout, Table};
use crate::{diff, output};

/// Largest response accepted (a list of many resources, or an apply's
/// before/after documents); the server sends at most 16 MiB.
const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

fn client(channel: Channel) -> ResourcesClient<Channel> {
    ResourcesClient::new(channel)
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
        .max_encoding_message_size(MAX_RESPONSE_BYTES)
}

/// `Route default/ratings`.
fn display_name(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind} {namespace}/{name}")
}

fn action_name(action: i32) -> &'static str {
    match Action::try_from(action) {
        Ok(Action::Created) => "created",
        Ok(Action::Configured) => "configured",
        Ok(Action::Unchanged) => "unchanged",
        Err(_) => "unknown",
    }
}

/// Sends one Apply request for every source (a write: resent elsewhere
/// only when provably not applied).
async fn send_apply(
    ctx: &Ctx,
    what: &str,
    sources: Vec<Source>,
    dry_run: bool,
    expected_revision: Option<u64>,
    lease: u64,
) -> Result<ApplyResponse, CliError> {
    let request = ApplyRequest {
        documents: sources
            .into_iter()
            .map(|s| SourceDocument {
                source: s.name,
                content: s.content,
            })
            .collect(),
        dry_run,
        expected_revision,
        lease,
    };
    let answer = ctx
        .client
        .unary_write(what, |channel, deadline| {
            let request = with_deadline(request.clone(), deadline);
            async move { client(channel).apply(request).await }
        })
        .await?;
    Ok(answer.value)
}

fn read(files: &FileArgs) -> Result<Vec<Source>, CliError> {
    read_sources(&files.filenames, files.recursive)
}

pub async fn apply(ctx: &Ctx, args: ApplyArgs) -> Result<(), CliError> {
    let sources = read(&args.files)?;
    let what = if args.dry_run {
        "apply --dry-run"
    } else {
        "apply"
    };
    let response = send_apply(
        ctx,
        what,
        sources,
        args.dry_run,
        args.expected_revision,
        args.lease,
    )
    .await?;
    if ctx.json() {
        let results: Vec<Value> = response
            .results
            .iter()
            .map(|r| {
                json!({
                    "kind": r.kind,
                    "namespace": r.namespace,
                    "name": r.name,
                    "action": action_name(r.action),
                    "mod_revision": r.mod_revision,
                })
            })
            .collect();
        return print_json(&json!({
            "dry_run": args.dry_run,
            "revision": response.revision,
            "results": results,
        }));
    }
    let suffix = if args.dry_run { " (dry run)" } else { "" };
    let mut text = String::new();
    for r in &response.results {
        text.push_str(&format!(
            "{} {}{suffix}\n",
            display_name(&r.kind, &r.namespace, &r.name),
            action_name(r.action)
        ));
    }
    write_stdout(text.as_bytes())
}

/// `diff`: exit 0 without differences, 1 with; errors that would exit 1
/// elsewhere exit 2 here, so 1 always means "there are differences".
pub async fn diff(ctx: &Ctx, args: DiffArgs) -> Result<(), CliError> {
    match diff_inner(ctx, args).await {
        Ok(false) => Ok(()),
        Ok(true) => Err(CliError::silent(exit::OTHER)),
        Err(e) if e.code == exit::OTHER => Err(CliError {
            code: exit::USAGE,
            message: e.message,
        }),
        Err(e) => Err(e),
    }
}

/// YAML of a stored/applied canonical JSON document; empty for none.
fn yaml_of(bytes: &[u8], what: &str) -> Result<String, CliError> {
    if bytes.is_empty() {
        return Ok(String::new());
    }
    Resource::from_json(bytes)
        .map(|r| r.to_yaml())
        .map_err(|e| {
            CliError::new(
                exit::OTHER,
                format!("{what}: the server sent a document that does not parse: {e}"),
            )
        })
}

/// The diff of one apply result, with its `---`/`+++` header; empty when
/// it would not change.
fn result_diff(r: &ApplyResult) -> Result<String, CliError> {
    if Action::try_from(r.action) == Ok(Action::Unchanged) {
        return Ok(String::new());
    }
    let name = display_name(&r.kind, &r.namespace, &r.name);
    let current = yaml_of(&r.previous, &name)?;
    let applied = yaml_of(&r.applied, &name)?;
    let mut hunks = diff::unified(&current, &applied);
    if hunks.is_empty() {
        // Same document; the apply would still rewrite it (another lease).
        hunks = "# the document is the same; only its lease attachment would change\n".into();
    }
    let absent = if r.previous.is_empty() {
        " (does not exist)"
    } else {
        ""
    };
    Ok(format!(
        "--- current {name}{absent}\n+++ applied {name}\n{hunks}"
    ))
}

/// Prints the diffs; true if anything would change.
async fn diff_inner(ctx: &Ctx, args: DiffArgs) -> Result<bool, CliError> {
    let sources = read(&args.files)?;
    let response = send_apply(ctx, "diff", sources, true, None, args.lease).await?;
    let mut changed = false;
    let mut text = String::new();
    let mut results = Vec::new();
    for r in &response.results {
        let d = result_diff(r)?;
        changed |= !d.is_empty();
        if ctx.json() {
            results.push(json!({
                "kind": r.kind,
                "namespace": r.namespace,
                "name": r.name,
                "action": action_name(r.action),
                "diff": d,
            }));
        } else {
            text.push_str(&d);
        }
    }
    if ctx.json() {
        print_json(&json!({ "changed": changed, "results": results }))?;
    } else {
        write_stdout(text.as_bytes())?;
    }
    Ok(changed)
}

/// A stored resource as the API returns it, decoded.
struct Stored {
    resource: Resource,
    mod_revision: u64,
    lease: u64,
}

fn decode(json: &[u8], mod_revision: u64, lease: u64, kind: Kind) -> Result<Stored, CliError> {
    let resource = Resource::from_json(json).map_err(|e| {
        CliError::new(
            exit::OTHER,
            format!("a stored {kind} (mod_revision {mod_revision}) does not parse: {e}"),
        )
    })?;
    Ok(Stored {
        resource,
        mod_revision,
        lease,
    })
}

fn namespace_of(namespace: Option<&str>) -> &str {
    namespace.unwrap_or(DEFAULT_NAMESPACE)
}

pub async fn get(ctx: &Ctx, kind: Kind, args: GetCmdArgs) -> Result<(), CliError> {
    let namespace = namespace_of(args.namespace.as_deref()).to_string();
    if let Some(name) = &args.name {
        if args.all_namespaces {
            return Err(CliError::new(
                exit::USAGE,
                format!("get {kind} {name}: -A (all namespaces) cannot be used with a NAME"),
            ));
        }
        let request = ResourceGetRequest {
            kind: kind.as_str().into(),
            namespace: namespace.clone(),
            name: name.clone(),
            serializable: args.serializable,
        };
        let what = format!("get {}", display_name(kind.as_str(), &namespace, name));
        let answer = ctx
            .client
            .unary(&what, |channel, deadline| {
                let request = with_deadline(request.clone(), deadline);
                async move { client(channel).get(request).await }
            })
            .await?;
        let Some(res) = answer.value.resource else {
            return Err(CliError::new(
                exit::NOT_FOUND,
                format!("{what}: not found (endpoint {})", answer.endpoint),
            ));
        };
        let stored = decode(&res.json, res.mod_revision, res.lease, kind)?;
        return print_resources(ctx, kind, &[stored], false, true);
    }
    let list_namespace = if args.all_namespaces {
        String::new()
    } else {
        namespace.clone()
    };
    let request = ResourceListRequest {
        kind: kind.as_str().into(),
        namespace: list_namespace,
        serializable: args.serializable,
    };
    let what = format!("get {kind}");
    let answer = ctx
        .client
        .unary(&what, |channel, deadline| {
            let request = with_deadline(request.clone(), deadline);
            async move { client(channel).list(request).await }
        })
        .await?;
    let stored = answer
        .value
        .resources
        .iter()
        .map(|r| decode(&r.json, r.mod_revision, r.lease, kind))
        .collect::<Result<Vec<_>, _>>()?;
    if stored.is_empty() && !ctx.json() {
        // Like kubectl: a note on stderr, nothing (not even a header) on
        // stdout; JSON prints `[]`.
        let scope = if args.all_namespaces {
            "any namespace".to_string()
        } else {
            format!("namespace {namespace}")
        };
        output::note(&format!("no {kind} resources found in {scope}"));
        return Ok(());
    }
    print_resources(ctx, kind, &stored, args.all_namespaces, false)
}

/// Prints resources as a table, JSON (one object, or an array for a list)
/// or YAML documents separated by `---`.
fn print_resources(
    ctx: &Ctx,
    kind: Kind,
    stored: &[Stored],
    with_namespace: bool,
    single: bool,
) -> Result<(), CliError> {
    match ctx.format {
        Format::Json => {
            let text = if single {
                stored
                    .first()
                    .map(|s| serde_json::to_string_pretty(&s.resource))
                    .unwrap_or_else(|| Ok("null".into()))
            } else {
                let all: Vec<&Resource> = stored.iter().map(|s| &s.resource).collect();
                serde_json::to_string_pretty(&all)
            }
            .map_err(|e| CliError::new(exit::OTHER, format!("cannot encode JSON: {e}")))?;
            write_stdout(format!("{text}\n").as_bytes())
        }
        Format::Yaml => {
            let docs: Vec<String> = stored.iter().map(|s| s.resource.to_yaml()).collect();
            write_stdout(docs.join("---\n").as_bytes())
        }
        Format::Table => {
            let mut headers: Vec<&str> = Vec::new();
            if with_namespace {
                headers.push("NAMESPACE");
            }
            headers.push("NAME");
            headers.extend_from_slice(kind_columns(kind));
            headers.push("REVISION");
            let mut table = Table::new(&headers);
            for s in stored {
                let mut row = Vec::new();
                if with_namespace {
                    row.push(escape_text(&s.resource.metadata.namespace));
                }
                row.push(escape_text(&s.resource.metadata.name));
                row.extend(kind_cells(s).into_iter().map(|c| cell(&c)));
                row.push(s.mod_revision.to_string());
                table.row(row);
            }
            write_stdout(table.render().as_bytes())
        }
    }
}

/// A table cell: escaped, `-` when empty (so columns stay countable).
fn cell(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        escape_text(text)
    }
}

fn kind_columns(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Service => &["PORTS"],
        Kind::Instance => &["SERVICE", "ADDRESS", "PORT", "HEALTH", "LEASE"],
        Kind::Route => &["HOSTS", "HTTP-RULES", "TCP-RULES"],
        Kind::DestinationPolicy => &["HOST", "SUBSETS", "BALANCER"],
        Kind::Quota => &["MAX", "PER", "OVERRIDES"],
        Kind::AccessPolicy => &["DEFAULT", "RULES"],
    }
}

fn kind_cells(s: &Stored) -> Vec<String> {
    match &s.resource.spec {
        Spec::Service(spec) => vec![spec
            .ports
            .iter()
            .map(|p| format!("{}:{}/{}", p.name, p.port, protocol_name(p.protocol)))
            .collect::<Vec<_>>()
            .join(",")],
        Spec::Instance(spec) => vec![
            spec.service.clone(),
            spec.address.to_string(),
            spec.port.to_string(),
            health_name(spec.health).into(),
            if s.lease == 0 {
                String::new()
            } else {
                s.lease.to_string()
            },
        ],
        Spec::Route(spec) => vec![
            spec.hosts.join(","),
            spec.http.len().to_string(),
            spec.tcp.len().to_string(),
        ],
        Spec::DestinationPolicy(spec) => vec![
            spec.host.clone(),
            spec.subsets
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
            lb_name(
                spec.load_balancer
                    .as_ref()
                    .map(|lb| lb.policy)
                    .unwrap_or_default(),
            )
            .into(),
        ],
        Spec::Quota(spec) => vec![
            spec.max_amount.to_string(),
            spec.valid_duration.to_string(),
            spec.overrides.len().to_string(),
        ],
        Spec::AccessPolicy(spec) => vec![
            match spec.default_action {
                Some(trellis_resources::Action::Allow) => "allow".into(),
                Some(trellis_resources::Action::Deny) => "deny".into(),
                None => String::new(),
            },
            spec.rules.len().to_string(),
        ],
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Http => "http",
        Protocol::Http2 => "http2",
        Protocol::Grpc => "grpc",
        Protocol::Tcp => "tcp",
    }
}

fn health_name(h: Health) -> &'static str {
    match h {
        Health::Healthy => "healthy",
        Health::Unhealthy => "unhealthy",
        Health::Draining => "draining",
    }
}

fn lb_name(p: LbPolicy) -> &'static str {
    match p {
        LbPolicy::LeastRequest => "leastRequest",
        LbPolicy::RoundRobin => "roundRobin",
        LbPolicy::Random => "random",
        LbPolicy::ConsistentHash => "consistentHash",
        LbPolicy::Weighted => "weighted",
    }
}

/// The outcome of deleting one resource.
#[derive(Serialize)]
struct Deleted {
    kind: &'static str,
    namespace: String,
    name: String,
    deleted: bool,
    revision: u64,
}

/// Deletes one resource; `Ok` whether or not it existed.
async fn delete_one(
    ctx: &Ctx,
    kind: Kind,
    namespace: &str,
    name: &str,
    expected_mod_revision: Option<u64>,
) -> Result<(Deleted, String), CliError> {
    let request = ResourceDeleteRequest {
        kind: kind.as_str().into(),
        namespace: namespace.into(),
        name: name.into(),
        expected_mod_revision,
    };
    let what = format!("delete {}", display_name(kind.as_str(), namespace, name));
    let answer = ctx
        .client
        .unary_write(&what, |channel, deadline| {
            let request = with_deadline(request.clone(), deadline);
            async move { client(channel).delete(request).await }
        })
        .await?;
    Ok((
        Deleted {
            kind: kind.as_str(),
            namespace: namespace.into(),
            name: name.into(),
            deleted: answer.value.deleted,
            revision: answer.value.header.map_or(0, |h| h.revision),
        },
        answer.endpoint,
    ))
}

fn to_json_value(value: &impl Serialize) -> Result<Value, CliError> {
    serde_json::to_value(value)
        .map_err(|e| CliError::new(exit::OTHER, format!("cannot encode JSON: {e}")))
}

/// `delete KIND NAME [-n NS] [--expected-revision N]`.
pub async fn delete(ctx: &Ctx, kind: Kind, args: DeleteCmdArgs) -> Result<(), CliError> {
    let Some(name) = args.name.as_deref() else {
        return Err(CliError::new(
            exit::USAGE,
            format!("delete {kind}: give the NAME of the resource to delete (or -f PATH)"),
        ));
    };
    let namespace = namespace_of(args.namespace.as_deref());
    let (outcome, endpoint) =
        delete_one(ctx, kind, namespace, name, args.expected_revision).await?;
    let shown = display_name(kind.as_str(), namespace, name);
    if ctx.json() {
        print_json(&to_json_value(&outcome)?)?;
    } else if outcome.deleted {
        print_line(&format!("{shown} deleted"))?;
    }
    if !outcome.deleted && !args.ignore_not_found {
        return Err(CliError::new(
            exit::NOT_FOUND,
            format!("delete {shown}: not found (endpoint {endpoint})"),
        ));
    }
    Ok(())
}

/// `delete -f PATH...`: every resource named in the files, one delete each
/// (not atomic). Missing resources are reported and give exit 3 at the
/// end, after the others were deleted.
pub async fn delete_files(ctx: &Ctx, args: DeleteCmdArgs) -> Result<(), CliError> {
    let sources = read_sources(&args.filenames, args.recursive)?;
    let mut resources: Vec<Resource> = Vec::new();
    let mut problems = Vec::new();
    for source in &sources {
        match parse_documents(&source.name, &source.content) {
            Ok(parsed) => resources.extend(parsed),
            Err(errors) => problems.extend(errors.iter().map(ToString::to_string)),
        }
    }
    if !problems.is_empty() {
        return Err(CliError::new(
            exit::USAGE,
            format!("delete: invalid documents:\n{}", problems.join("\n")),
        ));
    }
    if resources.is_empty() {
        return Err(CliError::new(
            exit::USAGE,
            "delete: no resources in the documents",
        ));
    }
    // The same resource in two files is deleted once.
    let mut seen = std::collections::HashSet::new();
    resources.retain(|r| seen.insert(r.key()));

    let mut outcomes = Vec::new();
    let mut missing = Vec::new();
    for r in &resources {
        let (outcome, endpoint) =
            delete_one(ctx, r.kind(), &r.metadata.namespace, &r.metadata.name, None).await?;
        if outcome.deleted {
            if !ctx.json() {
                print_line(&format!("{} deleted", r.display_name()))?;
            }
        } else if !args.ignore_not_found {
            missing.push(format!("{} (endpoint {endpoint})", r.display_name()));
        }
        outcomes.push(outcome);
    }
    if ctx.json() {
        print_json(&json!({ "results": to_json_value(&outcomes)? }))?;
    }
    if !missing.is_empty() {
        return Err(CliError::new(
            exit::NOT_FOUND,
            format!("delete: not found: {}", missing.join(", ")),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(action: Action, previous: &str, applied: &str) -> ApplyResult {
        ApplyResult {
            kind: "Service".into(),
            namespace: "default".into(),
            name: "ratings".into(),
            action: action as i32,
            previous: previous.as_bytes().to_vec(),
            applied: applied.as_bytes().to_vec(),
            mod_revision: 7,
        }
    }

    const V1: &str = r#"{"apiVersion":"trellis/v1","kind":"Service","metadata":{"name":"ratings","namespace":"default"},"spec":{"ports":[{"name":"http","port":9080,"protocol":"http"}]}}"#;

    #[test]
    fn diffs_of_apply_results() -> Result<(), CliError> {
        assert_eq!(result_diff(&result(Action::Unchanged, V1, V1))?, "");
        let created = result_diff(&result(Action::Created, "", V1))?;
        assert!(
            created.starts_with(
                "--- current Service default/ratings (does not exist)\n+++ applied Service default/ratings\n@@ -0,0 +1,"
            ),
            "{created}"
        );
        assert!(
            created.lines().skip(3).all(|l| l.starts_with('+')),
            "{created}"
        );
        let v2 = V1.replace("9080", "9081");
        let changed = result_diff(&result(Action::Configured, V1, &v2))?;
        assert!(
            changed.contains("\n-    port: 9080\n+    port: 9081\n"),
            "{changed}"
        );
        let lease_only = result_diff(&result(Action::Configured, V1, V1))?;
        assert!(lease_only.contains("lease"), "{lease_only}");
        Ok(())
    }

    #[test]
    fn every_kind_has_as_many_cells_as_columns() {
        let docs = [
            "apiVersion: trellis/v1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports: [{name: http, port: 80, protocol: http}]\n",
            "apiVersion: trellis/v1\nkind: Instance\nmetadata: {name: a}\nspec: {service: a, address: 10.0.0.1, port: 80}\n",
            "apiVersion: trellis/v1\nkind: Route\nmetadata: {name: a}\nspec:\n  hosts: [a]\n  http: [{route: [{destination: {service: a}}]}]\n",
            "apiVersion: trellis/v1\nkind: DestinationPolicy\nmetadata: {name: a}\nspec: {host: a}\n",
            "apiVersion: trellis/v1\nkind: Quota\nmetadata: {name: a}\nspec: {maxAmount: 5, validDuration: 1s}\n",
            "apiVersion: trellis/v1\nkind: AccessPolicy\nmetadata: {name: a}\nspec: {defaultAction: deny}\n",
        ];
        for doc in docs {
            let parsed = parse_documents("t.yaml", doc);
            assert!(parsed.is_ok(), "{doc}: {parsed:?}");
            for resource in parsed.unwrap_or_default() {
                let kind = resource.kind();
                let stored = Stored {
                    resource,
                    mod_revision: 1,
                    lease: 0,
                };
                assert_eq!(
                    kind_cells(&stored).len(),
                    kind_columns(kind).len(),
                    "{kind}"
                );
            }
        }
    }
}
