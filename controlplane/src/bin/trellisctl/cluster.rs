//! Cluster commands: `cluster init|status|snapshot`, `member list|add|remove`
//! and `leader transfer`.
//!
//! `cluster status` and `cluster snapshot` learn the membership from any
//! endpoint, then ask every member directly at its admin address;
//! `cluster init` asks every `--endpoints` node for its identity, initializes
//! the first and adds the others through it, then (`--ca-dir`) loads the CA.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};
use trellis_proto::admin::cluster_client::ClusterClient;
use trellis_proto::admin::{
    AddMemberRequest, InitializeRequest, Member, RemoveMemberRequest, SnapshotRequest,
    SnapshotResponse, StatusRequest, StatusResponse, TransferLeaderRequest,
};

use crate::args::{ClusterInitArgs, LeaderTransferArgs, MemberAddArgs, MemberRemoveArgs};
use crate::client::{endpoint_uri, hostport, keep_telling, with_deadline, Failure};
use crate::commands::Ctx;
use crate::error::{exit, CliError};
use crate::identity::{self, CaFiles};
use crate::output::{human_bytes, member_json, note, print_json, print_line, write_stdout, Table};

/// How often `cluster init` retries an `AddMember` that found no leader yet.
const ADD_MEMBER_ATTEMPTS: usize = 10;
const ADD_MEMBER_BACKOFF: Duration = Duration::from_millis(300);

/// A node to ask directly: a member (id known) or a bare endpoint.
struct Target {
    node_id: Option<u64>,
    admin: String,
    raft: String,
    voter: Option<bool>,
}

async fn status_at(ctx: &Ctx, endpoint: &str) -> Result<StatusResponse, Failure> {
    if endpoint.trim().is_empty() {
        return Err(Failure::Connect("the member has no admin address".into()));
    }
    ctx.client
        .call_at(endpoint, |channel, deadline| {
            let request = with_deadline(StatusRequest {}, deadline);
            async move { ClusterClient::new(channel).status(request).await }
        })
        .await
}

async fn snapshot_at(ctx: &Ctx, endpoint: &str) -> Result<SnapshotResponse, Failure> {
    if endpoint.trim().is_empty() {
        return Err(Failure::Connect("the member has no admin address".into()));
    }
    ctx.client
        .call_at(endpoint, |channel, deadline| {
            let request = with_deadline(SnapshotRequest {}, deadline);
            async move { ClusterClient::new(channel).snapshot(request).await }
        })
        .await
}

/// The nodes to ask: the members known to the first endpoint that answers
/// as part of an initialized cluster, else (only fresh nodes answered) the
/// endpoints themselves.
async fn targets(ctx: &Ctx, what: &str) -> Result<Vec<Target>, CliError> {
    let mut last = None;
    let mut fresh_answered = false;
    for endpoint in ctx.client.endpoints() {
        match status_at(ctx, endpoint).await {
            Ok(status) if !status.members.is_empty() => {
                let mut members = status.members;
                members.sort_by_key(|m| m.node_id);
                return Ok(members
                    .into_iter()
                    .map(|m| Target {
                        node_id: Some(m.node_id),
                        admin: m.admin_addr,
                        raft: m.raft_addr,
                        voter: Some(m.voter),
                    })
                    .collect());
            }
            Ok(_) => fresh_answered = true,
            Err(f) if f.retryable() => keep_telling(&mut last, f, endpoint),
            Err(f) => return Err(f.into_error(what, endpoint)),
        }
    }
    if fresh_answered {
        note(&format!(
            "{what}: no endpoint reports members (not initialized?); showing the endpoints"
        ));
        return Ok(ctx
            .client
            .endpoints()
            .iter()
            .map(|e| Target {
                node_id: None,
                admin: e.clone(),
                raft: String::new(),
                voter: None,
            })
            .collect());
    }
    Err(ctx.client.all_failed(what, last))
}

