//! End-to-end behaviour of a real three-node `trellisd` cluster on loopback:
//! forwarding and linearizable reads, compare-and-set, transactions, watch
//! history, leader failure (and its prompt detection), full restart, snapshot catch-up of a wiped
//! node, membership changes and input validation.
//!
//! Every test starts its own cluster through `trellis_tests::Cluster` (real
//! processes, real Raft over TCP) and waits on observable state (status
//! polling, stream messages), never on fixed sleeps.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tonic::Code;
use trellis_proto::admin::{
    compare, event, txn_op, txn_op_result, CompactRequest, Compare, DeleteRequest, GetRequest,
    ListRequest, PutRequest, RemoveMemberRequest, SnapshotRequest, TxnOp, TxnRequest, WatchRequest,
    WatchResponse,
};
use trellis_tests::{Cluster, ClusterOptions};

type Kv = trellis_proto::admin::kv_client::KvClient<tonic::transport::Channel>;

const STREAM_TIMEOUT: Duration = Duration::from_secs(20);

fn put_req(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        ..Default::default()
    }
}

async fn put(kv: &mut Kv, key: &str, value: &str) -> Result<u64> {
    let resp = kv
        .put(put_req(key, value))
        .await
        .with_context(|| format!("put {key}"))?
        .into_inner();
    Ok(resp.header.context("put response without header")?.revision)
}

async fn get(kv: &mut Kv, key: &str, serializable: bool) -> Result<Option<(Vec<u8>, u64)>> {
    match kv
        .get(GetRequest {
            key: key.into(),
            serializable,
        })
        .await
    {
        Ok(r) => {
            let kv = r.into_inner().kv.context("get response without kv")?;
            Ok(Some((kv.value, kv.mod_revision)))
        }
        Err(s) if s.code() == Code::NotFound => Ok(None),
        Err(s) => Err(s).with_context(|| format!("get {key}")),
    }
}

/// Nodes other than the leader.
async fn followers(c: &Cluster) -> Result<(u64, Vec<u64>)> {
    let leader = c.leader().await?;
    Ok((
        leader,
        c.ids().into_iter().filter(|id| *id != leader).collect(),
    ))
}

/// Open a watch on node `id` for `prefix` from `start_revision`.
async fn watch_from(
    c: &Cluster,
    id: u64,
    prefix: &str,
    start_revision: u64,
) -> Result<tonic::Streaming<WatchResponse>> {
    let resp = c
        .kv(id)
        .watch(WatchRequest {
            prefix: prefix.into(),
            start_revision,
            progress_interval_ms: 0,
        })
        .await
        .with_context(|| format!("watch {prefix} from {start_revision} on node {id}"))?;
    Ok(resp.into_inner())
}

/// Read the next message of a watch stream, failing after a deadline.
async fn next_msg(stream: &mut tonic::Streaming<WatchResponse>) -> Result<WatchResponse> {
    match tokio::time::timeout(STREAM_TIMEOUT, stream.message()).await {
        Err(_) => bail!("no watch message within {STREAM_TIMEOUT:?}"),
        Ok(Err(s)) => bail!("watch stream failed: {s}"),
        Ok(Ok(None)) => bail!("watch stream ended"),
        Ok(Ok(Some(m))) => Ok(m),
    }
}

