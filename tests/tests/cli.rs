//! End-to-end tests of `trellisctl`, the operator CLI: every test starts a
//! real 3-node `trellisd` cluster on 127.0.0.1 with the harness, runs the
//! real `trellisctl` binary against the nodes' admin addresses and checks
//! exit codes (the table in `docs/CONTRACTS.md`), stdout and stderr.
//!
//! Build the binaries first, in the same profile as the tests:
//! `cargo build --release --bins && cargo test --release -p trellis-tests --test cli`.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use tokio::time::Instant;
use trellis_tests::{Cluster, CLUSTER_TIMEOUT, POLL_INTERVAL};

use common::{array_field, bool_field, str_field, u64_field, Ctl};

/// How long a watcher may take to print the events we wait for.
const WATCH_TIMEOUT: Duration = Duration::from_secs(15);
/// An address where nothing listens (TCP port 1 on loopback).
const DEAD_ENDPOINT: &str = "127.0.0.1:1";

/// `put -o json` and returns the revision it reports.
async fn put_json(ctl: &Ctl, key: &str, value: &str) -> Result<u64> {
    let run = ctl.run(&["put", key, value, "-o", "json"]).await?;
    run.expect_ok()?;
    let doc = run.json()?;
    ensure!(
        str_field(&doc, "key")? == key,
        "put echoed another key; {run}"
    );
    u64_field(&doc, "revision")
}

/// `delete -o json` and returns the revision it reports.
async fn delete_json(ctl: &Ctl, key: &str) -> Result<u64> {
    let run = ctl.run(&["delete", key, "-o", "json"]).await?;
    run.expect_ok()?;
    let doc = run.json()?;
    ensure!(
        bool_field(&doc, "deleted")?,
        "delete says not deleted; {run}"
    );
    u64_field(&doc, "revision")
}

/// A node other than `leader` (the highest such id).
fn a_follower(cluster: &Cluster, leader: u64) -> Result<u64> {
    cluster
        .ids()
        .into_iter()
        .filter(|&id| id != leader)
        .max()
        .context("the cluster has no follower")
}

