//! Start-up, wiring and shutdown of the sidecar (control-plane side and
//! request path):
//! [`Sidecar::start`] returns a handle once the admin endpoint listens;
//! [`run`] starts one and runs it until a future (a signal) resolves.
//!
//! Start-up order, so a restarted sidecar is useful as early as possible:
//!
//! 1. validate the config, read `ca_file`, create `data_dir`; bind
//!    `outbound_addr` and `inbound_addr` and write
//!    `<data_dir>/{outbound,inbound}.addr` (before registering, so the
//!    instance is registered with the bound inbound port when
//!    `instance.port` is not given);
//! 2. load `<data_dir>/config.json` (ready at once if it parses);
//! 3. listen on `admin_addr`, write `<data_dir>/admin.addr`; serve the
//!    request path ([`crate::proxy`]; inbound handshakes fail and outbound
//!    requests get 503 until an identity exists);
//! 4. in the background: obtain the identity (stored or join), start
//!    certificate renewal, run the connection manager.
//!
//! Shutdown: the connection manager says goodbye (the instance leaves the
//! registry) and closes, renewal stops; the data path keeps accepting for
//! [`DEREGISTER_GRACE`] while peers learn of it, then stops accepting and
//! drains open connections (up to `drain_timeout_ms`); the disk writer
//! saves the latest config, QUIC close frames go out, and the admin
//! endpoint stops last.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::admin::{self, AdminState};
use crate::cache::ConfigCache;
use crate::config::{ConfigError, SidecarConfig};
use crate::control::{ControlPlane, ControlStatus};
use crate::disk;
use crate::identity::{self, CurrentIdentity, IdentityContext, IdentityError};
use crate::mesh::MeshConfig;
use crate::proxy::access_log::{AccessLog, Sink};
use crate::proxy::drain::Drain;
use crate::proxy::health_check::HealthChecks;
use crate::proxy::outbound::TcpForward;
use crate::proxy::{
    self, balance::Balancer, retry::RetryBudgets, upstream::Upstreams, Inbound, Metrics, Outbound,
    TlsSource,
};
use crate::shutdown::{self, ShutdownTrigger};
use crate::transport::{self, Endpoints};
use crate::updates::UpdateLog;

/// How long QUIC close frames get to leave at shutdown.
pub const CLOSE_GRACE: Duration = Duration::from_millis(200);

/// How long the data path keeps accepting after the instance was
/// deregistered at shutdown: peers apply a registry change in ~20 ms (p99
/// over 1,000 sidecars, see the README); 1 s covers a slow or briefly
/// reconnecting peer without holding a shutdown noticeably longer.
pub const DEREGISTER_GRACE: Duration = Duration::from_secs(1);

/// Why the sidecar could not start or stopped. [`SidecarError::exit_code`]
/// maps it to the binary's exit status; [`SidecarError::retryable`] says
/// whether starting again unchanged may succeed.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// A config value is wrong (exit 2, not retryable).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The CA file is missing or not a CA certificate (exit 2, not retryable).
    #[error("ca_file {}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
    /// `data_dir` cannot be created or written (exit 1, retryable once fixed).
    #[error("data_dir {}: {source}", path.display())]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The admin address is taken or not ours (exit 1, retryable).
    #[error("admin_addr {addr}: cannot listen: {source}")]
    AdminBind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// A data-path listener address (`outbound_addr`, `inbound_addr`) is
    /// taken or not ours (exit 1, retryable).
    #[error("{field} {addr}: cannot listen: {source}")]
    ListenerBind {
        field: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The access log cannot be opened (exit 1, retryable once fixed).
    #[error("access_log {path}: {source}")]
    AccessLog {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// No identity: join refused (exit 1), no token (exit 2), ...
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A task of the sidecar panicked (exit 1).
    #[error("internal error: {0}")]
    Internal(String),
}

impl SidecarError {
    /// The process exit status for this error: 2 for configuration
    /// problems, 1 for everything else (including a refused join).
    pub fn exit_code(&self) -> u8 {
        match self {
            SidecarError::Config(_) | SidecarError::CaFile { .. } => 2,
            SidecarError::Identity(
                IdentityError::NoJoinToken { .. } | IdentityError::TokenFile { .. },
            ) => 2,
            _ => 1,
        }
    }

    /// True if starting again with the same config may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            SidecarError::DataDir { .. }
                | SidecarError::AdminBind { .. }
                | SidecarError::ListenerBind { .. }
                | SidecarError::AccessLog { .. }
                | SidecarError::Internal(_)
                | SidecarError::Identity(IdentityError::Persist { .. })
        )
    }
}

