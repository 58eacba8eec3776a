//! The sidecars' QUIC endpoint and the cluster CA on a real three-node
//! `trellisd` cluster with mutual TLS, driven frame by frame with a raw
//! protocol client (`trellis_tests::quic`): joining with a token, what is
//! refused and why, watch snapshots, deltas, resumption and compaction
//! notices, instance registration under a lease, proxy-status, and the
//! admin API's certificate checks.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tonic::Code;
use trellis_proto::admin::{
    CompactRequest, CreateTokenRequest, GetRequest, ListCertificatesRequest, ProxyStatusRequest,
    PutRequest,
};
use trellis_proto::sidecar as sc;
use trellis_tests::quic::{self, client_endpoint, connect, issued, join};
use trellis_tests::{Cluster, ClusterOptions};

const STEP: Duration = Duration::from_secs(20);

async fn tls_cluster() -> Result<Cluster> {
    Cluster::start_with(ClusterOptions {
        tls: true,
        ..ClusterOptions::default()
    })
    .await
}

fn ca_pem(c: &Cluster) -> Result<String> {
    let pki = c.pki().context("TLS cluster")?;
    Ok(std::fs::read_to_string(&pki.ca_file)?)
}

async fn token(c: &Cluster, node: u64, ns: &str, svc: &str) -> Result<String> {
    Ok(c.identity_client(node)
        .create_token(CreateTokenRequest {
            namespace: ns.into(),
            service: svc.into(),
            ttl_ms: 0,
            description: "test".into(),
        })
        .await?
        .into_inner()
        .token)
}