// ---------------------------------------------------------------------------
// 1. cluster status
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_healthy_then_degraded_then_no_quorum() -> Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.leader().await?;
    let ctl = Ctl::for_cluster(&cluster)?;

    // Table: one row per member, exactly one leader.
    let run = ctl.run(&["cluster", "status"]).await?;
    run.expect_ok()?;
    let rows = run.table_rows("ID")?;
    ensure!(rows.len() == 3, "expected 3 member rows; {run}");
    let ids: BTreeSet<String> = rows.iter().filter_map(|r| r.first().cloned()).collect();
    ensure!(
        ids == ["1", "2", "3"].iter().map(|s| s.to_string()).collect(),
        "rows are not nodes 1..3; {run}"
    );
    let leader_rows: Vec<&Vec<String>> = rows
        .iter()
        .filter(|r| r.get(3).map(String::as_str) == Some("leader"))
        .collect();
    ensure!(leader_rows.len() == 1, "expected exactly one leader; {run}");
    ensure!(
        leader_rows[0].first() == Some(&leader.to_string()),
        "the table's leader is not node {leader}; {run}"
    );
    for id in cluster.ids() {
        let admin = cluster.admin_addr(id).to_string();
        ensure!(
            rows.iter()
                .any(|r| r.first() == Some(&id.to_string()) && r.get(1) == Some(&admin)),
            "no row for node {id} at {admin}; {run}"
        );
    }

    // JSON: 3 reachable members that all name the same leader.
    let run = ctl.run(&["cluster", "status", "-o", "json"]).await?;
    run.expect_ok()?;
    let doc = run.json()?;
    let members = array_field(&doc, "members")?;
    ensure!(members.len() == 3, "expected 3 members; {run}");
    ensure!(u64_field(&doc, "reachable")? == 3 && u64_field(&doc, "total")? == 3);
    let mut node_ids = BTreeSet::new();
    for m in members {
        ensure!(bool_field(m, "reachable")?, "unreachable member {m}");
        ensure!(
            u64_field(m, "leader_id")? == leader,
            "member names another leader than {leader}: {m}"
        );
        node_ids.insert(u64_field(m, "node_id")?);
    }
    ensure!(
        node_ids == BTreeSet::from([1, 2, 3]),
        "node ids {node_ids:?}"
    );
    let json_leaders: Vec<u64> = members
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("leader"))
        .filter_map(|m| m.get("node_id").and_then(Value::as_u64))
        .collect();
    ensure!(
        json_leaders == vec![leader],
        "leader roles {json_leaders:?}; {run}"
    );

    // Kill a follower: degraded (exit 6) and the dead member is named. Its
    // address comes first in --endpoints, so the membership must be learned
    // from another endpoint.
    let dead = a_follower(&cluster, leader)?;
    cluster.kill(dead).await?;
    let dead_admin = cluster.admin_addr(dead).to_string();
    let mut order = vec![dead_admin.clone()];
    order.extend(
        cluster
            .ids()
            .into_iter()
            .filter(|&id| id != dead)
            .map(|id| cluster.admin_addr(id).to_string()),
    );
    let ctl = Ctl::new(order.join(","))?;

    let run = ctl.run(&["cluster", "status"]).await?;
    run.expect_code(6)?
        .expect_stderr("1 of 3 members unreachable")?;
    let dead_row = run
        .stdout()
        .lines()
        .find(|l| l.split_whitespace().next() == Some(dead.to_string().as_str()))
        .map(str::to_string)
        .with_context(|| format!("no row for node {dead}; {run}"))?;
    ensure!(
        dead_row.contains(&dead_admin) && dead_row.contains("unreachable"),
        "the row of node {dead} does not say it is unreachable at {dead_admin}: {dead_row:?}"
    );
    let live_rows = run
        .table_rows("ID")?
        .into_iter()
        .filter(|r| r.get(3).map(String::as_str) == Some("leader"))
        .count();
    ensure!(live_rows == 1, "expected the leader row to remain; {run}");

    let run = ctl.run(&["cluster", "status", "-o", "json"]).await?;
    run.expect_code(6)?;
    let doc = run.json()?;
    ensure!(u64_field(&doc, "reachable")? == 2 && u64_field(&doc, "total")? == 3);
    let unreachable: Vec<&Value> = array_field(&doc, "members")?
        .iter()
        .filter(|m| m.get("reachable").and_then(Value::as_bool) == Some(false))
        .collect();
    ensure!(unreachable.len() == 1, "expected one unreachable; {run}");
    ensure!(u64_field(unreachable[0], "node_id")? == dead);
    ensure!(str_field(unreachable[0], "admin_addr")? == dead_admin);
    ensure!(
        !str_field(unreachable[0], "error")?.is_empty(),
        "no error for the dead member; {run}"
    );

    // A second node down: no quorum. Status still reaches one member (6),
    // writes cannot commit (5).
    let second = cluster
        .ids()
        .into_iter()
        .find(|&id| id != dead && id != leader)
        .context("no second follower")?;
    cluster.kill(second).await?;
    let run = ctl.run(&["cluster", "status", "-o", "json"]).await?;
    run.expect_code(6)?
        .expect_stderr("2 of 3 members unreachable")?;
    let run = ctl
        .run(&["put", "/no-quorum", "x", "--timeout", "1s"])
        .await?;
    run.expect_code(5)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. put / get / list / delete
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_round_trip_table_json_and_stdin() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let ctl = Ctl::for_cluster(&cluster)?;

    // Table output.
    let run = ctl.run(&["put", "/kv/a", "alpha"]).await?;
    run.expect_ok()?;
    let rev_a = run
        .stdout()
        .trim()
        .strip_prefix("OK revision=")
        .and_then(|r| r.parse::<u64>().ok())
        .with_context(|| format!("expected `OK revision=N`; {run}"))?;
    ensure!(rev_a > 0, "revision 0; {run}");
    let run = ctl.run(&["get", "/kv/a"]).await?;
    run.expect_ok()?;
    ensure!(run.stdout == b"alpha\n", "get printed another value; {run}");

    // JSON output: revisions present and increasing.
    let rev_b = put_json(&ctl, "/kv/b", "beta").await?;
    let rev_a2 = put_json(&ctl, "/kv/a", "alpha2").await?;
    ensure!(
        rev_a < rev_b && rev_b < rev_a2,
        "revisions not increasing: {rev_a}, {rev_b}, {rev_a2}"
    );
    let run = ctl.run(&["get", "/kv/a", "-o", "json"]).await?;
    run.expect_ok()?;
    let doc = run.json()?;
    ensure!(str_field(&doc, "key")? == "/kv/a");
    ensure!(str_field(&doc, "value")? == "alpha2", "{run}");
    ensure!(u64_field(&doc, "create_revision")? == rev_a, "{run}");
    ensure!(u64_field(&doc, "mod_revision")? == rev_a2, "{run}");
    ensure!(u64_field(&doc, "version")? == 2, "{run}");
    ensure!(u64_field(&doc, "revision")? >= rev_a2, "{run}");

    // An unrelated key must not show up under the prefix.
    put_json(&ctl, "/other", "x").await?;

    let run = ctl.run(&["list", "/kv/"]).await?;
    run.expect_ok()?;
    let rows = run.table_rows("KEY")?;
    let want = vec![
        vec![
            "/kv/a".to_string(),
            rev_a2.to_string(),
            "2".into(),
            "alpha2".into(),
        ],
        vec![
            "/kv/b".to_string(),
            rev_b.to_string(),
            "1".into(),
            "beta".into(),
        ],
    ];
    ensure!(
        rows == want,
        "list table {rows:?}, expected {want:?}; {run}"
    );

    let run = ctl.run(&["list", "/kv/", "-o", "json"]).await?;
    run.expect_ok()?;
    let doc = run.json()?;
    ensure!(u64_field(&doc, "count")? == 2, "{run}");
    ensure!(!bool_field(&doc, "more")?, "{run}");
    ensure!(u64_field(&doc, "revision")? > rev_a2, "{run}");
    let kvs = array_field(&doc, "kvs")?;
    let got: Vec<(String, String, u64)> = kvs
        .iter()
        .map(|kv| {
            Ok((
                str_field(kv, "key")?.to_string(),
                str_field(kv, "value")?.to_string(),
                u64_field(kv, "mod_revision")?,
            ))
        })
        .collect::<Result<_>>()?;
    ensure!(
        got == vec![
            ("/kv/a".to_string(), "alpha2".to_string(), rev_a2),
            ("/kv/b".to_string(), "beta".to_string(), rev_b),
        ],
        "list json {got:?}; {run}"
    );

    // --keys-only leaves values out.
    let run = ctl
        .run(&["list", "/kv/", "--keys-only", "-o", "json"])
        .await?;
    run.expect_ok()?;
    let doc = run.json()?;
    for kv in array_field(&doc, "kvs")? {
        ensure!(
            kv.get("value").is_none() && kv.get("value_base64").is_none(),
            "--keys-only printed a value: {kv}"
        );
    }

    // Delete: table, then JSON, then the key is gone.
    let run = ctl.run(&["delete", "/kv/b"]).await?;
    run.expect_ok()?;
    let del_rev = run
        .stdout()
        .trim()
        .strip_prefix("deleted revision=")
        .and_then(|r| r.parse::<u64>().ok())
        .with_context(|| format!("expected `deleted revision=N`; {run}"))?;
    ensure!(del_rev > rev_a2, "delete revision {del_rev} <= {rev_a2}");
    let del_rev2 = delete_json(&ctl, "/kv/a").await?;
    ensure!(del_rev2 > del_rev, "revisions not increasing after deletes");
    ctl.run(&["get", "/kv/a"]).await?.expect_code(3)?;
    let run = ctl.run(&["list", "/kv/", "-o", "json"]).await?;
    run.expect_ok()?;
    ensure!(u64_field(&run.json()?, "count")? == 0, "{run}");

    // VALUE `-` reads stdin to EOF, byte for byte (newlines included).
    let text = "line one\nline two\n";
    let run = ctl
        .run_with_stdin(&["put", "/kv/stdin", "-", "-o", "json"], text.as_bytes())
        .await?;
    run.expect_ok()?;
    let rev_stdin = u64_field(&run.json()?, "revision")?;
    ensure!(rev_stdin > del_rev2);
    let run = ctl.run(&["get", "/kv/stdin", "-o", "json"]).await?;
    run.expect_ok()?;
    ensure!(str_field(&run.json()?, "value")? == text, "{run}");
    let run = ctl.run(&["get", "/kv/stdin"]).await?;
    run.expect_ok()?;
    ensure!(
        run.stdout == format!("{text}\n").as_bytes(),
        "get did not print the raw value plus a newline; {run}"
    );

    // A non-UTF-8 value survives the round trip; JSON shows it as base64.
    let binary: &[u8] = &[0xff, 0x00, 0xfe, 0x80, b'a'];
    ctl.run_with_stdin(&["put", "/kv/bin", "-"], binary)
        .await?
        .expect_ok()?;
    let run = ctl.run(&["get", "/kv/bin", "-o", "json"]).await?;
    run.expect_ok()?;
    let doc = run.json()?;
    ensure!(str_field(&doc, "value_base64")? == "/wD+gGE=", "{run}");
    ensure!(
        doc.get("value").is_none(),
        "binary value shown as text; {run}"
    );
    let run = ctl.run(&["get", "/kv/bin"]).await?;
    run.expect_ok()?;
    let mut want = binary.to_vec();
    want.push(b'\n');
    ensure!(run.stdout == want, "raw get changed the bytes; {run}");
    let run = ctl.run(&["list", "/kv/bin", "-o", "json"]).await?;
    run.expect_ok()?;
    let doc = run.json()?;
    let kvs = array_field(&doc, "kvs")?;
    ensure!(kvs.len() == 1, "{run}");
    ensure!(str_field(&kvs[0], "value_base64")? == "/wD+gGE=", "{run}");
    let run = ctl.run(&["list", "/kv/bin"]).await?;
    run.expect_ok()?;
    ensure!(
        run.stdout().contains("base64:/wD+gGE="),
        "the table does not show the binary value as base64; {run}"
    );

    // An empty value from stdin is a value, not a missing key.
    ctl.run_with_stdin(&["put", "/kv/empty", "-"], b"")
        .await?
        .expect_ok()?;
    let run = ctl.run(&["get", "/kv/empty", "-o", "json"]).await?;
    run.expect_ok()?;
    ensure!(str_field(&run.json()?, "value")?.is_empty(), "{run}");
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. Exit codes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_not_found_conflict_invalid() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let ctl = Ctl::for_cluster(&cluster)?;

    // Not found: 3.
    ctl.run(&["get", "/missing"])
        .await?
        .expect_code(3)?
        .expect_stderr("not found")?;
    ctl.run(&["get", "/missing", "-o", "json"])
        .await?
        .expect_code(3)?;
    ctl.run(&["delete", "/missing"])
        .await?
        .expect_code(3)?
        .expect_stderr("not found")?;
    let run = ctl.run(&["del", "/missing", "-o", "json"]).await?;
    run.expect_code(3)?;
    ensure!(!bool_field(&run.json()?, "deleted")?, "{run}");

    // Compare-and-set conflict: 4, naming the current revision.
    let rev = put_json(&ctl, "/cas", "v1").await?;
    let wrong = (rev + 100).to_string();
    let run = ctl
        .run(&["put", "/cas", "v2", "--expected-revision", &wrong])
        .await?;
    run.expect_code(4)?
        .expect_stderr(&format!("current mod_revision is {rev}"))?;
    // Expected revision 0 = "only if absent".
    ctl.run(&["put", "/cas", "v2", "--expected-revision", "0"])
        .await?
        .expect_code(4)?
        .expect_stderr(&format!("current mod_revision is {rev}"))?;
    // The right revision applies, and the value did not change before that.
    let run = ctl.run(&["get", "/cas"]).await?;
    run.expect_ok()?;
    ensure!(
        run.stdout == b"v1\n",
        "a failed CAS changed the value; {run}"
    );
    ctl.run(&["put", "/cas", "v3", "--expected-revision", &rev.to_string()])
        .await?
        .expect_ok()?;
    ctl.run(&["put", "/cas-new", "x", "--expected-revision", "0"])
        .await?
        .expect_ok()?;

    // Invalid arguments: 2.
    ctl.run(&["put", "", "v"])
        .await?
        .expect_code(2)?
        .expect_stderr("key")?;
    let long_key = "k".repeat(1025);
    ctl.run(&["put", &long_key, "v"])
        .await?
        .expect_code(2)?
        .expect_stderr("1024")?
        .expect_stderr("key")?;
    ctl.run(&["get", &long_key])
        .await?
        .expect_code(2)?
        .expect_stderr("1024")?;
    // The limit itself is fine.
    ctl.run(&["put", &"k".repeat(1024), "v"])
        .await?
        .expect_ok()?;
    // Too big a value (limit 1 MiB).
    ctl.run_with_stdin(&["put", "/big", "-"], &vec![b'x'; 1024 * 1024 + 1])
        .await?
        .expect_code(2)?
        .expect_stderr("value")?;

    for bad in ["abc", "5", "0s", "-1s"] {
        let flag = format!("--timeout={bad}");
        ctl.run(&["get", "/cas", &flag])
            .await?
            .expect_code(2)?
            .expect_stderr("--timeout")?;
    }
    ctl.run(&["frobnicate"])
        .await?
        .expect_code(2)?
        .expect_stderr("frobnicate")?;
    ctl.run(&["cluster", "frobnicate"]).await?.expect_code(2)?;
    ctl.run(&["leader", "transfer"])
        .await?
        .expect_code(2)?
        .expect_stderr("--to")?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. Unreachable endpoints and failover
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_exit_5_and_failover() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let dead = Ctl::new(DEAD_ENDPOINT)?;
    for args in [
        &["get", "/k"][..],
        &["put", "/k", "v"],
        &["list", "/"],
        &["cluster", "status"],
        &["member", "list"],
    ] {
        dead.run(args)
            .await?
            .expect_code(5)?
            .expect_stderr("cannot connect")?
            .expect_stderr(DEAD_ENDPOINT)?;
    }

    // Nothing listening first, a real node second: the CLI fails over.
    let real = cluster.admin_addr(2).to_string();
    let ctl = Ctl::new(format!("{DEAD_ENDPOINT},{real}"))?;
    let run = ctl.run(&["put", "/failover", "ok"]).await?;
    run.expect_ok()?;
    let run = ctl.run(&["get", "/failover"]).await?;
    run.expect_ok()?;
    ensure!(run.stdout == b"ok\n", "{run}");
    let run = ctl.run(&["cluster", "status", "-o", "json"]).await?;
    run.expect_ok()?;
    ensure!(u64_field(&run.json()?, "reachable")? == 3, "{run}");
    ctl.run(&["member", "list"]).await?.expect_ok()?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 5. watch