/// A running sidecar.
#[derive(Debug)]
pub struct Sidecar {
    admin_addr: SocketAddr,
    outbound_addr: SocketAddr,
    inbound_addr: SocketAddr,
    config: watch::Receiver<Arc<MeshConfig>>,
    acks: watch::Receiver<u64>,
    status: watch::Receiver<ControlStatus>,
    identity: watch::Receiver<Option<Arc<CurrentIdentity>>>,
    updates: Arc<UpdateLog>,
    trigger: ShutdownTrigger,
    task: JoinHandle<Result<(), SidecarError>>,
}

fn read_ca(config: &SidecarConfig) -> Result<String, SidecarError> {
    let err = |reason: String| SidecarError::CaFile {
        path: config.ca_file.clone(),
        reason,
    };
    let pem = std::fs::read_to_string(&config.ca_file).map_err(|e| err(e.to_string()))?;
    // Building a client config parses the CA and checks it is usable.
    transport::quic_client_config(&pem, None).map_err(|e| err(e.to_string()))?;
    Ok(pem)
}

impl Sidecar {
    /// Validates `config`, loads the disk copy, starts the admin endpoint,
    /// and starts obtaining an identity and connecting in the background.
    /// Errors from the background (a refused join) come from
    /// [`Sidecar::wait`].
    pub async fn start(mut config: SidecarConfig) -> Result<Sidecar, SidecarError> {
        config.validate()?;
        let ca_pem = read_ca(&config)?;
        for dir in [config.data_dir.clone(), config.identity_dir()] {
            std::fs::create_dir_all(&dir)
                .map_err(|source| SidecarError::DataDir { path: dir, source })?;
        }
        let (outbound_listener, outbound_addr) = bind_data(
            "outbound_addr",
            &config.outbound_addr,
            &config.outbound_addr_path(),
        )
        .await?;
        let (inbound_listener, inbound_addr) = bind_data(
            "inbound_addr",
            &config.inbound_addr,
            &config.inbound_addr_path(),
        )
        .await?;
        let mut tcp_listeners = Vec::new();
        for f in &config.tcp_forward {
            let listener = TcpListener::bind(&f.listen).await.map_err(|source| {
                SidecarError::ListenerBind {
                    field: "tcp_forward",
                    addr: f.listen.clone(),
                    source,
                }
            })?;
            let (service, namespace) = match f.service.split_once('.') {
                Some((s, ns)) => (s.to_string(), ns.to_string()),
                None => (f.service.clone(), config.namespace.clone()),
            };
            tcp_listeners.push((
                listener,
                TcpForward {
                    service,
                    namespace,
                    port: f.port,
                },
            ));
        }
        if let Some(inst) = config.instance.as_mut() {
            if inst.port == 0 {
                inst.port = inbound_addr.port();
            }
        }
        let config = Arc::new(config);

        let updates = Arc::new(UpdateLog::default());
        let mut cache = ConfigCache::new(Arc::clone(&updates));
        let cache_path = config.config_cache_path();
        match disk::load(&cache_path) {
            Ok(Some(state)) => {
                tracing::info!(path = %cache_path.display(), revision = state.revision, keys = state.kvs.len(),
                    "serving the last good config from disk");
                cache.load(state.revision, state.kvs);
            }
            Ok(None) => {
                tracing::info!(path = %cache_path.display(), "no config on disk; waiting for the control plane")
            }
            Err(e) => {
                tracing::error!(path = %e.path.display(), error = %e.reason, "ignoring the unreadable config cache; starting empty")
            }
        }
        let disk_writer = disk::spawn_writer(cache_path, cache.subscribe());

        let (trigger, shutdown) = shutdown::channel();
        // The data path stops accepting only after deregistration and a
        // grace period (see the task below), not at the trigger.
        let (listen_trigger, listen_shutdown) = shutdown::channel();
        let identity_tx = Arc::new(watch::channel(None).0);
        let (status_tx, status) = watch::channel(ControlStatus::default());
        let status_tx = Arc::new(status_tx);
        let (conn_tx, conn_rx) = watch::channel(None);
        let sidecar_name = config.resolved_name();

        let listener = TcpListener::bind(&config.admin_addr)
            .await
            .map_err(|source| SidecarError::AdminBind {
                addr: config.admin_addr.clone(),
                source,
            })?;
        let admin_addr = listener
            .local_addr()
            .map_err(|source| SidecarError::AdminBind {
                addr: config.admin_addr.clone(),
                source,
            })?;
        let addr_path = config.admin_addr_path();
        trellis_identity::write_file_atomic(
            &addr_path,
            format!("{admin_addr}\n").as_bytes(),
            false,
        )
        .map_err(|source| SidecarError::DataDir {
            path: addr_path,
            source,
        })?;
        tracing::info!(admin_addr = %admin_addr, sidecar = %sidecar_name, "admin endpoint listening");
        let metrics = Arc::new(Metrics::default());
        let access_log = match &config.access_log {
            None => AccessLog::disabled(Arc::clone(&metrics)),
            Some(path) => AccessLog::start(Sink::parse(path), Arc::clone(&metrics))
                .await
                .map_err(|source| SidecarError::AccessLog {
                    path: path.clone(),
                    source,
                })?,
        };
        let drain = Drain::default();
        let balancer = Arc::new(Balancer::default());
        let health = Arc::new(HealthChecks::default());
        let admin_state = AdminState {
            sidecar_name: sidecar_name.clone(),
            config: cache.subscribe(),
            acks: cache.acks(),
            status: status.clone(),
            identity: identity_tx.subscribe(),
            updates: Arc::clone(&updates),
            metrics: Arc::clone(&metrics),
            balancer: Arc::clone(&balancer),
            health: Arc::clone(&health),
        };
        let (admin_trigger, admin_shutdown) = shutdown::channel();
        let admin_task = tokio::spawn(admin::serve(listener, admin_state, admin_shutdown));

        let tls = Arc::new(TlsSource::new(ca_pem.clone(), identity_tx.subscribe()));
        let limits = Arc::new(proxy::conn::Limits::from(&config.connection));
        let outbound = Arc::new(Outbound {
            config: cache.subscribe(),
            namespace: config.namespace.clone(),
            source: format!("{}/{}", config.namespace, config.service),
            labels: config
                .instance
                .as_ref()
                .map(|i| i.labels.clone())
                .unwrap_or_default(),
            balancer,
            upstreams: Upstreams::with_limits(Arc::clone(&tls), Arc::clone(&limits)),
            tls: Arc::clone(&tls),
            metrics: Arc::clone(&metrics),
            retry_budgets: RetryBudgets::default(),
            access_log: access_log.clone(),
            drain: drain.clone(),
            passthrough: Default::default(),
            health: Arc::clone(&health),
            outliers: Default::default(),
            circuits: Default::default(),
            latencies: Default::default(),
            backup_budgets: RetryBudgets::default(),
            limits: Arc::clone(&limits),
        });
        // validate() checked app_addr.
        let app_addr = config
            .app_addr
            .parse()
            .map_err(|e| SidecarError::Internal(format!("app_addr: {e}")))?;
        let inbound = Arc::new(
            Inbound::new(
                Arc::clone(&tls),
                app_addr,
                &config.namespace,
                config.service.clone(),
                cache.subscribe(),
                metrics,
                access_log,
                drain.clone(),
            )
            .with_limits(Arc::clone(&limits)),
        );
        for (listener, to) in tcp_listeners {
            tokio::spawn(proxy::outbound::serve_tcp(
                listener,
                Arc::clone(&outbound),
                to,
                listen_shutdown.clone(),
            ));
        }
        tokio::spawn(proxy::outbound::serve(
            outbound_listener,
            outbound,
            listen_shutdown.clone(),
        ));
        tokio::spawn(proxy::inbound::serve(
            inbound_listener,
            inbound,
            listen_shutdown.clone(),
        ));
        tracing::info!(outbound_addr = %outbound_addr, inbound_addr = %inbound_addr, app_addr = %app_addr,
            workers = config.worker_threads(), "request path listening");
        // Active health checks (proxy/health_check.rs): destinations while
        // the data path serves; the local app while registered.
        tokio::spawn(proxy::health_check::run_destination_checks(
            Arc::clone(&health),
            cache.subscribe(),
            Arc::clone(&tls),
            Arc::clone(&limits),
            listen_shutdown.clone(),
        ));
        if config.instance.is_some() {
            tokio::spawn(
                proxy::health_check::run_local_checks(
                    Arc::clone(&health),
                    cache.subscribe(),
                    config.namespace.clone(),
                    config.service.clone(),
                    app_addr,
                    shutdown.clone(),
                )
                .instrument(tracing::info_span!("app_health_check", app = %app_addr)),
            );
        }

        let config_rx = cache.subscribe();
        let acks = cache.acks();
        let identity = identity_tx.subscribe();

        let endpoints = Arc::new(Endpoints::default());
        let drain_timeout = Duration::from_millis(config.drain_timeout_ms);
        let registers = config.instance.is_some();
        let task = tokio::spawn(async move {
            let mut sd = shutdown.clone();
            let result: Result<(), SidecarError> = async {
                let ctx = IdentityContext::new(&config, ca_pem.clone(), Arc::clone(&endpoints));
                let Some(id) = identity::obtain(&ctx, &mut sd).await? else {
                    return Ok(());
                };
                identity_tx.send_replace(Some(Arc::new(id)));
                let renewal = tokio::spawn(identity::run_renewal(
                    ctx,
                    Arc::clone(&identity_tx),
                    conn_rx,
                    sd.clone(),
                ));
                let manager = ControlPlane::new(
                    Arc::clone(&config),
                    ca_pem,
                    identity_tx.subscribe(),
                    Arc::clone(&endpoints),
                    status_tx,
                    conn_tx,
                )
                .with_app_health(health.local_health());
                manager.run(&mut cache, sd.clone()).await;
                let _ = renewal.await;
                Ok(())
            }
            .await;
            if let Err(e) = &result {
                tracing::error!(error = %e, "sidecar stopping");
            }
            // Shutdown order: the goodbye above deregistered the instance;
            // peers see that within milliseconds, but until they do they
            // may still send here, so the listeners stay open for a grace
            // period; then they stop accepting and open connections finish
            // their requests under the deadline.
            if result.is_ok() && sd.is_triggered() && registers {
                tokio::time::sleep(DEREGISTER_GRACE).await;
            }
            listen_trigger.trigger();
            let open = drain.open();
            if open > 0 {
                tracing::info!(
                    open,
                    deadline_ms = drain_timeout.as_millis() as u64,
                    "draining connections"
                );
                if !drain.wait(drain_timeout).await {
                    tracing::warn!(
                        open = drain.open(),
                        "drain deadline passed; closing the rest"
                    );
                }
            }
            drop(cache);
            if let Err(e) = disk_writer.await {
                tracing::warn!(error = %e, "config writer failed");
            }
            endpoints.shutdown(CLOSE_GRACE).await;
            admin_trigger.trigger();
            let _ = admin_task.await;
            tracing::info!("sidecar stopped");
            result
        });
        Ok(Sidecar {
            admin_addr,
            outbound_addr,
            inbound_addr,
            config: config_rx,
            acks,
            status,
            identity,
            updates,
            trigger,
            task,
        })
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The bound outbound (application-facing) address.
    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound_addr
    }

