//! A sidecar's session stream: instance registration under a lease, lease
//! keepalives, and acks of the revision the sidecar has applied.
//!
//! The first `SessionRequest` registers the instance (if any) as the
//! `Instance` resource `/instance/<ns>/<name>` of the connection's own
//! service — namespace and service come from the verified certificate,
//! never from the request — attached to a lease. A sidecar that failed
//! over from another node resumes its lease (`resume_lease_id`), so the
//! registry does not churn — but only a lease that holds nothing except its
//! own instance, and never an instance key another service registered. Each `SessionUpdate` keeps the lease alive
//! (through the leader's lease keeper, like `Lease.KeepAlive`) and records
//! the applied revision for proxy-status. `goodbye` revokes the lease,
//! which deregisters the instance at once; a dropped connection leaves the
//! lease to expire, in case the sidecar re-attaches elsewhere in time.
//!
//! **Health reports.** A sidecar that checks its own app (the `healthCheck`
//! of its service's DestinationPolicy) reports the result: in the
//! registration (`InstanceRegistration.health`, so a re-registration after
//! a failover keeps it) and, when it flips, in a `SessionUpdate.health`.
//! The update rewrites the instance's `spec.health` ([`set_health`]):
//! compare-and-set on the value's `mod_revision`, under the same lease,
//! validated, retried a few times on a race; the ack goes out only after
//! the write committed. Errors are [`HealthReportError`]s, answered as
//! `Error` frames (NOT_FOUND when the instance or its lease is gone, so the
//! sidecar registers again with its current health).

use std::sync::Arc;

use quinn::{RecvStream, SendStream};
use trellis_identity::Identity;
use trellis_proto::frame::{read_frame, write_frame};
use trellis_proto::sidecar as sc;
use trellis_raft_store::{Command, Compare, CompareOp, CompareTarget, Outcome, TxnOp};
use trellis_resources::service::Health;
use trellis_resources::{InstanceSpec, Metadata, Resource, Spec};

use super::registry::SidecarRegistry;
use crate::api::lease::local;
use crate::error::ApiError;
use crate::node::Node;
use crate::system::now_unix_ms;

/// Longest registration lease a sidecar may ask for: a dead sidecar's
/// instance must not linger in every balancer for long.
pub const MAX_SIDECAR_LEASE_TTL_MS: u64 = 5 * 60 * 1000;
/// Largest session frame accepted (registrations and updates are small).
const MAX_SESSION_FRAME: usize = 64 * 1024;
/// Compare-and-set attempts for one health report: the instance key is
/// written only by its own session (and by re-registration), so losing
/// the race more than a few times means something else is rewriting it;
/// the sidecar is told to retry instead of this loop spinning.
pub const HEALTH_CAS_ATTEMPTS: u32 = 3;

