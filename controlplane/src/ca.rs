//! The cluster CA on a control node: join tokens, certificates for
//! sidecars (join and renewal), and the records of what was issued.
//!
//! The CA ([`crate::system::CaRecord`]) is loaded into the replicated store
//! by `trellisctl cluster init --ca-dir` / `ca load` ([`load_ca`]); every
//! node can then sign. A sidecar joins with a token ([`create_token`]) and
//! a CSR ([`join`]); the token's scope, never the CSR, decides the identity
//! (`spiffe://<td>/ns/<ns>/svc/<svc>`). Renewal ([`renew`]) re-issues the
//! identity of the connection's own, verified certificate.
//!
//! Tokens and certificate records are attached to leases that end with
//! them, so the store forgets expired ones by itself. Lookups are
//! linearizable ([`Node::linearize`]): a token created a moment ago on
//! another node is found.

use std::sync::Arc;
use std::time::Duration;

use trellis_identity::{Ca, Identity, Issued, JoinToken};
use trellis_proto::admin as pb;
use trellis_raft_store::{Command, Outcome};

use crate::error::ApiError;
use crate::node::Node;
use crate::system::{self, CaRecord, CertRecord, TokenRecord};

/// A join token's life when the operator gives none: a working day to roll
/// out a service (kubeadm's bootstrap tokens also default to 24 h).
pub const DEFAULT_TOKEN_TTL_MS: u64 = 24 * 60 * 60 * 1000;
/// Kept past a certificate's expiry in its record's lease, so `cert list`
/// still shows a just-expired certificate briefly and clock skew between
/// nodes never drops a live one.
const CERT_RECORD_GRACE_MS: u64 = 60_000;

/// Store the cluster CA. `Ok(false)` if this same CA is already loaded;
/// FAILED_PRECONDITION if another one is.
pub async fn load_ca(
    node: &Node,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(String, bool), ApiError> {
    let ca = Ca::from_pem(cert_pem, key_pem)
        .map_err(|e| ApiError::invalid("cert_pem", e.to_string()))?;
    let record = CaRecord {
        cert_pem: ca.cert_pem().to_string(),
        key_pem: ca.key_pem().to_string(),
        trust_domain: ca.trust_domain().to_string(),
    };
    let value = serde_json::to_vec(&record).map_err(|e| ApiError::internal("encode CA", e))?;
    let resp = node
        .propose(Command::Put {
            key: system::CA_KEY.to_string(),
            value,
            expected_mod_revision: Some(0),
            prev_kv: false,
            lease: 0,
        })
        .await?;
    match resp.outcome {
        Outcome::Put { .. } => Ok((record.trust_domain, true)),
        Outcome::Conflict { .. } => {
            node.linearize().await?;
            let current = current_ca_record(node)?;
            match current {
                Some(c) if c.cert_pem.trim() == record.cert_pem.trim() => {
                    Ok((record.trust_domain, false))
                }
                _ => Err(ApiError::FailedPrecondition(
                    "the cluster already has a different CA; its certificates would stop verifying if it were replaced".into(),
                )),
            }
        }
        other => Err(ApiError::internal("load CA", format!("{other:?}"))),
    }
}

fn current_ca_record(node: &Node) -> Result<Option<CaRecord>, ApiError> {
    let Some(kv) = node
        .store
        .get(system::CA_KEY)
        .map_err(|e| ApiError::internal("store get", e))?
    else {
        return Ok(None);
    };
    serde_json::from_slice(&kv.value)
        .map(Some)
        .map_err(|e| ApiError::internal("decode CA record", e))
}

/// The CA as this node has applied it (cached by revision).
pub fn ca(node: &Node) -> Result<Arc<Ca>, ApiError> {
    let kv = node
        .store
        .get(system::CA_KEY)
        .map_err(|e| ApiError::internal("store get", e))?
        .ok_or_else(|| {
            ApiError::FailedPrecondition(
                "the cluster has no CA yet: run `trellisctl ca load --ca-dir DIR` (or `cluster init --ca-dir`)".into(),
            )
        })?;
    let mut cache = node.ca_cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((rev, ca)) = cache.as_ref() {
        if *rev == kv.mod_revision {
            return Ok(ca.clone());
        }
    }
    let record: CaRecord =
        serde_json::from_slice(&kv.value).map_err(|e| ApiError::internal("decode CA record", e))?;
    let ca = Arc::new(
        Ca::from_pem(&record.cert_pem, &record.key_pem)
            .map_err(|e| ApiError::internal("stored CA", e))?,
    );
    *cache = Some((kv.mod_revision, ca.clone()));
    Ok(ca)
}

/// The CA certificate and trust domain (never the key).
pub async fn get_ca(node: &Node) -> Result<(String, String), ApiError> {
    node.linearize().await?;
    if current_ca_record(node)?.is_none() {
        return Err(ApiError::ResourceNotFound {
            what: "the cluster CA (load one with `trellisctl ca load --ca-dir DIR`)".into(),
        });
    }
    let ca = ca(node)?;
    Ok((ca.cert_pem().to_string(), ca.trust_domain().to_string()))
}

/// Check a namespace or service name: the resources' DNS-label rule, so a
/// token can only name what the registry can hold.
fn check_name(field: &str, v: &str) -> Result<(), ApiError> {
    if trellis_resources::validate::is_dns_label(v) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!("{v:?} is not a DNS label (lower-case letters, digits, '-', at most 63)"),
        ))
    }
}

