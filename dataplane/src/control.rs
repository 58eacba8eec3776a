//! The connection manager: keeps the sidecar attached to one control node
//! at a time and runs its two long-lived streams there.
//!
//! ```text
//! loop:
//!   seed = next seed (the first one at random)
//!   connect (timeout, newest certificate) ──fail──► backoff, next seed
//!   open watch   (after_revision = last applied)   ─┐ run both until one
//!   open session (resume_lease_id = previous lease) ─┘ fails or shutdown
//!   backoff (full jitter; reset after a connection that lasted > 5 s)
//! ```
//!
//! * **Watch**: snapshots, deltas and progress go into the
//!   [`ConfigCache`], which refuses anything that would go back in time; a
//!   refusal, a server `Error`, a closed stream or a silent one (no message
//!   for several progress intervals) ends the connection, and the next one
//!   resumes from the applied revision on the next seed.
//! * **Session**: registers the instance (if any) and acknowledges the
//!   applied revision: a `SessionUpdate` every ttl/3 and, coalesced to at
//!   most one per [`ACK_COALESCE`], whenever the acknowledged revision
//!   moves. A NOT_FOUND answer (lease expired) re-registers without the old
//!   lease. On shutdown it sends `goodbye`, waits briefly for the ack and
//!   closes.
//! * **Health**: with a local app check ([`ControlPlane::with_app_health`],
//!   fed by [`crate::proxy::health_check::run_local_checks`]) the
//!   registration carries the app's current health, and every flip goes out
//!   at once as a `SessionUpdate` with `health` set (the control plane
//!   rewrites the Instance's `spec.health` before acking). A new session —
//!   after a reconnect or a failover to another node — registers with the
//!   current health, so nothing is lost in between. Without a check nothing
//!   is reported (the registry's default, healthy).
//!
//! The connection's state is published as [`ControlStatus`] (for
//! `/config_dump`) and the connection itself on a watch channel (for
//! certificate renewal, [`crate::identity::run_renewal`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;
use trellis_proto::sidecar::{
    InstanceHealth, InstanceRegistration, SessionRequest, SessionUpdate, WatchRequest,
};

use crate::backoff::{Backoff, HEALTHY_CONNECTION};
use crate::cache::ConfigCache;
use crate::config::SidecarConfig;
use crate::identity::CurrentIdentity;
use crate::proxy::health_check::LocalHealth;
use crate::session::SessionStream;
use crate::shutdown::Shutdown;
use crate::transport::{self, Endpoints, TransportError};
use crate::updates::now_unix_ms;
use crate::watch::{WatchEvent, WatchSession};

/// Acknowledgements of a moving revision go out at most this often: a
/// burst of deltas costs one SessionUpdate, and `proxy-status` still sees
/// the sidecar catch up within 50 ms.
pub const ACK_COALESCE: Duration = Duration::from_millis(50);
/// Keepalives go at least this far apart, whatever the TTL.
pub const MIN_KEEPALIVE_INTERVAL: Duration = Duration::from_millis(100);
/// How long the server may take to accept a session (registration goes
/// through the Raft log, which may wait out an election).
pub const SESSION_OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the ack of the goodbye at shutdown.
pub const GOODBYE_TIMEOUT: Duration = Duration::from_millis(500);
/// A watch with no message for this many progress intervals is stuck.
pub const WATCH_SILENCE_INTERVALS: u32 = 4;
/// ... but never declared stuck sooner than this.
pub const MIN_WATCH_SILENCE: Duration = Duration::from_secs(3);

/// The sidecar's view of its control-plane connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ControlStatus {
    /// A connection is up.
    pub connected: bool,
    /// The node's address, while connected.
    pub attached_to: Option<SocketAddr>,
    /// The seed it was reached through.
    pub seed: Option<String>,
    /// The node serving the watch / session.
    pub node_id: Option<u64>,
    /// The instance's lease (0: none).
    pub lease_id: u64,
    /// The registered instance's store key.
    pub instance_key: Option<String>,
    /// Connections made so far.
    pub connections: u64,
    pub connected_since_unix_ms: Option<u64>,
    /// The cluster revision in the last SessionAck.
    pub cluster_revision: u64,
    /// The revision last acknowledged to the control plane.
    pub acked_revision: u64,
    /// Why the last connection attempt or connection failed.
    pub last_error: Option<String>,
    /// The instance health the control plane last accepted from this
    /// sidecar (`healthy` / `unhealthy`); `None` without a local app
    /// check or a registered instance.
    pub reported_health: Option<String>,
}

