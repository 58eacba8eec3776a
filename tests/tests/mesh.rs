//! Mesh resources and leases on a real three-node `trellisd` cluster:
//! atomic multi-document apply (one revision, all or nothing), validation
//! messages that name the document and the field, the round trip of a
//! resource through the store, and leases — expiry deletes the instances
//! registered under a lease through a committed entry that watchers see,
//! while keepalives carry a lease across a leader failover.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tonic::Code;
use trellis_proto::admin::{
    apply_result::Action, event, ApplyRequest, ApplyResponse, LeaseGrantRequest,
    LeaseKeepAliveRequest, ResourceDeleteRequest, ResourceGetRequest, ResourceListRequest,
    SourceDocument, WatchRequest, WatchResponse,
};
use trellis_tests::Cluster;

const STREAM_TIMEOUT: Duration = Duration::from_secs(20);

const RATINGS: &str = r#"
apiVersion: trellis/v1
kind: Service
metadata: {name: ratings}
spec:
  ports: [{name: http, port: 9080, protocol: http}]
---
apiVersion: trellis/v1
kind: DestinationPolicy
metadata: {name: ratings}
spec:
  host: ratings
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
"#;

fn route(name: &str, v1: u32, v2: u32) -> String {
    format!(
        r#"
apiVersion: trellis/v1
kind: Route
metadata: {{name: {name}}}
spec:
  hosts: [ratings]
  http:
    - route:
        - destination: {{service: ratings, subset: v1}}
          weight: {v1}
        - destination: {{service: ratings, subset: v2}}
          weight: {v2}
"#
    )
}

fn doc(source: &str, content: &str) -> SourceDocument {
    SourceDocument {
        source: source.into(),
        content: content.into(),
    }
}

async fn apply(
    c: &Cluster,
    node: u64,
    documents: Vec<SourceDocument>,
    dry_run: bool,
    expected_revision: Option<u64>,
) -> std::result::Result<ApplyResponse, tonic::Status> {
    c.resources_client(node)
        .apply(ApplyRequest {
            documents,
            dry_run,
            expected_revision,
            lease: 0,
        })
        .await
        .map(|r| r.into_inner())
}

fn actions(r: &ApplyResponse) -> Vec<(String, Action)> {
    r.results
        .iter()
        .map(|x| {
            (
                format!("{} {}/{}", x.kind, x.namespace, x.name),
                Action::try_from(x.action).unwrap_or(Action::Unchanged),
            )
        })
        .collect()
}

