//! The compiled config: [`MeshConfig`], an immutable view of the mesh at
//! one revision, built from the raw key-value state by
//! [`MeshConfig::build`] and published as an `Arc` by [`crate::cache`].
//!
//! Keys under resource prefixes (`/{kind}/{namespace}/{name}`, see
//! [`trellis_resources::parse_key`]) are parsed into typed
//! [`Resource`]s once, when they arrive ([`Entry::new`]), and indexed here
//! for the lookups the request path needs:
//!
//! | lookup | by |
//! |---|---|
//! | [`MeshConfig::service`] | namespace, service name |
//! | [`MeshConfig::instances`] | namespace, service name (the instances' `spec.service`) |
//! | [`MeshConfig::routes_for_host`] | namespace, host (each entry of a Route's `spec.hosts`) |
//! | [`MeshConfig::destination_policy`] | namespace, host (`spec.host`) |
//! | [`MeshConfig::quotas`] | namespace |
//! | [`MeshConfig::access_policies`] | namespace |
//!
//! A value that does not parse, or whose kind/namespace/name disagree with
//! its key, is skipped with a warning and counted ([`MeshConfig::skipped`]);
//! it never stops the rest of the config from applying. Keys that are not
//! resource keys are kept raw only.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use trellis_proto::sidecar::KeyValue;
use trellis_resources::service::Protocol;
use trellis_resources::{
    parse_key, AccessPolicySpec, DestinationPolicySpec, InstanceSpec, Kind, QuotaSpec, Resource,
    RouteSpec, ServiceSpec, Spec,
};

/// Where the config came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// Nothing loaded yet (not ready).
    Empty,
    /// Loaded from `<data_dir>/config.json` at start-up; not yet refreshed
    /// from the control plane.
    Disk,
    /// Received from the control node `node_id`.
    ControlPlane { node_id: u64 },
}

impl ConfigSource {
    /// `"none"`, `"disk"` or `"control-plane"`, as `/config_dump` shows it.
    pub fn as_str(&self) -> &'static str {
        match self {
            ConfigSource::Empty => "none",
            ConfigSource::Disk => "disk",
            ConfigSource::ControlPlane { .. } => "control-plane",
        }
    }
}

/// What a stored value turned into.
#[derive(Debug, Clone)]
pub enum Parsed {
    /// A typed resource matching its key.
    Resource(Arc<Resource>),
    /// A resource key whose value could not be used; the reason.
    Skipped(String),
    /// Not a resource key: kept raw.
    Raw,
}

/// One key: the raw value as the control plane sent it, and what it parsed
/// into.
#[derive(Debug, Clone)]
pub struct Entry {
    pub kv: KeyValue,
    pub parsed: Parsed,
}

impl Entry {
    /// Parses `kv` if its key is a resource key. Never panics; a bad value
    /// becomes [`Parsed::Skipped`] (and a warning).
    pub fn new(kv: KeyValue) -> Entry {
        let parsed = match parse_key(&kv.key) {
            None => Parsed::Raw,
            Some((kind, ns, name)) => match Resource::from_json(&kv.value) {
                Ok(r)
                    if r.kind() == kind
                        && r.metadata.namespace == ns
                        && r.metadata.name == name =>
                {
                    Parsed::Resource(Arc::new(r))
                }
                Ok(r) => Parsed::Skipped(format!(
                    "value is {} but the key names {kind} {ns}/{name}",
                    r.display_name()
                )),
                Err(e) => Parsed::Skipped(e.to_string()),
            },
        };
        if let Parsed::Skipped(why) = &parsed {
            tracing::warn!(key = %kv.key, mod_revision = kv.mod_revision, error = %why,
                "skipping a config value that is not a valid resource");
        }
        Entry { kv, parsed }
    }

    /// The resource, if the value parsed.
    pub fn resource(&self) -> Option<&Arc<Resource>> {
        match &self.parsed {
            Parsed::Resource(r) => Some(r),
            _ => None,
        }
    }
}