/// (revision, [(type, key)]) of every event-carrying message until
/// `last_revision` has been seen.
async fn collect_until(
    stream: &mut tonic::Streaming<WatchResponse>,
    last_revision: u64,
) -> Result<Vec<(u64, Vec<(i32, String)>)>> {
    let mut out = Vec::new();
    loop {
        let m = next_msg(stream).await?;
        ensure!(!m.compacted, "unexpected compaction notice");
        if m.events.is_empty() {
            continue;
        }
        let rev = m.header.context("watch response without header")?.revision;
        for e in &m.events {
            let kv_rev = e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
            ensure!(
                kv_rev == rev,
                "event at {kv_rev} in the response of revision {rev}"
            );
        }
        out.push((
            rev,
            m.events
                .iter()
                .map(|e| {
                    (
                        e.r#type,
                        e.kv.as_ref().map(|kv| kv.key.clone()).unwrap_or_default(),
                    )
                })
                .collect(),
        ));
        if rev >= last_revision {
            return Ok(out);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_on_follower_is_read_linearizably_on_another() -> Result<()> {
    let c = Cluster::start(3).await?;
    let (_leader, f) = followers(&c).await?;
    let rev = put(&mut c.kv(f[0]), "/a/b", "via-follower").await?;
    // Linearizable (default) read on the other follower sees it at once.
    let got = get(&mut c.kv(f[1]), "/a/b", false).await?;
    assert_eq!(got, Some((b"via-follower".to_vec(), rev)));
    // A serializable read is local; once that node applied `rev` it agrees.
    c.wait_for_revision(f[1], rev).await?;
    let got = get(&mut c.kv(f[1]), "/a/b", true).await?;
    assert_eq!(got, Some((b"via-follower".to_vec(), rev)));
    // Revisions are global and increase by one per write.
    let rev2 = put(&mut c.kv(f[1]), "/a/c", "x").await?;
    assert_eq!(rev2, rev + 1);
    // List with pagination, from the leader's state through a follower.
    for i in 0..5 {
        put(&mut c.kv(f[0]), &format!("/page/{i}"), "v").await?;
    }
    let mut keys = Vec::new();
    let mut token = String::new();
    loop {
        let resp = c
            .kv(f[1])
            .list(ListRequest {
                prefix: "/page/".into(),
                limit: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        keys.extend(resp.kvs.into_iter().map(|kv| kv.key));
        if resp.next_page_token.is_empty() {
            break;
        }
        token = resp.next_page_token;
    }
    assert_eq!(
        keys,
        (0..5).map(|i| format!("/page/{i}")).collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_conflicts_name_the_current_revision() -> Result<()> {
    let c = Cluster::start(3).await?;
    let (_, f) = followers(&c).await?;
    let mut kv = c.kv(f[0]);
    let r1 = put(&mut kv, "/cas", "1").await?;
    let err = kv
        .put(PutRequest {
            expected_mod_revision: Some(r1 + 10),
            ..put_req("/cas", "2")
        })
        .await
        .expect_err("stale CAS must fail");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .contains(&format!("current mod_revision is {r1}")),
        "{}",
        err.message()
    );
    assert_eq!(
        err.metadata()
            .get("x-trellis-current-revision")
            .and_then(|v| v.to_str().ok()),
        Some(r1.to_string().as_str())
    );
    // The right revision wins; create-only on an existing key conflicts.
    let r2 = kv
        .put(PutRequest {
            expected_mod_revision: Some(r1),
            ..put_req("/cas", "2")
        })
        .await?
        .into_inner()
        .header
        .context("header")?
        .revision;
    assert_eq!(r2, r1 + 1);
    let err = kv
        .put(PutRequest {
            expected_mod_revision: Some(0),
            ..put_req("/cas", "3")
        })
        .await
        .expect_err("create-only on an existing key");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = kv
        .delete(DeleteRequest {
            key: "/cas".into(),
            expected_mod_revision: Some(r1),
            prev_kv: false,
        })
        .await
        .expect_err("stale compare-and-delete");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        get(&mut kv, "/cas", false).await?,
        Some((b"2".to_vec(), r2))
    );
    Ok(())
}

fn op_put(key: &str, value: &str) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::Put(put_req(key, value))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_applies_all_or_nothing_at_one_revision() -> Result<()> {
    let c = Cluster::start(3).await?;
    let (_, f) = followers(&c).await?;
    let mut kv = c.kv(f[0]);
    put(&mut kv, "/t/flag", "on").await?;
    put(&mut kv, "/t/old", "x").await?;
    let value_is = |v: &str| Compare {
        key: "/t/flag".into(),
        target: compare::Target::Value as i32,
        op: compare::Op::Equal as i32,
        value: v.as_bytes().to_vec(),
        number: 0,
    };
    let resp = kv
        .txn(TxnRequest {
            compare: vec![value_is("on")],
            success: vec![
                op_put("/t/a", "1"),
                op_put("/t/b", "2"),
                TxnOp {
                    op: Some(txn_op::Op::Delete(DeleteRequest {
                        key: "/t/old".into(),
                        ..Default::default()
                    })),
                },
                TxnOp {
                    op: Some(txn_op::Op::Get(GetRequest {
                        key: "/t/a".into(),
                        serializable: false,
                    })),
                },
            ],
            failure: vec![op_put("/t/failed", "1")],
        })
        .await?
        .into_inner();
    assert!(resp.succeeded);
    let rev = resp.header.context("header")?.revision;
    // The get inside the txn sees the txn's own put.
    match &resp.results[3].result {
        Some(txn_op_result::Result::Get(g)) => {
            assert_eq!(
                g.kv.as_ref().map(|kv| kv.value.clone()),
                Some(b"1".to_vec())
            )
        }
        other => bail!("expected a get result, got {other:?}"),
    }
    let mut kv2 = c.kv(f[1]);
    assert_eq!(
        get(&mut kv2, "/t/a", false).await?,
        Some((b"1".to_vec(), rev))
    );
    assert_eq!(
        get(&mut kv2, "/t/b", false).await?,
        Some((b"2".to_vec(), rev))
    );
    assert_eq!(get(&mut kv2, "/t/old", false).await?, None);
    assert_eq!(get(&mut kv2, "/t/failed", false).await?, None);

    // A failing compare runs only the failure branch.
    let resp = kv
        .txn(TxnRequest {
            compare: vec![value_is("off")],
            success: vec![op_put("/t/a", "changed")],
            failure: vec![op_put("/t/failed", "yes")],
        })
        .await?
        .into_inner();
    assert!(!resp.succeeded);
    assert_eq!(
        get(&mut kv2, "/t/a", false).await?.map(|v| v.0),
        Some(b"1".to_vec())
    );
    assert_eq!(
        get(&mut kv2, "/t/failed", false).await?.map(|v| v.0),
        Some(b"yes".to_vec())
    );

    // A txn with one invalid op is rejected whole, before anything commits.
    let before = c.status(f[1]).await?.revision;
    let err = kv
        .txn(TxnRequest {
            compare: vec![],
            success: vec![op_put("/t/ok", "1"), op_put("", "bad")],
            failure: vec![],
        })
        .await
        .expect_err("invalid txn");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("success[1].put.key"),
        "{}",
        err.message()
    );
    assert_eq!(get(&mut kv2, "/t/ok", false).await?, None);
    assert_eq!(c.status(c.leader().await?).await?.revision, before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_replays_history_in_order_once_and_resumes_anywhere() -> Result<()> {
    let c = Cluster::start(3).await?;
    let (leader, f) = followers(&c).await?;
    let mut kv = c.kv(leader);
    // The committed history, as the writers saw it: revision -> events.
    let mut history: BTreeMap<u64, Vec<(i32, String)>> = BTreeMap::new();
    const PUT: i32 = event::EventType::Put as i32;
    const DEL: i32 = event::EventType::Delete as i32;
    for i in 0..10 {
        let key = format!("/w/{}", i % 4);
        let rev = put(&mut kv, &key, &format!("v{i}")).await?;
        history.insert(rev, vec![(PUT, key)]);
        put(&mut kv, "/other/x", "ignored").await?;
    }
    let del = kv
        .delete(DeleteRequest {
            key: "/w/0".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    history.insert(
        del.header.context("header")?.revision,
        vec![(DEL, "/w/0".into())],
    );
    let txn = kv
        .txn(TxnRequest {
            success: vec![
                op_put("/w/t1", "a"),
                op_put("/other/t", "b"),
                op_put("/w/t2", "c"),
            ],
            ..Default::default()
        })
        .await?
        .into_inner();
    let txn_rev = txn.header.context("header")?.revision;
    history.insert(txn_rev, vec![(PUT, "/w/t1".into()), (PUT, "/w/t2".into())]);

    // From revision 1 on a follower: every matching event, in order, once,
    // a revision's events together.
    c.wait_for_revision(f[0], txn_rev).await?;
    let mut s = watch_from(&c, f[0], "/w/", 1).await?;
    let got = collect_until(&mut s, txn_rev).await?;
    let want: Vec<(u64, Vec<(i32, String)>)> = history.clone().into_iter().collect();
    assert_eq!(got, want);

    // Resume from the middle on the other follower: exactly the suffix.
    let mid = *history.keys().nth(5).context("history too short")?;
    let mut s2 = watch_from(&c, f[1], "/w/", mid).await?;
    let got = collect_until(&mut s2, txn_rev).await?;
    let want: Vec<_> = history.range(mid..).map(|(r, e)| (*r, e.clone())).collect();
    assert_eq!(got, want);

    // Live events keep flowing to the open stream.
    let live = put(&mut kv, "/w/live", "1").await?;
    let got = collect_until(&mut s, live).await?;
    assert_eq!(got, vec![(live, vec![(PUT, "/w/live".to_string())])]);

    // A start revision in the future is waited for, not answered early.
    let future = live + 3;
    let mut s3 = watch_from(&c, f[1], "/w/", future).await?;
    let created = next_msg(&mut s3).await?;
    assert!(created.events.is_empty());
    for i in 0..3 {
        put(&mut kv, "/w/f", &i.to_string()).await?;
    }
    let got = collect_until(&mut s3, future).await?;
    assert_eq!(got, vec![(future, vec![(PUT, "/w/f".to_string())])]);

    // After compaction, a watch from before it is told to resync.
    c.kv(f[0]).compact(CompactRequest { revision: mid }).await?;
    // Compaction spends no revision: wait until that follower applied it.
    let watcher = f[1];
    c.wait_for(
        STREAM_TIMEOUT,
        "the follower to apply the compaction",
        |st| {
            st.get(&watcher)
                .and_then(|s| s.as_ref().ok())
                .filter(|s| s.compact_revision >= mid)
                .map(|_| ())
        },
    )
    .await?;
    let mut s4 = watch_from(&c, watcher, "/w/", 1).await?;
    let m = next_msg(&mut s4).await?;
    let m = if m.events.is_empty() && !m.compacted {
        next_msg(&mut s4).await?
    } else {
        m
    };
    assert!(m.compacted, "expected a compaction notice, got {m:?}");
    assert_eq!(m.compact_revision, mid);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_write() -> Result<()> {
    let mut c = Cluster::start(3).await?;
    let (old_leader, f) = followers(&c).await?;
    let mut acked = BTreeMap::new();
    for i in 0..50 {
        let key = format!("/ack/{i}");
        let rev = put(&mut c.kv(f[i % 2]), &key, &i.to_string()).await?;
        acked.insert(key, (i.to_string().into_bytes(), rev));
    }
    c.kill(old_leader).await?;
    let new_leader = c.leader().await?;
    assert_ne!(new_leader, old_leader);
    // Writes are accepted again (through either survivor).
    let after = put(&mut c.kv(f[0]), "/ack/after", "x").await?;
    let last_acked = acked.values().map(|v| v.1).max().unwrap_or(0);
    assert!(after > last_acked);
    for (key, want) in &acked {
        assert_eq!(
            get(&mut c.kv(f[1]), key, false).await?.as_ref(),
            Some(want),
            "{key}"
        );
    }
    // The old leader comes back as a follower and catches up.
    c.restart(old_leader).await?;
    c.wait_for_revision(old_leader, after).await?;
    c.wait_converged().await?;
    assert_eq!(
        get(&mut c.kv(old_leader), "/ack/after", true)
            .await?
            .map(|v| v.1),
        Some(after)
    );
    Ok(())
}

/// Election timeouts so long (lease 8 s + 4–8 s) that only the crash
/// detector can replace a killed leader within the test's bounds.
fn slow_election_options() -> trellis_tests::ClusterOptions {
    trellis_tests::ClusterOptions {
        heartbeat_ms: Some(100),
        election_min_ms: Some(4_000),
        election_max_ms: Some(8_000),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_without_waiting_out_the_election_timeout() -> Result<()> {
    let mut c = Cluster::start_with(slow_election_options()).await?;
    for round in 0..2 {
        let (old_leader, f) = followers(&c).await?;
        let before = c.status(f[0]).await?.term;
        put(&mut c.kv(f[0]), &format!("/crash/{round}"), "before").await?;
        // Both detectors armed: each follower has seen the leader's
        // liveness stream open (a follower that never did leaves a dead
        // leader to the timers).
        c.wait_for(
            trellis_tests::CLUSTER_TIMEOUT,
            "followers watching the leader's liveness",
            |sts| {
                f.iter()
                    .all(|id| {
                        sts.get(id)
                            .and_then(|s| s.as_ref().ok())
                            .is_some_and(|s| s.liveness_watched_leader == old_leader)
                    })
                    .then_some(())
            },
        )
        .await?;
        let killed_at = std::time::Instant::now();
        c.kill(old_leader).await?;
        let new_leader = c.leader().await?;
        let took = killed_at.elapsed();
        assert_ne!(new_leader, old_leader);
        // The timer path needs at least 12 s of silence (it took 14.8 s
        // with `--no-crash-detection`).
        assert!(
            took < Duration::from_secs(4),
            "round {round}: new leader after {took:?}; the crash detector should act at once"
        );
        let after = c.status(new_leader).await?.term;
        assert!(after > before, "term {before} -> {after}");
        put(&mut c.kv(new_leader), &format!("/crash/{round}"), "after").await?;
        c.restart(old_leader).await?;
        c.wait_converged().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crash_detector_leaves_a_live_leader_alone() -> Result<()> {
    let mut c = Cluster::start_with(slow_election_options()).await?;
    let (leader, f) = followers(&c).await?;
    let term = c.status(leader).await?.term;
    // A follower dies and comes back; the leader keeps serving throughout.
    c.kill(f[0]).await?;
    put(&mut c.kv(f[1]), "/live/1", "x").await?;
    c.restart(f[0]).await?;
    let rev = put(&mut c.kv(f[0]), "/live/2", "y").await?;
    c.wait_for_revision(f[0], rev).await?;
    c.wait_converged().await?;
    for id in c.ids() {
        let s = c.status(id).await?;
        assert_eq!(
            (s.leader_id, s.term),
            (leader, term),
            "node {id} saw a leader change"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_revision_survive_kill_of_every_node() -> Result<()> {
    let mut c = Cluster::start(3).await?;
    let leader = c.leader().await?;
    let mut last = 0;
    for i in 0..30 {
        last = put(
            &mut c.kv(leader),
            &format!("/dur/{i}"),
            &format!("value-{i}"),
        )
        .await?;
    }
    for id in c.ids() {
        c.kill(id).await?;
    }
    for id in c.ids() {
        c.restart(id).await?;
    }
    let leader = c.leader().await?;
    let status = c.wait_for_revision(leader, last).await?;
    assert_eq!(status.revision, last, "revision counter must be intact");
    // Right after a full restart the nodes may still settle on a leader
    // (they remember different ones): retry what the server marks safe to
    // retry, as a client would.
    for i in 0..30 {
        let key = format!("/dur/{i}");
        let got = retrying(|| get_owned(c.kv(leader), key.clone())).await?;
        assert_eq!(got.map(|v| v.0), Some(format!("value-{i}").into_bytes()));
    }
    // The counter continues where it stopped.
    let next = retrying(|| async {
        let mut kv = c.kv(leader);
        put(&mut kv, "/dur/next", "x").await
    })
    .await?;
    assert_eq!(next, last + 1);
    Ok(())
}

async fn get_owned(mut kv: Kv, key: String) -> Result<Option<(Vec<u8>, u64)>> {
    get(&mut kv, &key, false).await
}

/// Run `op` again while it fails with a status the server marked
/// `x-trellis-retry-safe: true` (nothing was applied), for up to the
/// cluster timeout.
async fn retrying<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let deadline = tokio::time::Instant::now() + trellis_tests::CLUSTER_TIMEOUT;
    loop {
        match op().await {
            Err(e)
                if tokio::time::Instant::now() < deadline
                    && e.downcast_ref::<tonic::Status>().is_some_and(|s| {
                        s.metadata()
                            .get("x-trellis-retry-safe")
                            .is_some_and(|v| v.as_bytes() == b"true")
                    }) =>
            {
                tokio::time::sleep(trellis_tests::POLL_INTERVAL).await;
            }
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_node_catches_up_through_a_snapshot() -> Result<()> {
    let mut c = Cluster::start(3).await?;
    let (leader, f) = followers(&c).await?;
    let victim = f[0];
    for i in 0..200 {
        put(
            &mut c.kv(leader),
            &format!("/snap/{i:03}"),
            &"x".repeat(100),
        )
        .await?;
    }
    // Snapshot and purge the log everywhere, then lose one node's disk.
    for id in c.ids() {
        let s = c
            .cluster_client(id)
            .snapshot(SnapshotRequest {})
            .await?
            .into_inner();
        ensure!(s.snapshot_index > 0, "node {id} built no snapshot: {s:?}");
    }
    let purged = c.status(leader).await?.purged_index;
    ensure!(purged > 0, "the leader's log was not purged");
    c.kill(victim).await?;
    c.wipe(victim)?;
    let last = put(&mut c.kv(leader), "/snap/after-wipe", "y").await?;
    c.restart(victim).await?;
    let st = c.wait_for_revision(victim, last).await?;
    assert!(
        st.snapshot_index >= purged,
        "victim should have installed a snapshot covering {purged}: {st:?}"
    );
    let got = get(&mut c.kv(victim), "/snap/000", true).await?;
    assert_eq!(got.map(|v| v.0), Some("x".repeat(100).into_bytes()));
    // It serves reads and forwards writes like any member.
    put(&mut c.kv(victim), "/snap/via-victim", "z").await?;
    c.wait_converged().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_a_member_and_add_a_fresh_one() -> Result<()> {
    let mut c = Cluster::start(3).await?;
    let (leader, f) = followers(&c).await?;
    put(&mut c.kv(leader), "/m/before", "1").await?;
    let resp = c
        .cluster_client(f[0])
        .remove_member(RemoveMemberRequest { node_id: f[1] })
        .await?
        .into_inner();
    assert_eq!(resp.members.len(), 2);
    assert!(resp.members.iter().all(|m| m.node_id != f[1]));
    c.kill(f[1]).await?;
    // Two voters still make a quorum.
    let rev = put(&mut c.kv(f[0]), "/m/two", "2").await?;
    let err = c
        .cluster_client(leader)
        .remove_member(RemoveMemberRequest { node_id: 99 })
        .await
        .expect_err("unknown member");
    assert_eq!(err.code(), Code::NotFound);

    let fresh = c.spawn_fresh_node().await?;
    let req = c.add_member_request(fresh);
    c.add_member_with_retry(f[0], req).await?;
    c.wait_for_revision(fresh, rev).await?;
    let members = c.status(leader).await?.members;
    let voters: Vec<u64> = members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.node_id)
        .collect();
    assert_eq!(voters.len(), 3, "{members:?}");
    assert!(voters.contains(&fresh));
    assert_eq!(
        get(&mut c.kv(fresh), "/m/before", true).await?.map(|v| v.0),
        Some(b"1".to_vec())
    );
    put(&mut c.kv(fresh), "/m/after", "3").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_invalid_argument_naming_the_field() -> Result<()> {
    let c = Cluster::start(3).await?;
    let (_, f) = followers(&c).await?;
    let mut kv = c
        .kv(f[0])
        .max_encoding_message_size(8 << 20)
        .max_decoding_message_size(8 << 20);
    let cases: Vec<(PutRequest, &str)> = vec![
        (put_req("", "v"), "key: must not be empty"),
        (
            put_req(&"k".repeat(1025), "v"),
            "key: is 1025 bytes; the limit is 1024",
        ),
        (
            PutRequest {
                key: "/big".into(),
                value: vec![0; 1024 * 1024 + 1],
                ..Default::default()
            },
            "value: is 1048577 bytes; the limit is 1048576",
        ),
    ];
    for (req, want) in cases {
        let err = kv.put(req).await.expect_err("must be rejected");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains(want),
            "{} should contain {want}",
            err.message()
        );
    }
    // Exactly at the limits is fine.
    kv.put(PutRequest {
        key: "k".repeat(1024),
        value: vec![7; 1024 * 1024],
        ..Default::default()
    })
    .await?;
    let err = kv
        .list(ListRequest {
            limit: 1_000_000,
            ..Default::default()
        })
        .await
        .expect_err("limit over maximum");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("limit"));
    let err = kv
        .get(GetRequest {
            key: "/missing".into(),
            serializable: false,
        })
        .await
        .expect_err("missing key");
    assert_eq!(err.code(), Code::NotFound);
    let err = kv
        .compact(CompactRequest {
            revision: 1_000_000,
        })
        .await
        .expect_err("future compaction");
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(err.message().contains("in the future"), "{}", err.message());
    let now = put(&mut kv, "/c", "1").await?;
    kv.compact(CompactRequest { revision: now }).await?;
    let err = kv
        .compact(CompactRequest { revision: now - 1 })
        .await
        .expect_err("compaction below the compact revision");
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(
        err.message().contains("already compacted"),
        "{}",
        err.message()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uninitialized_node_says_so() -> Result<()> {
    let mut c = Cluster::start(1).await?;
    let lonely = c.spawn_fresh_node().await?;
    let err = c
        .kv(lonely)
        .put(put_req("/x", "1"))
        .await
        .expect_err("uninitialized node cannot accept writes");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("cluster init"), "{}", err.message());
    let st = c.status(lonely).await?;
    assert!(!st.initialized);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_reflection_lists_the_admin_services() -> Result<()> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let c = Cluster::start(1).await?;
    let channel = trellis_tests::connect(c.admin_addr(1)).await?;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await?
        .into_inner();
    let resp = responses
        .message()
        .await?
        .context("no reflection response")?;
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        bail!("unexpected reflection response {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["trellis.admin.v1.KV", "trellis.admin.v1.Cluster"] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_leader_kill_under_concurrent_load() -> Result<()> {
    acknowledged_writes_survive_a_leader_kill(Vec::new()).await
}

/// The same with the leader replicating its appends while they sync: a
/// leader killed before its own sync must not take back anything a client
/// was told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_leader_kill_with_leader_overlap() -> Result<()> {
    acknowledged_writes_survive_a_leader_kill(vec!["--leader-overlap".into()]).await
}

async fn acknowledged_writes_survive_a_leader_kill(extra_args: Vec<String>) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let mut c = Cluster::start_with(ClusterOptions {
        nodes: 3,
        extra_args,
        ..ClusterOptions::default()
    })
    .await?;
    let leader = c.leader().await?;
    let ids = c.ids();
    let stop = Arc::new(AtomicBool::new(false));
    // 8 writers, each putting unique keys through every node in turn;
    // errors (during the failover) are allowed, acknowledgements are kept.
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let clients: Vec<Kv> = ids.iter().map(|id| c.kv(*id)).collect();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("/load/{w}/{i}");
                let mut kv = clients[(i as usize + w as usize) % clients.len()].clone();
                let mut req = tonic::Request::new(put_req(&key, &format!("{w}-{i}")));
                req.set_timeout(Duration::from_secs(2));
                if let Ok(resp) = kv.put(req).await {
                    if let Some(h) = resp.into_inner().header {
                        acked.push((key, format!("{w}-{i}"), h.revision));
                    }
                }
                i += 1;
            }
            acked
        }));
    }
    // Let load build up, kill the leader mid-stream, keep writing through
    // the election, then stop.
    c.wait_for_revision(leader, 300).await?;
    c.kill(leader).await?;
    let new_leader = c.leader().await?;
    let after_kill = c.status(new_leader).await?.revision;
    c.wait_for_revision(new_leader, after_kill + 300).await?;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await?);
    }
    ensure!(
        acked.len() > 600,
        "too few acknowledged writes: {}",
        acked.len()
    );

    // Every acknowledged write is there, at its revision; revisions are
    // unique (each put is its own revision).
    let mut revisions: Vec<u64> = acked.iter().map(|a| a.2).collect();
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(
        revisions.len(),
        acked.len(),
        "two acknowledged puts share a revision"
    );
    let mut kv = c.kv(new_leader);
    for (key, value, rev) in &acked {
        assert_eq!(
            get(&mut kv, key, false).await?,
            Some((value.clone().into_bytes(), *rev)),
            "acknowledged write {key} at revision {rev}"
        );
    }

    // The killed node returns and all three replicas hold the same data.
    c.restart(leader).await?;
    let last = c.status(new_leader).await?.revision;
    let mut dumps = Vec::new();
    for id in c.ids() {
        c.wait_for_revision(id, last).await?;
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let resp = c
                .kv(id)
                .list(ListRequest {
                    prefix: "/load/".into(),
                    page_token: token.clone(),
                    serializable: true,
                    ..Default::default()
                })
                .await?
                .into_inner();
            all.extend(
                resp.kvs
                    .into_iter()
                    .map(|kv| (kv.key, kv.value, kv.mod_revision)),
            );
            if resp.next_page_token.is_empty() {
                break;
            }
            token = resp.next_page_token;
        }
        dumps.push(all);
    }
    assert_eq!(dumps[0], dumps[1]);
    assert_eq!(dumps[1], dumps[2]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_writes_and_linearizable_reads_fail_fast_as_unavailable() -> Result<()> {
    let mut c = Cluster::start_with(trellis_tests::ClusterOptions {
        extra_args: vec!["--request-timeout-ms".into(), "1000".into()],
        ..Default::default()
    })
    .await?;
    let (leader, f) = followers(&c).await?;
    let rev = put(&mut c.kv(leader), "/q", "before").await?;
    c.wait_for_revision(f[0], rev).await?;
    // Lose the majority: only f[0] is left.
    c.kill(leader).await?;
    c.kill(f[1]).await?;
    let mut kv = c.kv(f[0]);
    let started = std::time::Instant::now();
    let err = kv.put(put_req("/q", "after")).await.expect_err("no quorum");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        err.message().contains("leader") || err.message().contains("quorum"),
        "{}",
        err.message()
    );
    let err = kv
        .get(GetRequest {
            key: "/q".into(),
            serializable: false,
        })
        .await
        .expect_err("no quorum for a linearizable read");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // A serializable read is served from the survivor's own state.
    assert_eq!(
        get(&mut kv, "/q", true).await?,
        Some((b"before".to_vec(), rev))
    );
    // Quorum back: writes work again.
    c.restart(f[1]).await?;
    c.leader().await?;
    put(&mut c.kv(f[0]), "/q", "after").await?;
    Ok(())
}
