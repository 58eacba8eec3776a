//! The registry kinds: [`ServiceSpec`] (a named service and its ports) and
//! [`InstanceSpec`] (one running endpoint of a service, registered by its
//! sidecar under a lease).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::validate::{self, Errors};

/// `kind: Service` — a service the mesh routes to. Its name
/// (`metadata.name`) is what routes, policies and instances refer to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// The ports the service listens on; at least one, names and numbers
    /// unique.
    pub ports: Vec<ServicePort>,
}

/// One port of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// Port name (DNS-1123 label, e.g. `http`), unique within the service.
    pub name: String,
    /// Port number, 1..=65535, unique within the service.
    pub port: u16,
    /// Application protocol; decides which proxy path handles the port.
    pub protocol: Protocol,
}

/// Application protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (HTTP routing rules apply).
    Http,
    /// HTTP/2 (HTTP routing rules apply).
    Http2,
    /// gRPC over HTTP/2 (HTTP routing rules apply; gRPC statuses understood).
    Grpc,
    /// Opaque TCP (only `tcp` route rules apply).
    Tcp,
}

impl ServiceSpec {
    pub(crate) fn validate(&self, errs: &mut Errors) {
        if self.ports.is_empty() {
            errs.add("spec.ports", "at least one port is required");
        }
        for (i, p) in self.ports.iter().enumerate() {
            let path = format!("spec.ports[{i}]");
            validate::dns_label(errs, &format!("{path}.name"), "port name", &p.name);
            validate::port(errs, &format!("{path}.port"), p.port);
        }
        validate::unique(
            errs,
            &self.ports,
            |p| p.name.clone(),
            |i| format!("spec.ports[{i}].name"),
            |p, first| {
                format!(
                    "port name {:?} is already used by spec.ports[{first}]",
                    p.name
                )
            },
        );
        validate::unique(
            errs,
            &self.ports,
            |p| p.port,
            |i| format!("spec.ports[{i}].port"),
            |p, first| format!("port {} is already used by spec.ports[{first}]", p.port),
        );
    }
}

/// Weight of an instance that does not set one. 100 leaves room to give a
/// canary instance less (e.g. 10) or a bigger machine more, in whole numbers.
pub const DEFAULT_INSTANCE_WEIGHT: u32 = 100;

/// Largest instance weight: 100x the default is plenty of spread, and the
/// bound keeps sums of weights far from overflowing a `u32` in balancers.
pub const MAX_INSTANCE_WEIGHT: u32 = 10_000;

fn default_instance_weight() -> u32 {
    DEFAULT_INSTANCE_WEIGHT
}

fn is_default_instance_weight(w: &u32) -> bool {
    *w == DEFAULT_INSTANCE_WEIGHT
}

/// `kind: Instance` — one running endpoint of a service. Sidecars register
/// their own instance under a lease; the control plane deletes it when the
/// lease expires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstanceSpec {
    /// The service this is an instance of (a `Service` name, same namespace).
    pub service: String,
    /// IP literal, v4 or v6, where the instance (its sidecar) listens.
    pub address: IpAddr,
    /// Port at `address`, 1..=65535.
    pub port: u16,
    /// Instance labels (e.g. `version: v2`, `zone: us-east-1a`) that subsets,
    /// source matches and locality use.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Relative share of traffic for the `weighted` balancer,
    /// 1..=[`MAX_INSTANCE_WEIGHT`]; default [`DEFAULT_INSTANCE_WEIGHT`].
    #[serde(
        default = "default_instance_weight",
        skip_serializing_if = "is_default_instance_weight"
    )]
    pub weight: u32,
    /// Health as the instance reports it; default [`DEFAULT_HEALTH`].
    #[serde(default, skip_serializing_if = "Health::is_healthy")]
    pub health: Health,
}

/// Health of an instance that does not report one: healthy. A sidecar
/// registers its instance once the application is ready, so registration
/// itself is the readiness signal; it reports `unhealthy` or `draining` only
/// when that changes.
pub const DEFAULT_HEALTH: Health = Health::Healthy;

/// Health of an instance as reported by its sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Receives traffic (the default, [`DEFAULT_HEALTH`]).
    Healthy,
    /// Receives no new traffic.
    Unhealthy,
    /// Shutting down: receives no new requests, in-flight ones finish.
    Draining,
}

impl Default for Health {
    fn default() -> Health {
        DEFAULT_HEALTH
    }
}

impl Health {
    /// True for `healthy`.
    pub fn is_healthy(&self) -> bool {
        *self == Health::Healthy
    }
}

impl InstanceSpec {
    pub(crate) fn validate(&self, errs: &mut Errors) {
        validate::dns_label(errs, "spec.service", "service", &self.service);
        validate::port(errs, "spec.port", self.port);
        validate::labels(errs, "spec.labels", &self.labels);
        if !(1..=MAX_INSTANCE_WEIGHT).contains(&self.weight) {
            errs.add(
                "spec.weight",
                format!("must be in 1..={MAX_INSTANCE_WEIGHT}, got {}", self.weight),
            );
        }
        if self.address.is_unspecified() || self.address.is_multicast() {
            errs.add(
                "spec.address",
                format!(
                    "{} is not a unicast address an instance can listen on",
                    self.address
                ),
            );
        }
    }
}
