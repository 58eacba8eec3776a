//! Active health checks, driven by the `healthCheck` of a service's
//! DestinationPolicy (HTTP `GET path`, 2xx passes; or a TCP connect), with
//! the policy's interval, per-check timeout and healthy/unhealthy
//! thresholds. Two checkers share the threshold logic ([`Thresholds`]):
//!
//! * **Destinations** ([`run_destination_checks`]): the request path calls
//!   [`HealthChecks::note_destination`] for every routed request whose
//!   destination's policy has a `healthCheck` (HTTP) and every TCP
//!   connection (a read-locked set lookup; the write lock only the first
//!   time). A background
//!   task checks, every `interval`, each endpoint (`instance.address:port`,
//!   the peer sidecar's inbound listener) of the noted destinations whose
//!   policy has a `healthCheck`: HTTP through the peer sidecar over mutual
//!   TLS (its own [`Upstreams`] pool, authority = the service, `user-agent:
//!   trellis-health-check`), so the check covers the app behind it; TCP by
//!   connecting to the endpoint. An endpoint that fails `unhealthyThreshold`
//!   checks in a row is in the failing set, which the balancer reads
//!   ([`HealthChecks::is_failing`]), until it passes `healthyThreshold` in a
//!   row. Endpoints and destinations that leave the config are forgotten.
//! * **The local app** ([`run_local_checks`]): the sidecar checks its own
//!   `app_addr` with the `healthCheck` of its own service's policy (HTTP/1.1
//!   `GET path` straight to the app, or a TCP connect) and publishes the
//!   result on a watch channel ([`HealthChecks::local_health`]); the
//!   connection manager ([`crate::control`]) reports flips to the control
//!   plane, which rewrites the Instance's `spec.health`. No check
//!   configured: [`LocalHealth::Unchecked`] (reported as healthy).
//!
//! Data enters from the compiled config (watch channel), the request path
//! (noted destinations) and the checks' network answers; it leaves through
//! the failing set (request path), the local-health channel (control
//! plane), [`HealthChecks::render_metrics`] (`/metrics`),
//! [`HealthChecks::endpoint_state`] (`/endpoints`) and `info` logs of every
//! transition.
//!
//! Every endpoint starts as passing (like a newly registered instance):
//! checks take it out, never keep it from coming in.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hyper::body::Bytes;
use hyper::header::{HeaderValue, HOST, USER_AGENT};
use hyper::{Method, Request, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;
use trellis_resources::policy::HealthCheck;

use super::body::full;
use super::inbound::ORIG_PROTO_HEADER;
use super::metrics::escape;
use super::tls::TlsSource;
use super::upstream::Upstreams;
use crate::mesh::MeshConfig;
use crate::shutdown::Shutdown;

/// The `user-agent` of every check, so apps and access logs can tell
/// checks from traffic.
pub const CHECK_USER_AGENT: &str = "trellis-health-check";

/// Most destinations remembered from [`HealthChecks::note_destination`]:
/// far more services than one caller talks to, small enough that a bug
/// noting garbage cannot grow memory without bound.
pub const MAX_NOTED_DESTINATIONS: usize = 4096;

/// Shortest time between two checks of one endpoint, whatever the policy
/// says: the control plane validates `interval > 0`, and this floor keeps
/// a value that slipped through (an old or hand-written store entry) from
/// turning a checker into a busy loop.
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(10);

/// Errors kept per endpoint for `/metrics` are cut to this many bytes: a
/// reason, not a dump of whatever the peer sent.
const MAX_ERROR_LEN: usize = 200;

/// Why one check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// No answer within the policy's `timeout`.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// TCP (or TLS / HTTP/2 to the peer sidecar) connect failed.
    #[error("connect: {0}")]
    Connect(String),
    /// The request could not be built or failed after connecting.
    #[error("request: {0}")]
    Request(String),
    /// Answered, but not 2xx.
    #[error("answered {0}")]
    Status(u16),
    /// This sidecar has no certificate yet: the check was not made and
    /// counts neither way.
    #[error("no workload certificate yet")]
    NoIdentity,
}

/// Consecutive results against the policy's thresholds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Thresholds {
    failing: bool,
    passes: u32,
    fails: u32,
}

impl Thresholds {
    /// Whether the checked thing is failing (out of the pool).
    pub fn is_failing(&self) -> bool {
        self.failing
    }