/// A node's role for people, from its Raft state and the leader it knows.
pub fn role(state: &str, node_id: u64, leader_id: u64, voter: Option<bool>) -> String {
    let state = state.to_ascii_lowercase();
    if (leader_id != 0 && leader_id == node_id) || state == "leader" {
        "leader".into()
    } else if state.contains("learner") || voter == Some(false) {
        "learner".into()
    } else if state.contains("candidate") {
        "candidate".into()
    } else if state.contains("follower") {
        "follower".into()
    } else if state.is_empty() {
        "unknown".into()
    } else {
        state
    }
}

fn id_cell(id: Option<u64>) -> String {
    id.map_or_else(|| "-".into(), |id| id.to_string())
}

pub async fn status(ctx: &Ctx) -> Result<(), CliError> {
    let what = "cluster status";
    let targets = targets(ctx, what).await?;
    let results = join_all(targets.iter().map(|t| status_at(ctx, &t.admin))).await;
    let total = targets.len();
    let answered = results.iter().filter(|r| r.is_ok()).count();

    if ctx.json() {
        let rows: Vec<Value> = targets
            .iter()
            .zip(&results)
            .map(|(t, r)| match r {
                Ok(s) => json!({
                    "node_id": s.node_id,
                    "admin_addr": t.admin,
                    "raft_addr": if s.raft_addr.is_empty() { &t.raft } else { &s.raft_addr },
                    "voter": t.voter,
                    "reachable": true,
                    "role": role(&s.state, s.node_id, s.leader_id, t.voter),
                    "state": s.state,
                    "leader_id": s.leader_id,
                    "term": s.term,
                    "last_log_index": s.last_log_index,
                    "commit_index": s.commit_index,
                    "applied_index": s.applied_index,
                    "revision": s.revision,
                    "compact_revision": s.compact_revision,
                    "snapshot_index": s.snapshot_index,
                    "purged_index": s.purged_index,
                    "db_size_bytes": s.db_size_bytes,
                    "initialized": s.initialized,
                }),
                Err(f) => json!({
                    "node_id": t.node_id,
                    "admin_addr": t.admin,
                    "raft_addr": t.raft,
                    "voter": t.voter,
                    "reachable": false,
                    "error": f.message(),
                }),
            })
            .collect();
        print_json(&json!({ "members": rows, "reachable": answered, "total": total }))?;
    } else {
        let mut table = Table::new(&[
            "ID", "ADMIN", "RAFT", "ROLE", "TERM", "LAST-LOG", "COMMIT", "APPLIED", "REVISION",
            "DB-SIZE",
        ]);
        for (t, r) in targets.iter().zip(&results) {
            match r {
                Ok(s) => table.row(vec![
                    s.node_id.to_string(),
                    t.admin.clone(),
                    if s.raft_addr.is_empty() {
                        t.raft.clone()
                    } else {
                        s.raft_addr.clone()
                    },
                    role(&s.state, s.node_id, s.leader_id, t.voter),
                    s.term.to_string(),
                    s.last_log_index.to_string(),
                    s.commit_index.to_string(),
                    s.applied_index.to_string(),
                    s.revision.to_string(),
                    human_bytes(s.db_size_bytes),
                ]),
                Err(f) => table.note_row(
                    vec![id_cell(t.node_id), t.admin.clone(), t.raft.clone()],
                    format!("unreachable: {}", f.message()),
                ),
            }
        }
        write_stdout(table.render().as_bytes())?;
    }

    for (t, r) in targets.iter().zip(&results) {
        if let (Some(id), Ok(s)) = (t.node_id, r) {
            if s.node_id != id {
                note(&format!(
                    "{what}: member {id} is listed at {} but node {} answered there",
                    t.admin, s.node_id
                ));
            }
        }
    }
    let leaders: HashSet<u64> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|s| s.leader_id)
        .filter(|&id| id != 0)
        .collect();
    if answered > 0 && leaders.is_empty() {
        note(&format!("{what}: no member knows a leader"));
    } else if leaders.len() > 1 {
        let mut ids: Vec<u64> = leaders.into_iter().collect();
        ids.sort_unstable();
        note(&format!("{what}: members disagree on the leader: {ids:?}"));
    }

    if answered == total {
        Ok(())
    } else if answered == 0 {
        Err(CliError::new(
            exit::UNAVAILABLE,
            format!("{what}: none of the {total} members answered"),
        ))
    } else {
        let down: Vec<String> = targets
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_err())
            .map(|(t, _)| match t.node_id {
                Some(id) => format!("{id} ({})", t.admin),
                None => t.admin.clone(),
            })
            .collect();
        Err(CliError::new(
            exit::DEGRADED,
            format!(
                "{what}: {} of {total} members unreachable: {}",
                total - answered,
                down.join(", ")
            ),
        ))
    }
}

