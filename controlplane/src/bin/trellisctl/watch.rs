//! `watch`: streams the changes under a prefix, one line (or JSON object)
//! per event, and survives node failures. `watch KIND` is the same stream
//! on the kind's key prefix (`/route/default/`), shown as resource events
//! (`ADDED Route default/ratings (revision 12)`).
//!
//! Without `--rev` the start ("now") is pinned to a concrete revision first
//! (a one-key `List` gives the current revision), so a reconnect never loses
//! events. When a stream breaks, the next endpoint is asked to resume from
//! the last seen revision + 1; events at or below it are skipped, so nothing
//! is printed twice. Progress notices advance the resume point and, once the
//! server is known to send them, detect a silently dead connection.

use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use tonic::Code;
use trellis_proto::admin::event::EventType;
use trellis_proto::admin::kv_client::KvClient;
use trellis_proto::admin::{KeyValue, ListRequest, WatchRequest, WatchResponse};
use trellis_resources::{key_prefix, parse_key, Kind, Resource};

use crate::args::WatchArgs;
use crate::client::{fmt_duration, with_deadline, Failure};
use crate::commands::Ctx;
use crate::error::{exit, CliError};
use crate::output::{display_value, escape_text, insert_value, note, print_json_line, print_line};

/// How often the server is asked for a progress notice when idle.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);
/// Reconnects in a row without any answer before giving up (per endpoint).
const ATTEMPTS_PER_ENDPOINT: usize = 2;

/// How events are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `PUT key rev=N value` / `DELETE key rev=N`.
    Keys,
    /// `ADDED|MODIFIED|DELETED Kind ns/name (revision N)`.
    Resources,
}

/// `watch [PREFIX]`: every change under a key prefix.
pub async fn watch(ctx: &Ctx, args: WatchArgs) -> Result<(), CliError> {
    let what = format!("watch {:?}", args.prefix);
    run(ctx, &what, &args.prefix, args.rev, Mode::Keys).await
}

/// `watch KIND [-n NS | -A]`: changes to resources of one kind, in one
/// namespace (`None`: every namespace).
pub async fn watch_resources(
    ctx: &Ctx,
    kind: Kind,
    namespace: Option<&str>,
    rev: Option<u64>,
) -> Result<(), CliError> {
    let prefix = key_prefix(kind, namespace);
    let what = match namespace {
        Some(ns) => format!("watch {kind} in namespace {ns}"),
        None => format!("watch {kind} in every namespace"),
    };
    run(ctx, &what, &prefix, rev, Mode::Resources).await
}