    /// Records one result; returns the new state (`true`: failing) when it
    /// flips: after `unhealthy` consecutive failures, or `healthy`
    /// consecutive passes while failing.
    pub fn record(&mut self, passed: bool, healthy: u32, unhealthy: u32) -> Option<bool> {
        if passed {
            self.fails = 0;
            self.passes = self.passes.saturating_add(1);
            if self.failing && self.passes >= healthy.max(1) {
                self.failing = false;
                return Some(false);
            }
        } else {
            self.passes = 0;
            self.fails = self.fails.saturating_add(1);
            if !self.failing && self.fails >= unhealthy.max(1) {
                self.failing = true;
                return Some(true);
            }
        }
        None
    }
}

/// The local app's health as this sidecar's own checks see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LocalHealth {
    /// No `healthCheck` for this sidecar's service (or no instance):
    /// nothing is reported, the registry keeps its default (healthy).
    #[default]
    Unchecked,
    /// Checked and passing (also the state before the first failures).
    Passing,
    /// Failed `unhealthyThreshold` checks in a row.
    Failing,
}

impl LocalHealth {
    /// `unchecked`, `passing` or `failing`.
    pub fn as_str(self) -> &'static str {
        match self {
            LocalHealth::Unchecked => "unchecked",
            LocalHealth::Passing => "passing",
            LocalHealth::Failing => "failing",
        }
    }
}

/// One checked endpoint.
#[derive(Debug, Clone)]
struct EndpointState {
    /// `namespace/service`.
    destination: String,
    thresholds: Thresholds,
    last_error: Option<String>,
}

/// Counters of one destination (`namespace/service`).
#[derive(Debug, Clone, Default)]
struct DestinationStats {
    passed: u64,
    failed: u64,
    to_failing: u64,
    to_passing: u64,
}

#[derive(Debug, Default)]
struct State {
    endpoints: BTreeMap<SocketAddr, EndpointState>,
    destinations: BTreeMap<String, DestinationStats>,
    local_transitions: u64,
}

/// Health-check state shared by the checkers, the request path and the
/// admin endpoint.
#[derive(Debug)]
pub struct HealthChecks {
    /// Endpoints failing their checks: read per request.
    failing: RwLock<HashSet<SocketAddr>>,
    /// namespace -> services the request path routed to.
    noted: RwLock<HashMap<String, HashSet<String>>>,
    /// Wakes the destination checker when a destination is first noted.
    noted_changed: Notify,
    state: Mutex<State>,
    local: watch::Sender<LocalHealth>,
}

impl Default for HealthChecks {
    fn default() -> Self {
        HealthChecks {
            failing: RwLock::default(),
            noted: RwLock::default(),
            noted_changed: Notify::new(),
            state: Mutex::default(),
            local: watch::channel(LocalHealth::Unchecked).0,
        }
    }
}

impl HealthChecks {
    /// Whether `ep` is currently failing its checks (so gets no traffic).
    pub fn is_failing(&self, ep: SocketAddr) -> bool {
        self.failing.read().is_ok_and(|s| s.contains(&ep))
    }

    /// Whether any endpoint is failing its checks (one read lock; the
    /// request path asks per endpoint only then).
    pub fn any_failing(&self) -> bool {
        self.failing.read().is_ok_and(|s| !s.is_empty())
    }

    /// The request path routed a request to `namespace/service`: check its
    /// endpoints from now on if its policy has a `healthCheck`. A read lock
    /// and a set lookup once the destination is known.
    pub fn note_destination(&self, namespace: &str, service: &str) {
        let known = self
            .noted
            .read()
            .is_ok_and(|m| m.get(namespace).is_some_and(|s| s.contains(service)));
        if known {
            return;
        }
        let mut m = self.noted.write().unwrap_or_else(|e| e.into_inner());
        let total: usize = m.values().map(HashSet::len).sum();
        if total >= MAX_NOTED_DESTINATIONS {
            return;
        }
        if m.entry(namespace.to_string())
            .or_default()
            .insert(service.to_string())
        {
            drop(m);
            self.noted_changed.notify_one();
        }
    }

    /// The destinations noted so far, sorted.
    pub fn noted_destinations(&self) -> Vec<(String, String)> {
        let m = self.noted.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(String, String)> = m
            .iter()
            .flat_map(|(ns, s)| s.iter().map(move |svc| (ns.clone(), svc.clone())))
            .collect();
        v.sort();
        v
    }

    fn forget_destination(&self, namespace: &str, service: &str) {
        let mut m = self.noted.write().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = m.get_mut(namespace) {
            s.remove(service);
            if s.is_empty() {
                m.remove(namespace);
            }
        }
    }