/// Why a sidecar's health report was not applied. Converted into the
/// `Error` frame the sidecar gets by `From<HealthReportError> for ApiError`.
#[derive(Debug, thiserror::Error)]
pub enum HealthReportError {
    /// Not a value of `InstanceHealth` (a newer sidecar?).
    #[error("health {0} is not a known InstanceHealth value")]
    UnknownValue(i32),
    /// The session registered no instance.
    #[error("this session registered no instance; there is no health to report")]
    NoInstance,
    /// The instance was deleted (its lease expired or was revoked).
    #[error("instance {key} is gone (lease {lease} expired or was revoked); register again")]
    Gone { key: String, lease: u64 },
    /// The key now belongs to another lease (a newer registration).
    #[error("instance {key} is no longer held by this session's lease {lease}; register again")]
    NotOwned { key: String, lease: u64 },
    /// The stored value is not an Instance, or the rewritten one is invalid.
    #[error("instance {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// The value kept changing under the compare-and-set.
    #[error("instance {key} changed while its health was written ({attempts} attempts); retry")]
    Conflict { key: String, attempts: u32 },
    /// Reading, linearizing or proposing failed.
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl From<HealthReportError> for ApiError {
    fn from(e: HealthReportError) -> ApiError {
        match e {
            HealthReportError::UnknownValue(_) => {
                ApiError::invalid("session update.health", e.to_string())
            }
            HealthReportError::NoInstance => ApiError::FailedPrecondition(e.to_string()),
            // NOT_FOUND: the sidecar registers again (with its health).
            HealthReportError::Gone { key, .. } | HealthReportError::NotOwned { key, .. } => {
                ApiError::NotFound { key }
            }
            HealthReportError::Corrupt { .. } => ApiError::internal("instance health", e),
            // UNAVAILABLE, retryable: nothing was written.
            HealthReportError::Conflict { .. } => ApiError::NoLeader(e.to_string()),
            HealthReportError::Api(e) => e,
        }
    }
}

/// The health a sidecar reports: `None` for UNSPECIFIED.
fn reported_health(value: i32) -> Result<Option<Health>, HealthReportError> {
    match sc::InstanceHealth::try_from(value) {
        Ok(sc::InstanceHealth::Unspecified) => Ok(None),
        Ok(sc::InstanceHealth::Healthy) => Ok(Some(Health::Healthy)),
        Ok(sc::InstanceHealth::Unhealthy) => Ok(Some(Health::Unhealthy)),
        Err(_) => Err(HealthReportError::UnknownValue(value)),
    }
}

/// The stored Instance `value` (at `key`) with `spec.health = health`,
/// validated; `None` if it already has that health.
fn with_health(
    key: &str,
    value: &[u8],
    health: Health,
) -> Result<Option<Vec<u8>>, HealthReportError> {
    let corrupt = |reason: String| HealthReportError::Corrupt {
        key: key.to_string(),
        reason,
    };
    let mut r = Resource::from_json(value).map_err(|e| corrupt(e.to_string()))?;
    let Spec::Instance(spec) = &mut r.spec else {
        return Err(corrupt(format!("holds a {}, not an Instance", r.kind())));
    };
    if spec.health == health {
        return Ok(None);
    }
    spec.health = health;
    r.validate().map_err(|errs| {
        corrupt(
            errs.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    Ok(Some(r.to_json()))
}

/// Puts `value` at `key` under `lease` if the key's `mod_revision` is
/// still `mod_revision` (0: the key is absent): the outcome of that one
/// compare-and-set transaction.
async fn put_if_unchanged(
    node: &Arc<Node>,
    key: &str,
    mod_revision: u64,
    value: Vec<u8>,
    lease: u64,
) -> Result<Outcome, ApiError> {
    let resp = node
        .propose(Command::Txn {
            compare: vec![Compare {
                key: key.to_string(),
                target: CompareTarget::ModRevision(mod_revision),
                op: CompareOp::Equal,
            }],
            success: vec![TxnOp::Put {
                key: key.to_string(),
                value,
                lease,
            }],
            failure: vec![],
        })
        .await?;
    Ok(resp.outcome)
}

/// Rewrites the health of the instance at `key`, which `lease` must hold:
/// read (linearized), compare-and-set on `mod_revision`, same lease.
/// Returns whether anything changed.
pub async fn set_health(
    node: &Arc<Node>,
    key: &str,
    lease: u64,
    health: Health,
) -> Result<bool, HealthReportError> {
    for _ in 0..HEALTH_CAS_ATTEMPTS {
        node.linearize().await?;
        let kv = node
            .store
            .get(key)
            .map_err(|e| ApiError::internal("store get", e))?
            .ok_or_else(|| HealthReportError::Gone {
                key: key.to_string(),
                lease,
            })?;
        if kv.lease != lease {
            return Err(HealthReportError::NotOwned {
                key: key.to_string(),
                lease,
            });
        }
        let Some(value) = with_health(key, &kv.value, health)? else {
            return Ok(false);
        };
        match put_if_unchanged(node, key, kv.mod_revision, value, lease).await? {
            Outcome::Txn {
                succeeded: true, ..
            } => return Ok(true),
            Outcome::Txn { .. } => continue,
            Outcome::LeaseNotFound { .. } => {
                return Err(HealthReportError::Gone {
                    key: key.to_string(),
                    lease,
                })
            }
            other => return Err(ApiError::internal("instance health", format!("{other:?}")).into()),
        }
    }
    Err(HealthReportError::Conflict {
        key: key.to_string(),
        attempts: HEALTH_CAS_ATTEMPTS,
    })
}

/// Why a session ended (for the log).
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    #[error("sidecar went away")]
    Gone,
    #[error("bad frame: {0}")]
    Frame(#[from] trellis_proto::frame::FrameError),
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// The Instance resource a registration describes.
fn instance_resource(
    namespace: &str,
    service: &str,
    reg: &sc::InstanceRegistration,
) -> Result<Resource, ApiError> {
    let address = reg.address.parse().map_err(|_| {
        ApiError::invalid(
            "instance.address",
            format!("{:?} is not an IP address", reg.address),
        )
    })?;
    let port = u16::try_from(reg.port)
        .map_err(|_| ApiError::invalid("instance.port", format!("{} is not a port", reg.port)))?;
    let resource = Resource {
        metadata: Metadata::new(reg.name.clone(), namespace),
        spec: Spec::Instance(InstanceSpec {
            service: service.to_string(),
            address,
            port,
            labels: reg.labels.clone().into_iter().collect(),
            weight: if reg.weight == 0 {
                trellis_resources::service::DEFAULT_INSTANCE_WEIGHT
            } else {
                reg.weight
            },
            // UNSPECIFIED (a sidecar without a check) is healthy.
            health: reported_health(reg.health)
                .map_err(|e| ApiError::invalid("instance.health", e.to_string()))?
                .unwrap_or_default(),
        }),
    };
    resource.validate().map_err(|errs| {
        ApiError::invalid(
            "instance",
            errs.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    Ok(resource)
}

/// The service an Instance value registers (`None` if it does not parse).
fn instance_service(value: &[u8]) -> Option<String> {
    match Resource::from_json(value).ok()?.spec {
        Spec::Instance(i) => Some(i.service),
        _ => None,
    }
}

/// Register (or re-register) the instance; returns (lease, key).
///
/// A sidecar may resume only a lease that holds nothing but its own
/// instance key, and may take over an instance key only if it is free or
/// registers the same service — lease ids and instance names are visible to
/// every watcher, so neither may be trusted from the request alone.
async fn register(
    node: &Arc<Node>,
    namespace: &str,
    service: &str,
    req: &sc::SessionRequest,
    reg: &sc::InstanceRegistration,
) -> Result<(u64, String), ApiError> {
    let resource = instance_resource(namespace, service, reg)?;
    let key = resource.key();
    let value = resource.to_json();
    let ttl_ms = session_ttl(node, req.ttl_ms);
    node.linearize().await?;
    let current = node
        .store
        .get(&key)
        .map_err(|e| ApiError::internal("store get", e))?;
    if let Some(kv) = &current {
        if instance_service(&kv.value).as_deref() != Some(service) {
            return Err(ApiError::PermissionDenied(format!(
                "instance {namespace}/{} is registered by another service; pick another instance name",
                reg.name
            )));
        }
    }
    let owned = |id: u64| -> Result<bool, ApiError> {
        let held = node
            .store
            .lease(id)
            .map_err(|e| ApiError::internal("store lease", e))?;
        Ok(held.is_some_and(|(_, keys)| keys == [key.clone()]))
    };
    let resumed = if req.resume_lease_id != 0 && owned(req.resume_lease_id)? {
        match local::keep_alive(node, req.resume_lease_id).await {
            Ok(_) => Some(req.resume_lease_id),
            Err(e) if e.to_sidecar().code == sc::error::Code::NotFound as i32 => None,
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    let lease = match resumed {
        Some(l) => l,
        None => local::grant(node, ttl_ms).await?,
    };
    // Unchanged registration under the same lease: nothing to write.
    if current
        .as_ref()
        .is_some_and(|kv| kv.lease == lease && kv.value == value)
    {
        return Ok((lease, key));
    }
    // Put only if the key is still as read (absent, or this service's).
    let mod_revision = current.as_ref().map_or(0, |kv| kv.mod_revision);
    match put_if_unchanged(node, &key, mod_revision, value, lease).await? {
        Outcome::Txn {
            succeeded: true, ..
        } => Ok((lease, key)),
        Outcome::Txn { .. } => Err(ApiError::NoLeader(format!(
            "instance {key} changed while registering; retry"
        ))),
        Outcome::LeaseNotFound { id } => Err(ApiError::LeaseNotFound { id }),
        other => Err(ApiError::internal(
            "register instance",
            format!("{other:?}"),
        )),
    }
}

/// The lease TTL for a session: the sidecar's ask, or the node's default,
/// within [`MIN_LEASE_TTL_MS`, `MAX_SIDECAR_LEASE_TTL_MS`].
fn session_ttl(node: &Node, asked_ms: u64) -> u64 {
    let ttl = if asked_ms == 0 {
        node.config.sidecars.lease_ttl_ms
    } else {
        asked_ms
    };
    ttl.clamp(crate::leases::MIN_LEASE_TTL_MS, MAX_SIDECAR_LEASE_TTL_MS)
}

async fn send(send: &mut SendStream, kind: sc::session_message::Kind) -> Result<(), SessionEnd> {
    write_frame(send, &sc::SessionMessage { kind: Some(kind) })
        .await
        .map_err(|_| SessionEnd::Gone)
}

/// Serve one session stream.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    node: &Arc<Node>,
    registry: &SidecarRegistry,
    conn_id: u64,
    identity: &Identity,
    spiffe_id: &str,
    req: sc::SessionRequest,
    tx: &mut SendStream,
    rx: &mut RecvStream,
) -> Result<(), SessionEnd> {
    let (lease, instance_key) = match (&req.instance, identity) {
        (None, _) => (0, String::new()),
        (Some(reg), Identity::Workload { namespace, service }) => {
            register(node, namespace, service, &req, reg).await?
        }
        (Some(_), other) => {
            return Err(ApiError::PermissionDenied(format!(
                "{other} is not a workload identity and cannot register an instance"
            ))
            .into())
        }
    };
    let ttl_ms = if lease == 0 {
        0
    } else {
        session_ttl(node, req.ttl_ms)
    };
    registry.update(conn_id, |e| {
        e.sidecar_name = req.sidecar_name.clone();
        e.instance_key = instance_key.clone();
        e.lease_id = lease;
        e.applied_revision = req.applied_revision;
        e.last_update_unix_ms = now_unix_ms();
    });
    tracing::info!(%spiffe_id, sidecar = %req.sidecar_name, %instance_key, lease, "session open");
    send(
        tx,
        sc::session_message::Kind::Accepted(sc::SessionAccepted {
            node_id: node.id,
            spiffe_id: spiffe_id.to_string(),
            lease_id: lease,
            ttl_ms,
            instance_key: instance_key.clone(),
        }),
    )
    .await?;
    loop {
        let Some(update) =
            read_frame::<_, sc::SessionUpdate>(rx, MAX_SESSION_FRAME, "session update").await?
        else {
            return Err(SessionEnd::Gone);
        };
        registry.update(conn_id, |e| {
            e.applied_revision = e.applied_revision.max(update.applied_revision);
            e.last_update_unix_ms = now_unix_ms();
        });
        if update.goodbye {
            if lease != 0 {
                local::revoke(node, lease).await?;
            }
            tracing::info!(%spiffe_id, %instance_key, "session closed by the sidecar (deregistered)");
            send(
                tx,
                sc::session_message::Kind::Ack(sc::SessionAck {
                    ttl_ms: 0,
                    revision: node.store.revision(),
                }),
            )
            .await?;
            return Ok(());
        }
        let ttl = if lease == 0 {
            // No lease to keep alive through the leader: confirm this node
            // still reaches one, so a sidecar on a cut-off node is told
            // (UNAVAILABLE) and fails over instead of trusting it.
            node.linearize().await?;
            0
        } else {
            local::keep_alive(node, lease).await?
        };
        if let Some(health) = reported_health(update.health).map_err(ApiError::from)? {
            if lease == 0 {
                return Err(ApiError::from(HealthReportError::NoInstance).into());
            }
            let changed = set_health(node, &instance_key, lease, health)
                .await
                .map_err(ApiError::from)?;
            if changed {
                tracing::info!(%spiffe_id, %instance_key, ?health, "instance health reported by its sidecar");
            }
        }
        send(
            tx,
            sc::session_message::Kind::Ack(sc::SessionAck {
                ttl_ms: ttl,
                revision: node.store.revision(),
            }),
        )
        .await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_become_valid_instances_or_clear_errors() {
        let reg = sc::InstanceRegistration {
            name: "reviews-1".into(),
            address: "127.0.0.1".into(),
            port: 9080,
            labels: [("version".to_string(), "v2".to_string())].into(),
            weight: 0,
            health: 0,
        };
        let r = instance_resource("default", "reviews", &reg).unwrap();
        assert_eq!(r.key(), "/instance/default/reviews-1");
        let Spec::Instance(spec) = &r.spec else {
            panic!("not an instance")
        };
        assert_eq!(spec.service, "reviews");
        assert_eq!(
            spec.weight,
            trellis_resources::service::DEFAULT_INSTANCE_WEIGHT
        );

        let bad = sc::InstanceRegistration {
            address: "example.com".into(),
            ..reg.clone()
        };
        let err = instance_resource("default", "reviews", &bad).unwrap_err();
        assert!(err.to_string().contains("instance.address"), "{err}");
        let bad = sc::InstanceRegistration {
            port: 70000,
            ..reg.clone()
        };
        assert!(instance_resource("default", "reviews", &bad)
            .unwrap_err()
            .to_string()
            .contains("instance.port"));
        let bad = sc::InstanceRegistration {
            name: "Bad_Name".into(),
            ..reg
        };
        assert!(instance_resource("default", "reviews", &bad)
            .unwrap_err()
            .to_string()
            .contains("metadata.name"));
    }

    fn registration(health: sc::InstanceHealth) -> sc::InstanceRegistration {
        sc::InstanceRegistration {
            name: "reviews-1".into(),
            address: "127.0.0.1".into(),
            port: 9080,
            health: health as i32,
            ..Default::default()
        }
    }

    fn health_of(value: &[u8]) -> Health {
        match Resource::from_json(value).unwrap().spec {
            Spec::Instance(i) => i.health,
            other => panic!("not an instance: {other:?}"),
        }
    }

    #[test]
    fn registration_carries_the_reported_health() {
        for (h, want) in [
            (sc::InstanceHealth::Unspecified, Health::Healthy),
            (sc::InstanceHealth::Healthy, Health::Healthy),
            (sc::InstanceHealth::Unhealthy, Health::Unhealthy),
        ] {
            let r = instance_resource("default", "reviews", &registration(h)).unwrap();
            assert_eq!(health_of(&r.to_json()), want, "{h:?}");
        }
        let bad = sc::InstanceRegistration {
            health: 99,
            ..registration(sc::InstanceHealth::Healthy)
        };
        let err = instance_resource("default", "reviews", &bad).unwrap_err();
        assert!(err.to_string().contains("instance.health"), "{err}");
    }

    #[test]
    fn health_reports_map_to_values_or_typed_errors() {
        assert_eq!(reported_health(0).unwrap(), None);
        assert_eq!(reported_health(1).unwrap(), Some(Health::Healthy));
        assert_eq!(reported_health(2).unwrap(), Some(Health::Unhealthy));
        assert!(matches!(
            reported_health(7),
            Err(HealthReportError::UnknownValue(7))
        ));
    }

    #[test]
    fn health_is_rewritten_only_when_it_changes() {
        let r = instance_resource(
            "default",
            "reviews",
            &registration(sc::InstanceHealth::Healthy),
        )
        .unwrap();
        let key = r.key();
        let value = r.to_json();
        assert_eq!(with_health(&key, &value, Health::Healthy).unwrap(), None);
        let down = with_health(&key, &value, Health::Unhealthy)
            .unwrap()
            .expect("changed");
        assert_eq!(health_of(&down), Health::Unhealthy);
        // Everything else is kept.
        let mut back = Resource::from_json(&down).unwrap();
        if let Spec::Instance(i) = &mut back.spec {
            i.health = Health::Healthy;
        }
        assert_eq!(back, r);
        let up = with_health(&key, &down, Health::Healthy)
            .unwrap()
            .expect("changed");
        assert_eq!(health_of(&up), Health::Healthy);
        assert!(matches!(
            with_health(&key, b"garbage", Health::Healthy),
            Err(HealthReportError::Corrupt { .. })
        ));
    }

    #[test]
    fn health_errors_tell_the_sidecar_what_to_do() {
        use sc::error::Code;
        let code = |e: HealthReportError| ApiError::from(e).to_sidecar();
        let gone = code(HealthReportError::Gone {
            key: "/instance/default/a".into(),
            lease: 3,
        });
        assert_eq!(gone.code, Code::NotFound as i32, "re-register: {gone:?}");
        let taken = code(HealthReportError::NotOwned {
            key: "/instance/default/a".into(),
            lease: 3,
        });
        assert_eq!(taken.code, Code::NotFound as i32);
        let race = code(HealthReportError::Conflict {
            key: "/instance/default/a".into(),
            attempts: HEALTH_CAS_ATTEMPTS,
        });
        assert_eq!(race.code, Code::Unavailable as i32);
        assert!(race.retryable);
        let none = code(HealthReportError::NoInstance);
        assert_eq!(none.code, Code::FailedPrecondition as i32);
        let bad = code(HealthReportError::UnknownValue(9));
        assert_eq!(bad.code, Code::InvalidArgument as i32);
    }
}
