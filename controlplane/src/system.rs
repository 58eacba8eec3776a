//! The control plane's own records in the replicated store, under the
//! reserved prefix [`RESERVED_PREFIX`]: the cluster CA, join tokens and the
//! certificates the cluster issued.
//!
//! | key | value |
//! |---|---|
//! | `/_trellis/ca` | [`CaRecord`] (certificate *and key*) |
//! | `/_trellis/tokens/<id>` | [`TokenRecord`], attached to a lease that ends with the token |
//! | `/_trellis/certs/<serial>` | [`CertRecord`], attached to a lease that ends with the certificate |
//!
//! Nothing outside the control plane reads or writes these keys: the KV API
//! refuses them ([`is_reserved`] in `api::convert`), lists and admin watches
//! leave them out, and sidecar watches never carry them — so the CA key
//! never leaves the control nodes' stores.

use serde::{Deserialize, Serialize};

/// Keys the control plane keeps for itself.
pub const RESERVED_PREFIX: &str = "/_trellis/";
/// The cluster's root CA.
pub const CA_KEY: &str = "/_trellis/ca";
/// Join tokens, by id.
pub const TOKENS_PREFIX: &str = "/_trellis/tokens/";
/// Issued certificates, by serial.
pub const CERTS_PREFIX: &str = "/_trellis/certs/";

/// Is `key` one of the control plane's own?
pub fn is_reserved(key: &str) -> bool {
    key.starts_with(RESERVED_PREFIX)
}

/// May a scan of `prefix` reach reserved keys (and must filter them)?
pub fn prefix_reaches_reserved(prefix: &str) -> bool {
    RESERVED_PREFIX.starts_with(prefix) || prefix.starts_with(RESERVED_PREFIX)
}

pub fn token_key(id: &str) -> String {
    format!("{TOKENS_PREFIX}{id}")
}

pub fn cert_key(serial: &str) -> String {
    format!("{CERTS_PREFIX}{serial}")
}

/// The root CA as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaRecord {
    pub cert_pem: String,
    pub key_pem: String,
    pub trust_domain: String,
}

/// A join token as stored: only the SHA-256 of its secret.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub secret_sha256: String,
    pub namespace: String,
    pub service: String,
    pub created_unix_ms: u64,
    pub expires_unix_ms: u64,
    #[serde(default)]
    pub description: String,
}

/// A certificate the cluster issued.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertRecord {
    pub serial: String,
    pub spiffe_id: String,
    pub not_before_unix_ms: u64,
    pub not_after_unix_ms: u64,
    pub issued_by_node: u64,
    /// `join` or `renew`.
    pub reason: String,
    /// The token a join used ("" for renewals).
    #[serde(default)]
    pub token_id: String,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_prefix_checks() {
        assert!(is_reserved("/_trellis/ca"));
        assert!(!is_reserved("/_trellisx"));
        assert!(!is_reserved("/route/default/a"));
        for p in ["", "/", "/_", "/_trellis/", "/_trellis/tokens/"] {
            assert!(prefix_reaches_reserved(p), "{p:?}");
        }
        for p in ["/route/", "/a", "/_x"] {
            assert!(!prefix_reaches_reserved(p), "{p:?}");
        }
    }
}
