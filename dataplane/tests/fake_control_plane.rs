//! The sidecar against an in-process fake control plane: a quinn server
//! speaking the sidecar protocol (join, renew, watch, session) from a
//! scripted store, with hooks to misbehave. It checks the sidecar's side
//! of the protocol — join and refusal, snapshot/delta application, resume
//! after a failover, refusal of a stale delta, lease re-registration,
//! goodbye, renewal, restart from disk — without a real `trellisd`
//! (end-to-end tests against real nodes live in `tests/`).

// The fake server's helpers are test code too: a broken fixture should
// fail loudly.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;
use trellis_dataplane::{ConfigSource, Sidecar, SidecarConfig, SidecarError};
use trellis_identity::{Ca, ClientAuth, Identity, ALPN_SIDECAR};
use trellis_proto::frame::{read_frame, write_frame, MAX_FRAME_BYTES};
use trellis_proto::sidecar::{
    certificate_response, error, event, open, session_message, watch_message, CertificateResponse,
    Delta, Event, IssuedCertificate, KeyValue, Open, Progress, SessionAccepted, SessionAck,
    SessionMessage, SessionRequest, SessionUpdate, Snapshot, WatchMessage, WatchRequest,
};

const TOKEN_OK: &str = "trellis-0123456789abcdef.0123456789abcdef0123456789abcdef";
const TOKEN_BAD: &str = "trellis-fedcba9876543210.0123456789abcdef0123456789abcdef";

/// The cluster's state, shared by every fake node.
struct Cluster {
    ca: Ca,
    /// Validity of issued workload certificates.
    cert_validity: Mutex<Duration>,
    revision: Mutex<(u64, BTreeMap<String, KeyValue>, Vec<Delta>)>,
    changes: broadcast::Sender<Delta>,
    watch_requests: Mutex<Vec<(u64, WatchRequest)>>,
    session_requests: Mutex<Vec<(u64, SessionRequest)>>,
    session_updates: Mutex<Vec<(u64, SessionUpdate)>>,
    renewals: AtomicU64,
    /// Send a duplicate of the snapshot's revision as a delta, once.
    inject_stale_delta: AtomicBool,
    /// Answer the next SessionUpdate with NOT_FOUND, once.
    lose_lease: AtomicBool,
    next_lease: AtomicU64,
}

impl Cluster {
    fn new() -> Arc<Cluster> {
        Arc::new(Cluster {
            ca: Ca::create("trellis.local").unwrap(),
            cert_validity: Mutex::new(Duration::from_secs(3600)),
            revision: Mutex::new((1, BTreeMap::new(), Vec::new())),
            changes: broadcast::channel(1024).0,
            watch_requests: Mutex::default(),
            session_requests: Mutex::default(),
            session_updates: Mutex::default(),
            renewals: AtomicU64::new(0),
            inject_stale_delta: AtomicBool::new(false),
            lose_lease: AtomicBool::new(false),
            next_lease: AtomicU64::new(100),
        })
    }