/// Make a join token for sidecars of `namespace`/`service`.
pub async fn create_token(
    node: &Arc<Node>,
    r: pb::CreateTokenRequest,
) -> Result<(JoinToken, TokenRecord), ApiError> {
    check_name("namespace", &r.namespace)?;
    check_name("service", &r.service)?;
    let ttl_ms = if r.ttl_ms == 0 {
        DEFAULT_TOKEN_TTL_MS
    } else {
        r.ttl_ms
    };
    if !(crate::leases::MIN_LEASE_TTL_MS..=crate::leases::MAX_LEASE_TTL_MS).contains(&ttl_ms) {
        return Err(ApiError::invalid(
            "ttl_ms",
            format!(
                "{ttl_ms} ms is outside {}..={} ms",
                crate::leases::MIN_LEASE_TTL_MS,
                crate::leases::MAX_LEASE_TTL_MS
            ),
        ));
    }
    // Fails early (before a lease is granted) if there is nothing to sign with.
    node.linearize().await?;
    ca(node)?;
    let token = JoinToken::generate();
    let now = system::now_unix_ms();
    let record = TokenRecord {
        id: token.id.clone(),
        secret_sha256: token.secret_hash(),
        namespace: r.namespace,
        service: r.service,
        created_unix_ms: now,
        expires_unix_ms: now + ttl_ms,
        description: r.description,
    };
    let lease = crate::api::lease::local::grant(node, ttl_ms).await?;
    let value = serde_json::to_vec(&record).map_err(|e| ApiError::internal("encode token", e))?;
    let resp = node
        .propose(Command::Put {
            key: system::token_key(&token.id),
            value,
            expected_mod_revision: Some(0),
            prev_kv: false,
            lease,
        })
        .await?;
    match resp.outcome {
        Outcome::Put { .. } => Ok((token, record)),
        other => Err(ApiError::internal("store token", format!("{other:?}"))),
    }
}

/// Every live token (linearizable).
pub async fn list_tokens(node: &Node) -> Result<Vec<TokenRecord>, ApiError> {
    node.linearize().await?;
    scan(node, system::TOKENS_PREFIX)
}

/// Every live certificate record (linearizable).
pub async fn list_certs(node: &Node) -> Result<Vec<CertRecord>, ApiError> {
    node.linearize().await?;
    scan(node, system::CERTS_PREFIX)
}

fn scan<T: serde::de::DeserializeOwned>(node: &Node, prefix: &str) -> Result<Vec<T>, ApiError> {
    let page = node
        .store
        .list(prefix, None, usize::MAX, usize::MAX, false)
        .map_err(|e| ApiError::internal("store list", e))?;
    let mut out = Vec::with_capacity(page.kvs.len());
    for kv in page.kvs {
        match serde_json::from_slice(&kv.value) {
            Ok(v) => out.push(v),
            Err(e) => tracing::warn!(key = %kv.key, error = %e, "unreadable record skipped"),
        }
    }
    Ok(out)
}

/// Delete a token; `false` if there was none.
pub async fn revoke_token(node: &Node, id: &str) -> Result<bool, ApiError> {
    if id.is_empty() || id.contains('/') {
        return Err(ApiError::invalid("id", format!("{id:?} is not a token id")));
    }
    let resp = node
        .propose(Command::Delete {
            key: system::token_key(id),
            expected_mod_revision: None,
            prev_kv: false,
        })
        .await?;
    Ok(matches!(resp.outcome, Outcome::Delete { prev: Some(_) }))
}

