//! Active health checks end to end, real processes on loopback: a TLS
//! three-node cluster, a caller sidecar (`productpage`, client only) and two
//! instances of `reviews`, each its own sidecar in front of its own
//! controllable backend ([`Backend`]), with a DestinationPolicy
//! `healthCheck: {http: {path: /health}, interval: 200ms, timeout: 100ms,
//! healthyThreshold: 2, unhealthyThreshold: 2}`.
//!
//! When backend `a` starts failing `/health`:
//! * the caller's own active checks (through `a`'s sidecar over mTLS) mark
//!   `a`'s endpoint failing (`/endpoints`, `/metrics`), and every request
//!   goes to `b`;
//! * `a`'s sidecar reports its instance unhealthy: the control plane's
//!   Instance resource shows `health: unhealthy`;
//! * after a failover of `a`'s sidecar to another control node the instance
//!   stays unhealthy (the new registration carries it).
//!
//! When `a` passes again, the instance is reported healthy and `a` gets
//! traffic again. Every wait polls under a deadline.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use trellis_tests::backend::Backend;
use trellis_tests::http::{h2_client, h2_get, instances_of, H2};
use trellis_tests::sidecar::{apply, sidecar, SidecarProc};
use trellis_tests::{Cluster, ClusterOptions};

/// Deadline of one step (a condition that normally holds within a second).
const STEP: Duration = Duration::from_secs(15);
/// Poll interval under a deadline.
const POLL: Duration = Duration::from_millis(50);
/// Consecutive answers from the healthy instance that show the failing one
/// left the pool (with two instances, chance alone gives 2^-40).
const ALL_TO_B: usize = 40;

const RESOURCES: &str = r#"
apiVersion: trellis/v1
kind: Service
metadata: {name: reviews}
spec:
  ports: [{name: http, port: 9080, protocol: http}]
---
apiVersion: trellis/v1
kind: DestinationPolicy
metadata: {name: reviews}
spec:
  host: reviews
  healthCheck:
    http: {path: /health}
    interval: 200ms
    timeout: 100ms
    healthyThreshold: 2
    unhealthyThreshold: 2
"#;

/// Polls `check` until it returns `Some` (or `STEP` passes).
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + STEP;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {STEP:?} (last error: {last_err:?})");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The `spec.health` of Instance `default/name`, read from control node
/// `node` (absent in the JSON = healthy).
async fn registry_health(c: &Cluster, node: u64, name: &str) -> Result<String> {
    let r = c
        .resources_client(node)
        .get(trellis_proto::admin::ResourceGetRequest {
            kind: "Instance".into(),
            namespace: "default".into(),
            name: name.into(),
            serializable: false,
        })
        .await?
        .into_inner();
    let json: Value = serde_json::from_slice(&r.resource.context("no resource")?.json)?;
    Ok(json["spec"]["health"]
        .as_str()
        .unwrap_or("healthy")
        .to_string())
}

/// The caller's `/endpoints` entry for the reviews endpoint at `addr`.
async fn endpoint(caller: &SidecarProc, addr: &str) -> Result<Value> {
    let eps = caller.get_json("/endpoints").await?;
    eps["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["service"] == "reviews")
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["address"] == addr)
        .with_context(|| format!("no endpoint {addr} in {eps}"))
}

