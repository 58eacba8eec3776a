//! Real `trellis-sidecar` processes against a real three-node `trellisd`
//! cluster with mutual TLS: join with a token, snapshot then every change,
//! re-attach to another node within 2 s of a `kill -9` with no gap and no
//! duplicate, a config that survives a full control-plane outage and a
//! sidecar restart (from its disk copy), catching up when the cluster comes
//! back, and certificate renewal over the open connection.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use trellis_proto::admin::{CreateTokenRequest, ListCertificatesRequest, PutRequest};
use trellis_tests::sidecar::SidecarProc;
use trellis_tests::{Cluster, ClusterOptions};

/// The bound for re-attaching after the attached node is killed.
const REATTACH_BOUND: Duration = Duration::from_secs(2);
const STEP: Duration = Duration::from_secs(30);

async fn tls_cluster(extra: &[&str]) -> Result<Cluster> {
    Cluster::start_with(ClusterOptions {
        tls: true,
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        ..ClusterOptions::default()
    })
    .await
}

async fn sidecar(c: &Cluster, name: &str) -> Result<SidecarProc> {
    let token = c
        .identity_client(1)
        .create_token(CreateTokenRequest {
            namespace: "default".into(),
            service: "reviews".into(),
            ttl_ms: 0,
            description: name.into(),
        })
        .await?
        .into_inner()
        .token;
    let pki = c.pki().context("pki")?;
    SidecarProc::spawn(
        c.dir().join(name),
        c.dir().join(format!("{name}.log")),
        vec![
            "--seeds".into(),
            c.quic_seeds(),
            "--ca-file".into(),
            pki.ca_file.display().to_string(),
            "--join-token".into(),
            token,
            "--name".into(),
            name.into(),
            "--namespace".into(),
            "default".into(),
            "--service".into(),
            "reviews".into(),
            "--instance-name".into(),
            name.into(),
            "--instance-address".into(),
            "127.0.0.1".into(),
            "--instance-port".into(),
            "9080".into(),
        ],
    )
    .await
}