pub async fn snapshot(ctx: &Ctx) -> Result<(), CliError> {
    let what = "cluster snapshot";
    let targets = targets(ctx, what).await?;
    let results = join_all(targets.iter().map(|t| snapshot_at(ctx, &t.admin))).await;
    if ctx.json() {
        let rows: Vec<Value> = targets
            .iter()
            .zip(&results)
            .map(|(t, r)| match r {
                Ok(s) => json!({
                    "node_id": s.node_id,
                    "admin_addr": t.admin,
                    "ok": true,
                    "snapshot_index": s.snapshot_index,
                    "purged_index": s.purged_index,
                }),
                Err(f) => json!({
                    "node_id": t.node_id,
                    "admin_addr": t.admin,
                    "ok": false,
                    "error": f.message(),
                }),
            })
            .collect();
        print_json(&json!({ "members": rows }))?;
    } else {
        let mut table = Table::new(&["NODE", "ADMIN", "SNAPSHOT-INDEX", "PURGED-INDEX"]);
        for (t, r) in targets.iter().zip(&results) {
            match r {
                Ok(s) => table.row(vec![
                    s.node_id.to_string(),
                    t.admin.clone(),
                    s.snapshot_index.to_string(),
                    s.purged_index.to_string(),
                ]),
                Err(f) => table.note_row(
                    vec![id_cell(t.node_id), t.admin.clone()],
                    format!("failed: {}", f.message()),
                ),
            }
        }
        write_stdout(table.render().as_bytes())?;
    }
    let failed: Vec<(&Target, &Failure)> = targets
        .iter()
        .zip(&results)
        .filter_map(|(t, r)| r.as_ref().err().map(|f| (t, f)))
        .collect();
    match failed.first() {
        None => Ok(()),
        Some((t, f)) => Err(CliError::new(
            f.exit_code(),
            format!(
                "{what}: {} of {} members failed; first: node {}: {} (endpoint {})",
                failed.len(),
                targets.len(),
                id_cell(t.node_id),
                f.message(),
                t.admin
            ),
        )),
    }
}

/// The member table (`ID ROLE RAFT ADMIN`), or a JSON document with
/// `members` (plus `extra` fields).
fn print_members(
    ctx: &Ctx,
    members: &[Member],
    leader_id: Option<u64>,
    extra: Value,
) -> Result<(), CliError> {
    let mut members = members.to_vec();
    members.sort_by_key(|m| m.node_id);
    if ctx.json() {
        let mut doc = match extra {
            Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        if let Some(leader) = leader_id {
            doc.insert("leader_id".into(), json!(leader));
        }
        doc.insert(
            "members".into(),
            Value::Array(members.iter().map(member_json).collect()),
        );
        return print_json(&Value::Object(doc));
    }
    let mut table = Table::new(&["ID", "ROLE", "RAFT", "ADMIN"]);
    for m in &members {
        let mut role = if m.voter { "voter" } else { "learner" }.to_string();
        if leader_id.is_some_and(|l| l != 0 && l == m.node_id) {
            role.push_str(" (leader)");
        }
        table.row(vec![
            m.node_id.to_string(),
            role,
            m.raft_addr.clone(),
            m.admin_addr.clone(),
        ]);
    }
    write_stdout(table.render().as_bytes())
}

/// `reported` unless it is empty or a wildcard (0.0.0.0, [::]); then the
/// host the user reached the node at, with the reported port.
fn concrete_addr(reported: &str, endpoint: &str) -> String {
    let endpoint_host = endpoint_uri(endpoint)
        .parse::<tonic::transport::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_string));
    let endpoint_hostport = hostport(endpoint).to_string();
    if reported.trim().is_empty() {
        return endpoint_hostport;
    }
    match (reported.parse::<SocketAddr>(), endpoint_host) {
        (Ok(addr), Some(host)) if addr.ip().is_unspecified() => format!("{host}:{}", addr.port()),
        _ => reported.to_string(),
    }
}