async fn run(
    ctx: &Ctx,
    what: &str,
    prefix: &str,
    rev: Option<u64>,
    mode: Mode,
) -> Result<(), CliError> {
    let what = what.to_string();
    let mut next = match rev {
        Some(rev) if rev > 0 => rev,
        _ => current_revision(ctx, prefix, &what).await? + 1,
    };
    let endpoints = ctx.client.endpoints().to_vec();
    if endpoints.is_empty() {
        return Err(CliError::new(
            exit::USAGE,
            format!("{what}: no endpoints given"),
        ));
    }
    // Stall detection: a healthy stream sends a progress notice every
    // PROGRESS_INTERVAL, so silence for this long means a dead connection.
    let stall = PROGRESS_INTERVAL * 3 + ctx.client.timeout();
    let max_failures = endpoints.len() * ATTEMPTS_PER_ENDPOINT;
    let mut failures = 0usize;
    let mut index = 0usize;
    let mut last: Option<(Failure, String)> = None;
    loop {
        if failures >= max_failures {
            let last = last.as_ref().map(|(f, e)| (clone_failure(f), e.as_str()));
            return Err(ctx.client.all_failed(&what, last));
        }
        if failures > 0 {
            // Back off a little, more after every full round of endpoints.
            let round = (failures - 1) / endpoints.len();
            tokio::time::sleep(Duration::from_millis(200 * (1 << round.min(4)))).await;
        }
        let endpoint = endpoints[index % endpoints.len()].clone();
        index += 1;
        let request = WatchRequest {
            prefix: prefix.to_string(),
            start_revision: next,
            progress_interval_ms: PROGRESS_INTERVAL.as_millis() as u32,
        };
        // The deadline bounds opening the stream only, not the stream itself.
        let opened = ctx
            .client
            .call_at(&endpoint, |channel, _deadline| {
                let request = request.clone();
                async move { KvClient::new(channel).watch(request).await }
            })
            .await;
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(f) if reconnectable(&f) => {
                note(&format!(
                    "{what}: cannot watch at {endpoint}: {}; trying the next endpoint",
                    f.message()
                ));
                failures += 1;
                last = Some((f, endpoint));
                continue;
            }
            Err(f) => return Err(f.into_error(&what, &endpoint)),
        };
        let mut progress_seen = false;
        let broken = loop {
            let message = if progress_seen {
                match tokio::time::timeout(stall, stream.message()).await {
                    Ok(m) => m,
                    Err(_) => {
                        break Failure::Status(tonic::Status::unavailable(format!(
                            "no progress for {}",
                            fmt_duration(stall)
                        )))
                    }
                }
            } else {
                stream.message().await
            };
            match message {
                Ok(Some(response)) => {
                    failures = 0;
                    if response.events.is_empty() && !response.compacted {
                        progress_seen = true;
                    }
                    next = handle(ctx, &what, &response, next, mode)?;
                }
                Ok(None) => {
                    break Failure::Status(tonic::Status::unavailable(
                        "the server ended the stream",
                    ))
                }
                Err(status) => {
                    let f = Failure::Status(status);
                    if !reconnectable(&f) {
                        return Err(f.into_error(&what, &endpoint));
                    }
                    break f;
                }
            }
        };
        note(&format!(
            "{what}: stream from {endpoint} broke: {}; resuming from revision {next} on the next endpoint",
            broken.message()
        ));
        failures += 1;
        last = Some((broken, endpoint));
    }
}

/// Whether a watch failure is worth retrying elsewhere: connection trouble
/// and server-side aborts, but not answers about the request itself.
fn reconnectable(f: &Failure) -> bool {
    f.retryable()
        || matches!(
            f.code(),
            Some(Code::Unknown | Code::Cancelled | Code::Aborted | Code::Internal)
        )
}

fn clone_failure(f: &Failure) -> Failure {
    match f {
        Failure::Connect(m) => Failure::Connect(m.clone()),
        Failure::Tls { code, message } => Failure::Tls {
            code: *code,
            message: message.clone(),
        },
        Failure::Status(s) => Failure::Status(tonic::Status::new(s.code(), f.message())),
    }
}

/// The store revision now (a linearizable one-key list under the prefix).
async fn current_revision(ctx: &Ctx, prefix: &str, what: &str) -> Result<u64, CliError> {
    let request = ListRequest {
        prefix: prefix.to_string(),
        limit: 1,
        page_token: String::new(),
        serializable: false,
        keys_only: true,
    };
    let answer = ctx
        .client
        .unary(what, |channel, deadline| {
            let request = with_deadline(request.clone(), deadline);
            async move { KvClient::new(channel).list(request).await }
        })
        .await?;
    Ok(answer.value.header.map_or(0, |h| h.revision))
}