/// What the registry is told for a local check result (`None`: no check,
/// nothing to report).
pub fn instance_health(local: LocalHealth) -> Option<InstanceHealth> {
    match local {
        LocalHealth::Failing => Some(InstanceHealth::Unhealthy),
        LocalHealth::Passing => Some(InstanceHealth::Healthy),
        LocalHealth::Unchecked => None,
    }
}

/// The health an update carries, given what the check says now (`want`)
/// and what the control plane last accepted (`reported`): a change, or
/// `healthy` when the check was removed after reporting `unhealthy` (no
/// check means healthy, as for a sidecar that never checked).
pub fn health_to_send(
    want: Option<InstanceHealth>,
    reported: Option<InstanceHealth>,
) -> Option<InstanceHealth> {
    match want {
        Some(w) if reported != Some(w) => Some(w),
        Some(_) => None,
        None if reported == Some(InstanceHealth::Unhealthy) => Some(InstanceHealth::Healthy),
        None => None,
    }
}

fn health_name(h: InstanceHealth) -> String {
    match h {
        InstanceHealth::Unhealthy => "unhealthy",
        _ => "healthy",
    }
    .to_string()
}

/// How a connection ended.
enum Ended {
    Shutdown,
    Failed(String),
}

/// The connection manager (see the module doc).
pub struct ControlPlane {
    config: Arc<SidecarConfig>,
    sidecar_name: String,
    ca_pem: String,
    identity_rx: watch::Receiver<Option<Arc<CurrentIdentity>>>,
    endpoints: Arc<Endpoints>,
    status_tx: Arc<watch::Sender<ControlStatus>>,
    conn_tx: watch::Sender<Option<quinn::Connection>>,
    app_health: Option<watch::Receiver<LocalHealth>>,
}

impl ControlPlane {
    /// A manager for `config` (validated), presenting the identity in
    /// `identity_rx`, publishing its state on `status_tx` and `conn_tx`.
    pub fn new(
        config: Arc<SidecarConfig>,
        ca_pem: String,
        identity_rx: watch::Receiver<Option<Arc<CurrentIdentity>>>,
        endpoints: Arc<Endpoints>,
        status_tx: Arc<watch::Sender<ControlStatus>>,
        conn_tx: watch::Sender<Option<quinn::Connection>>,
    ) -> Self {
        ControlPlane {
            sidecar_name: config.resolved_name(),
            config,
            ca_pem,
            identity_rx,
            endpoints,
            status_tx,
            conn_tx,
            app_health: None,
        }
    }

    /// Reports the local app's health from `rx` (see the module doc);
    /// ignored for a sidecar without an instance.
    pub fn with_app_health(mut self, rx: watch::Receiver<LocalHealth>) -> Self {
        self.app_health = Some(rx);
        self
    }

