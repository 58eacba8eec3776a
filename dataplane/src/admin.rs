//! The admin HTTP/1.1 endpoint (hyper 1), on `admin_addr` (loopback by
//! default): liveness, readiness and a dump of what the sidecar knows.
//!
//! | route | answer |
//! |---|---|
//! | `GET /live` | 200 `live` while the process runs |
//! | `GET /ready` | 200 `ready` once a config is loaded (disk or control plane), else 503 and why |
//! | `GET /config_dump` | JSON: revision, source, connection, identity, local app health (`app_health`, `reported_health`), counts, keys, resources |
//! | `GET /debug/updates` | JSON array of the last applied updates ([`crate::updates`]) |
//! | `GET /endpoints` | JSON: every service with registered instances: its balancer, subsets and endpoints (address, instance, labels, weight, health, requests in flight from this sidecar, `health_check`: `failing` / `passing` / `unchecked` from this sidecar's active checks) |
//! | `GET /metrics` | Prometheus text: requests, latency histograms, retries, TCP, config revision ([`crate::proxy::metrics`]); health checks ([`crate::proxy::health_check`]) |
//!
//! Anything else is 404. The bound address is logged and written to
//! `<data_dir>/admin.addr` (by [`crate::Sidecar::start`]) so tests can use
//! port 0.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::control::ControlStatus;
use crate::identity::CurrentIdentity;
use crate::mesh::{ConfigSource, MeshConfig, Parsed};
use crate::proxy::balance::Balancer;
use crate::proxy::health_check::HealthChecks;
use crate::proxy::Metrics;
use crate::shutdown::Shutdown;
use crate::updates::UpdateLog;

/// What the endpoint reads; all of it shared with the rest of the sidecar.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub sidecar_name: String,
    pub config: watch::Receiver<Arc<MeshConfig>>,
    pub acks: watch::Receiver<u64>,
    pub status: watch::Receiver<ControlStatus>,
    pub identity: watch::Receiver<Option<Arc<CurrentIdentity>>>,
    pub updates: Arc<UpdateLog>,
    pub metrics: Arc<Metrics>,
    /// The request path's balancer state (in-flight counts).
    pub balancer: Arc<Balancer>,
    /// Active health-check state (destinations and the local app).
    pub health: Arc<HealthChecks>,
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(v: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(v) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode: {e}\n"),
        ),
    }
}