/// What `cluster init` did before the CA step.
struct Formed {
    /// The node Initialize went to (or, already initialized, the first).
    endpoint: String,
    members: Vec<Member>,
    leader_id: Option<u64>,
    already_initialized: bool,
}

pub async fn init(ctx: &Ctx, args: ClusterInitArgs) -> Result<(), CliError> {
    let what = "cluster init";
    // Check the CA files before changing anything.
    let ca = identity::read_init_ca(args.ca_dir.as_ref())?;
    let formed = form(ctx, what).await?;
    let mut extra = serde_json::Map::new();
    extra.insert(
        "already_initialized".into(),
        json!(formed.already_initialized),
    );
    if let Some(files) = &ca {
        let response = load_ca_after_init(ctx, what, &formed.endpoint, files).await?;
        note(&format!("{what}: {}", identity::load_ca_summary(&response)));
        extra.insert("trust_domain".into(), json!(response.trust_domain));
        extra.insert("ca_loaded".into(), json!(response.loaded));
    }
    print_members(ctx, &formed.members, formed.leader_id, Value::Object(extra))
}

/// `LoadCa` right after the cluster formed: through the node that was
/// initialized, retrying while it has no leader yet.
async fn load_ca_after_init(
    ctx: &Ctx,
    what: &str,
    endpoint: &str,
    files: &CaFiles,
) -> Result<trellis_proto::admin::LoadCaResponse, CliError> {
    use trellis_proto::admin::identity_client::IdentityClient;
    use trellis_proto::admin::LoadCaRequest;
    let step = format!("{what}: loading the CA");
    let request = LoadCaRequest {
        cert_pem: files.cert_pem.clone(),
        key_pem: files.key_pem.clone(),
    };
    if !ctx.client.tls() {
        note(&format!(
            "{what}: sending the CA key without TLS (no --ca-file); do this only on a \
             trusted network"
        ));
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = ctx
            .client
            .call_at(endpoint, |channel, deadline| {
                let request = with_deadline(request.clone(), deadline);
                async move { IdentityClient::new(channel).load_ca(request).await }
            })
            .await;
        match result {
            Ok(response) => return Ok(response),
            // LoadCa is idempotent (the same CA again changes nothing).
            Err(f) if f.retryable() && attempt < ADD_MEMBER_ATTEMPTS => {
                tokio::time::sleep(ADD_MEMBER_BACKOFF).await;
            }
            Err(f) => return Err(f.into_error(&step, endpoint)),
        }
    }
}