async fn get(h2: &H2) -> Result<String> {
    let a = h2_get(h2, "reviews", "/reviews/1", &[]).await?;
    ensure!(a.status == 200, "status {} {:?}", a.status, a.headers);
    Ok(a.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_instances_leave_the_pool_and_are_reported_unhealthy() -> Result<()> {
    let started = Instant::now();
    let mut c = Cluster::start_with(ClusterOptions {
        tls: true,
        ..ClusterOptions::default()
    })
    .await?;
    let rev = apply(&c, RESOURCES).await?;
    let a = Backend::start("a").await?;
    let b = Backend::start("b").await?;
    let mut sidecars = Vec::new();
    for (name, backend) in [("reviews-a", &a), ("reviews-b", &b)] {
        sidecars.push(
            sidecar(
                &c,
                name,
                "reviews",
                &[
                    "--app-addr".into(),
                    backend.addr.to_string(),
                    "--instance-address".into(),
                    "127.0.0.1".into(),
                ],
            )
            .await?,
        );
    }
    let caller = sidecar(&c, "productpage", "productpage", &[]).await?;
    caller
        .wait_dump(STEP, "config with both reviews instances", |d| {
            d["revision"].as_u64().unwrap_or(0) >= rev
                && instances_of(d, "reviews") == 2
                && d["identity"].is_string()
        })
        .await?;
    for s in &sidecars {
        s.wait_dump(STEP, "identity and instance", |d| {
            d["identity"].is_string() && d["instance_key"].is_string()
        })
        .await?;
    }
    let a_ep = sidecars[0].inbound_addr()?.to_string();
    let h2 = h2_client(caller.outbound_addr()?).await?;

    // Both instances serve; the caller starts checking reviews once it has
    // routed to it, and both pass.
    let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
    eventually("both instances answering", || async {
        let body = get(&h2).await?;
        let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.insert(body);
        Ok((seen.len() == 2).then_some(()))
    })
    .await?;
    eventually("the caller checking a's endpoint", || async {
        let e = endpoint(&caller, &a_ep).await?;
        Ok((e["health_check"] == "passing").then_some(()))
    })
    .await?;
    ensure!(
        sidecars[0].get_json("/config_dump").await?["app_health"] == "passing",
        "a's sidecar should be checking its app"
    );

    // a fails /health.
    a.set_health(false);
    eventually("the caller's checks marking a failing", || async {
        let e = endpoint(&caller, &a_ep).await?;
        Ok((e["health_check"] == "failing").then_some(()))
    })
    .await?;
    let (_, metrics) = caller.get("/metrics").await?;
    let gauge = format!(
        "trellis_health_check_failing{{destination=\"default/reviews\",endpoint=\"{a_ep}\"}} 1"
    );
    ensure!(metrics.contains(&gauge), "no {gauge} in\n{metrics}");
    let to_failing = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "trellis_health_check_transitions_total{destination=\"default/reviews\",to=\"failing\"} ",
            )
        })
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    ensure!(
        to_failing >= 1,
        "no transition to failing counted:\n{metrics}"
    );
    eventually("the registry showing reviews-a unhealthy", || async {
        Ok((registry_health(&c, 1, "reviews-a").await? == "unhealthy").then_some(()))
    })
    .await?;
    // The sidecar records the ack after the registry has the write.
    sidecars[0]
        .wait_dump(STEP, "a's sidecar reporting its app unhealthy", |d| {
            d["app_health"] == "failing" && d["reported_health"] == "unhealthy"
        })
        .await?;
    caller
        .wait_dump(STEP, "the caller seeing reviews-a unhealthy", |d| {
            d["resources"].as_array().is_some_and(|rs| {
                rs.iter().any(|r| {
                    r["kind"] == "Instance"
                        && r["metadata"]["name"] == "reviews-a"
                        && r["spec"]["health"] == "unhealthy"
                })
            })
        })
        .await?;
    // Every request now goes to b.
    let hits_a = a.hits();
    for i in 0..ALL_TO_B {
        let body = get(&h2).await?;
        ensure!(
            body == "b",
            "request {i} went to {body} while a fails /health"
        );
    }
    ensure!(a.hits() == hits_a, "a got traffic while failing");

    // a's sidecar fails over to another control node: the instance stays
    // unhealthy (the new registration carries it).
    let dump = sidecars[0].get_json("/config_dump").await?;
    let attached = dump["attached_node_id"]
        .as_u64()
        .context("a's sidecar is not attached")?;
    let connections = dump["connections"].as_u64().unwrap_or(0);
    c.kill(attached).await?;
    let other = c
        .ids()
        .into_iter()
        .find(|&id| id != attached)
        .context("no other node")?;
    // Registered again on a live node (the control plane's own view).
    eventually("a's sidecar registered on another node", || async {
        let st = c
            .cluster_client(other)
            .proxy_status(trellis_proto::admin::ProxyStatusRequest {})
            .await?
            .into_inner();
        Ok(st
            .sidecars
            .iter()
            .any(|s| {
                s.sidecar_name == "reviews-a"
                    && s.node_id != attached
                    && s.instance_key == "/instance/default/reviews-a"
            })
            .then_some(()))
    })
    .await?;
    ensure!(
        sidecars[0].get_json("/config_dump").await?["connections"]
            .as_u64()
            .unwrap_or(0)
            > connections,
        "a's sidecar did not reconnect"
    );
    eventually("reviews-a still unhealthy after the failover", || async {
        Ok((registry_health(&c, other, "reviews-a").await? == "unhealthy").then_some(()))
    })
    .await?;

    // a passes again: reported healthy, back in the caller's pool.
    a.set_health(true);
    eventually("the registry showing reviews-a healthy again", || async {
        Ok((registry_health(&c, other, "reviews-a").await? == "healthy").then_some(()))
    })
    .await?;
    eventually("the caller's checks passing a again", || async {
        let e = endpoint(&caller, &a_ep).await?;
        Ok((e["health_check"] == "passing" && e["health"] == "healthy").then_some(()))
    })
    .await?;
    eventually("a answering again", || async {
        Ok((get(&h2).await? == "a").then_some(()))
    })
    .await?;
    let dump = sidecars[0].get_json("/config_dump").await?;
    ensure!(
        dump["app_health"] == "passing" && dump["reported_health"] == "healthy",
        "{} {}",
        dump["app_health"],
        dump["reported_health"]
    );
    eprintln!("health-check test took {:?}", started.elapsed());
    Ok(())
}