/// Prints the new events of one response and returns the next revision to
/// resume from.
fn handle(
    ctx: &Ctx,
    what: &str,
    response: &WatchResponse,
    next: u64,
    mode: Mode,
) -> Result<u64, CliError> {
    if response.compacted {
        // The start revision is out of the node's history range: the same
        // exit code as an OUT_OF_RANGE status.
        return Err(CliError::new(
            exit::USAGE,
            format!(
                "{what}: revision {next} has been compacted (compact revision {}); \
                 re-read the current state (`trellisctl list`, `trellisctl get KIND`) \
                 and watch from a newer revision",
                response.compact_revision
            ),
        ));
    }
    if response.events.is_empty() {
        // A progress notice: everything up to its revision was delivered.
        let revision = response.header.map_or(0, |h| h.revision);
        return Ok(next.max(revision.saturating_add(1)));
    }
    let mut next_after = next;
    for event in &response.events {
        let Some(kv) = &event.kv else { continue };
        let revision = kv.mod_revision;
        if revision < next {
            continue; // already printed before a reconnect
        }
        next_after = next_after.max(revision.saturating_add(1));
        let kind = EventType::try_from(event.r#type).unwrap_or(EventType::Put);
        if mode == Mode::Resources {
            print_resource_event(ctx, kind, kv)?;
        } else if ctx.json() {
            let mut object = serde_json::Map::new();
            object.insert("type".into(), json!(kind.as_str_name()));
            object.insert("key".into(), json!(kv.key));
            object.insert("revision".into(), json!(revision));
            if kind == EventType::Put {
                insert_value(&mut object, &kv.value);
                object.insert("create_revision".into(), json!(kv.create_revision));
                object.insert("version".into(), json!(kv.version));
            }
            print_json_line(&Value::Object(object))?;
        } else if kind == EventType::Put {
            print_line(&format!(
                "PUT {} rev={revision} {}",
                escape_text(&kv.key),
                display_value(&kv.value)
            ))?;
        } else {
            print_line(&format!("DELETE {} rev={revision}", escape_text(&kv.key)))?;
        }
    }
    Ok(next_after)
}

/// One resource event as a JSON line; field order as written.
#[derive(Serialize)]
struct ResourceEvent<'a> {
    #[serde(rename = "type")]
    event: &'static str,
    kind: &'static str,
    namespace: &'a str,
    name: &'a str,
    revision: u64,
    /// The document after the change (not for deletions).
    #[serde(skip_serializing_if = "Option::is_none")]
    object: Option<Resource>,
}

/// ADDED (first version), MODIFIED or DELETED.
fn resource_event_name(kind: EventType, kv: &KeyValue) -> &'static str {
    match kind {
        EventType::Delete => "DELETED",
        EventType::Put if kv.version <= 1 => "ADDED",
        EventType::Put => "MODIFIED",
    }
}

fn print_resource_event(ctx: &Ctx, kind: EventType, kv: &KeyValue) -> Result<(), CliError> {
    // Keys under the prefix that are not resource keys (written with `kv
    // put`) are not resource events.
    let Some((resource_kind, namespace, name)) = parse_key(&kv.key) else {
        return Ok(());
    };
    let event = resource_event_name(kind, kv);
    if ctx.json() {
        let object = if kind == EventType::Put {
            Resource::from_json(&kv.value).ok()
        } else {
            None
        };
        let line = ResourceEvent {
            event,
            kind: resource_kind.as_str(),
            namespace,
            name,
            revision: kv.mod_revision,
            object,
        };
        let mut text = serde_json::to_string(&line)
            .map_err(|e| CliError::new(exit::OTHER, format!("cannot encode JSON: {e}")))?;
        text.push('\n');
        return crate::output::write_stdout(text.as_bytes());
    }
    print_line(&format!(
        "{event} {resource_kind} {}/{} (revision {})",
        escape_text(namespace),
        escape_text(name),
        kv.mod_revision
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_event_names() {
        let kv = |version| KeyValue {
            key: "/route/default/r".into(),
            version,
            ..KeyValue::default()
        };
        assert_eq!(resource_event_name(EventType::Put, &kv(1)), "ADDED");
        assert_eq!(resource_event_name(EventType::Put, &kv(2)), "MODIFIED");
        assert_eq!(resource_event_name(EventType::Delete, &kv(0)), "DELETED");
    }
}