    /// The bound inbound (peer-sidecar-facing) address.
    pub fn inbound_addr(&self) -> SocketAddr {
        self.inbound_addr
    }

    /// The compiled config, updated after every change (what the request
    /// path reads).
    pub fn config(&self) -> watch::Receiver<Arc<MeshConfig>> {
        self.config.clone()
    }

    /// The revision acknowledged to the control plane.
    pub fn acked_revision(&self) -> watch::Receiver<u64> {
        self.acks.clone()
    }

    /// The control-plane connection's state.
    pub fn status(&self) -> watch::Receiver<ControlStatus> {
        self.status.clone()
    }

    /// The current certificate (`None` while joining).
    pub fn identity(&self) -> watch::Receiver<Option<Arc<CurrentIdentity>>> {
        self.identity.clone()
    }

    /// The log of applied updates.
    pub fn updates(&self) -> Arc<UpdateLog> {
        Arc::clone(&self.updates)
    }

    /// Asks the sidecar to stop (goodbye to the control plane, final disk
    /// write); see [`Sidecar::wait`].
    pub fn shutdown(&self) {
        self.trigger.trigger();
    }

    /// Waits for the sidecar to stop on its own (a refused join) or after
    /// [`Sidecar::shutdown`].
    pub async fn wait(self) -> Result<(), SidecarError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(SidecarError::Internal(e.to_string())),
        }
    }

    /// [`Sidecar::shutdown`] then [`Sidecar::wait`].
    pub async fn stop(self) -> Result<(), SidecarError> {
        self.shutdown();
        self.wait().await
    }
}

/// Binds a data-path listener and writes its bound address to `path`.
async fn bind_data(
    field: &'static str,
    addr: &str,
    path: &std::path::Path,
) -> Result<(TcpListener, SocketAddr), SidecarError> {
    let err = |source| SidecarError::ListenerBind {
        field,
        addr: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    trellis_identity::write_file_atomic(path, format!("{bound}\n").as_bytes(), false).map_err(
        |source| SidecarError::DataDir {
            path: path.to_path_buf(),
            source,
        },
    )?;
    Ok((listener, bound))
}

/// Runs a sidecar with `config` until it fails or `shutdown` resolves, then
/// stops it gracefully.
pub async fn run(
    config: SidecarConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SidecarError> {
    let mut sidecar = Sidecar::start(config).await?;
    tokio::select! {
        r = &mut sidecar.task => return r.unwrap_or_else(|e| Err(SidecarError::Internal(e.to_string()))),
        _ = shutdown => {}
    }
    sidecar.stop().await
}