    /// `failing`, `passing` or `unchecked` (no check configured, or not
    /// noted by the request path): what `/endpoints` shows.
    pub fn endpoint_state(&self, ep: SocketAddr) -> &'static str {
        if self.is_failing(ep) {
            return "failing";
        }
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.endpoints.contains_key(&ep) {
            "passing"
        } else {
            "unchecked"
        }
    }

    /// The local app's health, updated by [`run_local_checks`].
    pub fn local_health(&self) -> watch::Receiver<LocalHealth> {
        self.local.subscribe()
    }

    /// The local app's health now.
    pub fn local(&self) -> LocalHealth {
        *self.local.borrow()
    }

    fn set_local(&self, to: LocalHealth) {
        let changed = self.local.send_if_modified(|h| {
            let changed = *h != to;
            *h = to;
            changed
        });
        if changed {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.local_transitions += 1;
        }
    }

    /// Records one check of `ep` (a `destination` endpoint); returns the
    /// new state on a flip.
    fn record(
        &self,
        destination: &str,
        ep: SocketAddr,
        hc: &HealthCheck,
        result: &Result<(), CheckError>,
    ) -> Option<bool> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let e = st.endpoints.entry(ep).or_insert_with(|| EndpointState {
            destination: destination.to_string(),
            thresholds: Thresholds::default(),
            last_error: None,
        });
        e.destination = destination.to_string();
        e.last_error = result.as_ref().err().map(|err| {
            let mut s = err.to_string();
            if s.len() > MAX_ERROR_LEN {
                let mut cut = MAX_ERROR_LEN;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s.truncate(cut);
            }
            s
        });
        let flip =
            e.thresholds
                .record(result.is_ok(), hc.healthy_threshold, hc.unhealthy_threshold);
        let stats = st.destinations.entry(destination.to_string()).or_default();
        if result.is_ok() {
            stats.passed += 1;
        } else {
            stats.failed += 1;
        }
        match flip {
            Some(true) => stats.to_failing += 1,
            Some(false) => stats.to_passing += 1,
            None => {}
        }
        if flip.is_some() {
            self.publish_failing(&st);
        }
        flip
    }

    /// Keeps only the endpoints in `keep` and the counters of the
    /// destinations in `dests`.
    fn retain(&self, keep: &HashMap<SocketAddr, Target>, dests: &HashSet<String>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let before = st.endpoints.len();
        st.endpoints.retain(|ep, e| {
            let kept = keep.get(ep).is_some_and(|t| t.destination == e.destination);
            if !kept {
                tracing::info!(endpoint = %ep, destination = %e.destination, "endpoint left the config; forgetting its health checks");
            }
            kept
        });
        st.destinations.retain(|d, _| dests.contains(d));
        if st.endpoints.len() != before {
            self.publish_failing(&st);
        }
    }

    fn publish_failing(&self, st: &State) {
        let set: HashSet<SocketAddr> = st
            .endpoints
            .iter()
            .filter(|(_, e)| e.thresholds.is_failing())
            .map(|(ep, _)| *ep)
            .collect();
        *self.failing.write().unwrap_or_else(|e| e.into_inner()) = set;
    }

    /// Prometheus text for `/metrics`:
    ///
    /// | metric | type | labels |
    /// |---|---|---|
    /// | `trellis_health_check_failing` | gauge (0/1) | destination, endpoint |
    /// | `trellis_health_checks_total` | counter | destination, result (`pass`/`fail`) |
    /// | `trellis_health_check_transitions_total` | counter | destination, to (`failing`/`passing`) |
    /// | `trellis_local_health_check_failing` | gauge (0/1; absent when unchecked) | |
    /// | `trellis_local_health_check_transitions_total` | counter | |
    pub fn render_metrics(&self) -> String {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let header = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        header(
            &mut out,
            "trellis_health_check_failing",
            "gauge",
            "1 while an endpoint fails its active health checks (out of the pool).",
        );
        for (ep, e) in &st.endpoints {
            let _ = writeln!(
                out,
                "trellis_health_check_failing{{destination=\"{}\",endpoint=\"{ep}\"}} {}",
                escape(&e.destination),
                u8::from(e.thresholds.is_failing())
            );
        }
        header(
            &mut out,
            "trellis_health_checks_total",
            "counter",
            "Active health checks of destination endpoints, by result.",
        );
        for (d, s) in &st.destinations {
            let d = escape(d);
            let _ = writeln!(
                out,
                "trellis_health_checks_total{{destination=\"{d}\",result=\"pass\"}} {}",
                s.passed
            );
            let _ = writeln!(
                out,
                "trellis_health_checks_total{{destination=\"{d}\",result=\"fail\"}} {}",
                s.failed
            );
        }
        header(
            &mut out,
            "trellis_health_check_transitions_total",
            "counter",
            "Endpoints that started failing or passing their health checks.",
        );
        for (d, s) in &st.destinations {
            let d = escape(d);
            let _ = writeln!(
                out,
                "trellis_health_check_transitions_total{{destination=\"{d}\",to=\"failing\"}} {}",
                s.to_failing
            );
            let _ = writeln!(
                out,
                "trellis_health_check_transitions_total{{destination=\"{d}\",to=\"passing\"}} {}",
                s.to_passing
            );
        }
        let local = *self.local.borrow();
        header(
            &mut out,
            "trellis_local_health_check_failing",
            "gauge",
            "1 while the local app fails its health check (reported unhealthy).",
        );
        if local != LocalHealth::Unchecked {
            let _ = writeln!(
                out,
                "trellis_local_health_check_failing {}",
                u8::from(local == LocalHealth::Failing)
            );
        }
        header(
            &mut out,
            "trellis_local_health_check_transitions_total",
            "counter",
            "Changes of the local app's checked health.",
        );
        let _ = writeln!(
            out,
            "trellis_local_health_check_transitions_total {}",
            st.local_transitions
        );
        out
    }
}

