//! The sidecar's certificate lifecycle.
//!
//! 1. **Start** ([`obtain`]): a certificate and key in
//!    `<data_dir>/identity/{cert.pem,key.pem}` that chain to the CA, match
//!    each other, name a workload of the configured namespace/service and
//!    have at least [`MIN_REMAINING_FRACTION`] of their lifetime left are
//!    used as they are. Otherwise the sidecar **joins**: from a random seed
//!    on, it connects without a client certificate, sends
//!    `Open{join: {token, csr}}` and reads a `CertificateResponse`. A
//!    refusal (UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT) fails
//!    start-up at once (`join refused by 10.0.0.1:7381: join token expired`);
//!    anything else (UNAVAILABLE, no answer, a dead node) moves to the next
//!    seed with backoff. The key (0600), certificate and CA are persisted
//!    atomically before they are used.
//! 2. **Use**: the current identity is published on a
//!    `watch<Option<Arc<CurrentIdentity>>>`; every new connection reads the
//!    newest one ([`crate::control`]), `/config_dump` shows it.
//! 3. **Renew** ([`run_renewal`]): at `renew_at_fraction` of the lifetime,
//!    a `renew` stream on the current connection with a fresh key and CSR;
//!    persisted, then swapped in. Failures are retried with backoff; should
//!    the certificate expire meanwhile, the sidecar joins again if it has a
//!    token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use trellis_identity::{CertInfo, Identity};
use trellis_proto::frame::{read_frame, MAX_FRAME_BYTES};
use trellis_proto::sidecar::{
    certificate_response, open, CertificateResponse, JoinRequest, Open, RenewRequest,
};

use crate::backoff::Backoff;
use crate::config::SidecarConfig;
use crate::shutdown::Shutdown;
use crate::transport::{self, Endpoints, RemoteError};
use crate::updates::now_unix_ms;

/// A certificate on disk is reused only with at least this fraction of its
/// lifetime left; less would mean renewing (or failing to) right away.
pub const MIN_REMAINING_FRACTION: f64 = 0.10;
/// How long a join or renew waits for the certificate: signing goes
/// through the Raft log (the token is consumed), which may wait out a
/// leader election.
pub const CERT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// First delay between renewal attempts.
pub const RENEW_RETRY_BASE: Duration = Duration::from_secs(1);
/// Largest delay between renewal attempts: a renewal has a third of the
/// lifetime left, so no need to hammer an unhealthy control plane.
pub const RENEW_RETRY_MAX: Duration = Duration::from_secs(30);
/// How long a renewal waits for the connection manager to have a
/// connection before counting the attempt as failed.
pub const RENEW_CONNECTION_WAIT: Duration = Duration::from_secs(5);

/// Certificate file in the identity directory.
pub const CERT_FILE: &str = "cert.pem";
/// Private key file (mode 0600).
pub const KEY_FILE: &str = "key.pem";
/// The CA certificate the control plane returned with the certificate.
pub const CA_FILE: &str = "ca.pem";

/// The certificate and key the sidecar presents.
#[derive(Clone)]
pub struct CurrentIdentity {
    pub cert_pem: String,
    pub key_pem: String,
    pub info: CertInfo,
}

impl std::fmt::Debug for CurrentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CurrentIdentity")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl CurrentIdentity {
    /// When the certificate was issued: the CA backdates `not_before` by
    /// [`trellis_identity::CLOCK_SKEW_BACKDATE`] for clock skew, which is
    /// not lifetime to plan renewal with (with short certificates it would
    /// put the renewal point in the past, renewing in a loop).
    pub fn issued_at_unix_ms(&self) -> u64 {
        let backdate = trellis_identity::CLOCK_SKEW_BACKDATE.as_millis() as u64;
        self.info
            .not_before_unix_ms
            .saturating_add(backdate)
            .min(self.info.not_after_unix_ms)
    }

    /// The fraction of the lifetime (from issue) left at `now_ms` (0 when
    /// expired).
    pub fn remaining_fraction(&self, now_ms: u64) -> f64 {
        let nb = self.issued_at_unix_ms();
        let na = self.info.not_after_unix_ms;
        if na <= nb || now_ms >= na {
            return 0.0;
        }
        let life = (na - nb) as f64;
        ((na - now_ms.max(nb)) as f64 / life).min(1.0)
    }

    /// When to renew: `issued + fraction * lifetime`.
    pub fn renew_at_unix_ms(&self, fraction: f64) -> u64 {
        let nb = self.issued_at_unix_ms();
        let life = self.info.not_after_unix_ms.saturating_sub(nb);
        nb.saturating_add((life as f64 * fraction.clamp(0.0, 1.0)) as u64)
    }

    /// True once `not_after` has passed.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        now_ms >= self.info.not_after_unix_ms
    }
}