/// A sidecar's join: check the token, sign the CSR for the token's scope,
/// record the certificate.
#[tracing::instrument(level = "info", skip_all, fields(token_id))]
pub async fn join(
    node: &Arc<Node>,
    req: &trellis_proto::sidecar::JoinRequest,
) -> Result<Issued, ApiError> {
    let token =
        JoinToken::parse(&req.token).map_err(|e| ApiError::Unauthenticated(e.to_string()))?;
    tracing::Span::current().record("token_id", token.id.as_str());
    node.linearize().await?;
    let kv = node
        .store
        .get(&system::token_key(&token.id))
        .map_err(|e| ApiError::internal("store get", e))?
        .ok_or_else(|| {
            ApiError::Unauthenticated(format!(
                "join token {} is unknown (expired or revoked?)",
                token.id
            ))
        })?;
    let record: TokenRecord =
        serde_json::from_slice(&kv.value).map_err(|e| ApiError::internal("decode token", e))?;
    if !token.matches_hash(&record.secret_sha256) {
        return Err(ApiError::Unauthenticated(format!(
            "join token {}: the secret does not match",
            token.id
        )));
    }
    if system::now_unix_ms() >= record.expires_unix_ms {
        return Err(ApiError::Unauthenticated(format!(
            "join token {} expired",
            token.id
        )));
    }
    let scope = format!("ns/{}/svc/{}", record.namespace, record.service);
    let wants_ns = req.namespace.is_empty() || req.namespace == record.namespace;
    let wants_svc = req.service.is_empty() || req.service == record.service;
    if !(wants_ns && wants_svc) {
        return Err(ApiError::PermissionDenied(format!(
            "join token {} is scoped to {scope}; it cannot join ns/{}/svc/{}",
            token.id,
            if req.namespace.is_empty() {
                &record.namespace
            } else {
                &req.namespace
            },
            if req.service.is_empty() {
                &record.service
            } else {
                &req.service
            },
        )));
    }
    let identity = Identity::Workload {
        namespace: record.namespace.clone(),
        service: record.service.clone(),
    };
    issue(node, &req.csr_pem, &identity, "join", &token.id).await
}

/// Renew the identity of a verified connection with a fresh CSR.
#[tracing::instrument(level = "info", skip_all, fields(identity = %identity))]
pub async fn renew(
    node: &Arc<Node>,
    identity: &Identity,
    csr_pem: &str,
) -> Result<Issued, ApiError> {
    if !matches!(identity, Identity::Workload { .. }) {
        return Err(ApiError::PermissionDenied(format!(
            "{identity} is not a workload identity; node and admin certificates are made with `trellisctl cert create`"
        )));
    }
    issue(node, csr_pem, identity, "renew", "").await
}

async fn issue(
    node: &Arc<Node>,
    csr_pem: &str,
    identity: &Identity,
    reason: &str,
    token_id: &str,
) -> Result<Issued, ApiError> {
    let ca = ca(node)?;
    let ttl = Duration::from_millis(node.config.sidecars.workload_cert_ttl_ms);
    let issued = ca
        .sign_csr(csr_pem, identity, &[], ttl)
        .map_err(|e| ApiError::invalid("csr_pem", e.to_string()))?;
    let info = &issued.info;
    let record = CertRecord {
        serial: info.serial.clone(),
        spiffe_id: info.spiffe_id.clone(),
        not_before_unix_ms: info.not_before_unix_ms,
        not_after_unix_ms: info.not_after_unix_ms,
        issued_by_node: node.id,
        reason: reason.to_string(),
        token_id: token_id.to_string(),
    };
    let ttl_ms = (info.not_after_unix_ms.saturating_sub(system::now_unix_ms())
        + CERT_RECORD_GRACE_MS)
        .clamp(
            crate::leases::MIN_LEASE_TTL_MS,
            crate::leases::MAX_LEASE_TTL_MS,
        );
    let lease = crate::api::lease::local::grant(node, ttl_ms).await?;
    let value =
        serde_json::to_vec(&record).map_err(|e| ApiError::internal("encode cert record", e))?;
    node.propose(Command::Put {
        key: system::cert_key(&record.serial),
        value,
        expected_mod_revision: None,
        prev_kv: false,
        lease,
    })
    .await?;
    tracing::info!(serial = %record.serial, spiffe_id = %record.spiffe_id, reason, "certificate issued");
    Ok(issued)
}
