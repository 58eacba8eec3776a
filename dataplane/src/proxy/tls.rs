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

/// The value of `key` in `cache` for identity `id`, made by `make` the
/// first time; a different identity (a renewed certificate) starts a new
/// map, so each map is bounded by the keys one identity used.
fn per_identity<V: Clone>(
    cache: &Cached<HashMap<String, V>>,
    id: Arc<CurrentIdentity>,
    key: &str,
    make: impl FnOnce(&CurrentIdentity) -> Result<V, TlsError>,
) -> Result<V, TlsError> {
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    match cache.as_mut() {
        Some((cached_id, map)) if Arc::ptr_eq(cached_id, &id) => {
            if let Some(v) = map.get(key) {
                return Ok(v.clone());
            }
        }
        _ => *cache = Some((Arc::clone(&id), HashMap::new())),
    }
    let v = make(&id)?;
    if let Some((_, map)) = cache.as_mut() {
        map.insert(key.to_string(), v.clone());
    }
    Ok(v)
}

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
        per_identity(&self.peer_ids, self.current()?, key, |id| {
            Ok(trellis_identity::Identity::Workload {
                namespace: namespace.to_string(),
                service: service.to_string(),
            }
            .to_spiffe(&id.info.trust_domain)
            .into())
        })
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
        per_identity(&self.clients, self.current()?, expected, |id| {
            Ok(Arc::new(trellis_identity::workload_client_config(
                &self.ca_pem,
                &id.cert_pem,
                &id.key_pem,
                Some(expected.to_string()),
                &[ALPN_H2],
            )?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_identity::{CertInfo, Identity};

    fn identity(trust_domain: &str) -> Arc<CurrentIdentity> {
        Arc::new(CurrentIdentity {
            cert_pem: String::new(),
            key_pem: String::new(),
            info: CertInfo {
                serial: "01".into(),
                identity: Identity::Workload {
                    namespace: "default".into(),
                    service: "web".into(),
                },
                trust_domain: trust_domain.into(),
                spiffe_id: format!("spiffe://{trust_domain}/ns/default/svc/web"),
                not_before_unix_ms: 0,
                not_after_unix_ms: u64::MAX,
            },
        })
    }

    #[test]
    fn peer_ids_are_cached_per_identity() {
        let (tx, rx) = watch::channel(None);
        let tls = TlsSource::new(String::new(), rx);
        assert!(matches!(
            tls.peer_id("shop/cart", "shop", "cart"),
            Err(TlsError::NoIdentity)
        ));
        tx.send_replace(Some(identity("a.example")));
        let first = tls.peer_id("shop/cart", "shop", "cart").unwrap();
        assert_eq!(&*first, "spiffe://a.example/ns/shop/svc/cart");
        let again = tls.peer_id("shop/cart", "shop", "cart").unwrap();
        assert!(
            Arc::ptr_eq(&first, &again),
            "the second call is a cache hit"
        );
        // A new certificate (here with another trust domain) starts afresh.
        tx.send_replace(Some(identity("b.example")));
        let renewed = tls.peer_id("shop/cart", "shop", "cart").unwrap();
        assert_eq!(&*renewed, "spiffe://b.example/ns/shop/svc/cart");
    }
}
