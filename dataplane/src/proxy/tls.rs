//! TLS configs for the data path, built from the *current* identity when a
//! connection is made: a renewed certificate is used by the next
//! connection, while established connections keep the one they started
//! with (nothing is dropped on rotation). Configs are cached per identity
//! (compared by `Arc` pointer), so PEM is parsed once per certificate, not
//! per connection.
//!
//! * inbound: server config with the workload certificate, client
//!   certificates required and verified against the cluster CA, ALPN `h2`;
//! * outbound: client config presenting the workload certificate and
//!   verifying the peer sidecar by its SPIFFE ID
//!   ([`trellis_identity::SpiffeServerVerifier`]), ALPN `h2`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::{ClientConfig, ServerConfig};
use tokio::sync::watch;
use trellis_identity::{ClientAuth, IdentityError};

use crate::identity::CurrentIdentity;

/// ALPN of sidecar-to-sidecar HTTP connections.
pub const ALPN_H2: &[u8] = b"h2";

/// Why no TLS config could be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Still joining: no certificate yet.
    #[error("no workload certificate yet")]
    NoIdentity,
    /// The certificate, key or CA did not load.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

type Cached<T> = Mutex<Option<(Arc<CurrentIdentity>, T)>>;

/// Builds (and caches) TLS configs from the identity watch channel.
#[derive(Debug)]
pub struct TlsSource {
    ca_pem: String,
    identity: watch::Receiver<Option<Arc<CurrentIdentity>>>,
    server: Cached<Arc<ServerConfig>>,
    clients: Cached<HashMap<String, Arc<ClientConfig>>>,
    /// Expected peer SPIFFE IDs by `namespace/service`, in the current
    /// identity's trust domain (asked for on every request).
    peer_ids: Cached<HashMap<String, Arc<str>>>,
}

impl TlsSource {
    /// A source trusting `ca_pem`, following `identity`.
    pub fn new(ca_pem: String, identity: watch::Receiver<Option<Arc<CurrentIdentity>>>) -> Self {
        TlsSource {
            ca_pem,
            identity,
            server: Mutex::new(None),
            clients: Mutex::new(None),
            peer_ids: Mutex::new(None),
        }
    }

    /// The current identity.
    pub fn current(&self) -> Result<Arc<CurrentIdentity>, TlsError> {
        self.identity.borrow().clone().ok_or(TlsError::NoIdentity)
    }

    /// The SPIFFE ID the sidecars of `namespace/service` must present, in
    /// the current identity's trust domain; `key` is `namespace/service`
    /// (the cache key, which callers already hold).
    pub fn peer_id(&self, key: &str, namespace: &str, service: &str) -> Result<Arc<str>, TlsError> {
        let id = self.current()?;
        let mut cache = self.peer_ids.lock().unwrap_or_else(|e| e.into_inner());
        match cache.as_mut() {
            Some((cached_id, map)) if Arc::ptr_eq(cached_id, &id) => {
                if let Some(v) = map.get(key) {
                    return Ok(Arc::clone(v));
                }
            }
            _ => *cache = Some((Arc::clone(&id), HashMap::new())),
        }
        let spiffe: Arc<str> = trellis_identity::Identity::Workload {
            namespace: namespace.to_string(),
            service: service.to_string(),
        }
        .to_spiffe(&id.info.trust_domain)
        .into();
        if let Some((_, map)) = cache.as_mut() {
            // Bounded by the services in the config; a new identity starts
            // a new map.
            map.insert(key.to_string(), Arc::clone(&spiffe));
        }
        Ok(spiffe)
    }

    /// The inbound server config for the current certificate.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let id = self.current()?;
        let mut cache = self.server.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached_id, cfg)) = cache.as_ref() {
            if Arc::ptr_eq(cached_id, &id) {
                return Ok(Arc::clone(cfg));
            }
        }
        let cfg = Arc::new(trellis_identity::server_config(
            &self.ca_pem,
            &id.cert_pem,
            &id.key_pem,
            ClientAuth::Required,
            &[ALPN_H2],
        )?);
        *cache = Some((id, Arc::clone(&cfg)));
        Ok(cfg)
    }

    /// The outbound client config for the current certificate that accepts
    /// only a server whose SPIFFE ID is `expected`.
    pub fn client_config(&self, expected: &str) -> Result<Arc<ClientConfig>, TlsError> {
        let id = self.current()?;
        let mut cache = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        match cache.as_mut() {
            Some((cached_id, map)) if Arc::ptr_eq(cached_id, &id) => {
                if let Some(cfg) = map.get(expected) {
                    return Ok(Arc::clone(cfg));
                }
            }
            _ => *cache = Some((Arc::clone(&id), HashMap::new())),
        }
        let cfg = Arc::new(trellis_identity::workload_client_config(
            &self.ca_pem,
            &id.cert_pem,
            &id.key_pem,
            Some(expected.to_string()),
            &[ALPN_H2],
        )?);
        if let Some((_, map)) = cache.as_mut() {
            map.insert(expected.to_string(), Arc::clone(&cfg));
        }
        Ok(cfg)
    }
}