async fn put(c: &Cluster, node: u64, key: &str, value: &str) -> Result<u64> {
    let resp = c
        .kv(node)
        .put(PutRequest {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(resp.header.context("header")?.revision)
}

async fn next_watch(recv: &mut quinn::RecvStream) -> Result<sc::watch_message::Kind> {
    let msg = tokio::time::timeout(STEP, quic::next::<sc::WatchMessage>(recv))
        .await
        .context("no watch message in time")??
        .context("watch stream ended")?;
    msg.kind.context("empty watch message")
}

fn error_of(kind: &sc::watch_message::Kind) -> Option<&sc::Error> {
    match kind {
        sc::watch_message::Kind::Error(e) => Some(e),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_watch_register_and_proxy_status() -> Result<()> {
    let c = tls_cluster().await?;
    let ca = ca_pem(&c)?;
    let tok = token(&c, 2, "default", "reviews").await?;

    // Without a certificate: only join is allowed.
    let anon = client_endpoint(&ca, None)?;
    let conn = connect(&anon, c.quic_addr(1)).await?;
    let (_s, mut r) = quic::watch(&conn, "/", None).await?;
    let kind = next_watch(&mut r).await?;
    let e = error_of(&kind).context("a watch without a certificate must be refused")?;
    ensure!(e.code() == sc::error::Code::Unauthenticated, "{e:?}");
    ensure!(
        e.message.contains("client certificate is required"),
        "{}",
        e.message
    );

    // Garbage, unknown and out-of-scope tokens.
    for (bad, code, needle) in [
        (
            "not-a-token",
            sc::error::Code::Unauthenticated,
            "join token",
        ),
        (
            "trellis-0123456789abcdef.0123456789abcdef0123456789abcdef",
            sc::error::Code::Unauthenticated,
            "unknown",
        ),
    ] {
        let (resp, _) = join(&conn, bad, "", "").await?;
        let err = issued(resp).expect_err("bad token accepted");
        ensure!(err.to_string().contains(needle), "{bad}: {err}");
        ensure!(
            err.to_string().contains(&format!("{code:?}")),
            "{bad}: {err}"
        );
    }
    let wrong_secret = format!("{}0", &tok[..tok.len() - 1]);
    let wrong_secret = if wrong_secret == tok {
        format!("{}1", &tok[..tok.len() - 1])
    } else {
        wrong_secret
    };
    let err = issued(join(&conn, &wrong_secret, "", "").await?.0).expect_err("wrong secret");
    ensure!(err.to_string().contains("secret does not match"), "{err}");
    let err = issued(join(&conn, &tok, "default", "ratings").await?.0).expect_err("scope");
    ensure!(
        err.to_string().contains("PermissionDenied")
            && err.to_string().contains("scoped to ns/default/svc/reviews"),
        "{err}"
    );

    // A proper join, on a follower-or-leader alike (node 3).
    let conn3 = connect(&anon, c.quic_addr(3)).await?;
    let (resp, key_pem) = join(&conn3, &tok, "default", "reviews").await?;
    let cert = issued(resp)?;
    ensure!(
        cert.spiffe_id == "spiffe://trellis.local/ns/default/svc/reviews",
        "{}",
        cert.spiffe_id
    );
    ensure!(
        cert.ca_pem.trim() == ca.trim(),
        "join returns the cluster CA"
    );
    ensure!(!cert.ca_pem.contains("PRIVATE KEY"));
    let info = trellis_identity::cert_info(&cert.cert_pem)?;
    ensure!(info.serial == cert.serial);

    // Recorded, and listed.
    let certs = c
        .identity_client(1)
        .list_certificates(ListCertificatesRequest {})
        .await?
        .into_inner()
        .certificates;
    ensure!(
        certs
            .iter()
            .any(|r| r.serial == cert.serial && r.reason == "join"),
        "{certs:?}"
    );

    // With the certificate: watch from nothing → snapshot, then deltas.
    let r1 = put(&c, 1, "/app/a", "1").await?;
    // Watches are served from the node's applied state: let node 2 apply
    // the put so that the snapshot must contain it.
    c.wait_for_revision(2, r1).await?;
    let ep = client_endpoint(&ca, Some((&cert.cert_pem, &key_pem)))?;
    let conn = connect(&ep, c.quic_addr(2)).await?;
    let (_ws, mut wr) = quic::watch(&conn, "/", None).await?;
    let mut snap_rev;
    let mut keys = Vec::new();
    loop {
        match next_watch(&mut wr).await? {
            sc::watch_message::Kind::Snapshot(s) => {
                keys.extend(s.kvs.into_iter().map(|kv| kv.key));
                snap_rev = s.revision;
                if !s.more {
                    break;
                }
            }
            other => bail!("expected a snapshot first, got {other:?}"),
        }
    }
    ensure!(
        snap_rev >= r1,
        "snapshot at {snap_rev} misses the put at {r1}"
    );
    ensure!(keys.contains(&"/app/a".to_string()), "{keys:?}");
    ensure!(
        keys.iter().all(|k| !k.starts_with("/_trellis/")),
        "reserved keys leaked to a watch: {keys:?}"
    );

    let r2 = put(&c, 3, "/app/b", "2").await?;
    let r3 = put(&c, 1, "/app/a", "3").await?;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match next_watch(&mut wr).await? {
            sc::watch_message::Kind::Delta(d) => {
                ensure!(d.revision > snap_rev);
                for e in d.events {
                    let kv = e.kv.context("event without kv")?;
                    ensure!(!kv.key.starts_with("/_trellis/"), "{}", kv.key);
                    seen.push((d.revision, kv.key));
                }
            }
            sc::watch_message::Kind::Progress(_) => {}
            other => bail!("unexpected {other:?}"),
        }
    }
    ensure!(
        seen == vec![(r2, "/app/b".to_string()), (r3, "/app/a".to_string())],
        "{seen:?}"
    );

    // A session registers the instance of the certificate's own service.
    let (mut ss, mut sr) = quic::open(
        &conn,
        sc::open::Kind::Session(sc::SessionRequest {
            instance: Some(sc::InstanceRegistration {
                name: "reviews-1".into(),
                address: "127.0.0.1".into(),
                port: 9080,
                labels: [("version".to_string(), "v2".to_string())].into(),
                weight: 0,
                health: 0,
            }),
            ttl_ms: 5_000,
            resume_lease_id: 0,
            applied_revision: r3,
            sidecar_name: "reviews-sidecar-1".into(),
        }),
    )
    .await?;
    let accepted = match quic::next::<sc::SessionMessage>(&mut sr)
        .await?
        .and_then(|m| m.kind)
    {
        Some(sc::session_message::Kind::Accepted(a)) => a,
        other => bail!("expected SessionAccepted, got {other:?}"),
    };
    ensure!(accepted.instance_key == "/instance/default/reviews-1");
    ensure!(accepted.lease_id != 0 && accepted.ttl_ms == 5_000);
    // The registration reaches the watch.
    loop {
        if let sc::watch_message::Kind::Delta(d) = next_watch(&mut wr).await? {
            if d.events.iter().any(|e| {
                e.kv.as_ref()
                    .is_some_and(|kv| kv.key == accepted.instance_key)
            }) {
                break;
            }
        }
    }

    // proxy-status, from another node, sees it with its applied revision.
    let update_rev = c
        .kv(1)
        .get(GetRequest {
            key: "/app/a".into(),
            serializable: false,
        })
        .await?
        .into_inner()
        .header
        .context("header")?
        .revision;
    trellis_proto::frame::write_frame(
        &mut ss,
        &sc::SessionUpdate {
            applied_revision: update_rev,
            goodbye: false,
            health: 0,
        },
    )
    .await?;
    match quic::next::<sc::SessionMessage>(&mut sr)
        .await?
        .and_then(|m| m.kind)
    {
        Some(sc::session_message::Kind::Ack(a)) => ensure!(a.ttl_ms > 0),
        other => bail!("expected an ack, got {other:?}"),
    }
    let status = c
        .cluster_client(3)
        .proxy_status(ProxyStatusRequest {})
        .await?
        .into_inner();
    ensure!(status.unreachable.is_empty(), "{:?}", status.unreachable);
    let me = status
        .sidecars
        .iter()
        .find(|s| s.sidecar_name == "reviews-sidecar-1")
        .with_context(|| format!("sidecar missing from proxy-status: {:?}", status.sidecars))?;
    ensure!(
        me.node_id == 2 && me.applied_revision == update_rev,
        "{me:?}"
    );
    ensure!(
        me.spiffe_id.ends_with("/ns/default/svc/reviews") && me.watches == 1,
        "{me:?}"
    );

    // Goodbye deregisters at once.
    trellis_proto::frame::write_frame(
        &mut ss,
        &sc::SessionUpdate {
            applied_revision: update_rev,
            goodbye: true,
            health: 0,
        },
    )
    .await?;
    let _ = quic::next::<sc::SessionMessage>(&mut sr).await?;
    let gone = c
        .kv(1)
        .get(GetRequest {
            key: accepted.instance_key.clone(),
            serializable: false,
        })
        .await;
    // Instance keys are resource keys: raw KV reads of them work.
    ensure!(
        gone.as_ref().err().map(|s| s.code()) == Some(Code::NotFound),
        "instance still registered after goodbye: {gone:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_revision_and_compaction_notice_with_snapshot() -> Result<()> {
    let c = tls_cluster().await?;
    let ca = ca_pem(&c)?;
    let tok = token(&c, 1, "default", "web").await?;
    let anon = client_endpoint(&ca, None)?;
    let (resp, key) = join(&connect(&anon, c.quic_addr(1)).await?, &tok, "", "").await?;
    let cert = issued(resp)?;
    let ep = client_endpoint(&ca, Some((&cert.cert_pem, &key)))?;

    let mut revs = Vec::new();
    for i in 0..6 {
        revs.push(put(&c, 1, &format!("/cfg/k{i}"), &i.to_string()).await?);
    }
    // Resume after revs[2]: exactly the later revisions, in order.
    let conn = connect(&ep, c.quic_addr(3)).await?;
    let (_s, mut r) = quic::watch(&conn, "/cfg/", Some(revs[2])).await?;
    let mut got = Vec::new();
    while got.len() < 3 {
        match next_watch(&mut r).await? {
            sc::watch_message::Kind::Delta(d) => got.push(d.revision),
            sc::watch_message::Kind::Progress(_) => {}
            other => bail!("unexpected {other:?}"),
        }
    }
    ensure!(got == revs[3..].to_vec(), "{got:?} vs {revs:?}");

    // Compact past revs[3]; resuming after revs[1] gets the notice and a
    // snapshot, then continues.
    c.kv(1)
        .compact(CompactRequest { revision: revs[3] })
        .await?;
    // Node 3 serves the watch: wait until it has applied the compaction
    // (before that, it still has the history and rightly sends it).
    c.wait_for(STEP, "node 3 compacted", |sts| {
        sts.get(&3)?
            .as_ref()
            .ok()
            .filter(|s| s.compact_revision >= revs[3])
            .map(|_| ())
    })
    .await?;
    let (_s, mut r) = quic::watch(&conn, "/cfg/", Some(revs[1])).await?;
    match next_watch(&mut r).await? {
        sc::watch_message::Kind::Compacted(n) => ensure!(n.compact_revision >= revs[3], "{n:?}"),
        other => bail!("expected a compaction notice, got {other:?}"),
    }
    let snap = match next_watch(&mut r).await? {
        sc::watch_message::Kind::Snapshot(s) => s,
        other => bail!("expected a snapshot after the notice, got {other:?}"),
    };
    ensure!(
        !snap.more && snap.kvs.len() == 6 && snap.revision >= revs[5],
        "{snap:?}"
    );
    let after = put(&c, 2, "/cfg/k9", "9").await?;
    loop {
        match next_watch(&mut r).await? {
            sc::watch_message::Kind::Delta(d) => {
                ensure!(d.revision == after, "{d:?}");
                break;
            }
            sc::watch_message::Kind::Progress(_) => {}
            other => bail!("unexpected {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_requires_a_cluster_certificate_of_the_right_kind() -> Result<()> {
    let c = tls_cluster().await?;
    let pki = c.pki().context("pki")?;
    let addr = c.admin_addr(1);

    // Plaintext against the TLS listener fails.
    let plain = trellis_tests::lazy_channel(addr)?;
    let r = trellis_proto::admin::kv_client::KvClient::new(plain)
        .get(GetRequest {
            key: "/x".into(),
            serializable: true,
        })
        .await;
    ensure!(r.is_err(), "plaintext admin call succeeded");

    // A certificate from another CA is refused in the handshake.
    let other = trellis_identity::Ca::create("other.local")?;
    let (adm, adm_key) = other.issue_admin("mallory", Duration::from_secs(3600))?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pki.ca().cert_pem()))
        .identity(tonic::transport::Identity::from_pem(adm.cert_pem, adm_key));
    let ch = trellis_tests::lazy_channel_tls(addr, Some(&tls))?;
    let r = trellis_proto::admin::kv_client::KvClient::new(ch)
        .get(GetRequest {
            key: "/x".into(),
            serializable: true,
        })
        .await;
    ensure!(r.is_err(), "a foreign CA's certificate was accepted");

    // A sidecar certificate from this CA: valid, but not for the admin API.
    let (csr, key) = trellis_identity::generate_csr()?;
    let wl = pki.ca().sign_csr(
        &csr,
        &trellis_identity::Identity::Workload {
            namespace: "default".into(),
            service: "web".into(),
        },
        &[],
        Duration::from_secs(3600),
    )?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pki.ca().cert_pem()))
        .identity(tonic::transport::Identity::from_pem(wl.cert_pem, key));
    let ch = trellis_tests::lazy_channel_tls(addr, Some(&tls))?;
    let r = trellis_proto::admin::kv_client::KvClient::new(ch)
        .get(GetRequest {
            key: "/x".into(),
            serializable: true,
        })
        .await;
    let status = r.expect_err("a sidecar certificate used the admin API");
    ensure!(status.code() == Code::PermissionDenied, "{status:?}");
    ensure!(
        status.message().contains("ns/default/svc/web"),
        "{status:?}"
    );

    // The admin certificate works; reserved keys stay out of reach.
    let r = c
        .kv(1)
        .get(GetRequest {
            key: "/_trellis/ca".into(),
            serializable: false,
        })
        .await
        .expect_err("the CA record is readable through KV");
    ensure!(
        r.code() == Code::InvalidArgument && r.message().contains("keeps for itself"),
        "{r:?}"
    );
    let listed = c
        .kv(1)
        .list(trellis_proto::admin::ListRequest {
            prefix: "/".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(
        listed
            .kvs
            .iter()
            .all(|kv| !kv.key.starts_with("/_trellis/")),
        "{:?}",
        listed.kvs
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_watcher_holds_up_neither_writes_nor_other_watchers() -> Result<()> {
    let c = tls_cluster().await?;
    let ca = ca_pem(&c)?;
    let tok = token(&c, 1, "default", "web").await?;
    let anon = client_endpoint(&ca, None)?;
    let (resp, key) = join(&connect(&anon, c.quic_addr(1)).await?, &tok, "", "").await?;
    let cert = issued(resp)?;
    let ep = client_endpoint(&ca, Some((&cert.cert_pem, &key)))?;

    // A watcher that never reads, on the same node as a healthy one.
    let stuck_conn = connect(&ep, c.quic_addr(2)).await?;
    let (_stuck_send, _stuck_recv) = quic::watch(&stuck_conn, "/big/", Some(0)).await?;
    let conn = connect(&ep, c.quic_addr(2)).await?;
    let (_s, mut r) = quic::watch(&conn, "/big/", Some(0)).await?;

    // 40 × 256 KiB: far more than QUIC's flow-control windows, so the
    // stuck watcher's stream is blocked long before the end.
    let value = "x".repeat(256 * 1024);
    let mut revs = Vec::new();
    for i in 0..40 {
        let rev = tokio::time::timeout(STEP, put(&c, 1, &format!("/big/{i}"), &value))
            .await
            .context("a put was held up")??;
        revs.push(rev);
    }
    let mut got = Vec::new();
    while got.len() < revs.len() {
        match next_watch(&mut r).await? {
            sc::watch_message::Kind::Delta(d) => got.push(d.revision),
            sc::watch_message::Kind::Progress(_) => {}
            other => bail!("unexpected {other:?}"),
        }
    }
    ensure!(got == revs, "{got:?} vs {revs:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_revoked_tokens_and_foreign_certificates_are_refused() -> Result<()> {
    let c = tls_cluster().await?;
    let ca = ca_pem(&c)?;
    let anon = client_endpoint(&ca, None)?;
    let conn = connect(&anon, c.quic_addr(2)).await?;

    // A token that lives one second: usable, then refused once expired.
    let created = c
        .identity_client(1)
        .create_token(CreateTokenRequest {
            namespace: "default".into(),
            service: "web".into(),
            ttl_ms: 1_000,
            description: "short".into(),
        })
        .await?
        .into_inner();
    let expires = created.info.context("token info")?.expires_unix_ms;
    issued(join(&conn, &created.token, "", "").await?.0).context("fresh token refused")?;
    // Wait out the token's own deadline (wall clock, as the nodes check it).
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(expires.saturating_sub(now_ms) + 50)).await;
    let err = issued(join(&conn, &created.token, "", "").await?.0).expect_err("expired token");
    let msg = err.to_string();
    ensure!(
        msg.contains("Unauthenticated") && (msg.contains("expired") || msg.contains("unknown")),
        "{msg}"
    );

    // A revoked token is refused.
    let tok = token(&c, 1, "default", "web").await?;
    let id = tok
        .strip_prefix("trellis-")
        .and_then(|t| t.split('.').next())
        .context("token id")?
        .to_string();
    let revoked = c
        .identity_client(3)
        .revoke_token(trellis_proto::admin::RevokeTokenRequest { id })
        .await?
        .into_inner();
    ensure!(revoked.revoked);
    let err = issued(join(&conn, &tok, "", "").await?.0).expect_err("revoked token");
    ensure!(err.to_string().contains("unknown"), "{err}");

    // A certificate from another CA does not get through the handshake.
    let other = trellis_identity::Ca::create("other.local")?;
    let (csr, key) = trellis_identity::generate_csr()?;
    let foreign = other.sign_csr(
        &csr,
        &trellis_identity::Identity::Workload {
            namespace: "default".into(),
            service: "web".into(),
        },
        &[],
        Duration::from_secs(3600),
    )?;
    let ep = client_endpoint(&ca, Some((&foreign.cert_pem, &key)))?;
    let refused = async {
        let conn = connect(&ep, c.quic_addr(1)).await?;
        // Depending on timing the refusal shows at the handshake or on the
        // first stream.
        let (_s, mut r) = quic::watch(&conn, "/", None).await?;
        quic::next::<sc::WatchMessage>(&mut r).await
    }
    .await;
    ensure!(
        !matches!(
            refused,
            Ok(Some(sc::WatchMessage {
                kind: Some(sc::watch_message::Kind::Snapshot(_)),
                ..
            }))
        ),
        "a certificate from another CA was served: {refused:?}"
    );
    Ok(())
}

/// Join as `ns/default/svc/<svc>` and return a connection with the cert.
async fn joined(c: &Cluster, ca: &str, svc: &str, node: u64) -> Result<quinn::Connection> {
    let tok = token(c, 1, "default", svc).await?;
    let anon = client_endpoint(ca, None)?;
    let (resp, key) = join(&connect(&anon, c.quic_addr(node)).await?, &tok, "", "").await?;
    let cert = issued(resp)?;
    let ep = client_endpoint(ca, Some((&cert.cert_pem, &key)))?;
    connect(&ep, c.quic_addr(node)).await
}

async fn open_session(
    conn: &quinn::Connection,
    name: &str,
    resume_lease_id: u64,
) -> Result<sc::session_message::Kind> {
    let (_s, mut r) = quic::open(
        conn,
        sc::open::Kind::Session(sc::SessionRequest {
            instance: Some(sc::InstanceRegistration {
                name: name.into(),
                address: "127.0.0.1".into(),
                port: 9080,
                labels: Default::default(),
                weight: 0,
                health: 0,
            }),
            ttl_ms: 5_000,
            resume_lease_id,
            applied_revision: 0,
            sidecar_name: name.into(),
        }),
    )
    .await?;
    quic::next::<sc::SessionMessage>(&mut r)
        .await?
        .and_then(|m| m.kind)
        .context("no session answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_cannot_take_another_services_instance_or_lease() -> Result<()> {
    let c = tls_cluster().await?;
    let ca = ca_pem(&c)?;
    let reviews = joined(&c, &ca, "reviews", 1).await?;
    let theirs = match open_session(&reviews, "reviews-1", 0).await? {
        sc::session_message::Kind::Accepted(a) => a,
        other => bail!("reviews could not register: {other:?}"),
    };

    let web = joined(&c, &ca, "web", 2).await?;
    // The same instance name, from another service: refused.
    match open_session(&web, "reviews-1", 0).await? {
        sc::session_message::Kind::Error(e) => ensure!(
            e.code() == sc::error::Code::PermissionDenied && e.message.contains("another service"),
            "{e:?}"
        ),
        other => bail!("web took reviews' instance: {other:?}"),
    }
    // Resuming reviews' lease (its id is visible to every watcher): web
    // gets a lease of its own instead.
    let mine = match open_session(&web, "web-1", theirs.lease_id).await? {
        sc::session_message::Kind::Accepted(a) => a,
        other => bail!("web could not register: {other:?}"),
    };
    ensure!(
        mine.lease_id != theirs.lease_id,
        "web resumed reviews' lease {}",
        theirs.lease_id
    );
    let kv = c
        .kv(3)
        .get(GetRequest {
            key: theirs.instance_key.clone(),
            serializable: false,
        })
        .await?
        .into_inner()
        .kv
        .context("reviews' instance")?;
    ensure!(
        kv.lease == theirs.lease_id,
        "reviews' instance moved to lease {}",
        kv.lease
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_resume_revision_is_refused_and_the_node_keeps_serving() -> Result<()> {
    let c = tls_cluster().await?;
    let ca = ca_pem(&c)?;
    let conn = joined(&c, &ca, "web", 2).await?;
    for after in [u64::MAX, u64::MAX - 1, 1 << 63] {
        let (_s, mut r) = quic::watch(&conn, "/", Some(after)).await?;
        let kind = next_watch(&mut r).await?;
        let e = error_of(&kind).with_context(|| format!("after {after}: {kind:?}"))?;
        ensure!(e.code() == sc::error::Code::InvalidArgument, "{e:?}");
    }
    // Node 2 still answers (a wrapped revision used to spin its only thread).
    let rev = put(&c, 2, "/still/alive", "1").await?;
    ensure!(rev > 0);
    Ok(())
}
