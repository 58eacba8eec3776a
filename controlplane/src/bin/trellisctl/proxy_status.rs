//! `proxy-status` (Istio's `istioctl proxy-status`): every sidecar
//! connected to any control node, with the revision it applied compared to
//! the cluster's revision.
//!
//! It is a report: stale sidecars do not change the exit code, but members
//! the answering node could not ask make it 6 (degraded), as for `cluster
//! status`, because the list may then be incomplete.

use serde_json::{json, Value};
use trellis_proto::admin::cluster_client::ClusterClient;
use trellis_proto::admin::{ProxyStatusRequest, SidecarStatus};

use crate::client::with_deadline;
use crate::commands::Ctx;
use crate::error::{exit, CliError};
use crate::output::{escape_text, print_json, print_line, write_stdout, Table};

/// A sidecar's sync state: how many revisions it is behind `revision`
/// (0: synced).
pub fn behind(sidecar: &SidecarStatus, revision: u64) -> u64 {
    revision.saturating_sub(sidecar.applied_revision)
}

/// `SYNCED` or `STALE (N behind)`.
pub fn status_text(behind: u64) -> String {
    if behind == 0 {
        "SYNCED".into()
    } else {
        format!("STALE ({behind} behind)")
    }
}

/// `warning: node X: why` for one unreachable member, whether or not the
/// server's text already starts with `node`.
pub fn warning_line(unreachable: &str) -> String {
    let text = escape_text(unreachable.trim());
    if text.starts_with("node ") {
        format!("warning: {text}")
    } else {
        format!("warning: node {text}")
    }
}

fn cell(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        escape_text(text)
    }
}

pub async fn proxy_status(ctx: &Ctx) -> Result<(), CliError> {
    let what = "proxy-status";
    let answer = ctx
        .client
        .unary(what, |channel, deadline| {
            let request = with_deadline(ProxyStatusRequest {}, deadline);
            async move { ClusterClient::new(channel).proxy_status(request).await }
        })
        .await?;
    let response = answer.value;
    let revision = response.revision;
    let mut sidecars = response.sidecars;
    sidecars.sort_by(|a, b| {
        (&a.sidecar_name, a.node_id, &a.remote_addr).cmp(&(
            &b.sidecar_name,
            b.node_id,
            &b.remote_addr,
        ))
    });

    if ctx.json() {
        let rows: Vec<Value> = sidecars
            .iter()
            .map(|s| {
                let behind = behind(s, revision);
                json!({
                    "node_id": s.node_id,
                    "sidecar_name": s.sidecar_name,
                    "spiffe_id": s.spiffe_id,
                    "remote_addr": s.remote_addr,
                    "instance_key": s.instance_key,
                    "lease_id": s.lease_id,
                    "applied_revision": s.applied_revision,
                    "connected_unix_ms": s.connected_unix_ms,
                    "last_update_unix_ms": s.last_update_unix_ms,
                    "watches": s.watches,
                    "status": if behind == 0 { "SYNCED" } else { "STALE" },
                    "behind": behind,
                })
            })
            .collect();
        print_json(&json!({
            "revision": revision,
            "sidecars": rows,
            "unreachable": response.unreachable,
        }))?;
    } else {
        let mut text = format!("revision: {revision}\n");
        let mut table = Table::new(&["NAME", "IDENTITY", "NODE", "INSTANCE", "APPLIED", "STATUS"]);
        for s in &sidecars {
            table.row(vec![
                cell(&s.sidecar_name),
                cell(&s.spiffe_id),
                s.node_id.to_string(),
                cell(&s.instance_key),
                s.applied_revision.to_string(),
                status_text(behind(s, revision)),
            ]);
        }
        text.push_str(&table.render());
        write_stdout(text.as_bytes())?;
        for u in &response.unreachable {
            print_line(&warning_line(u))?;
        }
    }

    match response.unreachable.len() {
        0 => Ok(()),
        n => Err(CliError::new(
            exit::DEGRADED,
            format!(
                "{what}: {n} member{} could not be asked; the list may be incomplete \
                 (endpoint {})",
                if n == 1 { "" } else { "s" },
                answer.endpoint
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_states() {
        let s = SidecarStatus {
            applied_revision: 7,
            ..SidecarStatus::default()
        };
        assert_eq!(status_text(behind(&s, 7)), "SYNCED");
        assert_eq!(status_text(behind(&s, 5)), "SYNCED");
        assert_eq!(status_text(behind(&s, 10)), "STALE (3 behind)");
    }

    #[test]
    fn warnings_name_the_node() {
        assert_eq!(
            warning_line("node 2: connection refused"),
            "warning: node 2: connection refused"
        );
        assert_eq!(
            warning_line("3 (127.0.0.1:1): timeout"),
            "warning: node 3 (127.0.0.1:1): timeout"
        );
    }
}