/// What one endpoint check task checks.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    namespace: String,
    service: String,
    /// `namespace/service`.
    destination: String,
    check: HealthCheck,
}

/// Checks the endpoints of the noted destinations until `shutdown`: one
/// task per endpoint, (re)planned whenever the config changes or a
/// destination is first noted.
pub async fn run_destination_checks(
    health: Arc<HealthChecks>,
    mut config: watch::Receiver<Arc<MeshConfig>>,
    tls: Arc<TlsSource>,
    limits: Arc<super::conn::Limits>,
    mut shutdown: Shutdown,
) {
    let upstreams = Arc::new(Upstreams::with_limits(Arc::clone(&tls), limits));
    let mut tasks: HashMap<SocketAddr, (Target, JoinHandle<()>)> = HashMap::new();
    let mut config_open = true;
    loop {
        let cfg = Arc::clone(&config.borrow_and_update());
        let desired = plan(&health, &cfg);
        tasks.retain(|ep, (t, task)| {
            let keep = desired.get(ep) == Some(t);
            if !keep {
                task.abort();
            }
            keep
        });
        for (ep, t) in &desired {
            if tasks.contains_key(ep) {
                continue;
            }
            let span =
                tracing::info_span!("health_check", destination = %t.destination, endpoint = %ep);
            let task = tokio::spawn(
                check_endpoint_loop(
                    *ep,
                    t.clone(),
                    Arc::clone(&health),
                    Arc::clone(&upstreams),
                    Arc::clone(&tls),
                )
                .instrument(span),
            );
            tasks.insert(*ep, (t.clone(), task));
        }
        let dests: HashSet<String> = desired.values().map(|t| t.destination.clone()).collect();
        health.retain(&desired, &dests);
        tokio::select! {
            r = config.changed(), if config_open => {
                if r.is_err() {
                    config_open = false;
                }
            }
            _ = health.noted_changed.notified() => {}
            _ = shutdown.wait() => break,
        }
    }
    for (_, (_, task)) in tasks {
        task.abort();
    }
    tracing::debug!("destination health checks stopped");
}

/// The endpoints to check at `cfg`: those of noted destinations whose
/// policy has a `healthCheck` (the first destination by name wins an
/// endpoint two claim). Destinations gone from the config are forgotten.
fn plan(health: &HealthChecks, cfg: &MeshConfig) -> HashMap<SocketAddr, Target> {
    let mut desired = HashMap::new();
    for (ns, svc) in health.noted_destinations() {
        let policy = cfg.destination_policy(&ns, &svc).map(|(_, p)| p);
        let has_instances = cfg.instances(&ns, &svc).next().is_some();
        if policy.is_none() && !has_instances && cfg.service(&ns, &svc).is_none() {
            tracing::debug!(destination = %format!("{ns}/{svc}"), "destination left the config; forgetting it");
            health.forget_destination(&ns, &svc);
            continue;
        }
        let Some(check) = policy.and_then(|p| p.health_check.clone()) else {
            continue;
        };
        let destination = format!("{ns}/{svc}");
        for (_, inst) in cfg.instances(&ns, &svc) {
            desired
                .entry(SocketAddr::new(inst.address, inst.port))
                .or_insert_with(|| Target {
                    namespace: ns.clone(),
                    service: svc.clone(),
                    destination: destination.clone(),
                    check: check.clone(),
                });
        }
    }
    desired
}