async fn put(c: &Cluster, node: u64, key: &str, value: &str) -> Result<u64> {
    Ok(c.kv(node)
        .put(PutRequest {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .header
        .context("header")?
        .revision)
}

fn revision(d: &Value) -> u64 {
    d["revision"].as_u64().unwrap_or(0)
}

fn has_key(d: &Value, key: &str) -> bool {
    d["keys"]
        .as_array()
        .is_some_and(|ks| ks.iter().any(|k| k["key"] == key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_follows_every_change_across_a_kill_of_its_node() -> Result<()> {
    let mut c = tls_cluster(&[]).await?;
    put(&c, 1, "/cfg/before", "0").await?;
    let s = sidecar(&c, "reviews-a").await?;
    let d = s
        .wait_dump(STEP, "connected and synced", |d| {
            d["connected"] == true && has_key(d, "/cfg/before")
        })
        .await?;
    ensure!(
        d["identity"] == "spiffe://trellis.local/ns/default/svc/reviews",
        "{d}"
    );
    let attached = d["attached_node_id"].as_u64().context("attached node")?;
    let (code, _) = s.get("/ready").await?;
    ensure!(code == 200, "not ready: {code}");

    // Changes while attached, then kill -9 the attached node, then more.
    let writer = *c
        .ids()
        .iter()
        .find(|&&id| id != attached)
        .context("writer")?;
    let mut committed = BTreeMap::new();
    for i in 0..20 {
        let key = format!("/cfg/k{i}");
        committed.insert(put(&c, writer, &key, &i.to_string()).await?, key);
    }
    let killed_at = Instant::now();
    c.kill(attached).await?;
    let d = s
        .wait_dump(STEP, "re-attached to another node", |d| {
            d["connected"] == true
                && d["attached_node_id"]
                    .as_u64()
                    .is_some_and(|n| n != attached)
        })
        .await?;
    let reattach = killed_at.elapsed();
    ensure!(
        reattach <= REATTACH_BOUND,
        "re-attached after {reattach:?} (bound {REATTACH_BOUND:?}): {d}"
    );
    for i in 20..40 {
        let key = format!("/cfg/k{i}");
        committed.insert(put(&c, writer, &key, &i.to_string()).await?, key);
    }
    let last = *committed.keys().next_back().context("puts")?;
    s.wait_dump(STEP, "caught up", |d| revision(d) >= last)
        .await?;

    // The applied sequence: strictly increasing revisions, and every
    // committed put exactly once, at its revision.
    let updates = s.get_json("/debug/updates").await?;
    let updates = updates.as_array().context("updates array")?;
    let mut prev = 0;
    let mut seen: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for u in updates {
        let rev = u["revision"].as_u64().context("revision")?;
        if u["kind"] == "delta" {
            ensure!(
                rev > prev,
                "revision {rev} applied after {prev}: {updates:?}"
            );
            for k in u["keys"].as_array().context("keys")? {
                let key = k["key"].as_str().unwrap_or_default().to_string();
                if key.starts_with("/cfg/k") {
                    ensure!(k["mod_revision"] == rev, "{u}");
                    seen.entry(rev).or_default().push(key);
                }
            }
        }
        prev = prev.max(rev);
    }
    let expected: BTreeMap<u64, Vec<String>> =
        committed.into_iter().map(|(r, k)| (r, vec![k])).collect();
    ensure!(
        seen == expected,
        "applied /cfg/ changes differ from the committed history:\n applied {seen:?}\n committed {expected:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_survives_an_outage_and_a_sidecar_restart_then_catches_up() -> Result<()> {
    let mut c = tls_cluster(&[]).await?;
    let r = put(&c, 1, "/cfg/a", "1").await?;
    let mut s = sidecar(&c, "reviews-b").await?;
    s.wait_dump(STEP, "synced", |d| revision(d) >= r && has_key(d, "/cfg/a"))
        .await?;
    // Wait until the config is on disk (written off the hot path).
    let disk = s.data_dir().join("config.json");
    let deadline = Instant::now() + STEP;
    loop {
        let text = std::fs::read_to_string(&disk).unwrap_or_default();
        if text.contains("/cfg/a") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "config never reached {}",
            disk.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Every control node down: the sidecar keeps serving its config.
    for id in c.ids() {
        c.kill(id).await?;
    }
    let d = s
        .wait_dump(STEP, "disconnected", |d| d["connected"] == false)
        .await?;
    ensure!(has_key(&d, "/cfg/a") && revision(&d) >= r, "{d}");
    ensure!(
        s.get("/ready").await?.0 == 200,
        "not ready during the outage"
    );

    // Restart the sidecar with no control node up: it serves from disk.
    s.stop(Duration::from_secs(5)).await?;
    s.start().await?;
    let d = s
        .wait_dump(STEP, "loaded from disk", |d| has_key(d, "/cfg/a"))
        .await?;
    ensure!(d["source"] == "disk" && revision(&d) >= r, "{d}");
    ensure!(
        s.get("/ready").await?.0 == 200,
        "not ready from its disk copy"
    );

    // The cluster comes back: the sidecar catches up.
    for id in c.ids() {
        c.restart(id).await?;
    }
    c.wait_converged().await?;
    let r2 = put(&c, 2, "/cfg/b", "2").await?;
    let d = s
        .wait_dump(STEP, "caught up after the outage", |d| {
            revision(d) >= r2 && has_key(d, "/cfg/b")
        })
        .await?;
    ensure!(
        d["source"] == "control-plane" && has_key(&d, "/cfg/a"),
        "{d}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_renews_its_certificate_before_expiry() -> Result<()> {
    // 12 s certificates: renewal at ~2/3 of the lifetime, about 8 s in.
    // (The test takes that long.)
    let c = tls_cluster(&["--workload-cert-ttl-ms", "12000"]).await?;
    let s = sidecar(&c, "reviews-c").await?;
    let d = s
        .wait_dump(STEP, "joined", |d| d["cert_serial"].is_string())
        .await?;
    let first = d["cert_serial"].as_str().unwrap_or_default().to_string();
    let joined = Instant::now();
    let d = s
        .wait_dump(STEP, "renewed", |d| {
            d["cert_serial"].as_str().is_some_and(|x| x != first)
        })
        .await?;
    let renewed = d["cert_serial"].as_str().unwrap_or_default().to_string();
    let lived = joined.elapsed();
    ensure!(d["connected"] == true, "{d}");
    // Renewed at ~2/3 of the 12 s, not at once (the CA backdates
    // not_before by a minute; that is no lifetime to plan with).
    ensure!(
        lived >= Duration::from_secs(5),
        "renewed after only {lived:?}: renewal would loop"
    );
    let certs = c
        .identity_client(2)
        .list_certificates(ListCertificatesRequest {})
        .await?
        .into_inner()
        .certificates;
    let reasons: BTreeMap<String, String> =
        certs.into_iter().map(|c| (c.serial, c.reason)).collect();
    ensure!(
        reasons.get(&first).map(String::as_str) == Some("join")
            && reasons.get(&renewed).map(String::as_str) == Some("renew"),
        "{reasons:?}"
    );
    Ok(())
}