    /// Commits one revision putting `key` = `value`; returns the revision.
    fn put(&self, key: &str, value: &[u8]) -> u64 {
        let mut st = self.revision.lock().unwrap();
        st.0 += 1;
        let rev = st.0;
        let kv = KeyValue {
            key: key.into(),
            value: value.to_vec(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: 0,
        };
        st.1.insert(key.into(), kv.clone());
        let delta = Delta {
            revision: rev,
            events: vec![Event {
                r#type: event::Type::Put as i32,
                kv: Some(kv),
            }],
        };
        st.2.push(delta.clone());
        let _ = self.changes.send(delta);
        rev
    }

    fn issue(&self, csr_pem: &str, ns: &str, svc: &str) -> CertificateResponse {
        let validity = *self.cert_validity.lock().unwrap();
        let issued = self
            .ca
            .sign_csr(
                csr_pem,
                &Identity::Workload {
                    namespace: ns.into(),
                    service: svc.into(),
                },
                &[],
                validity,
            )
            .unwrap();
        CertificateResponse {
            result: Some(certificate_response::Result::Certificate(
                IssuedCertificate {
                    cert_pem: issued.cert_pem,
                    ca_pem: self.ca.cert_pem().to_string(),
                    spiffe_id: issued.info.spiffe_id.clone(),
                    serial: issued.info.serial.clone(),
                    not_before_unix_ms: issued.info.not_before_unix_ms,
                    not_after_unix_ms: issued.info.not_after_unix_ms,
                },
            )),
        }
    }
}

fn pb_error(code: error::Code, message: &str, retryable: bool) -> trellis_proto::sidecar::Error {
    trellis_proto::sidecar::Error {
        code: code as i32,
        message: message.into(),
        retryable,
    }
}

/// One fake control node.
struct Node {
    id: u64,
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
}

impl Node {
    fn start(id: u64, cluster: &Arc<Cluster>) -> Node {
        let (issued, key) = cluster
            .ca
            .issue_node(id, &["127.0.0.1".to_string()], Duration::from_secs(3600))
            .unwrap();
        let tls = trellis_identity::server_config(
            cluster.ca.cert_pem(),
            &issued.cert_pem,
            &key,
            ClientAuth::Optional,
            &[ALPN_SIDECAR],
        )
        .unwrap();
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let endpoint = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(quic)),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let ep = endpoint.clone();
        let cluster = Arc::clone(cluster);
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let cluster = Arc::clone(&cluster);
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        tokio::spawn(serve_stream(id, Arc::clone(&cluster), send, recv));
                    }
                });
            }
        });
        Node { id, addr, endpoint }
    }

    /// The node dies: its connections are closed.
    fn kill(&self) {
        self.endpoint.close(quinn::VarInt::from_u32(9), b"killed");
    }
}

async fn serve_stream(
    node: u64,
    cluster: Arc<Cluster>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let Ok(Some(open)) = read_frame::<_, Open>(&mut recv, MAX_FRAME_BYTES, "open").await else {
        return;
    };
    match open.kind {
        Some(open::Kind::Join(j)) => {
            let resp = if j.token != TOKEN_OK {
                CertificateResponse {
                    result: Some(certificate_response::Result::Error(pb_error(
                        error::Code::Unauthenticated,
                        "join token expired",
                        false,
                    ))),
                }
            } else {
                let svc = if j.service.is_empty() {
                    "any"
                } else {
                    &j.service
                };
                cluster.issue(&j.csr_pem, &j.namespace, svc)
            };
            let _ = write_frame(&mut send, &resp).await;
            let _ = send.finish();
        }
        Some(open::Kind::Renew(r)) => {
            cluster.renewals.fetch_add(1, Ordering::SeqCst);
            let resp = cluster.issue(&r.csr_pem, "default", "reviews");
            let _ = write_frame(&mut send, &resp).await;
            let _ = send.finish();
        }
        Some(open::Kind::Watch(w)) => serve_watch(node, cluster, send, w).await,
        Some(open::Kind::Session(s)) => serve_session(node, cluster, send, recv, s).await,
        None => {}
    }
}