/// The raw state: every key under the watch prefix.
pub type RawState = BTreeMap<String, Arc<Entry>>;

/// namespace -> name -> value; lookups by `&str` without allocating.
type ByNs<T> = HashMap<String, HashMap<String, T>>;

fn insert_ns<T>(map: &mut ByNs<T>, ns: &str, name: &str, value: T) -> Option<T> {
    map.entry(ns.to_string())
        .or_default()
        .insert(name.to_string(), value)
}

fn get_ns<'a, T>(map: &'a ByNs<T>, ns: &str, name: &str) -> Option<&'a T> {
    map.get(ns)?.get(name)
}

/// The mesh's config at one revision, compiled for lookups. Immutable:
/// every change builds a new one (resources are shared `Arc`s, so that is
/// a re-index, not a re-parse).
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// The revision of the last applied change (0: nothing loaded).
    pub revision: u64,
    /// Where this config came from.
    pub source: ConfigSource,
    /// Every key, raw and parsed.
    pub raw: Arc<RawState>,
    services: ByNs<Arc<Resource>>,
    instances: ByNs<Vec<Arc<Resource>>>,
    routes: ByNs<Vec<Arc<Resource>>>,
    destination_policies: ByNs<Arc<Resource>>,
    quotas: HashMap<String, Vec<Arc<Resource>>>,
    access_policies: HashMap<String, Vec<Arc<Resource>>>,
    counts: BTreeMap<Kind, usize>,
    skipped: usize,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig::build(0, ConfigSource::Empty, Arc::new(RawState::new()))
    }
}

impl MeshConfig {
    /// Indexes `raw` at `revision`.
    pub fn build(revision: u64, source: ConfigSource, raw: Arc<RawState>) -> MeshConfig {
        let mut c = MeshConfig {
            revision,
            source,
            raw: Arc::clone(&raw),
            services: HashMap::new(),
            instances: HashMap::new(),
            routes: HashMap::new(),
            destination_policies: HashMap::new(),
            quotas: HashMap::new(),
            access_policies: HashMap::new(),
            counts: BTreeMap::new(),
            skipped: 0,
        };
        // BTreeMap order: keys sorted, so "first wins" below is deterministic.
        for entry in raw.values() {
            let r = match &entry.parsed {
                Parsed::Resource(r) => r,
                Parsed::Skipped(_) => {
                    c.skipped += 1;
                    continue;
                }
                Parsed::Raw => continue,
            };
            *c.counts.entry(r.kind()).or_default() += 1;
            let ns = r.metadata.namespace.as_str();
            match &r.spec {
                Spec::Service(_) => {
                    insert_ns(&mut c.services, ns, &r.metadata.name, Arc::clone(r));
                }
                Spec::Instance(i) => {
                    c.instances
                        .entry(ns.to_string())
                        .or_default()
                        .entry(i.service.clone())
                        .or_default()
                        .push(Arc::clone(r));
                }
                Spec::Route(rt) => {
                    for host in &rt.hosts {
                        c.routes
                            .entry(ns.to_string())
                            .or_default()
                            .entry(host.clone())
                            .or_default()
                            .push(Arc::clone(r));
                    }
                }
                Spec::DestinationPolicy(dp) => {
                    if get_ns(&c.destination_policies, ns, &dp.host).is_some() {
                        tracing::warn!(policy = %r.display_name(), host = %dp.host,
                            "another DestinationPolicy for this host sorts first; ignoring this one");
                    } else {
                        insert_ns(&mut c.destination_policies, ns, &dp.host, Arc::clone(r));
                    }
                }
                Spec::Quota(_) => c
                    .quotas
                    .entry(ns.to_string())
                    .or_default()
                    .push(Arc::clone(r)),
                Spec::AccessPolicy(_) => c
                    .access_policies
                    .entry(ns.to_string())
                    .or_default()
                    .push(Arc::clone(r)),
            }
        }
        c
    }

    /// True once a config was loaded (from disk or the control plane).
    pub fn is_loaded(&self) -> bool {
        self.source != ConfigSource::Empty
    }