async fn get_route_json(c: &Cluster, node: u64, name: &str) -> Result<Option<(Vec<u8>, u64)>> {
    match c
        .resources_client(node)
        .get(ResourceGetRequest {
            kind: "routes".into(),
            namespace: String::new(),
            name: name.into(),
            serializable: false,
        })
        .await
    {
        Ok(r) => {
            let res = r.into_inner().resource.context("no resource")?;
            Ok(Some((res.json, res.mod_revision)))
        }
        Err(s) if s.code() == Code::NotFound => Ok(None),
        Err(s) => Err(s.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_is_atomic_validated_and_round_trips() -> Result<()> {
    let c = Cluster::start(3).await?;
    let leader = c.leader().await?;
    let follower = c
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .context("no follower")?;

    // A set of three documents from two files: one revision for all.
    let canary = route("ratings", 90, 10);
    let first = apply(
        &c,
        follower,
        vec![doc("ratings.yaml", RATINGS), doc("route.yaml", &canary)],
        false,
        None,
    )
    .await?;
    ensure!(first.revision > 0);
    assert_eq!(
        actions(&first),
        vec![
            ("Service default/ratings".to_string(), Action::Created),
            (
                "DestinationPolicy default/ratings".to_string(),
                Action::Created
            ),
            ("Route default/ratings".to_string(), Action::Created),
        ]
    );
    assert!(first
        .results
        .iter()
        .all(|r| r.mod_revision == first.revision));

    // The stored form is the canonical JSON of the parsed document, and it
    // parses back to the same resource (round trip through the store).
    let (json, rev) = get_route_json(&c, leader, "ratings")
        .await?
        .context("route missing")?;
    assert_eq!(rev, first.revision);
    let parsed = trellis_resources::parse_documents("route.yaml", &canary)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(json, parsed[0].to_json());
    assert_eq!(
        trellis_resources::Resource::from_json(&json).map_err(|e| anyhow::anyhow!("{e}"))?,
        parsed[0]
    );

    // Applying the same set again changes nothing and spends no revision.
    let again = apply(
        &c,
        leader,
        vec![doc("ratings.yaml", RATINGS), doc("route.yaml", &canary)],
        false,
        None,
    )
    .await?;
    assert_eq!(again.revision, 0);
    assert!(actions(&again).iter().all(|(_, a)| *a == Action::Unchanged));

    // A bad document in the middle: nothing of the set is applied, and the
    // error names the file, the resource, the field and the problem.
    let before = c.status(leader).await?.revision;
    let err = apply(
        &c,
        follower,
        vec![
            doc("route.yaml", &route("ratings", 50, 50)),
            doc("bad.yaml", &route("broken", 90, 9)),
            doc("ratings.yaml", RATINGS),
        ],
        false,
        None,
    )
    .await
    .expect_err("a bad document must fail the apply");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let msg = err.message();
    assert!(
        msg.contains("bad.yaml")
            && msg.contains("Route default/broken")
            && msg.contains("spec.http[0].route")
            && msg.contains("99"),
        "{msg}"
    );
    assert_eq!(c.status(leader).await?.revision, before);
    assert_eq!(
        get_route_json(&c, leader, "ratings").await?.map(|x| x.1),
        Some(first.revision)
    );
    assert_eq!(get_route_json(&c, leader, "broken").await?, None);

    // A subset the destination's policy does not define.
    let missing = route("ratings", 100, 0).replace("subset: v2", "subset: v9");
    let err = apply(&c, leader, vec![doc("missing.yaml", &missing)], false, None)
        .await
        .expect_err("an unknown subset must fail");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("v9") && err.message().contains("missing.yaml"),
        "{}",
        err.message()
    );

    // Dry run: reports the change, commits nothing.
    let dry = apply(
        &c,
        follower,
        vec![doc("route.yaml", &route("ratings", 50, 50))],
        true,
        None,
    )
    .await?;
    assert_eq!(
        actions(&dry),
        vec![("Route default/ratings".to_string(), Action::Configured)]
    );
    assert_eq!(dry.revision, 0);
    assert_eq!(c.status(leader).await?.revision, before);

    // Optimistic concurrency: a set read at an old revision is refused
    // once one of its resources changed after it.
    let changed = apply(
        &c,
        leader,
        vec![doc("route.yaml", &route("ratings", 50, 50))],
        false,
        None,
    )
    .await?;
    let stale = apply(
        &c,
        follower,
        vec![doc("route.yaml", &route("ratings", 10, 90))],
        false,
        Some(changed.revision - 1),
    )
    .await
    .expect_err("stale expected revision");
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    apply(
        &c,
        follower,
        vec![doc("route.yaml", &route("ratings", 10, 90))],
        false,
        Some(changed.revision),
    )
    .await?;

    // A host has one Route: a second one for `ratings` is refused, naming
    // the Route that holds it.
    let err = apply(
        &c,
        follower,
        vec![doc("ab.yaml", &route("ratings-ab", 50, 50))],
        false,
        None,
    )
    .await
    .expect_err("a second route for the same host");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("ab.yaml: Route default/ratings-ab: spec.hosts[0]")
            && err
                .message()
                .contains("already routed by Route default/ratings"),
        "{}",
        err.message()
    );

    // List and delete.
    let listed = c
        .resources_client(follower)
        .list(ResourceListRequest {
            kind: "Route".into(),
            namespace: String::new(),
            serializable: false,
        })
        .await?
        .into_inner();
    assert_eq!(listed.resources.len(), 1);
    let deleted = c
        .resources_client(follower)
        .delete(ResourceDeleteRequest {
            kind: "rt".into(),
            namespace: "default".into(),
            name: "ratings".into(),
            expected_mod_revision: None,
        })
        .await?
        .into_inner();
    assert!(deleted.deleted);
    assert_eq!(get_route_json(&c, leader, "ratings").await?, None);
    Ok(())
}

fn instance(name: &str, version: &str) -> String {
    format!(
        r#"
apiVersion: trellis/v1
kind: Instance
metadata: {{name: {name}}}
spec:
  service: ratings
  address: 127.0.0.1
  port: 9080
  labels: {{version: {version}}}
"#
    )
}

async fn register(c: &Cluster, node: u64, lease: u64, names: &[&str]) -> Result<u64> {
    let documents = names
        .iter()
        .map(|n| doc(&format!("{n}.yaml"), &instance(n, "v1")))
        .collect();
    let r = c
        .resources_client(node)
        .apply(ApplyRequest {
            documents,
            dry_run: false,
            expected_revision: None,
            lease,
        })
        .await?
        .into_inner();
    Ok(r.revision)
}

async fn watch_instances(
    c: &Cluster,
    node: u64,
    after: u64,
) -> Result<tonic::Streaming<WatchResponse>> {
    Ok(c.kv(node)
        .watch(WatchRequest {
            prefix: "/instance/".into(),
            start_revision: after + 1,
            progress_interval_ms: 0,
        })
        .await?
        .into_inner())
}

/// The next message with events, or `None` if none came within `wait`.
async fn next_events(
    stream: &mut tonic::Streaming<WatchResponse>,
    wait: Duration,
) -> Result<Option<WatchResponse>> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => return Ok(None),
            Ok(Err(s)) => bail!("watch failed: {s}"),
            Ok(Ok(None)) => bail!("watch ended"),
            Ok(Ok(Some(m))) if m.events.is_empty() => continue,
            Ok(Ok(Some(m))) => return Ok(Some(m)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_deletes_its_instances_in_one_committed_revision() -> Result<()> {
    let c = Cluster::start(3).await?;
    let leader = c.leader().await?;
    let follower = c
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .context("no follower")?;
    let lease = c
        .lease_client(follower)
        .grant(LeaseGrantRequest {
            ttl_ms: 1_500,
            id: 0,
        })
        .await?
        .into_inner();
    let registered = register(&c, follower, lease.id, &["ratings-a", "ratings-b"]).await?;
    let mut watch = watch_instances(&c, follower, registered).await?;
    // No keepalives: the leader revokes the lease after its TTL.
    let m = next_events(&mut watch, STREAM_TIMEOUT)
        .await?
        .context("no delete event after the lease's TTL")?;
    let mut keys: Vec<(i32, String)> = m
        .events
        .iter()
        .map(|e| {
            (
                e.r#type,
                e.kv.as_ref().map(|kv| kv.key.clone()).unwrap_or_default(),
            )
        })
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            (
                event::EventType::Delete as i32,
                "/instance/default/ratings-a".to_string()
            ),
            (
                event::EventType::Delete as i32,
                "/instance/default/ratings-b".to_string()
            ),
        ],
        "both instances go in one revision"
    );
    let gone = c
        .lease_client(leader)
        .keep_alive(LeaseKeepAliveRequest { id: lease.id })
        .await
        .expect_err("the lease is gone");
    assert_eq!(gone.code(), Code::NotFound);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_carry_a_lease_across_a_leader_failover() -> Result<()> {
    const TTL: Duration = Duration::from_millis(2_000);
    let mut c = Cluster::start(3).await?;
    let old_leader = c.leader().await?;
    let survivors: Vec<u64> = c.ids().into_iter().filter(|id| *id != old_leader).collect();
    let lease = c
        .lease_client(survivors[0])
        .grant(LeaseGrantRequest {
            ttl_ms: TTL.as_millis() as u64,
            id: 0,
        })
        .await?
        .into_inner();
    let registered = register(&c, survivors[0], lease.id, &["ratings-a"]).await?;
    let mut watch = watch_instances(&c, survivors[1], registered).await?;

    // A holder that keeps the lease alive through whichever node answers.
    let clients: Vec<_> = survivors.iter().map(|id| c.lease_client(*id)).collect();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let keeper = tokio::spawn(async move {
        let mut i = 0usize;
        let mut tick = tokio::time::interval(TTL / 5);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop_rx.changed() => return Ok::<(), anyhow::Error>(()),
            }
            let mut client = clients[i % clients.len()].clone();
            match client
                .keep_alive(LeaseKeepAliveRequest { id: lease.id })
                .await
            {
                Ok(_) => {}
                Err(s) if s.code() == Code::NotFound => bail!("lease lost: {s}"),
                Err(_) => i += 1, // that node cannot serve it now: try the other
            }
        }
    });

    c.kill(old_leader).await?;
    let new_leader = c.leader().await?;
    ensure!(new_leader != old_leader);
    // Three TTLs under the new leader with keepalives: no delete.
    if let Some(m) = next_events(&mut watch, 3 * TTL).await? {
        bail!("instance changed while its lease was kept alive: {m:?}");
    }
    stop_tx.send(true)?;
    keeper.await??;
    // Once keepalives stop, the new leader expires the lease.
    let m = next_events(&mut watch, STREAM_TIMEOUT)
        .await?
        .context("no delete after keepalives stopped")?;
    assert_eq!(m.events.len(), 1);
    assert_eq!(m.events[0].r#type, event::EventType::Delete as i32);
    Ok(())
}