async fn check_endpoint_loop(
    ep: SocketAddr,
    t: Target,
    health: Arc<HealthChecks>,
    upstreams: Arc<Upstreams>,
    tls: Arc<TlsSource>,
) {
    let mut ticker = tokio::time::interval(t.check.interval.as_std().max(MIN_CHECK_INTERVAL));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = check_endpoint(ep, &t, &upstreams, &tls).await;
        if matches!(result, Err(CheckError::NoIdentity)) {
            continue;
        }
        if let Err(e) = &result {
            tracing::debug!(error = %e, "health check failed");
        }
        match health.record(&t.destination, ep, &t.check, &result) {
            Some(true) => tracing::info!(
                error = %result.as_ref().err().map(ToString::to_string).unwrap_or_default(),
                unhealthy_threshold = t.check.unhealthy_threshold,
                "endpoint failing its health checks; out of the pool"
            ),
            Some(false) => tracing::info!(
                healthy_threshold = t.check.healthy_threshold,
                "endpoint passing its health checks again; back in the pool"
            ),
            None => {}
        }
    }
}

/// One check of a destination endpoint (see the module doc).
async fn check_endpoint(
    ep: SocketAddr,
    t: &Target,
    upstreams: &Upstreams,
    tls: &TlsSource,
) -> Result<(), CheckError> {
    let timeout = t.check.timeout.as_std();
    let Some(http) = &t.check.http else {
        return tcp_check(ep, timeout).await;
    };
    let expected = tls
        .peer_id(
            &format!("{}/{}", t.namespace, t.service),
            &t.namespace,
            &t.service,
        )
        .map_err(|_| CheckError::NoIdentity)?;
    let uri = Uri::builder()
        .scheme("http")
        .authority(t.service.as_str())
        .path_and_query(http.path.as_str())
        .build()
        .map_err(|e| CheckError::Request(e.to_string()))?;
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .version(Version::HTTP_2)
        .body(full(Bytes::new()))
        .map_err(|e| CheckError::Request(e.to_string()))?;
    let h = req.headers_mut();
    h.insert(USER_AGENT, HeaderValue::from_static(CHECK_USER_AGENT));
    // The peer restores HTTP/1.1 for the app, as for a proxied HTTP/1.1
    // request (health endpoints are plain HTTP).
    h.insert(&ORIG_PROTO_HEADER, HeaderValue::from_static("HTTP/1.1"));
    let sent = tokio::time::timeout(timeout, upstreams.send(ep, &expected, req))
        .await
        .map_err(|_| CheckError::Timeout(timeout))?;
    let resp = sent.map_err(|e| match e {
        super::upstream::UpstreamError::Connect(s) => CheckError::Connect(s),
        other => CheckError::Request(other.to_string()),
    })?;
    // The body is not needed: dropping it resets just this stream.
    status_result(resp.status().as_u16())
}

fn status_result(code: u16) -> Result<(), CheckError> {
    if (200..300).contains(&code) {
        Ok(())
    } else {
        Err(CheckError::Status(code))
    }
}

async fn tcp_check(addr: SocketAddr, timeout: Duration) -> Result<(), CheckError> {
    tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| CheckError::Timeout(timeout))?
        .map(drop)
        .map_err(|e| CheckError::Connect(e.to_string()))
}

/// Whether the app of `namespace/service` is checked over HTTP/2: when
/// its Service has one port, declared `http2` or `grpc` — what the inbound
/// listener speaks to the app for a check that peers send through it
/// (their checks name no port), so both checks see the same app.
fn app_speaks_h2(cfg: &MeshConfig, namespace: &str, service: &str) -> bool {
    cfg.service(namespace, service).is_some_and(|(_, s)| {
        matches!(
            s.ports.as_slice(),
            [p] if matches!(p.protocol, trellis_resources::Protocol::Http2 | trellis_resources::Protocol::Grpc)
        )
    })
}

