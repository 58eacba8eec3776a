//! The mesh's typed resource documents, API version `trellis/v1`.
//!
//! Everything Trellis knows is a [`Resource`] at the store key
//! `/{kind}/{namespace}/{name}` (see `ARCHITECTURE.md`, "State"). This crate
//! defines what those resources are, reads them from what operators write,
//! checks them, and writes them back out. It does no I/O.
//!
//! # Where data enters and leaves
//!
//! * **In from operators**: [`parse_documents`]`(source, text)` reads a file
//!   (YAML, `---`-separated, or JSON) into resources, returning *every*
//!   problem as a [`DocError`] that renders as
//!   `route.yaml:12:5: spec.http[0]: unknown field ...` or
//!   `route.yaml: Route default/ratings: spec.http[0].route: weights sum to 99, expected 100`.
//!   Then [`check_references`] checks the set against itself and the store
//!   (Route subsets must exist in the DestinationPolicy; one namespace
//!   default action).
//! * **Into and out of the store**: [`Resource::to_json`] is the canonical
//!   stored form (compact, deterministic JSON); [`Resource::from_json`]
//!   reads it back. [`Resource::key`], [`key_prefix`] and [`parse_key`] map
//!   resources to store keys.
//! * **Out to operators**: [`Resource::to_yaml`].
//!
//! # Map
//!
//! | module | holds |
//! |---|---|
//! | [`document`] | [`Resource`], [`Metadata`], [`Spec`], [`Kind`], [`DocError`], parsing, canonical forms, keys |
//! | [`references`] | [`check_references`] |
//! | [`service`] | `Service` ([`ServiceSpec`]) and `Instance` ([`InstanceSpec`]) — the registry |
//! | [`route`] | `Route` ([`RouteSpec`]): HTTP/TCP rules, weights, timeouts, retries, faults, mirror, degrade |
//! | [`policy`] | `DestinationPolicy` ([`DestinationPolicySpec`]): subsets, balancing, locality, circuit breaking, outlier detection, health checks, backup requests, retry budget |
//! | [`quota`] | `Quota` ([`QuotaSpec`]): memquota-style limits with overrides |
//! | [`access`] | `AccessPolicy` ([`AccessPolicySpec`]): allow/deny, deny wins |
//! | [`matching`] | [`StringMatch`], [`HeaderMatch`] and their compiled forms |
//! | [`duration`] | [`Duration`]: `250ms`, `15s`, `1m`, `2h` |
//! | [`validate`] | [`FieldError`] and the shared name/label/header rules |
//!
//! Every default is a named `pub const` next to the type that uses it,
//! with the reason for its value. Every struct rejects unknown fields, so a
//! misspelt field is an error rather than a silently ignored setting.
//! Nothing here panics on any input: documents come from operators and the
//! network.

pub mod access;
pub mod document;
pub mod duration;
pub mod matching;
pub mod policy;
pub mod quota;
pub mod references;
pub mod route;
pub mod service;
pub mod validate;

pub use access::{AccessPolicySpec, AccessRule, Action, Source};
pub use document::{
    key_prefix, parse_documents, parse_key, DocError, Kind, Metadata, Resource, Spec, API_VERSION,
    DEFAULT_NAMESPACE, MAX_DOCUMENT_BYTES,
};
pub use duration::Duration;
pub use matching::{CompiledMatch, HeaderMatch, StringMatch};
pub use policy::{DestinationPolicySpec, LbPolicy, Subset};
pub use quota::{QuotaDimensions, QuotaOverride, QuotaSpec};
pub use references::check_references;
pub use route::{Destination, HttpRule, RouteSpec, TcpRoute, WeightedDestination};
pub use service::{Health, InstanceSpec, Protocol, ServicePort, ServiceSpec};
pub use validate::FieldError;