async fn serve_watch(
    node: u64,
    cluster: Arc<Cluster>,
    mut send: quinn::SendStream,
    req: WatchRequest,
) {
    cluster
        .watch_requests
        .lock()
        .unwrap()
        .push((node, req.clone()));
    let mut live = cluster.changes.subscribe();
    let (first, mut last) = {
        let st = cluster.revision.lock().unwrap();
        let msgs: Vec<watch_message::Kind> = match req.after_revision {
            None => {
                // Two chunks, to exercise reassembly.
                let kvs: Vec<KeyValue> = st.1.values().cloned().collect();
                let half = kvs.len() / 2;
                vec![
                    watch_message::Kind::Snapshot(Snapshot {
                        revision: st.0,
                        kvs: kvs[..half].to_vec(),
                        more: true,
                    }),
                    watch_message::Kind::Snapshot(Snapshot {
                        revision: st.0,
                        kvs: kvs[half..].to_vec(),
                        more: false,
                    }),
                ]
            }
            Some(after) => {
                st.2.iter()
                    .filter(|d| d.revision > after)
                    .cloned()
                    .map(watch_message::Kind::Delta)
                    .collect()
            }
        };
        (msgs, st.0)
    };
    for kind in first {
        let msg = WatchMessage {
            node_id: node,
            kind: Some(kind),
        };
        if write_frame(&mut send, &msg).await.is_err() {
            return;
        }
    }
    if req.after_revision.is_none() && cluster.inject_stale_delta.swap(false, Ordering::SeqCst) {
        let msg = WatchMessage {
            node_id: node,
            kind: Some(watch_message::Kind::Delta(Delta {
                revision: last,
                events: vec![],
            })),
        };
        let _ = write_frame(&mut send, &msg).await;
    }
    let interval = Duration::from_millis(u64::from(req.progress_interval_ms.max(50)));
    loop {
        let kind = tokio::select! {
            d = live.recv() => match d {
                Ok(d) if d.revision > last => { last = d.revision; watch_message::Kind::Delta(d) }
                Ok(_) => continue,
                Err(_) => return,
            },
            _ = tokio::time::sleep(interval) => watch_message::Kind::Progress(Progress { revision: last }),
        };
        let msg = WatchMessage {
            node_id: node,
            kind: Some(kind),
        };
        if write_frame(&mut send, &msg).await.is_err() {
            return;
        }
    }
}

async fn serve_session(
    node: u64,
    cluster: Arc<Cluster>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    req: SessionRequest,
) {
    cluster
        .session_requests
        .lock()
        .unwrap()
        .push((node, req.clone()));
    let lease_id = if req.resume_lease_id != 0 {
        req.resume_lease_id
    } else {
        cluster.next_lease.fetch_add(1, Ordering::SeqCst)
    };
    let accepted = SessionMessage {
        kind: Some(session_message::Kind::Accepted(SessionAccepted {
            node_id: node,
            spiffe_id: "spiffe://trellis.local/ns/default/svc/reviews".into(),
            lease_id,
            ttl_ms: req.ttl_ms,
            instance_key: "/instance/default/reviews-1".into(),
        })),
    };
    if write_frame(&mut send, &accepted).await.is_err() {
        return;
    }
    while let Ok(Some(update)) =
        read_frame::<_, SessionUpdate>(&mut recv, MAX_FRAME_BYTES, "update").await
    {
        cluster.session_updates.lock().unwrap().push((node, update));
        let reply = if cluster.lose_lease.swap(false, Ordering::SeqCst) {
            session_message::Kind::Error(pb_error(error::Code::NotFound, "lease expired", false))
        } else {
            session_message::Kind::Ack(SessionAck {
                ttl_ms: req.ttl_ms,
                revision: cluster.revision.lock().unwrap().0,
            })
        };
        let done = update.goodbye || matches!(reply, session_message::Kind::Error(_));
        let _ = write_frame(&mut send, &SessionMessage { kind: Some(reply) }).await;
        if done {
            let _ = send.finish();
            return;
        }
    }
}

fn sidecar_config(
    dir: &Path,
    cluster: &Cluster,
    seeds: &[&Node],
    token: Option<&str>,
) -> SidecarConfig {
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, cluster.ca.cert_pem()).unwrap();
    let mut c = SidecarConfig::from_toml(
        r#"
        name = "reviews-1"
        service = "reviews"
        admin_addr = "127.0.0.1:0"
        outbound_addr = "127.0.0.1:0"
        inbound_addr = "127.0.0.1:0"
        lease_ttl_ms = 1500
        reconnect_base_ms = 10
        reconnect_max_ms = 100
        connect_timeout_ms = 500
        progress_interval_ms = 200
        [instance]
        address = "127.0.0.1"
        port = 9080
        labels = { version = "v1" }
        "#,
    )
    .unwrap();
    c.seeds = seeds.iter().map(|n| n.addr.to_string()).collect();
    c.data_dir = dir.join("data");
    c.ca_file = ca_file;
    c.join_token = token.map(str::to_string);
    c
}