    /// Runs until `shutdown`, applying what the control plane sends to
    /// `cache`.
    pub async fn run(self, cache: &mut ConfigCache, mut shutdown: Shutdown) {
        let seeds = &self.config.seeds;
        if seeds.is_empty() {
            return;
        }
        let mut i = rand::rng().random_range(0..seeds.len());
        let mut backoff = Backoff::new(
            Duration::from_millis(self.config.reconnect_base_ms),
            Duration::from_millis(self.config.reconnect_max_ms),
        );
        let mut lease_id = 0u64;
        let mut tls: Option<(Arc<CurrentIdentity>, quinn::ClientConfig)> = None;
        loop {
            let seed = seeds[i % seeds.len()].clone();
            let span = tracing::info_span!("connection", seed = %seed);
            let connected = tokio::select! {
                r = self.connect(&seed, &mut tls).instrument(span.clone()) => r,
                _ = shutdown.wait() => break,
            };
            match connected {
                Err(e) => {
                    tracing::warn!(parent: &span, error = %e, "cannot connect to control node");
                    self.status_tx
                        .send_modify(|s| s.last_error = Some(e.to_string()));
                }
                Ok((addr, conn)) => {
                    let started = Instant::now();
                    tracing::info!(parent: &span, node = %addr, after_revision = ?cache.resume_after(), "connected to control node");
                    self.status_tx.send_modify(|s| {
                        s.connected = true;
                        s.attached_to = Some(addr);
                        s.seed = Some(seed.clone());
                        s.node_id = None;
                        s.connections += 1;
                        s.connected_since_unix_ms = Some(now_unix_ms());
                    });
                    self.conn_tx.send_replace(Some(conn.clone()));
                    let ended = self
                        .serve(&conn, cache, &mut lease_id, &shutdown)
                        .instrument(span.clone())
                        .await;
                    self.conn_tx.send_replace(None);
                    self.status_tx.send_modify(|s| {
                        s.connected = false;
                        s.attached_to = None;
                        s.connected_since_unix_ms = None;
                    });
                    match ended {
                        Ended::Shutdown => {
                            conn.close(quinn::VarInt::from_u32(0), b"sidecar shutting down");
                            break;
                        }
                        Ended::Failed(why) => {
                            tracing::warn!(parent: &span, node = %addr, reason = %why,
                                lasted_ms = started.elapsed().as_millis() as u64,
                                "lost the control node; moving to the next seed");
                            conn.close(quinn::VarInt::from_u32(1), b"sidecar reconnecting");
                            self.status_tx.send_modify(|s| s.last_error = Some(why));
                        }
                    }
                    if started.elapsed() >= HEALTHY_CONNECTION {
                        backoff.reset();
                    }
                }
            }
            i += 1;
            let delay = backoff.next_delay();
            tracing::debug!(delay_ms = delay.as_millis() as u64, "reconnect backoff");
            if shutdown.sleep(delay).await {
                break;
            }
        }
        tracing::info!("control-plane connection manager stopped");
    }

    /// Resolves `seed` and connects with the newest certificate.
    async fn connect(
        &self,
        seed: &str,
        tls: &mut Option<(Arc<CurrentIdentity>, quinn::ClientConfig)>,
    ) -> Result<(SocketAddr, quinn::Connection), TransportError> {
        let Some(id) = self.identity_rx.borrow().clone() else {
            return Err(TransportError::Tls("no certificate yet".into()));
        };
        let config = match tls {
            Some((cur, cfg)) if Arc::ptr_eq(cur, &id) => cfg.clone(),
            _ => {
                let cfg =
                    transport::quic_client_config(&self.ca_pem, Some((&id.cert_pem, &id.key_pem)))?;
                *tls = Some((id, cfg.clone()));
                cfg
            }
        };
        let addr = transport::resolve(seed).await?;
        let endpoint = self.endpoints.for_target(&addr)?;
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let conn = transport::connect(
            &endpoint,
            Some(config),
            addr,
            &transport::server_name(&addr),
            timeout,
        )
        .await?;
        Ok((addr, conn))
    }

    /// Runs the watch and the session on `conn` until one ends.
    async fn serve(
        &self,
        conn: &quinn::Connection,
        cache: &mut ConfigCache,
        lease_id: &mut u64,
        shutdown: &Shutdown,
    ) -> Ended {
        let acks = cache.acks();
        let req = WatchRequest {
            prefix: self.config.watch_prefix.clone(),
            after_revision: cache.resume_after(),
            progress_interval_ms: self.config.progress_interval_ms,
        };
        let silence = (self.config.progress_interval_ms > 0).then(|| {
            (Duration::from_millis(u64::from(self.config.progress_interval_ms))
                * WATCH_SILENCE_INTERVALS)
                .max(MIN_WATCH_SILENCE)
        });
        let status = &self.status_tx;
        let watch = async {
            let mut w = match WatchSession::open(conn, req).await {
                Ok(w) => w,
                Err(e) => return format!("watch: {e}"),
            };
            format!("watch: {}", run_watch(&mut w, cache, status, silence).await)
        }
        .instrument(tracing::info_span!("watch"));
        let session = self
            .run_session(conn, acks, lease_id, shutdown.clone())
            .instrument(tracing::info_span!("session"));
        tokio::select! {
            why = watch => Ended::Failed(why),
            ended = session => ended,
        }
    }