/// Why the sidecar has no identity and will not get one by waiting.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The control plane refused the join (bad, used or expired token;
    /// scope; malformed CSR). Not retry-safe: fix the token.
    #[error("join refused by {addr}: {message}")]
    JoinRefused { addr: SocketAddr, message: String },
    /// A join is needed and there is no token. Not retry-safe.
    #[error("no usable certificate in {} and no join token configured (set join_token or join_token_file)", dir.display())]
    NoJoinToken { dir: PathBuf },
    /// The token file cannot be read or holds no token. Not retry-safe.
    #[error("join_token_file {}: {reason}", path.display())]
    TokenFile { path: PathBuf, reason: String },
    /// The new certificate cannot be saved. Retry-safe once the disk is fixed.
    #[error("cannot save the certificate in {}: {source}", dir.display())]
    Persist {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One failed attempt to get a certificate.
#[derive(Debug, thiserror::Error)]
enum Attempt {
    /// Final: the request will never succeed as sent.
    #[error("join refused by {addr}: {message}")]
    Refused { addr: SocketAddr, message: String },
    /// Worth retrying, here or on another node.
    #[error("{0}")]
    Retry(String),
}

/// What the identity code needs from the config, plus the shared endpoints.
#[derive(Debug, Clone)]
pub struct IdentityContext {
    pub dir: PathBuf,
    /// The configured cluster CA (what servers are verified against).
    pub ca_pem: String,
    pub seeds: Vec<String>,
    pub namespace: String,
    /// Expected service; empty accepts any.
    pub service: String,
    pub join_token: Option<String>,
    pub join_token_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub renew_at_fraction: f64,
    pub endpoints: Arc<Endpoints>,
}

impl IdentityContext {
    /// From a validated config and the CA's PEM.
    pub fn new(config: &SidecarConfig, ca_pem: String, endpoints: Arc<Endpoints>) -> Self {
        IdentityContext {
            dir: config.identity_dir(),
            ca_pem,
            seeds: config.seeds.clone(),
            namespace: config.namespace.clone(),
            service: config.service.clone(),
            join_token: config.join_token.clone(),
            join_token_file: config.join_token_file.clone(),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            backoff_base: Duration::from_millis(config.reconnect_base_ms),
            backoff_max: Duration::from_millis(config.reconnect_max_ms),
            renew_at_fraction: config.renew_at_fraction,
            endpoints,
        }
    }

    fn has_token(&self) -> bool {
        self.join_token.is_some() || self.join_token_file.is_some()
    }

    /// The join token, read now (the file may have been updated).
    fn token(&self) -> Result<String, IdentityError> {
        if let Some(t) = &self.join_token {
            return Ok(t.trim().to_string());
        }
        let Some(path) = &self.join_token_file else {
            return Err(IdentityError::NoJoinToken {
                dir: self.dir.clone(),
            });
        };
        let text = std::fs::read_to_string(path).map_err(|e| IdentityError::TokenFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let token = text.trim();
        trellis_identity::JoinToken::parse(token).map_err(|e| IdentityError::TokenFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(token.to_string())
    }

    /// Why `id` cannot be used (or `Ok`): validity left, identity, key
    /// matching the certificate, chain to the CA.
    pub fn check_usable(&self, id: &CurrentIdentity, now_ms: u64) -> Result<(), String> {
        let left = id.remaining_fraction(now_ms);
        if left < MIN_REMAINING_FRACTION {
            return Err(format!(
                "only {:.0}% of its lifetime left (not after {} ms since the epoch)",
                left * 100.0,
                id.info.not_after_unix_ms
            ));
        }
        match &id.info.identity {
            Identity::Workload { namespace, service } => {
                if namespace != &self.namespace
                    || (!self.service.is_empty() && service != &self.service)
                {
                    return Err(format!(
                        "it is for {namespace}/{service}, the config says {}/{}",
                        self.namespace,
                        if self.service.is_empty() {
                            "*"
                        } else {
                            &self.service
                        }
                    ));
                }
            }
            other => return Err(format!("it is not a workload certificate ({other:?})")),
        }
        verify_chain(&self.ca_pem, &id.cert_pem)?;
        // Builds only if the key matches the certificate.
        transport::quic_client_config(&self.ca_pem, Some((&id.cert_pem, &id.key_pem)))
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The certificate on disk, if present and usable (else `None`, with
    /// the reason logged).
    pub fn load(&self) -> Option<CurrentIdentity> {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name));
        let (cert_pem, key_pem) = match (read(CERT_FILE), read(KEY_FILE)) {
            (Ok(c), Ok(k)) => (c, k),
            (Err(e), _) | (_, Err(e)) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the stored certificate; joining");
                } else {
                    tracing::info!(dir = %self.dir.display(), "no stored certificate; joining");
                }
                return None;
            }
        };
        let info = match trellis_identity::cert_info(&cert_pem) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(file = %self.dir.join(CERT_FILE).display(), error = %e, "stored certificate unreadable; joining");
                return None;
            }
        };
        let id = CurrentIdentity {
            cert_pem,
            key_pem,
            info,
        };
        match self.check_usable(&id, now_unix_ms()) {
            Ok(()) => {
                tracing::info!(spiffe_id = %id.info.spiffe_id, serial = %id.info.serial,
                    not_after_unix_ms = id.info.not_after_unix_ms, "using the stored certificate");
                Some(id)
            }
            Err(why) => {
                tracing::info!(spiffe_id = %id.info.spiffe_id, reason = %why, "stored certificate not usable; joining");
                None
            }
        }
    }

    /// Writes key (0600), certificate and CA atomically.
    pub fn save(&self, id: &CurrentIdentity, ca_pem: &str) -> Result<(), IdentityError> {
        let persist = |source| IdentityError::Persist {
            dir: self.dir.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(persist)?;
        trellis_identity::write_file_atomic(&self.dir.join(KEY_FILE), id.key_pem.as_bytes(), true)
            .map_err(persist)?;
        trellis_identity::write_file_atomic(
            &self.dir.join(CERT_FILE),
            id.cert_pem.as_bytes(),
            false,
        )
        .map_err(persist)?;
        let ca = if ca_pem.trim().is_empty() {
            &self.ca_pem
        } else {
            ca_pem
        };
        trellis_identity::write_file_atomic(&self.dir.join(CA_FILE), ca.as_bytes(), false)
            .map_err(persist)?;
        Ok(())
    }

    /// Turns the server's answer into an identity for `key_pem`.
    fn accept(
        &self,
        addr: SocketAddr,
        resp: Option<CertificateResponse>,
        key_pem: String,
    ) -> Result<(CurrentIdentity, String), Attempt> {
        let resp = resp
            .ok_or_else(|| Attempt::Retry(format!("{addr} closed the stream without an answer")))?;
        match resp.result {
            None => Err(Attempt::Retry(format!(
                "{addr} sent an empty certificate response"
            ))),
            Some(certificate_response::Result::Error(e)) => {
                let e = RemoteError::from(e);
                if e.is_refusal() {
                    Err(Attempt::Refused {
                        addr,
                        message: e.message,
                    })
                } else {
                    Err(Attempt::Retry(format!("{addr}: {e}")))
                }
            }
            Some(certificate_response::Result::Certificate(c)) => {
                let info = trellis_identity::cert_info(&c.cert_pem).map_err(|e| {
                    Attempt::Retry(format!("{addr} sent an unreadable certificate: {e}"))
                })?;
                let id = CurrentIdentity {
                    cert_pem: c.cert_pem,
                    key_pem,
                    info,
                };
                if !c.ca_pem.trim().is_empty() && c.ca_pem.trim() != self.ca_pem.trim() {
                    tracing::warn!(node = %addr, "the CA the control plane returned differs from ca_file; servers are still verified against ca_file");
                }
                // A fresh certificate must pass the same checks as one on disk.
                self.check_usable(&id, now_unix_ms()).map_err(|why| {
                    Attempt::Retry(format!(
                        "{addr} issued a certificate that cannot be used: {why}"
                    ))
                })?;
                Ok((id, c.ca_pem))
            }
        }
    }

    /// One join through `seed`.
    async fn join_once(
        &self,
        seed: &str,
        token: &str,
    ) -> Result<(CurrentIdentity, String), Attempt> {
        let retry = |e: &dyn std::fmt::Display| Attempt::Retry(format!("{seed}: {e}"));
        let addr = transport::resolve(seed).await.map_err(|e| retry(&e))?;
        let endpoint = self.endpoints.for_target(&addr).map_err(|e| retry(&e))?;
        let config = transport::quic_client_config(&self.ca_pem, None).map_err(|e| retry(&e))?;
        let conn = transport::connect(
            &endpoint,
            Some(config),
            addr,
            &transport::server_name(&addr),
            self.connect_timeout,
        )
        .await
        .map_err(|e| retry(&e))?;
        let (csr_pem, key_pem) = trellis_identity::generate_csr().map_err(|e| retry(&e))?;
        let open = Open {
            kind: Some(open::Kind::Join(JoinRequest {
                token: token.to_string(),
                csr_pem,
                namespace: self.namespace.clone(),
                service: self.service.clone(),
            })),
        };
        let result = async {
            let (_send, mut recv) = transport::open_stream(&conn, &open)
                .await
                .map_err(|e| retry(&e))?;
            let resp = tokio::time::timeout(
                CERT_RESPONSE_TIMEOUT,
                read_frame(&mut recv, MAX_FRAME_BYTES, "certificate response"),
            )
            .await
            .map_err(|_| {
                Attempt::Retry(format!(
                    "{addr}: no certificate within {CERT_RESPONSE_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| retry(&e))?;
            self.accept(addr, resp, key_pem)
        }
        .await;
        conn.close(quinn::VarInt::from_u32(0), b"joined");
        result
    }

    /// Joins, trying seeds in turn from a random one, until a certificate
    /// is issued (saved, then returned), the join is refused, or shutdown
    /// (`Ok(None)`).
    pub async fn join(
        &self,
        shutdown: &mut Shutdown,
    ) -> Result<Option<CurrentIdentity>, IdentityError> {
        let token = self.token()?;
        let n = self.seeds.len().max(1);
        let mut i = rand::rng().random_range(0..n);
        let mut backoff = Backoff::new(self.backoff_base, self.backoff_max);
        loop {
            let Some(seed) = self.seeds.get(i % n) else {
                return Err(IdentityError::NoJoinToken {
                    dir: self.dir.clone(),
                });
            };
            let span = tracing::info_span!("join", seed = %seed);
            let attempt = tokio::select! {
                r = tracing::Instrument::instrument(self.join_once(seed, &token), span) => r,
                _ = shutdown.wait() => return Ok(None),
            };
            match attempt {
                Ok((id, ca_pem)) => {
                    self.save(&id, &ca_pem)?;
                    tracing::info!(seed = %seed, spiffe_id = %id.info.spiffe_id, serial = %id.info.serial,
                        not_after_unix_ms = id.info.not_after_unix_ms, "joined the mesh");
                    return Ok(Some(id));
                }
                Err(Attempt::Refused { addr, message }) => {
                    return Err(IdentityError::JoinRefused { addr, message })
                }
                Err(Attempt::Retry(why)) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %why, retry_in_ms = delay.as_millis() as u64, "join attempt failed; trying the next seed");
                    i += 1;
                    if shutdown.sleep(delay).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// One renewal on `conn` (authenticated with the current certificate).
    async fn renew_once(
        &self,
        conn: &quinn::Connection,
    ) -> Result<(CurrentIdentity, String), Attempt> {
        let addr = conn.remote_address();
        let retry = |e: &dyn std::fmt::Display| Attempt::Retry(format!("{addr}: {e}"));
        let (csr_pem, key_pem) = trellis_identity::generate_csr().map_err(|e| retry(&e))?;
        let open = Open {
            kind: Some(open::Kind::Renew(RenewRequest { csr_pem })),
        };
        let (_send, mut recv) = transport::open_stream(conn, &open)
            .await
            .map_err(|e| retry(&e))?;
        let resp = tokio::time::timeout(
            CERT_RESPONSE_TIMEOUT,
            read_frame(&mut recv, MAX_FRAME_BYTES, "certificate response"),
        )
        .await
        .map_err(|_| {
            Attempt::Retry(format!(
                "{addr}: no certificate within {CERT_RESPONSE_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| retry(&e))?;
        // A refused renewal (e.g. a revoked certificate) is retried too:
        // the sidecar keeps serving, and its operator sees the warnings.
        self.accept(addr, resp, key_pem)
            .map_err(|e| Attempt::Retry(e.to_string()))
    }
}

/// Checks that `cert_pem` is a client certificate issued by `ca_pem` (a
/// certificate from another cluster's CA would only fail handshakes).
fn verify_chain(ca_pem: &str, cert_pem: &str) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, UnixTime};
    let roots = trellis_identity::root_store(ca_pem).map_err(|e| e.to_string())?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        trellis_identity::crypto_provider(),
    )
    .build()
    .map_err(|e| format!("ca_file: {e}"))?;
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate PEM: {e}"))?;
    let (leaf, intermediates) = chain.split_first().ok_or("no certificate in the PEM")?;
    verifier
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .map_err(|e| format!("not a valid certificate of the cluster in ca_file: {e}"))?;
    Ok(())
}

/// The identity at start: the stored one if usable, else a join.
/// `Ok(None)` on shutdown.
pub async fn obtain(
    ctx: &IdentityContext,
    shutdown: &mut Shutdown,
) -> Result<Option<CurrentIdentity>, IdentityError> {
    let dir = ctx.dir.clone();
    let c = ctx.clone();
    let loaded = tokio::task::spawn_blocking(move || c.load()).await.unwrap_or_else(|e| {
        tracing::warn!(dir = %dir.display(), error = %e, "loading the stored certificate failed");
        None
    });
    if let Some(id) = loaded {
        return Ok(Some(id));
    }
    if !ctx.has_token() {
        return Err(IdentityError::NoJoinToken {
            dir: ctx.dir.clone(),
        });
    }
    ctx.join(shutdown).await
}

/// Renews the certificate for as long as the sidecar runs: sleeps until
/// `renew_at_fraction` of the current certificate's lifetime, renews on
/// the connection `conn_rx` holds (retrying with backoff), saves, then
/// publishes the new identity on `identity_tx`.
pub async fn run_renewal(
    ctx: IdentityContext,
    identity_tx: Arc<watch::Sender<Option<Arc<CurrentIdentity>>>>,
    mut conn_rx: watch::Receiver<Option<quinn::Connection>>,
    mut shutdown: Shutdown,
) {
    loop {
        let Some(current) = identity_tx.borrow().clone() else {
            return;
        };
        let at = current.renew_at_unix_ms(ctx.renew_at_fraction);
        let wait = Duration::from_millis(at.saturating_sub(now_unix_ms()));
        tracing::info!(serial = %current.info.serial, renew_in_s = wait.as_secs(), "certificate renewal scheduled");
        if shutdown.sleep(wait).await {
            return;
        }
        let mut backoff = Backoff::new(RENEW_RETRY_BASE, RENEW_RETRY_MAX);
        loop {
            let attempt = if current.is_expired(now_unix_ms()) && ctx.has_token() {
                tracing::warn!(serial = %current.info.serial, "certificate expired before it could be renewed; joining again");
                match ctx.join(&mut shutdown).await {
                    Ok(Some(id)) => Ok(id),
                    Ok(None) => return,
                    Err(e) => Err(e.to_string()),
                }
            } else {
                renew_via(&ctx, &mut conn_rx, &mut shutdown).await
            };
            match attempt {
                Ok(id) => {
                    tracing::info!(old_serial = %current.info.serial, serial = %id.info.serial,
                        not_after_unix_ms = id.info.not_after_unix_ms, "renewed the certificate");
                    identity_tx.send_replace(Some(Arc::new(id)));
                    break;
                }
                Err(why) => {
                    if shutdown.is_triggered() {
                        return;
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %why, retry_in_ms = delay.as_millis() as u64, "certificate renewal failed; retrying");
                    if shutdown.sleep(delay).await {
                        return;
                    }
                }
            }
        }
    }
}

async fn renew_via(
    ctx: &IdentityContext,
    conn_rx: &mut watch::Receiver<Option<quinn::Connection>>,
    shutdown: &mut Shutdown,
) -> Result<CurrentIdentity, String> {
    let conn = tokio::select! {
        r = tokio::time::timeout(RENEW_CONNECTION_WAIT, conn_rx.wait_for(|c| c.is_some())) => match r {
            Ok(Ok(c)) => c.clone(),
            Ok(Err(_)) => return Err("the connection manager stopped".into()),
            Err(_) => return Err(format!("not connected to the control plane for {RENEW_CONNECTION_WAIT:?}")),
        },
        _ = shutdown.wait() => return Err("shutting down".into()),
    };
    let Some(conn) = conn else {
        return Err("not connected".into());
    };
    let span = tracing::info_span!("renew", node = %conn.remote_address());
    let (id, ca_pem) = tracing::Instrument::instrument(ctx.renew_once(&conn), span)
        .await
        .map_err(|e| e.to_string())?;
    let (c, id2, ca) = (ctx.clone(), id.clone(), ca_pem);
    tokio::task::spawn_blocking(move || c.save(&id2, &ca))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(id)
}

/// Where the stored identity lives for a config (for tools and tests).
pub fn identity_paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (dir.join(CERT_FILE), dir.join(KEY_FILE), dir.join(CA_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_identity::Ca;

    fn ctx(dir: &Path, ca: &Ca, service: &str) -> IdentityContext {
        IdentityContext {
            dir: dir.to_path_buf(),
            ca_pem: ca.cert_pem().to_string(),
            seeds: vec!["127.0.0.1:1".into()],
            namespace: "default".into(),
            service: service.into(),
            join_token: None,
            join_token_file: None,
            connect_timeout: Duration::from_millis(100),
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(2),
            renew_at_fraction: 0.66,
            endpoints: Arc::new(Endpoints::default()),
        }
    }

    fn issue(ca: &Ca, ns: &str, svc: &str, validity: Duration) -> CurrentIdentity {
        let (csr, key) = trellis_identity::generate_csr().unwrap();
        let issued = ca
            .sign_csr(
                &csr,
                &Identity::Workload {
                    namespace: ns.into(),
                    service: svc.into(),
                },
                &[],
                validity,
            )
            .unwrap();
        CurrentIdentity {
            cert_pem: issued.cert_pem,
            key_pem: key,
            info: issued.info,
        }
    }

    #[test]
    fn saved_identity_is_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create("trellis.local").unwrap();
        let c = ctx(dir.path(), &ca, "reviews");
        assert!(c.load().is_none(), "nothing on disk");
        let id = issue(&ca, "default", "reviews", Duration::from_secs(3600));
        c.save(&id, "").unwrap();
        let got = c.load().expect("usable");
        assert_eq!(got.info, id.info);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CA_FILE)).unwrap(),
            ca.cert_pem()
        );
    }

    #[test]
    fn unusable_identities_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create("trellis.local").unwrap();
        let c = ctx(dir.path(), &ca, "reviews");
        let now = now_unix_ms();

        let other_service = issue(&ca, "default", "ratings", Duration::from_secs(3600));
        assert!(c
            .check_usable(&other_service, now)
            .unwrap_err()
            .contains("default/ratings"));
        // Any service is fine when the config names none.
        ctx(dir.path(), &ca, "")
            .check_usable(&other_service, now)
            .unwrap();

        let mut mismatched = issue(&ca, "default", "reviews", Duration::from_secs(3600));
        mismatched.key_pem = issue(&ca, "default", "reviews", Duration::from_secs(3600)).key_pem;
        assert!(
            c.check_usable(&mismatched, now).is_err(),
            "key does not match"
        );

        let other_ca = Ca::create("trellis.local").unwrap();
        let foreign = issue(&other_ca, "default", "reviews", Duration::from_secs(3600));
        assert!(c
            .check_usable(&foreign, now)
            .unwrap_err()
            .contains("ca_file"));

        let id = issue(&ca, "default", "reviews", Duration::from_secs(3600));
        let late = id.info.not_after_unix_ms
            - (id.info.not_after_unix_ms - id.info.not_before_unix_ms) / 20;
        assert!(c
            .check_usable(&id, late)
            .unwrap_err()
            .contains("lifetime left"));
        assert!(c.check_usable(&id, id.info.not_after_unix_ms + 1).is_err());

        // Garbage on disk: not usable, no panic.
        std::fs::write(dir.path().join(CERT_FILE), "garbage").unwrap();
        std::fs::write(dir.path().join(KEY_FILE), "garbage").unwrap();
        assert!(c.load().is_none());
    }

    #[test]
    fn lifetime_arithmetic() {
        let ca = Ca::create("trellis.local").unwrap();
        let mut id = issue(&ca, "default", "reviews", Duration::from_secs(3600));
        // Issued at 61 s (not_before is backdated 60 s), valid until 71 s.
        id.info.not_before_unix_ms = 1_000;
        id.info.not_after_unix_ms = 71_000;
        assert_eq!(id.issued_at_unix_ms(), 61_000);
        assert_eq!(id.renew_at_unix_ms(0.66), 67_600);
        assert!((id.remaining_fraction(61_000) - 1.0).abs() < 1e-9);
        assert!((id.remaining_fraction(70_000) - 0.1).abs() < 1e-9);
        assert_eq!(id.remaining_fraction(0), 1.0);
        assert_eq!(id.remaining_fraction(71_000), 0.0);
        assert!(id.is_expired(71_000));
        assert!(!id.is_expired(70_999));
    }

    #[tokio::test]
    async fn no_token_means_no_join() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create("trellis.local").unwrap();
        let c = ctx(dir.path(), &ca, "reviews");
        let (_t, mut s) = crate::shutdown::channel();
        let e = obtain(&c, &mut s).await.unwrap_err();
        assert!(matches!(e, IdentityError::NoJoinToken { .. }), "{e}");

        let mut c2 = c.clone();
        c2.join_token_file = Some(dir.path().join("missing-token"));
        let e = obtain(&c2, &mut s).await.unwrap_err();
        assert!(e.to_string().starts_with("join_token_file "), "{e}");
    }

    #[tokio::test]
    async fn join_retries_unreachable_seeds_until_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create("trellis.local").unwrap();
        let mut c = ctx(dir.path(), &ca, "reviews");
        c.join_token = Some(trellis_identity::JoinToken::generate().to_string());
        let (t, mut s) = crate::shutdown::channel();
        let join = tokio::spawn(async move { c.join(&mut s).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        t.trigger();
        let r = tokio::time::timeout(Duration::from_secs(5), join)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(r, Ok(None)), "{r:?}");
    }
}