impl AdminState {
    /// Why the sidecar is not ready, or `None` if it is.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.config.borrow().is_loaded() {
            return None;
        }
        let status = self.status.borrow().clone();
        let why = if self.identity.borrow().is_none() {
            "no config yet: obtaining a certificate (joining the mesh)".to_string()
        } else if status.connected {
            format!(
                "no config yet: waiting for the first snapshot from {}",
                status
                    .attached_to
                    .map(|a| a.to_string())
                    .unwrap_or_default()
            )
        } else {
            match status.last_error {
                Some(e) => format!("no config yet: not connected to the control plane ({e})"),
                None => "no config yet: connecting to the control plane".to_string(),
            }
        };
        Some(why)
    }

    /// The `/config_dump` document.
    pub fn config_dump(&self) -> Value {
        let config = self.config.borrow().clone();
        let status = self.status.borrow().clone();
        let identity = self.identity.borrow().clone();
        let counts: serde_json::Map<String, Value> = config
            .counts()
            .iter()
            .map(|(k, n)| (k.as_str().to_string(), json!(n)))
            .collect();
        let mut keys = Vec::with_capacity(config.raw.len());
        let mut skipped = Vec::new();
        for (key, entry) in config.raw.iter() {
            let kind = match &entry.parsed {
                Parsed::Resource(r) => Some(r.kind().as_str()),
                Parsed::Skipped(why) => {
                    skipped.push(json!({ "key": key, "error": why }));
                    None
                }
                Parsed::Raw => None,
            };
            keys.push(json!({ "key": key, "mod_revision": entry.kv.mod_revision, "kind": kind }));
        }
        let resources: Vec<&trellis_resources::Resource> =
            config.resources().map(|r| r.as_ref()).collect();
        let node_id = match config.source {
            ConfigSource::ControlPlane { node_id } => Some(node_id),
            _ => None,
        };
        json!({
            "sidecar_name": self.sidecar_name,
            "revision": config.revision,
            "acked_revision": *self.acks.borrow(),
            "source": config.source.as_str(),
            "node_id": node_id,
            "connected": status.connected,
            "attached_to": status.attached_to.map(|a| a.to_string()),
            "attached_node_id": status.node_id,
            "lease_id": status.lease_id,
            "instance_key": status.instance_key,
            "connections": status.connections,
            "last_error": status.last_error,
            "app_health": self.health.local().as_str(),
            "reported_health": status.reported_health,
            "identity": identity.as_ref().map(|i| i.info.spiffe_id.clone()),
            "cert_serial": identity.as_ref().map(|i| i.info.serial.clone()),
            "cert_not_after_unix_ms": identity.as_ref().map(|i| i.info.not_after_unix_ms),
            "counts": counts,
            "skipped_values": config.skipped(),
            "skipped": skipped,
            "keys": keys,
            "resources": resources,
        })
    }

    /// `/endpoints`: what the balancer picks from, per service, at the
    /// current revision.
    pub fn endpoints(&self) -> Value {
        let cfg = Arc::clone(&self.config.borrow());
        let mut services: Vec<(&str, &str)> = cfg.services_with_instances().collect();
        services.sort();
        let list: Vec<Value> = services
            .into_iter()
            .map(|(ns, svc)| {
                let policy = cfg.destination_policy(ns, svc).map(|(_, p)| p);
                let lb = policy
                    .and_then(|p| p.load_balancer.as_ref())
                    .map_or(trellis_resources::policy::DEFAULT_LB_POLICY, |l| l.policy);
                let subsets: Vec<Value> = policy
                    .map(|p| {
                        p.subsets
                            .iter()
                            .map(|s| json!({"name": s.name, "labels": s.labels}))
                            .collect()
                    })
                    .unwrap_or_default();
                let eps: Vec<Value> = cfg
                    .instances(ns, svc)
                    .map(|(r, i)| {
                        let addr = SocketAddr::new(i.address, i.port);
                        json!({
                            "address": addr.to_string(),
                            "instance": r.metadata.name,
                            "labels": i.labels,
                            "weight": i.weight,
                            "health": i.health,
                            "in_flight": self.balancer.inflight.in_flight(addr),
                            "health_check": self.health.endpoint_state(addr),
                        })
                    })
                    .collect();
                json!({
                    "namespace": ns,
                    "service": svc,
                    "load_balancer": lb,
                    "subsets": subsets,
                    "endpoints": eps,
                })
            })
            .collect();
        json!({"revision": cfg.revision, "services": list})
    }

    /// Routes one request.
    pub fn handle(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        }
        match path {
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" => match self.not_ready_reason() {
                None => text(StatusCode::OK, "ready\n"),
                Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
            },
            "/config_dump" => json_response(&self.config_dump()),
            "/debug/updates" => json_response(&self.updates.records()),
            "/endpoints" => json_response(&self.endpoints()),
            "/metrics" => {
                let revision = self.config.borrow().revision;
                let mut body = self.metrics.render(revision);
                body.push_str(&self.health.render_metrics());
                let mut r = text(StatusCode::OK, body);
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            _ => text(
                StatusCode::NOT_FOUND,
                format!(
                    "no route {path}; try /live, /ready, /config_dump, /endpoints, /debug/updates, /metrics\n"
                ),
            ),
        }
    }
}