    fn registration(&self, health: Option<InstanceHealth>) -> Option<InstanceRegistration> {
        let inst = self.config.instance.as_ref()?;
        Some(InstanceRegistration {
            name: self.config.instance_name().unwrap_or_default(),
            address: inst.address.clone(),
            port: u32::from(inst.port),
            labels: inst
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            weight: inst.weight,
            health: health.map_or(0, |h| h as i32),
        })
    }

    /// The session stream: open (resuming the lease), then keepalives and
    /// acks until failure or shutdown.
    async fn run_session(
        &self,
        conn: &quinn::Connection,
        mut acks: watch::Receiver<u64>,
        lease_id: &mut u64,
        mut shutdown: Shutdown,
    ) -> Ended {
        // Health is reported only for a registered instance with a check.
        let mut app_health = self
            .app_health
            .clone()
            .filter(|_| self.config.instance.is_some());
        loop {
            let applied = *acks.borrow_and_update();
            // The health the registration carries (None: no check, the
            // server's default, healthy).
            let mut reported = app_health
                .as_mut()
                .and_then(|rx| instance_health(*rx.borrow_and_update()));
            let req = SessionRequest {
                instance: self.registration(reported),
                ttl_ms: self.config.lease_ttl_ms,
                resume_lease_id: *lease_id,
                applied_revision: applied,
                sidecar_name: self.sidecar_name.clone(),
            };
            let opened = tokio::select! {
                r = SessionStream::open(conn, req, SESSION_OPEN_TIMEOUT) => r,
                _ = shutdown.wait() => return Ended::Shutdown,
            };
            let mut stream = match opened {
                Ok(s) => s,
                Err(e) if e.is_lease_gone() && *lease_id != 0 => {
                    tracing::warn!(lease_id = *lease_id, error = %e, "previous lease is gone; registering anew");
                    *lease_id = 0;
                    continue;
                }
                Err(e) => return Ended::Failed(format!("session: {e}")),
            };
            let accepted = stream.accepted().clone();
            *lease_id = accepted.lease_id;
            tracing::info!(node_id = accepted.node_id, spiffe_id = %accepted.spiffe_id, lease_id = accepted.lease_id,
                instance_key = %accepted.instance_key, ttl_ms = accepted.ttl_ms, applied_revision = applied, "session accepted");
            self.status_tx.send_modify(|s| {
                s.node_id = Some(accepted.node_id);
                s.lease_id = accepted.lease_id;
                s.instance_key =
                    (!accepted.instance_key.is_empty()).then(|| accepted.instance_key.clone());
                s.acked_revision = applied;
                s.reported_health = reported.map(health_name);
            });
            let ttl = Duration::from_millis(if accepted.ttl_ms > 0 {
                accepted.ttl_ms
            } else {
                self.config.lease_ttl_ms
            });
            let keepalive = (ttl / 3).max(MIN_KEEPALIVE_INTERVAL);
            // An ack slower than a keepalive interval means the node is in
            // trouble; a few more seconds would not save the lease anyway.
            let ack_timeout = keepalive.clamp(Duration::from_millis(500), Duration::from_secs(5));
            let mut last_sent = Instant::now();
            loop {
                let mut goodbye = false;
                let health_changed = async {
                    match app_health.as_mut() {
                        Some(rx) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep_until(last_sent + keepalive) => {}
                    // A flip goes out at once (no coalescing: it is rare and
                    // peers should stop sending to a failing app quickly).
                    Ok(()) = health_changed => {}
                    Ok(()) = acks.changed() => {
                        let earliest = last_sent + ACK_COALESCE;
                        if Instant::now() < earliest {
                            tokio::select! {
                                _ = tokio::time::sleep_until(earliest) => {}
                                _ = shutdown.wait() => goodbye = true,
                            }
                        }
                    }
                    _ = shutdown.wait() => goodbye = true,
                }
                let applied = *acks.borrow_and_update();
                if goodbye {
                    let update = SessionUpdate {
                        applied_revision: applied,
                        goodbye: true,
                        health: 0,
                    };
                    match stream.update(update, GOODBYE_TIMEOUT).await {
                        Ok(_) => tracing::info!(
                            lease_id = *lease_id,
                            "said goodbye to the control plane"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "goodbye not acknowledged; the lease will expire instead")
                        }
                    }
                    stream.finish();
                    *lease_id = 0;
                    return Ended::Shutdown;
                }
                last_sent = Instant::now();
                let want = app_health
                    .as_mut()
                    .and_then(|rx| instance_health(*rx.borrow_and_update()));
                let health = health_to_send(want, reported);
                let update = SessionUpdate {
                    applied_revision: applied,
                    goodbye: false,
                    health: health.map_or(0, |h| h as i32),
                };
                match stream.update(update, ack_timeout).await {
                    Ok(ack) => {
                        if let Some(h) = health {
                            tracing::info!(health = %health_name(h), "instance health reported to the control plane");
                            reported = Some(h);
                            self.status_tx
                                .send_modify(|s| s.reported_health = Some(health_name(h)));
                        }
                        tracing::trace!(
                            applied,
                            cluster_revision = ack.revision,
                            ttl_ms = ack.ttl_ms,
                            "session ack"
                        );
                        self.status_tx.send_if_modified(|s| {
                            let changed =
                                s.cluster_revision != ack.revision || s.acked_revision != applied;
                            s.cluster_revision = ack.revision;
                            s.acked_revision = applied;
                            changed
                        });
                    }
                    Err(e) if e.is_lease_gone() => {
                        tracing::warn!(lease_id = *lease_id, error = %e, "lease expired; registering anew");
                        stream.finish();
                        *lease_id = 0;
                        break;
                    }
                    Err(e) => return Ended::Failed(format!("session: {e}")),
                }
            }
        }
    }
}