    /// The Service `ns/name`.
    pub fn service(&self, ns: &str, name: &str) -> Option<(&Resource, &ServiceSpec)> {
        let r = get_ns(&self.services, ns, name)?;
        match &r.spec {
            Spec::Service(s) => Some((r, s)),
            _ => None,
        }
    }

    /// The one Service in `ns` that declares `port`, with that port's
    /// protocol: how an intercepted connection's original destination port
    /// names its service. `None` if no Service, or more than one, declares
    /// the port (then the port alone cannot say which).
    pub fn service_for_port(&self, ns: &str, port: u16) -> Option<(&str, Protocol)> {
        let mut found = None;
        for r in self.services.get(ns)?.values() {
            let Spec::Service(s) = &r.spec else { continue };
            if let Some(p) = s.ports.iter().find(|p| p.port == port) {
                if found.is_some() {
                    return None;
                }
                found = Some((r.metadata.name.as_str(), p.protocol));
            }
        }
        found
    }

    /// Every namespace and service name with registered instances.
    pub fn services_with_instances(&self) -> impl Iterator<Item = (&str, &str)> {
        self.instances
            .iter()
            .flat_map(|(ns, m)| m.keys().map(move |svc| (ns.as_str(), svc.as_str())))
    }

    /// The registered instances of service `ns/service`, in key order.
    pub fn instances(
        &self,
        ns: &str,
        service: &str,
    ) -> impl Iterator<Item = (&Resource, &InstanceSpec)> {
        get_ns(&self.instances, ns, service)
            .into_iter()
            .flatten()
            .filter_map(|r| match &r.spec {
                Spec::Instance(i) => Some((r.as_ref(), i)),
                _ => None,
            })
    }

    /// Routes in `ns` that list `host` in `spec.hosts`, in key order.
    pub fn routes_for_host(
        &self,
        ns: &str,
        host: &str,
    ) -> impl Iterator<Item = (&Resource, &RouteSpec)> {
        get_ns(&self.routes, ns, host)
            .into_iter()
            .flatten()
            .filter_map(|r| match &r.spec {
                Spec::Route(s) => Some((r.as_ref(), s)),
                _ => None,
            })
    }

    /// The DestinationPolicy whose `spec.host` is `ns/host` (the first by
    /// key if several claim it).
    pub fn destination_policy(
        &self,
        ns: &str,
        host: &str,
    ) -> Option<(&Resource, &DestinationPolicySpec)> {
        let r = get_ns(&self.destination_policies, ns, host)?;
        match &r.spec {
            Spec::DestinationPolicy(s) => Some((r, s)),
            _ => None,
        }
    }

    /// Quotas of namespace `ns`, in key order.
    pub fn quotas(&self, ns: &str) -> impl Iterator<Item = (&Resource, &QuotaSpec)> {
        self.quotas
            .get(ns)
            .into_iter()
            .flatten()
            .filter_map(|r| match &r.spec {
                Spec::Quota(s) => Some((r.as_ref(), s)),
                _ => None,
            })
    }

    /// AccessPolicies of namespace `ns`, in key order.
    pub fn access_policies(
        &self,
        ns: &str,
    ) -> impl Iterator<Item = (&Resource, &AccessPolicySpec)> {
        self.access_policies
            .get(ns)
            .into_iter()
            .flatten()
            .filter_map(|r| match &r.spec {
                Spec::AccessPolicy(s) => Some((r.as_ref(), s)),
                _ => None,
            })
    }

    /// Every typed resource, in key order.
    pub fn resources(&self) -> impl Iterator<Item = &Arc<Resource>> {
        self.raw.values().filter_map(|e| e.resource())
    }

    /// Resources by kind (kinds with none are absent).
    pub fn counts(&self) -> &BTreeMap<Kind, usize> {
        &self.counts
    }

    /// Values under resource keys that were skipped.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// The raw value at `key`.
    pub fn get_raw(&self, key: &str) -> Option<&KeyValue> {
        self.raw.get(key).map(|e| &e.kv)
    }
}