/// Serves `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, state: AdminState, mut shutdown: Shutdown) {
    let state = Arc::new(state);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    tracing::warn!(error = %e, "admin accept failed");
                    if shutdown.sleep(std::time::Duration::from_millis(100)).await {
                        return;
                    }
                    continue;
                }
            },
            _ = shutdown.wait() => return,
        };
        let state = Arc::clone(&state);
        tokio::spawn(serve_connection(stream, peer, state));
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, peer: SocketAddr, state: Arc<AdminState>) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let state = Arc::clone(&state);
        async move {
            let mut resp = state.handle(req.method(), req.uri().path());
            if req.method() == Method::HEAD {
                *resp.body_mut() = Full::new(Bytes::new());
            }
            Ok::<_, Infallible>(resp)
        }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(peer = %peer, error = %e, "admin connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ConfigCache;
    use trellis_proto::sidecar::KeyValue;

    fn state(cache: &ConfigCache) -> (AdminState, watch::Sender<ControlStatus>) {
        let (status_tx, status) = watch::channel(ControlStatus::default());
        let (_id_tx, identity) = watch::channel(None);
        (
            AdminState {
                sidecar_name: "s".into(),
                config: cache.subscribe(),
                acks: cache.acks(),
                status,
                identity,
                updates: Arc::clone(cache.log()),
                metrics: Arc::default(),
                balancer: Arc::default(),
                health: Arc::default(),
            },
            status_tx,
        )
    }

    #[test]
    fn ready_follows_the_config() {
        let mut cache = ConfigCache::default();
        let (s, _tx) = state(&cache);
        assert_eq!(s.handle(&Method::GET, "/live").status(), StatusCode::OK);
        assert_eq!(
            s.handle(&Method::GET, "/ready").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(s.not_ready_reason().unwrap().contains("certificate"));
        cache.load(3, vec![]);
        assert_eq!(s.handle(&Method::GET, "/ready").status(), StatusCode::OK);
        assert_eq!(
            s.handle(&Method::GET, "/nope").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            s.handle(&Method::POST, "/live").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn dump_lists_keys_and_resources() {
        let mut cache = ConfigCache::default();
        let svc = br#"{"apiVersion":"trellis/v1","kind":"Service","metadata":{"name":"a","namespace":"default"},"spec":{"ports":[{"name":"http","port":80,"protocol":"http"}]}}"#;
        let kv = |k: &str, v: &[u8]| KeyValue {
            key: k.into(),
            value: v.to_vec(),
            mod_revision: 4,
            ..Default::default()
        };
        cache
            .apply_snapshot(
                7,
                4,
                vec![
                    kv("/service/default/a", svc),
                    kv("/service/default/b", b"bad"),
                    kv("/x", b"raw"),
                ],
            )
            .unwrap();
        let (s, tx) = state(&cache);
        tx.send_modify(|st| {
            st.connected = true;
            st.attached_to = Some("127.0.0.1:7381".parse().unwrap());
        });
        let d = s.config_dump();
        assert_eq!(d["revision"], 4);
        assert_eq!(d["source"], "control-plane");
        assert_eq!(d["node_id"], 7);
        assert_eq!(d["connected"], true);
        assert_eq!(d["attached_to"], "127.0.0.1:7381");
        assert_eq!(d["identity"], Value::Null);
        assert_eq!(d["counts"]["Service"], 1);
        assert_eq!(d["skipped_values"], 1);
        assert_eq!(d["keys"].as_array().unwrap().len(), 3);
        assert_eq!(d["keys"][0]["kind"], "Service");
        assert_eq!(d["keys"][1]["kind"], Value::Null);
        assert_eq!(d["resources"][0]["metadata"]["name"], "a");
        let updates: Value = serde_json::from_slice(
            &futures::executor::block_on(http_body_util::BodyExt::collect(
                s.handle(&Method::GET, "/debug/updates").into_body(),
            ))
            .unwrap()
            .to_bytes(),
        )
        .unwrap();
        assert_eq!(updates[0]["kind"], "snapshot");
        assert_eq!(updates[0]["node_id"], 7);
    }

    #[test]
    fn endpoints_and_metrics_show_health_checks() {
        let mut cache = ConfigCache::default();
        let inst = br#"{"apiVersion":"trellis/v1","kind":"Instance","metadata":{"name":"r1","namespace":"default"},"spec":{"service":"reviews","address":"127.0.0.1","port":7001}}"#;
        cache
            .apply_snapshot(
                1,
                2,
                vec![KeyValue {
                    key: "/instance/default/r1".into(),
                    value: inst.to_vec(),
                    mod_revision: 2,
                    ..Default::default()
                }],
            )
            .unwrap();
        let (s, _tx) = state(&cache);
        let eps = s.endpoints();
        assert_eq!(
            eps["services"][0]["endpoints"][0]["health_check"],
            "unchecked"
        );
        assert_eq!(s.config_dump()["app_health"], "unchecked");
        let body = futures::executor::block_on(http_body_util::BodyExt::collect(
            s.handle(&Method::GET, "/metrics").into_body(),
        ))
        .unwrap()
        .to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains("# TYPE trellis_health_check_failing gauge"),
            "{text}"
        );
        assert!(text.contains("trellis_config_revision"), "{text}");
    }

    #[tokio::test]
    async fn serves_http() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let cache = ConfigCache::default();
        let (s, _tx) = state(&cache);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (trigger, shutdown) = crate::shutdown::channel();
        let server = tokio::spawn(serve(listener, s, shutdown));
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 503"), "{out}");
        assert!(out.contains("no config yet"), "{out}");
        trigger.trigger();
        server.await.unwrap();
    }
}