/// Applies watch updates to `cache` until the stream fails (the reason is
/// returned). `silence`: the longest wait for a message.
async fn run_watch(
    w: &mut WatchSession,
    cache: &mut ConfigCache,
    status: &watch::Sender<ControlStatus>,
    silence: Option<Duration>,
) -> String {
    loop {
        let next = match silence {
            Some(limit) => match tokio::time::timeout(limit, w.next()).await {
                Ok(r) => r,
                Err(_) => return format!("no message for {limit:?} (progress was requested)"),
            },
            None => w.next().await,
        };
        let update = match next {
            Ok(u) => u,
            Err(e) => return e.to_string(),
        };
        let node_id = update.node_id;
        status.send_if_modified(|s| {
            let changed = s.node_id != Some(node_id);
            s.node_id = Some(node_id);
            changed
        });
        let result = match update.event {
            WatchEvent::Snapshot { revision, kvs } => cache.apply_snapshot(node_id, revision, kvs),
            WatchEvent::Delta(d) => cache.apply_delta(node_id, &d),
            WatchEvent::Progress { revision } => {
                cache.observe_progress(revision);
                Ok(())
            }
            WatchEvent::Compacted { compact_revision } => {
                tracing::info!(
                    node_id,
                    compact_revision,
                    applied = cache.applied_revision(),
                    "history after the applied revision was compacted; a snapshot follows"
                );
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::error!(node_id, error = %e, "control node violated the watch contract; reconnecting elsewhere");
            return e.to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_sent_on_changes_only() {
        use InstanceHealth::{Healthy, Unhealthy};
        assert_eq!(instance_health(LocalHealth::Unchecked), None);
        assert_eq!(instance_health(LocalHealth::Passing), Some(Healthy));
        assert_eq!(instance_health(LocalHealth::Failing), Some(Unhealthy));
        // No check, nothing reported: nothing to send.
        assert_eq!(health_to_send(None, None), None);
        // A check starts passing: the registry's default already says so,
        // but saying it once costs nothing and records it.
        assert_eq!(health_to_send(Some(Healthy), None), Some(Healthy));
        assert_eq!(
            health_to_send(Some(Unhealthy), Some(Healthy)),
            Some(Unhealthy)
        );
        assert_eq!(health_to_send(Some(Unhealthy), Some(Unhealthy)), None);
        assert_eq!(
            health_to_send(Some(Healthy), Some(Unhealthy)),
            Some(Healthy)
        );
        // The check is removed while unhealthy: healthy again.
        assert_eq!(health_to_send(None, Some(Unhealthy)), Some(Healthy));
        assert_eq!(health_to_send(None, Some(Healthy)), None);
    }
}