/// Polls `f` every 20 ms for up to 10 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_watches_acks_and_says_goodbye() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new();
    cluster.put("/service/default/reviews", br#"{"apiVersion":"trellis/v1","kind":"Service","metadata":{"name":"reviews","namespace":"default"},"spec":{"ports":[{"name":"http","port":9080,"protocol":"http"}]}}"#);
    cluster.put("/other/key", b"raw");
    let node = Node::start(1, &cluster);
    let sidecar = Sidecar::start(sidecar_config(
        dir.path(),
        &cluster,
        &[&node],
        Some(TOKEN_OK),
    ))
    .await
    .unwrap();

    // admin.addr is written for tools that start the sidecar on port 0.
    let written = std::fs::read_to_string(dir.path().join("data/admin.addr")).unwrap();
    assert_eq!(written.trim(), sidecar.admin_addr().to_string());

    let config = sidecar.config();
    eventually("the snapshot", || config.borrow().revision == 3).await;
    let cfg = config.borrow().clone();
    assert_eq!(cfg.source, ConfigSource::ControlPlane { node_id: 1 });
    assert!(cfg.service("default", "reviews").is_some());
    assert_eq!(cfg.raw.len(), 2);

    let (status, body) = http_get(sidecar.admin_addr(), "/ready").await;
    assert_eq!((status, body.trim()), (200, "ready"));

    let rev = cluster.put("/other/key2", b"x");
    eventually("the delta", || config.borrow().revision == rev).await;
    eventually("an ack of the delta", || {
        cluster
            .session_updates
            .lock()
            .unwrap()
            .iter()
            .any(|(_, u)| u.applied_revision == rev)
    })
    .await;

    let (status, dump) = http_get(sidecar.admin_addr(), "/config_dump").await;
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["revision"], rev);
    assert_eq!(dump["connected"], true);
    assert_eq!(dump["attached_to"], node.addr.to_string());
    assert_eq!(
        dump["identity"],
        "spiffe://trellis.local/ns/default/svc/reviews"
    );
    assert_eq!(dump["lease_id"], 100);
    assert_eq!(dump["counts"]["Service"], 1);
    let (_, updates) = http_get(sidecar.admin_addr(), "/debug/updates").await;
    let updates: serde_json::Value = serde_json::from_str(&updates).unwrap();
    assert_eq!(updates[0]["kind"], "snapshot");
    assert_eq!(updates[1]["kind"], "delta");
    assert_eq!(updates[1]["keys"][0]["key"], "/other/key2");

    let reqs = cluster.session_requests.lock().unwrap().clone();
    assert_eq!(reqs[0].1.sidecar_name, "reviews-1");
    assert_eq!(reqs[0].1.resume_lease_id, 0);
    let inst = reqs[0].1.instance.clone().unwrap();
    assert_eq!(
        (inst.name.as_str(), inst.address.as_str(), inst.port),
        ("reviews-1", "127.0.0.1", 9080)
    );
    assert_eq!(inst.labels["version"], "v1");

    sidecar.stop().await.unwrap();
    assert!(
        cluster
            .session_updates
            .lock()
            .unwrap()
            .iter()
            .any(|(_, u)| u.goodbye),
        "goodbye sent"
    );
    // The certificate and the config were saved.
    assert!(dir.path().join("data/identity/cert.pem").exists());
    let saved = trellis_dataplane::disk::load(&dir.path().join("data/config.json"))
        .unwrap()
        .unwrap();
    assert_eq!(saved.revision, rev);
    assert_eq!(
        cluster.watch_requests.lock().unwrap()[0].1.after_revision,
        None
    );

    // Restart with no reachable control plane and no token: the stored
    // certificate and config are used, and it is ready at once.
    node.kill();
    let mut c = sidecar_config(dir.path(), &cluster, &[&node], None);
    c.seeds = vec!["127.0.0.1:9".into()];
    let sidecar = Sidecar::start(c).await.unwrap();
    let cfg = sidecar.config().borrow().clone();
    assert_eq!(cfg.source, ConfigSource::Disk);
    assert_eq!(cfg.revision, rev);
    assert!(cfg.service("default", "reviews").is_some());
    let (status, _) = http_get(sidecar.admin_addr(), "/ready").await;
    assert_eq!(status, 200);
    let identity = sidecar.identity();
    eventually("the stored identity", || identity.borrow().is_some()).await;
    sidecar.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_join_fails_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new();
    let node = Node::start(1, &cluster);
    let sidecar = Sidecar::start(sidecar_config(
        dir.path(),
        &cluster,
        &[&node],
        Some(TOKEN_BAD),
    ))
    .await
    .unwrap();
    let (status, body) = http_get(sidecar.admin_addr(), "/ready").await;
    assert_eq!(status, 503, "{body}");
    let err = tokio::time::timeout(Duration::from_secs(10), sidecar.wait())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("join refused by {}: join token expired", node.addr)
    );
    assert_eq!(err.exit_code(), 1);
    assert!(matches!(err, SidecarError::Identity(_)));
    assert!(!dir.path().join("data/identity/cert.pem").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_and_resumes_from_the_applied_revision() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new();
    cluster.put("/a", b"1");
    let nodes = [Node::start(1, &cluster), Node::start(2, &cluster)];
    let sidecar = Sidecar::start(sidecar_config(
        dir.path(),
        &cluster,
        &[&nodes[0], &nodes[1]],
        Some(TOKEN_OK),
    ))
    .await
    .unwrap();
    let config = sidecar.config();
    let status = sidecar.status();
    eventually("the snapshot", || config.borrow().revision == 2).await;
    eventually("a session", || status.borrow().lease_id != 0).await;
    let first = status.borrow().node_id.unwrap();
    let lease = status.borrow().lease_id;
    let (dead, alive) = if first == 1 {
        (&nodes[0], &nodes[1])
    } else {
        (&nodes[1], &nodes[0])
    };
    dead.kill();
    let rev = cluster.put("/b", b"2");
    eventually("the delta via the other node", || {
        config.borrow().revision == rev
    })
    .await;
    assert_eq!(
        config.borrow().source,
        ConfigSource::ControlPlane { node_id: alive.id }
    );
    eventually("attached to the other node", || {
        status.borrow().attached_to == Some(alive.addr)
    })
    .await;

    let watches = cluster.watch_requests.lock().unwrap().clone();
    let resumed = watches.iter().find(|(n, _)| *n == alive.id).unwrap();
    assert_eq!(
        resumed.1.after_revision,
        Some(2),
        "resumed from the applied revision"
    );
    eventually("a session on the other node", || {
        cluster
            .session_requests
            .lock()
            .unwrap()
            .iter()
            .any(|(n, _)| *n == alive.id)
    })
    .await;
    let sessions = cluster.session_requests.lock().unwrap().clone();
    let resumed = sessions.iter().find(|(n, _)| *n == alive.id).unwrap();
    assert_eq!(resumed.1.resume_lease_id, lease, "the lease is resumed");

    // Each revision was applied exactly once.
    let log = sidecar.updates().records();
    let revs: Vec<u64> = log.iter().map(|r| r.revision).collect();
    assert_eq!(revs, [2, rev]);
    sidecar.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_delta_is_refused_and_the_watch_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new();
    cluster.put("/a", b"1");
    cluster.inject_stale_delta.store(true, Ordering::SeqCst);
    let node = Node::start(1, &cluster);
    let sidecar = Sidecar::start(sidecar_config(
        dir.path(),
        &cluster,
        &[&node],
        Some(TOKEN_OK),
    ))
    .await
    .unwrap();
    let status = sidecar.status();
    eventually("a reconnect", || {
        status.borrow().connections >= 2 && status.borrow().connected
    })
    .await;
    eventually("the second watch", || {
        cluster.watch_requests.lock().unwrap().len() >= 2
    })
    .await;
    let config = sidecar.config();
    assert_eq!(config.borrow().revision, 2);
    let watches = cluster.watch_requests.lock().unwrap().clone();
    assert_eq!(watches[0].1.after_revision, None);
    assert_eq!(watches[1].1.after_revision, Some(2));
    let rev = cluster.put("/b", b"2");
    eventually("the next delta", || config.borrow().revision == rev).await;
    let kinds: Vec<(&str, u64)> = sidecar
        .updates()
        .records()
        .iter()
        .map(|r| (r.kind, r.revision))
        .collect();
    assert_eq!(
        kinds,
        [("snapshot", 2), ("delta", rev)],
        "the stale delta was not applied"
    );
    sidecar.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_lease_is_registered_anew() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new();
    cluster.lose_lease.store(true, Ordering::SeqCst);
    let node = Node::start(1, &cluster);
    let sidecar = Sidecar::start(sidecar_config(
        dir.path(),
        &cluster,
        &[&node],
        Some(TOKEN_OK),
    ))
    .await
    .unwrap();
    eventually("a second session", || {
        cluster.session_requests.lock().unwrap().len() >= 2
    })
    .await;
    let reqs = cluster.session_requests.lock().unwrap().clone();
    assert_eq!(reqs[1].1.resume_lease_id, 0, "no resume of a lost lease");
    let status = sidecar.status();
    eventually("the new lease", || status.borrow().lease_id == 101).await;
    assert_eq!(status.borrow().connections, 1, "same connection");
    sidecar.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renews_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new();
    // Renewal at 0.5 of 4 s is 2 s after issue (the CA's 60 s backdate of
    // not_before does not count as lifetime).
    *cluster.cert_validity.lock().unwrap() = Duration::from_secs(4);
    let node = Node::start(1, &cluster);
    let mut config = sidecar_config(dir.path(), &cluster, &[&node], Some(TOKEN_OK));
    config.renew_at_fraction = 0.5;
    let sidecar = Sidecar::start(config).await.unwrap();
    let identity = sidecar.identity();
    eventually("the first certificate", || identity.borrow().is_some()).await;
    let first = identity.borrow().clone().unwrap().info.serial.clone();
    eventually("a renewal", || {
        identity
            .borrow()
            .as_ref()
            .is_some_and(|i| i.info.serial != first)
    })
    .await;
    assert!(cluster.renewals.load(Ordering::SeqCst) >= 1);
    let on_disk = std::fs::read_to_string(dir.path().join("data/identity/cert.pem")).unwrap();
    assert_eq!(on_disk, identity.borrow().clone().unwrap().cert_pem);
    sidecar.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sessions_share_one_endpoint() {
    let cluster = Cluster::new();
    cluster.put("/a", b"1");
    let node = Node::start(1, &cluster);
    let (csr, key) = trellis_identity::generate_csr().unwrap();
    let issued = match cluster.issue(&csr, "default", "bench").result {
        Some(certificate_response::Result::Certificate(c)) => c,
        other => panic!("{other:?}"),
    };
    let endpoint =
        trellis_dataplane::client_endpoint(cluster.ca.cert_pem(), Some((&issued.cert_pem, &key)))
            .unwrap();
    let mut sessions = Vec::new();
    for _ in 0..20 {
        let s =
            trellis_dataplane::WatchSession::connect(&endpoint, node.addr, "127.0.0.1", "/", None)
                .await
                .unwrap();
        sessions.push(s);
    }
    for s in &mut sessions {
        match s.next().await.unwrap().event {
            trellis_dataplane::WatchEvent::Snapshot { revision, kvs } => {
                assert_eq!(revision, 2);
                assert_eq!(kvs.len(), 1);
            }
            other => panic!("{other:?}"),
        }
    }
    let rev = cluster.put("/b", b"2");
    for s in &mut sessions {
        loop {
            let u = s.next().await.unwrap();
            assert_eq!(u.node_id, 1);
            if let trellis_dataplane::WatchEvent::Delta(d) = u.event {
                assert_eq!(d.revision, rev);
                break;
            }
        }
    }
}