/// The steps of `cluster init` before the CA: Initialize the first node and
/// add the others, or nothing if they already form one cluster.
async fn form(ctx: &Ctx, what: &str) -> Result<Formed, CliError> {
    let endpoints = ctx.client.endpoints().to_vec();
    if endpoints.is_empty() {
        return Err(CliError::new(
            exit::USAGE,
            format!("{what}: no endpoints given"),
        ));
    }
    let results = join_all(endpoints.iter().map(|e| status_at(ctx, e))).await;
    let mut nodes: Vec<(String, StatusResponse)> = Vec::with_capacity(endpoints.len());
    for (endpoint, result) in endpoints.iter().zip(results) {
        match result {
            Ok(status) => nodes.push((endpoint.clone(), status)),
            Err(f) => {
                return Err(f.into_error(&format!("{what}: asking for the node's status"), endpoint))
            }
        }
    }

    let mut seen: HashMap<u64, &str> = HashMap::new();
    for (endpoint, status) in &nodes {
        if let Some(other) = seen.insert(status.node_id, endpoint) {
            return Err(CliError::new(
                exit::USAGE,
                format!(
                    "{what}: {other} and {endpoint} are both node {} (each node needs its own --id)",
                    status.node_id
                ),
            ));
        }
    }

    let Some((first_endpoint, first)) = nodes.first() else {
        return Err(CliError::new(
            exit::USAGE,
            format!("{what}: no endpoints given"),
        ));
    };
    let initialized: Vec<&(String, StatusResponse)> =
        nodes.iter().filter(|(_, s)| s.initialized).collect();
    if initialized.len() == nodes.len() {
        let ids: HashSet<u64> = first.members.iter().map(|m| m.node_id).collect();
        let same_cluster = nodes.iter().all(|(_, s)| {
            ids.contains(&s.node_id) && s.members.iter().any(|m| m.node_id == first.node_id)
        });
        if !same_cluster {
            return Err(CliError::new(
                exit::USAGE,
                format!(
                    "{what}: refusing: the nodes are already initialized but do not form one \
                     cluster ({})",
                    describe_nodes(&nodes)
                ),
            ));
        }
        note(&format!(
            "{what}: the cluster is already initialized; nothing to do"
        ));
        return Ok(Formed {
            endpoint: first_endpoint.clone(),
            members: first.members.clone(),
            leader_id: Some(first.leader_id),
            already_initialized: true,
        });
    }
    if !initialized.is_empty() {
        return Err(CliError::new(
            exit::USAGE,
            format!(
                "{what}: refusing: {} already initialized ({}); add fresh nodes with \
                 `trellisctl member add` instead",
                if initialized.len() == 1 {
                    "a node is"
                } else {
                    "some nodes are"
                },
                initialized
                    .iter()
                    .map(|(e, s)| format!("node {} at {e}", s.node_id))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }

    // Work out every joiner's addresses before changing anything.
    let mut joiners = Vec::with_capacity(nodes.len().saturating_sub(1));
    for (endpoint, status) in nodes.iter().skip(1) {
        if status.raft_addr.trim().is_empty() {
            return Err(CliError::new(
                exit::OTHER,
                format!(
                    "{what}: node {} at {endpoint} reports no Raft address",
                    status.node_id
                ),
            ));
        }
        joiners.push(AddMemberRequest {
            node_id: status.node_id,
            raft_addr: concrete_addr(&status.raft_addr, endpoint),
            admin_addr: concrete_addr(&status.admin_addr, endpoint),
            learner: false,
        });
    }

    let initialized = ctx
        .client
        .call_at(first_endpoint, |channel, deadline| {
            let request = with_deadline(InitializeRequest {}, deadline);
            async move { ClusterClient::new(channel).initialize(request).await }
        })
        .await
        .map_err(|f| {
            f.into_error(
                &format!("{what}: initializing node {}", first.node_id),
                first_endpoint,
            )
        })?;
    note(&format!(
        "{what}: initialized node {} at {first_endpoint}",
        first.node_id
    ));
    let mut members: Vec<Member> = initialized.member.into_iter().collect();

    for joiner in joiners {
        let step = format!("{what}: adding node {}", joiner.node_id);
        let mut attempt = 0;
        let response = loop {
            attempt += 1;
            let result = ctx
                .client
                .call_at(first_endpoint, |channel, deadline| {
                    let request = with_deadline(joiner.clone(), deadline);
                    async move { ClusterClient::new(channel).add_member(request).await }
                })
                .await;
            match result {
                Ok(response) => break response,
                // Right after Initialize the node may still be electing itself.
                Err(f) if f.retryable() && attempt < ADD_MEMBER_ATTEMPTS => {
                    tokio::time::sleep(ADD_MEMBER_BACKOFF).await;
                }
                Err(f) => return Err(f.into_error(&step, first_endpoint)),
            }
        };
        members = response.members;
        note(&format!(
            "{what}: added node {} (raft {}, admin {})",
            joiner.node_id, joiner.raft_addr, joiner.admin_addr
        ));
    }
    Ok(Formed {
        endpoint: first_endpoint.clone(),
        members,
        leader_id: None,
        already_initialized: false,
    })
}

fn describe_nodes(nodes: &[(String, StatusResponse)]) -> String {
    nodes
        .iter()
        .map(|(e, s)| {
            let mut ids: Vec<u64> = s.members.iter().map(|m| m.node_id).collect();
            ids.sort_unstable();
            format!("node {} at {e} has members {ids:?}", s.node_id)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

pub async fn member_list(ctx: &Ctx) -> Result<(), CliError> {
    let what = "member list";
    let answer = ctx
        .client
        .unary(what, |channel, deadline| {
            let request = with_deadline(StatusRequest {}, deadline);
            async move { ClusterClient::new(channel).status(request).await }
        })
        .await?;
    let status = answer.value;
    if !status.initialized && status.members.is_empty() {
        return Err(CliError::new(
            exit::OTHER,
            format!(
                "{what}: node {} is not initialized; run `trellisctl cluster init` (endpoint {})",
                status.node_id, answer.endpoint
            ),
        ));
    }
    print_members(ctx, &status.members, Some(status.leader_id), json!({}))
}

pub async fn member_add(ctx: &Ctx, args: MemberAddArgs) -> Result<(), CliError> {
    let what = format!("member add {}", args.id);
    let request = AddMemberRequest {
        node_id: args.id,
        raft_addr: args.raft_addr,
        admin_addr: args.admin_addr,
        learner: args.learner,
    };
    let answer = ctx
        .client
        .unary_write(&what, |channel, deadline| {
            let request = with_deadline(request.clone(), deadline);
            async move { ClusterClient::new(channel).add_member(request).await }
        })
        .await?;
    print_members(ctx, &answer.value.members, None, json!({}))
}

pub async fn member_remove(ctx: &Ctx, args: MemberRemoveArgs) -> Result<(), CliError> {
    let what = format!("member remove {}", args.id);
    let request = RemoveMemberRequest { node_id: args.id };
    let answer = ctx
        .client
        .unary_write(&what, |channel, deadline| {
            let request = with_deadline(request, deadline);
            async move { ClusterClient::new(channel).remove_member(request).await }
        })
        .await?;
    print_members(ctx, &answer.value.members, None, json!({}))
}

pub async fn leader_transfer(ctx: &Ctx, args: LeaderTransferArgs) -> Result<(), CliError> {
    let what = format!("leader transfer to {}", args.to);
    let request = TransferLeaderRequest { node_id: args.to };
    let answer = ctx
        .client
        .unary_write(&what, |channel, deadline| {
            let request = with_deadline(request, deadline);
            async move { ClusterClient::new(channel).transfer_leader(request).await }
        })
        .await?;
    let leader = answer.value.leader_id;
    if ctx.json() {
        print_json(&json!({ "requested": args.to, "leader_id": leader }))?;
    } else if leader == 0 {
        print_line(&format!(
            "transfer to node {} requested; no leader known yet",
            args.to
        ))?;
    } else {
        print_line(&format!("leader is node {leader}"))?;
    }
    if leader != 0 && leader != args.to {
        return Err(CliError::new(
            exit::OTHER,
            format!(
                "{what}: node {leader} is leader instead (endpoint {})",
                answer.endpoint
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles() {
        assert_eq!(role("Leader", 1, 1, Some(true)), "leader");
        assert_eq!(role("Follower", 1, 1, Some(true)), "leader");
        assert_eq!(role("Follower", 2, 1, Some(true)), "follower");
        assert_eq!(role("Learner", 4, 1, Some(false)), "learner");
        assert_eq!(role("Follower", 4, 1, Some(false)), "learner");
        assert_eq!(role("Candidate", 3, 0, None), "candidate");
        assert_eq!(role("Shutdown", 3, 0, None), "shutdown");
        assert_eq!(role("", 3, 0, None), "unknown");
    }

    #[test]
    fn wildcard_addresses_take_the_endpoint_host() {
        assert_eq!(
            concrete_addr("0.0.0.0:7380", "10.0.0.5:7379"),
            "10.0.0.5:7380"
        );
        assert_eq!(
            concrete_addr("[::]:7380", "http://node-2:7379"),
            "node-2:7380"
        );
        assert_eq!(
            concrete_addr("10.0.0.9:7380", "node-2:7379"),
            "10.0.0.9:7380"
        );
        assert_eq!(concrete_addr("node-2:7380", "x:1"), "node-2:7380");
        assert_eq!(concrete_addr("", "http://node-2:7379"), "node-2:7379");
        assert_eq!(concrete_addr("0.0.0.0:7380", "[::1]:7379"), "[::1]:7380");
    }
}