// ---------------------------------------------------------------------------

/// One expected watch event.
#[derive(Debug)]
struct Expected {
    kind: &'static str,
    key: &'static str,
    revision: u64,
    /// `value` for PUT (text), or `value_base64` when `base64` is set.
    value: Option<&'static str>,
    base64: bool,
}

fn check_json_event(line: &str, want: &Expected) -> Result<()> {
    let v: Value =
        serde_json::from_str(line).with_context(|| format!("watch line is not JSON: {line:?}"))?;
    let ctx = || format!("event {line}, expected {want:?}");
    ensure!(str_field(&v, "type")? == want.kind, "{}", ctx());
    ensure!(str_field(&v, "key")? == want.key, "{}", ctx());
    ensure!(u64_field(&v, "revision")? == want.revision, "{}", ctx());
    match (want.value, want.base64) {
        (Some(val), false) => ensure!(str_field(&v, "value")? == val, "{}", ctx()),
        (Some(val), true) => ensure!(str_field(&v, "value_base64")? == val, "{}", ctx()),
        (None, _) => ensure!(
            v.get("value").is_none() && v.get("value_base64").is_none(),
            "{}",
            ctx()
        ),
    }
    Ok(())
}

fn table_event(want: &Expected) -> String {
    match (want.kind, want.value) {
        ("PUT", Some(v)) if want.base64 => {
            format!("PUT {} rev={} base64:{v}", want.key, want.revision)
        }
        ("PUT", Some(v)) => format!("PUT {} rev={} {v}", want.key, want.revision),
        _ => format!("DELETE {} rev={}", want.key, want.revision),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_puts_and_deletes_in_order() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let ctl = Ctl::for_cluster(&cluster)?;

    // From revision 1 every matching event is replayed, so the writes below
    // may happen before or after the streams open.
    let mut json_watch = ctl.spawn(&["watch", "/w/", "--rev", "1", "-o", "json"])?;
    let mut table_watch = ctl.spawn(&["watch", "/w/", "--rev", "1"])?;

    let r1 = put_json(&ctl, "/w/a", "v1").await?;
    let outside = put_json(&ctl, "/x/outside", "no").await?;
    let r2 = put_json(&ctl, "/w/b", "v2").await?;
    let r3 = put_json(&ctl, "/w/a", "v3").await?;
    let r4 = delete_json(&ctl, "/w/a").await?;
    let run = ctl
        .run_with_stdin(&["put", "/w/bin", "-", "-o", "json"], &[0xff, 0x00])
        .await?;
    run.expect_ok()?;
    let r5 = u64_field(&run.json()?, "revision")?;
    ctl.run(&["delete", "/x/outside"]).await?.expect_ok()?;
    // A last event under the prefix: once it arrives, everything before it
    // has, so an event for /x/... would have shown up in between.
    let r6 = put_json(&ctl, "/w/zz-end", "end").await?;
    let revs = [r1, outside, r2, r3, r4, r5, r6];
    ensure!(
        revs.windows(2).all(|w| w[0] < w[1]),
        "revisions not increasing: {revs:?}"
    );

    let want = [
        Expected {
            kind: "PUT",
            key: "/w/a",
            revision: r1,
            value: Some("v1"),
            base64: false,
        },
        Expected {
            kind: "PUT",
            key: "/w/b",
            revision: r2,
            value: Some("v2"),
            base64: false,
        },
        Expected {
            kind: "PUT",
            key: "/w/a",
            revision: r3,
            value: Some("v3"),
            base64: false,
        },
        Expected {
            kind: "DELETE",
            key: "/w/a",
            revision: r4,
            value: None,
            base64: false,
        },
        Expected {
            kind: "PUT",
            key: "/w/bin",
            revision: r5,
            value: Some("/wA="),
            base64: true,
        },
        Expected {
            kind: "PUT",
            key: "/w/zz-end",
            revision: r6,
            value: Some("end"),
            base64: false,
        },
    ];

    let deadline = Instant::now() + WATCH_TIMEOUT;
    for w in &want {
        let line = json_watch.next_line(deadline).await?;
        check_json_event(&line, w)?;
    }
    // Create revision and version on the second put of /w/a.
    let second_put: Value = serde_json::from_str(&json_watch.seen[2])?;
    ensure!(u64_field(&second_put, "create_revision")? == r1);
    ensure!(u64_field(&second_put, "version")? == 2);

    for w in &want {
        let line = table_watch.next_line(deadline).await?;
        let expected = table_event(w);
        ensure!(
            line == expected,
            "table watch printed {line:?}, expected {expected:?}"
        );
    }

    ensure!(json_watch.is_running(), "the json watcher exited by itself");
    ensure!(
        table_watch.is_running(),
        "the table watcher exited by itself"
    );
    json_watch.stop().await;
    table_watch.stop().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// 6. member list, leader transfer
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_list_and_leader_transfer() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let leader = cluster.leader().await?;
    let ctl = Ctl::for_cluster(&cluster)?;

    let run = ctl.run(&["member", "list"]).await?;
    run.expect_ok()?;
    let rows = run.table_rows("ID")?;
    ensure!(rows.len() == 3, "expected 3 members; {run}");
    for row in &rows {
        ensure!(row.get(1).map(String::as_str) == Some("voter"), "{run}");
    }
    let text = run.stdout();
    let leader_lines: Vec<&str> = text.lines().filter(|l| l.contains("(leader)")).collect();
    ensure!(
        leader_lines.len() == 1
            && leader_lines[0].split_whitespace().next() == Some(leader.to_string().as_str()),
        "expected node {leader} marked (leader); {run}"
    );

    let run = ctl.run(&["member", "list", "-o", "json"]).await?;
    run.expect_ok()?;
    let doc = run.json()?;
    ensure!(u64_field(&doc, "leader_id")? == leader, "{run}");
    let members = array_field(&doc, "members")?;
    ensure!(members.len() == 3, "{run}");
    let mut ids = BTreeSet::new();
    for m in members {
        ensure!(bool_field(m, "voter")?, "not a voter: {m}");
        let id = u64_field(m, "node_id")?;
        ensure!(
            str_field(m, "admin_addr")? == cluster.admin_addr(id).to_string()
                && str_field(m, "raft_addr")? == cluster.raft_addr(id).to_string(),
            "wrong addresses for node {id}: {m}"
        );
        ids.insert(id);
    }
    ensure!(ids == BTreeSet::from([1, 2, 3]), "{run}");

    // Hand leadership to a follower.
    let target = a_follower(&cluster, leader)?;
    let run = ctl
        .run(&["leader", "transfer", "--to", &target.to_string()])
        .await?;
    run.expect_ok()?;
    ensure!(
        run.stdout().trim() == format!("leader is node {target}"),
        "{run}"
    );
    cluster
        .wait_for(
            CLUSTER_TIMEOUT,
            "every node to follow the new leader",
            |sts| {
                sts.values()
                    .all(|s| {
                        s.as_ref()
                            .is_ok_and(|s| s.leader_id == target && s.members.len() == 3)
                    })
                    .then_some(())
            },
        )
        .await?;

    // trellisctl's view agrees (polled: the nodes may still be settling).
    let deadline = Instant::now() + CLUSTER_TIMEOUT;
    loop {
        let run = ctl.run(&["cluster", "status", "-o", "json"]).await?;
        let verdict: Result<()> = (|| {
            run.expect_ok()?;
            let doc = run.json()?;
            let members = array_field(&doc, "members")?;
            ensure!(members.len() == 3, "{run}");
            for m in members {
                ensure!(u64_field(m, "leader_id")? == target, "{run}");
                let role = str_field(m, "role")?;
                let want = if u64_field(m, "node_id")? == target {
                    "leader"
                } else {
                    "follower"
                };
                ensure!(role == want, "{run}");
            }
            Ok(())
        })();
        match verdict {
            Ok(()) => break,
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("node {target} never became leader in status")))
            }
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }

    // Transferring to the current leader is a no-op success; to a
    // non-member is "not found".
    let run = ctl
        .run(&[
            "leader",
            "transfer",
            "--to",
            &target.to_string(),
            "-o",
            "json",
        ])
        .await?;
    run.expect_ok()?;
    let doc = run.json()?;
    ensure!(u64_field(&doc, "leader_id")? == target, "{run}");
    ensure!(u64_field(&doc, "requested")? == target, "{run}");
    ctl.run(&["leader", "transfer", "--to", "99"])
        .await?
        .expect_code(3)?
        .expect_stderr("99")?;

    // Writes work through the new leader.
    ctl.run(&["put", "/after-transfer", "x"])
        .await?
        .expect_ok()?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 7. cluster snapshot
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_snapshot_on_every_node() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let ctl = Ctl::for_cluster(&cluster)?;
    let mut last = 0;
    for i in 0..5 {
        last = put_json(&ctl, &format!("/snap/{i}"), "v").await?;
    }
    // Every node has applied the writes, so each snapshot covers them.
    for id in cluster.ids() {
        cluster.wait_for_revision(id, last).await?;
    }

    let run = ctl.run(&["cluster", "snapshot", "-o", "json"]).await?;
    run.expect_ok()?;
    let doc = run.json()?;
    let members = array_field(&doc, "members")?;
    ensure!(members.len() == 3, "{run}");
    let mut ids = BTreeSet::new();
    for m in members {
        ensure!(bool_field(m, "ok")?, "snapshot failed: {m}");
        let id = u64_field(m, "node_id")?;
        let index = u64_field(m, "snapshot_index")?;
        ensure!(index > 0, "node {id} reports snapshot index 0; {run}");
        let status = cluster.status(id).await?;
        ensure!(
            status.snapshot_index >= index,
            "node {id}: Status says snapshot index {} < {index} reported by the CLI",
            status.snapshot_index
        );
        ids.insert(id);
    }
    ensure!(ids == BTreeSet::from([1, 2, 3]), "{run}");

    let run = ctl.run(&["cluster", "snapshot"]).await?;
    run.expect_ok()?;
    let rows = run.table_rows("NODE")?;
    ensure!(rows.len() == 3, "{run}");
    for row in &rows {
        let index: u64 = row
            .get(2)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no SNAPSHOT-INDEX in {row:?}; {run}"))?;
        ensure!(index > 0, "snapshot index 0 in {row:?}; {run}");
    }

    // The data is still there after the log was purged.
    let run = ctl.run(&["list", "/snap/", "-o", "json"]).await?;
    run.expect_ok()?;
    ensure!(u64_field(&run.json()?, "count")? == 5, "{run}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_on_next_endpoint_without_duplicates() -> Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.leader().await?;
    let follower = a_follower(&cluster, leader)?;
    let ctl = Ctl::for_cluster(&cluster)?;

    // The follower comes first, so the watcher streams from it.
    let mut order = vec![cluster.admin_addr(follower).to_string()];
    order.extend(
        cluster
            .ids()
            .into_iter()
            .filter(|&id| id != follower)
            .map(|id| cluster.admin_addr(id).to_string()),
    );
    let mut watcher =
        Ctl::new(order.join(","))?.spawn(&["watch", "/f/", "--rev", "1", "-o", "json"])?;

    let r1 = put_json(&ctl, "/f/1", "a").await?;
    let deadline = Instant::now() + WATCH_TIMEOUT;
    let first = Expected {
        kind: "PUT",
        key: "/f/1",
        revision: r1,
        value: Some("a"),
        base64: false,
    };
    check_json_event(&watcher.next_line(deadline).await?, &first)?;

    // The stream is up (from the follower): kill that node.
    cluster.kill(follower).await?;
    let r2 = put_json(&ctl, "/f/2", "b").await?;
    let r3 = delete_json(&ctl, "/f/1").await?;
    let r4 = put_json(&ctl, "/f/3", "c").await?;
    let rest = [
        Expected {
            kind: "PUT",
            key: "/f/2",
            revision: r2,
            value: Some("b"),
            base64: false,
        },
        Expected {
            kind: "DELETE",
            key: "/f/1",
            revision: r3,
            value: None,
            base64: false,
        },
        Expected {
            kind: "PUT",
            key: "/f/3",
            revision: r4,
            value: Some("c"),
            base64: false,
        },
    ];
    // Exactly these, in order: a replay of /f/1 after the reconnect would
    // show up here instead.
    for w in &rest {
        check_json_event(&watcher.next_line(deadline).await?, w)?;
    }
    ensure!(
        watcher.is_running(),
        "the watcher exited after the failover"
    );
    let ended = watcher.stop().await;
    ensure!(
        ended.contains("resuming from revision"),
        "the watcher did not report the resume on stderr: {ended}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_init_forms_a_five_node_cluster() -> Result<()> {
    let cluster = Cluster::spawn_unformed(trellis_tests::ClusterOptions {
        nodes: 5,
        ..Default::default()
    })
    .await?;
    let ctl = Ctl::for_cluster(&cluster)?;
    ctl.run(&["cluster", "init"]).await?.expect_ok()?;
    // A second init is refused rather than forming a second cluster.
    let again = ctl.run(&["cluster", "init"]).await?;
    ensure!(
        again.code != Some(0) || again.stderr.contains("already"),
        "{again}"
    );
    let leader = cluster.wait_converged().await?;
    let run = ctl.run(&["member", "list", "-o", "json"]).await?;
    run.expect_ok()?;
    let doc = run.json()?;
    let members = array_field(&doc, "members")?;
    ensure!(members.len() == 5, "{run}");
    for m in members {
        ensure!(bool_field(m, "voter")?, "not a voter: {m}");
    }
    ensure!(u64_field(&doc, "leader_id")? == leader, "{run}");
    // Writes go through with two of five nodes down.
    let mut cluster = cluster;
    let followers: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    cluster.kill(followers[0]).await?;
    cluster.kill(followers[1]).await?;
    let ctl = Ctl::new(cluster.admin_addr(leader).to_string())?;
    ctl.run(&["put", "/five", "ok"]).await?.expect_ok()?;
    Ok(())
}