/// One `GET path` straight to the local app, over HTTP/2 prior knowledge
/// when `h2`, else HTTP/1.1 (a fresh connection: a check every few seconds
/// does not need a pool).
async fn local_http_check(
    app: SocketAddr,
    host: &str,
    path: &str,
    h2: bool,
    timeout: Duration,
) -> Result<(), CheckError> {
    let check = async {
        let tcp = TcpStream::connect(app)
            .await
            .map_err(|e| CheckError::Connect(e.to_string()))?;
        let io = TokioIo::new(tcp);
        let connect = |e: hyper::Error| CheckError::Connect(e.to_string());
        let mut req = Request::builder()
            .method(Method::GET)
            .header(USER_AGENT, CHECK_USER_AGENT);
        req = if h2 {
            req.uri(format!("http://{host}{path}"))
        } else {
            req.uri(path).header(HOST, host)
        };
        let req = req
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| CheckError::Request(e.to_string()))?;
        let (resp, conn) = if h2 {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(connect)?;
            let conn = tokio::spawn(conn);
            (send.send_request(req).await, conn)
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(connect)?;
            let conn = tokio::spawn(conn);
            (send.send_request(req).await, conn)
        };
        conn.abort();
        let resp = resp.map_err(|e| CheckError::Request(e.to_string()))?;
        status_result(resp.status().as_u16())
    };
    tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| CheckError::Timeout(timeout))?
}

/// Checks the local app at `app` with the `healthCheck` of
/// `namespace/service`'s policy (re-read on every config change) until
/// `shutdown`, publishing the result on [`HealthChecks::local_health`].
pub async fn run_local_checks(
    health: Arc<HealthChecks>,
    mut config: watch::Receiver<Arc<MeshConfig>>,
    namespace: String,
    service: String,
    app: SocketAddr,
    mut shutdown: Shutdown,
) {
    let mut current: Option<HealthCheck> = None;
    let mut thresholds = Thresholds::default();
    let mut next = Instant::now();
    let mut config_open = true;
    loop {
        let check = config
            .borrow_and_update()
            .destination_policy(&namespace, &service)
            .and_then(|(_, p)| p.health_check.clone());
        if check != current {
            match &check {
                None => {
                    if thresholds.is_failing() {
                        tracing::info!(
                            "health check removed from the policy; reporting the app healthy"
                        );
                    }
                    thresholds = Thresholds::default();
                    health.set_local(LocalHealth::Unchecked);
                }
                Some(c) => {
                    tracing::info!(check = ?c, "checking the local app");
                    if current.is_none() {
                        health.set_local(LocalHealth::Passing);
                    }
                }
            }
            current = check;
            next = Instant::now();
        }
        let Some(check) = current.clone() else {
            tokio::select! {
                r = config.changed(), if config_open => if r.is_err() { config_open = false },
                _ = shutdown.wait() => break,
            }
            continue;
        };
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            r = config.changed(), if config_open => {
                if r.is_err() { config_open = false }
                continue;
            }
            _ = shutdown.wait() => break,
        }
        next = Instant::now() + check.interval.as_std().max(MIN_CHECK_INTERVAL);
        let timeout = check.timeout.as_std();
        let h2 = app_speaks_h2(&config.borrow(), &namespace, &service);
        let host = format!("{service}.{namespace}");
        let result = match &check.http {
            Some(h) => local_http_check(app, &host, &h.path, h2, timeout).await,
            None => tcp_check(app, timeout).await,
        };
        if let Err(e) = &result {
            tracing::debug!(error = %e, "local app health check failed");
        }
        match thresholds.record(
            result.is_ok(),
            check.healthy_threshold,
            check.unhealthy_threshold,
        ) {
            Some(true) => {
                tracing::info!(error = %result.as_ref().err().map(ToString::to_string).unwrap_or_default(),
                    unhealthy_threshold = check.unhealthy_threshold, "local app failing its health check; reporting it unhealthy");
                health.set_local(LocalHealth::Failing);
            }
            Some(false) => {
                tracing::info!(
                    healthy_threshold = check.healthy_threshold,
                    "local app passing its health check again; reporting it healthy"
                );
                health.set_local(LocalHealth::Passing);
            }
            None => {}
        }
    }
    tracing::debug!("local app health checks stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ConfigCache;
    use trellis_proto::sidecar::KeyValue;

    #[test]
    fn thresholds_need_consecutive_results() {
        let mut t = Thresholds::default();
        assert!(!t.is_failing());
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(true, 2, 3), None, "a pass resets the failures");
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), Some(true));
        assert!(t.is_failing());
        assert_eq!(t.record(false, 2, 3), None, "no second flip");
        assert_eq!(t.record(true, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), None, "a failure resets the passes");
        assert_eq!(t.record(true, 2, 3), None);
        assert_eq!(t.record(true, 2, 3), Some(false));
        assert!(!t.is_failing());
        // Threshold 0 (never valid) acts as 1 rather than flipping forever.
        let mut t = Thresholds::default();
        assert_eq!(t.record(false, 0, 0), Some(true));
        assert_eq!(t.record(true, 0, 0), Some(false));
    }

    #[test]
    fn noting_is_idempotent_and_bounded() {
        let h = HealthChecks::default();
        h.note_destination("default", "reviews");
        h.note_destination("default", "reviews");
        h.note_destination("shop", "cart");
        assert_eq!(
            h.noted_destinations(),
            vec![
                ("default".to_string(), "reviews".to_string()),
                ("shop".to_string(), "cart".to_string())
            ]
        );
        for i in 0..MAX_NOTED_DESTINATIONS + 10 {
            h.note_destination("many", &format!("s{i}"));
        }
        assert_eq!(h.noted_destinations().len(), MAX_NOTED_DESTINATIONS);
        h.forget_destination("default", "reviews");
        assert!(!h
            .noted_destinations()
            .contains(&("default".to_string(), "reviews".to_string())));
    }

    fn hc(unhealthy: u32, healthy: u32) -> HealthCheck {
        serde_json::from_value(serde_json::json!({
            "http": {"path": "/health"},
            "interval": "200ms",
            "timeout": "100ms",
            "healthyThreshold": healthy,
            "unhealthyThreshold": unhealthy,
        }))
        .unwrap()
    }

    #[test]
    fn failing_endpoints_leave_and_rejoin_and_show_in_metrics() {
        let h = HealthChecks::default();
        let ep: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let check = hc(2, 2);
        let fail = || Err(CheckError::Status(503));
        assert_eq!(h.endpoint_state(ep), "unchecked");
        assert_eq!(h.record("default/reviews", ep, &check, &Ok(())), None);
        assert_eq!(h.endpoint_state(ep), "passing");
        assert_eq!(h.record("default/reviews", ep, &check, &fail()), None);
        assert!(!h.is_failing(ep));
        assert_eq!(h.record("default/reviews", ep, &check, &fail()), Some(true));
        assert!(h.is_failing(ep));
        assert_eq!(h.endpoint_state(ep), "failing");
        let m = h.render_metrics();
        assert!(
            m.contains(
                "trellis_health_check_failing{destination=\"default/reviews\",endpoint=\"127.0.0.1:7001\"} 1"
            ),
            "{m}"
        );
        assert!(m.contains(
            "trellis_health_check_transitions_total{destination=\"default/reviews\",to=\"failing\"} 1"
        ));
        assert!(m.contains(
            "trellis_health_checks_total{destination=\"default/reviews\",result=\"fail\"} 2"
        ));
        assert!(!m.contains("trellis_local_health_check_failing 0"));
        h.record("default/reviews", ep, &check, &Ok(()));
        assert!(h.is_failing(ep));
        h.record("default/reviews", ep, &check, &Ok(()));
        assert!(!h.is_failing(ep));
        // Leaving the config forgets the endpoint (and its failing state).
        h.record("default/reviews", ep, &check, &fail());
        h.record("default/reviews", ep, &check, &fail());
        assert!(h.is_failing(ep));
        h.retain(&HashMap::new(), &HashSet::new());
        assert!(!h.is_failing(ep));
        assert_eq!(h.endpoint_state(ep), "unchecked");
        assert!(!h.render_metrics().contains("default/reviews"));
    }

    #[test]
    fn local_health_is_published_once_per_change() {
        let h = HealthChecks::default();
        let mut rx = h.local_health();
        assert_eq!(*rx.borrow_and_update(), LocalHealth::Unchecked);
        h.set_local(LocalHealth::Passing);
        h.set_local(LocalHealth::Passing);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), LocalHealth::Passing);
        assert!(!rx.has_changed().unwrap());
        h.set_local(LocalHealth::Failing);
        let m = h.render_metrics();
        assert!(m.contains("trellis_local_health_check_failing 1"), "{m}");
        assert!(
            m.contains("trellis_local_health_check_transitions_total 2"),
            "{m}"
        );
    }

    const SERVICE: &[u8] = br#"{"apiVersion":"trellis/v1","kind":"Service","metadata":{"name":"reviews","namespace":"default"},"spec":{"ports":[{"name":"http","port":80,"protocol":"http"}]}}"#;

    fn policy(check: &str) -> Vec<u8> {
        format!(
            r#"{{"apiVersion":"trellis/v1","kind":"DestinationPolicy","metadata":{{"name":"reviews","namespace":"default"}},"spec":{{"host":"reviews"{check}}}}}"#
        )
        .into_bytes()
    }

    fn instance(name: &str, port: u16) -> Vec<u8> {
        format!(
            r#"{{"apiVersion":"trellis/v1","kind":"Instance","metadata":{{"name":"{name}","namespace":"default"}},"spec":{{"service":"reviews","address":"127.0.0.1","port":{port}}}}}"#
        )
        .into_bytes()
    }

    fn kv(key: &str, value: Vec<u8>) -> KeyValue {
        KeyValue {
            key: key.into(),
            value,
            mod_revision: 1,
            ..Default::default()
        }
    }

    const HTTP_CHECK: &str = r#","healthCheck":{"http":{"path":"/health"},"interval":"50ms","timeout":"40ms","healthyThreshold":1,"unhealthyThreshold":1}"#;

    #[test]
    fn plans_checks_only_for_noted_destinations_with_a_check() {
        let mut cache = ConfigCache::default();
        cache
            .apply_snapshot(
                1,
                2,
                vec![
                    kv("/service/default/reviews", SERVICE.to_vec()),
                    kv("/destinationpolicy/default/reviews", policy(HTTP_CHECK)),
                    kv("/instance/default/r1", instance("r1", 7001)),
                    kv("/instance/default/r2", instance("r2", 7002)),
                ],
            )
            .unwrap();
        let cfg = cache.subscribe().borrow().clone();
        let h = HealthChecks::default();
        assert!(plan(&h, &cfg).is_empty(), "nothing noted yet");
        h.note_destination("default", "reviews");
        h.note_destination("default", "gone");
        let p = plan(&h, &cfg);
        let mut eps: Vec<String> = p.keys().map(ToString::to_string).collect();
        eps.sort();
        assert_eq!(eps, ["127.0.0.1:7001", "127.0.0.1:7002"]);
        assert_eq!(p.values().next().unwrap().destination, "default/reviews");
        assert_eq!(
            h.noted_destinations(),
            vec![("default".to_string(), "reviews".to_string())],
            "a destination not in the config is forgotten"
        );
    }

    /// An HTTP/1.1 app answering `/health` with `status`, on loopback.
    async fn app(status: Arc<std::sync::atomic::AtomicU16>) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let status = Arc::clone(&status);
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let code = status.load(std::sync::atomic::Ordering::SeqCst);
                            let ua = req.headers().get(USER_AGENT).cloned();
                            async move {
                                let mut r =
                                    hyper::Response::new(http_body_util::Full::new(Bytes::new()));
                                *r.status_mut() = hyper::StatusCode::from_u16(
                                    if ua.as_ref().is_some_and(|v| v == CHECK_USER_AGENT) {
                                        code
                                    } else {
                                        400
                                    },
                                )
                                .unwrap();
                                Ok::<_, std::convert::Infallible>(r)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn local_checks_follow_the_app_and_the_policy() {
        use std::sync::atomic::{AtomicU16, Ordering};
        let status = Arc::new(AtomicU16::new(200));
        let addr = app(Arc::clone(&status)).await;
        let mut cache = ConfigCache::default();
        cache
            .apply_snapshot(
                1,
                2,
                vec![kv("/destinationpolicy/default/reviews", policy(HTTP_CHECK))],
            )
            .unwrap();
        let h = Arc::new(HealthChecks::default());
        let mut rx = h.local_health();
        let (trigger, shutdown) = crate::shutdown::channel();
        let task = tokio::spawn(run_local_checks(
            Arc::clone(&h),
            cache.subscribe(),
            "default".into(),
            "reviews".into(),
            addr,
            shutdown,
        ));
        let wait_for = |want: LocalHealth, rx: &mut watch::Receiver<LocalHealth>| {
            let mut rx = rx.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|h| *h == want))
                    .await
                    .expect("timely")
                    .map(|_| ())
                    .unwrap();
            }
        };
        wait_for(LocalHealth::Passing, &mut rx).await;
        status.store(503, Ordering::SeqCst);
        wait_for(LocalHealth::Failing, &mut rx).await;
        status.store(204, Ordering::SeqCst);
        wait_for(LocalHealth::Passing, &mut rx).await;
        // A TCP check of a closed port fails.
        let closed = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        assert!(matches!(
            tcp_check(closed, Duration::from_millis(500)).await,
            Err(CheckError::Connect(_))
        ));
        // The policy loses its check: unchecked (reported healthy).
        status.store(503, Ordering::SeqCst);
        wait_for(LocalHealth::Failing, &mut rx).await;
        cache
            .apply_snapshot(
                1,
                3,
                vec![kv("/destinationpolicy/default/reviews", policy(""))],
            )
            .unwrap();
        wait_for(LocalHealth::Unchecked, &mut rx).await;
        trigger.trigger();
        task.await.unwrap();
    }
}
