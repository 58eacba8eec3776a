//! `kind: Route` — how requests to a service are routed, like Istio's
//! VirtualService: ordered HTTP rules (match → weighted destinations, or a
//! local degrade answer) with timeouts, retries, fault injection, mirroring
//! and header edits; and TCP rules by port.
//!
//! Evaluation (the data plane's contract): for a request to a host listed in
//! `hosts`, HTTP rules are tried in order and the first whose `match` list
//! matches wins (an empty list matches everything). A request no rule
//! matches gets `404` from the sidecar. A Route does not cross namespaces:
//! hosts and destination services are names in the Route's namespace.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::duration::Duration;
use crate::matching::{HeaderMatch, StringMatch};
use crate::validate::{self, Errors};

/// Timeout of an HTTP rule that does not set one: 15 s, long enough for any
/// interactive request, short enough that a hung upstream frees the
/// caller's resources well before typical client timeouts (30-60 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// Weights of a rule's destinations must add up to this (they are percents).
pub const TOTAL_WEIGHT: u32 = 100;

/// Most retries a rule may ask for. Beyond 10 the retries themselves become
/// the overload (retry storms); the destination's retry budget caps them
/// further.
pub const MAX_RETRY_ATTEMPTS: u32 = 10;

/// Conditions retried when `retryOn` is empty: only the ones where the
/// upstream certainly did not process the request (connection never made,
/// stream refused, gRPC unavailable/cancelled), so retrying is safe even
/// for non-idempotent requests.
pub const DEFAULT_RETRY_ON: [RetryOn; 4] = [
    RetryOn::ConnectFailure,
    RetryOn::RefusedStream,
    RetryOn::Unavailable,
    RetryOn::Cancelled,
];

/// Status of a degrade answer that does not set one: 503 Service
/// Unavailable, which well-behaved clients treat as "back off, try later".
pub const DEFAULT_DEGRADE_STATUS: u16 = 503;

/// Largest degrade body: 64 KiB. A degrade answer is a small placeholder
/// (an empty list, a "temporarily unavailable" object); every sidecar keeps
/// it in memory, so it must stay small.
pub const MAX_DEGRADE_BODY_BYTES: usize = 64 * 1024;

/// Share of requests mirrored when `mirror.percent` is not set: all of them
/// (the usual reason to mirror is to replay real traffic in full).
pub const DEFAULT_MIRROR_PERCENT: f64 = 100.0;

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

fn is_default_timeout(d: &Duration) -> bool {
    *d == DEFAULT_TIMEOUT
}

fn default_degrade_status() -> u16 {
    DEFAULT_DEGRADE_STATUS
}

fn is_default_degrade_status(s: &u16) -> bool {
    *s == DEFAULT_DEGRADE_STATUS
}

fn default_mirror_percent() -> f64 {
    DEFAULT_MIRROR_PERCENT
}

/// The `spec` of a Route.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec {
    /// Services (names in this namespace) whose traffic these rules govern;
    /// at least one, no repeats.
    pub hosts: Vec<String>,
    /// HTTP rules, tried in order; the first that matches wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRule>,
    /// TCP rules, one per port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpRoute>,
}

/// One HTTP rule: when any of `match` matches, send the request to `route`
/// (or answer it locally with `degrade`), applying the rest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRule {
    /// Optional name (DNS-1123 label, unique in the Route), shown in
    /// telemetry and errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Matches, OR-ed; empty matches every request.
    #[serde(rename = "match", default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatch>,
    /// Weighted destinations; weights sum to 100. Exactly one of `route` and
    /// `degrade` is set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<WeightedDestination>,
    /// Answer locally instead of forwarding (the downgrade switch). Exactly
    /// one of `route` and `degrade` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degrade: Option<Degrade>,
    /// Overall deadline for the request including retries; default
    /// [`DEFAULT_TIMEOUT`].
    #[serde(
        default = "default_timeout",
        skip_serializing_if = "is_default_timeout"
    )]
    pub timeout: Duration,
    /// Retry policy; absent means no retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,
    /// Fault injection (testing resilience); absent means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Copy requests to another destination, fire-and-forget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// Header edits on the request (before forwarding) and the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<HeaderOperations>,
}

/// One way an HTTP request can match; all set fields must match (AND).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    /// Request path (without query string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<StringMatch>,
    /// Methods (upper case), any of; empty means any method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub method: Vec<String>,
    /// Request headers by lower-case name; all must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, HeaderMatch>,
    /// Labels the calling instance must carry (all of them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
}

/// Where to send traffic.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    /// Service name in the Route's namespace.
    pub service: String,
    /// Subset of the service's instances, as defined by the DestinationPolicy
    /// whose `host` is `service`; absent means all instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Service port to use; absent means the port the request came in on
    /// (or the only port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.service)?;
        if let Some(s) = &self.subset {
            write!(f, "/{s}")?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// A destination with its share of traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedDestination {
    /// Where.
    pub destination: Destination,
    /// Percent of the rule's traffic, 0..=100; the rule's weights sum to
    /// 100. May be omitted only when the rule has a single destination
    /// (it then gets 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

impl WeightedDestination {
    /// The weight, with the single-destination default applied.
    pub fn effective_weight(&self) -> u32 {
        self.weight.unwrap_or(TOTAL_WEIGHT)
    }
}

/// Retry policy of an HTTP rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first try, 0..=[`MAX_RETRY_ATTEMPTS`].
    pub attempts: u32,
    /// Deadline of each try; at most the rule's `timeout`. Absent: each
    /// try may use what is left of the rule's timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// Conditions that trigger a retry; empty means [`DEFAULT_RETRY_ON`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<RetryOn>,
}

impl RetryPolicy {
    /// `retry_on`, or [`DEFAULT_RETRY_ON`] when empty.
    pub fn effective_retry_on(&self) -> &[RetryOn] {
        if self.retry_on.is_empty() {
            &DEFAULT_RETRY_ON
        } else {
            &self.retry_on
        }
    }
}

/// A retry condition (Envoy's `retry_on` vocabulary).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RetryOn {
    /// Any 5xx response, or no response (reset, timeout of a try).
    #[serde(rename = "5xx")]
    Status5xx,
    /// 502, 503 or 504.
    #[serde(rename = "gateway-error")]
    GatewayError,
    /// The connection to the upstream could not be made.
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The upstream reset the stream or connection.
    #[serde(rename = "reset")]
    Reset,
    /// 409 Conflict.
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
    /// HTTP/2 REFUSED_STREAM (the request was not processed).
    #[serde(rename = "refused-stream")]
    RefusedStream,
    /// gRPC status UNAVAILABLE.
    #[serde(rename = "unavailable")]
    Unavailable,
    /// gRPC status CANCELLED.
    #[serde(rename = "cancelled")]
    Cancelled,
    /// gRPC status DEADLINE_EXCEEDED.
    #[serde(rename = "deadline-exceeded")]
    DeadlineExceeded,
    /// gRPC status RESOURCE_EXHAUSTED.
    #[serde(rename = "resource-exhausted")]
    ResourceExhausted,
}

/// Fault injection: delay and/or abort a share of requests. At least one of
/// the two is set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    /// Delay before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Answer with an error instead of forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Injected delay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    /// Share of requests delayed, 0..=100 (fractions allowed).
    pub percent: f64,
    /// How long, more than 0s.
    pub fixed_delay: Duration,
}

/// Injected error answer. Exactly one of `httpStatus` and `grpcStatus`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// Share of requests aborted, 0..=100 (fractions allowed).
    pub percent: f64,
    /// HTTP status to answer, 200..=599.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// gRPC status to answer (name like `UNAVAILABLE`, or code 1..=16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<GrpcStatus>,
}

/// A non-OK gRPC status code (1..=16). Written as its name
/// (`UNAVAILABLE`) or its number (`14`); always written back as the name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrpcStatus(u8);

/// gRPC status names by code; index 0 is OK, which is not an abort status.
const GRPC_STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

impl GrpcStatus {
    /// The status with this code, if it is 1..=16.
    pub fn from_code(code: u64) -> Option<GrpcStatus> {
        u8::try_from(code)
            .ok()
            .filter(|c| (1..=16).contains(c))
            .map(GrpcStatus)
    }

    /// The status with this name (upper case, as in the gRPC spec).
    pub fn from_name(name: &str) -> Option<GrpcStatus> {
        GRPC_STATUS_NAMES
            .iter()
            .position(|n| *n == name)
            .filter(|&c| c != 0)
            .and_then(|c| GrpcStatus::from_code(c as u64))
    }

    /// Numeric code, 1..=16.
    pub fn code(&self) -> u8 {
        self.0
    }

    /// Name, like `UNAVAILABLE`.
    pub fn name(&self) -> &'static str {
        GRPC_STATUS_NAMES
            .get(usize::from(self.0))
            .copied()
            .unwrap_or("UNKNOWN")
    }
}

impl fmt::Display for GrpcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for GrpcStatus {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

struct GrpcStatusVisitor;

impl Visitor<'_> for GrpcStatusVisitor {
    type Value = GrpcStatus;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a gRPC status name like UNAVAILABLE or a code 1..=16")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<GrpcStatus, E> {
        GrpcStatus::from_code(v).ok_or_else(|| {
            E::custom(format!(
                "unknown gRPC status {v}, expected a code 1..=16 or a name like UNAVAILABLE"
            ))
        })
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<GrpcStatus, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(format!(
                "unknown gRPC status {v}, expected a code 1..=16 or a name like UNAVAILABLE"
            ))),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<GrpcStatus, E> {
        GrpcStatus::from_name(v).ok_or_else(|| {
            E::custom(format!(
                "unknown gRPC status {v:?}, expected one of {} or a code 1..=16",
                GRPC_STATUS_NAMES[1..].join(", ")
            ))
        })
    }
}

impl<'de> Deserialize<'de> for GrpcStatus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<GrpcStatus, D::Error> {
        deserializer.deserialize_any(GrpcStatusVisitor)
    }
}

/// Copy a share of requests to another destination; responses to the copies
/// are discarded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    /// Where the copies go.
    pub destination: Destination,
    /// Share of requests copied, 0..=100; default [`DEFAULT_MIRROR_PERCENT`].
    #[serde(default = "default_mirror_percent")]
    pub percent: f64,
}

/// A local answer in place of forwarding: the downgrade switch that sheds a
/// non-essential dependency under load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Degrade {
    /// HTTP status, 200..=599; default [`DEFAULT_DEGRADE_STATUS`].
    #[serde(
        default = "default_degrade_status",
        skip_serializing_if = "is_default_degrade_status"
    )]
    pub status: u16,
    /// Response body, at most [`MAX_DEGRADE_BODY_BYTES`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub body: String,
    /// Response headers (lower-case names), e.g. `content-type`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// Header edits for requests and responses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOperations {
    /// Applied to the request before it is forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<HeaderOps>,
    /// Applied to the response before it is returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<HeaderOps>,
}

/// One direction's header edits: `remove` first, then `add`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOps {
    /// Headers to add (appended; an existing header of that name stays).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    /// Header names to remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// A TCP rule: connections to `port` go to the weighted destinations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRoute {
    /// Service port this rule applies to, 1..=65535, unique in the Route.
    pub port: u16,
    /// Weighted destinations, weights sum to 100 (as for HTTP).
    pub route: Vec<WeightedDestination>,
}

impl RouteSpec {
    pub(crate) fn validate(&self, errs: &mut Errors) {
        if self.hosts.is_empty() {
            errs.add("spec.hosts", "at least one host is required");
        }
        for (i, h) in self.hosts.iter().enumerate() {
            validate::dns_label(errs, &format!("spec.hosts[{i}]"), "host", h);
        }
        validate::unique(
            errs,
            &self.hosts,
            Clone::clone,
            |i| format!("spec.hosts[{i}]"),
            |h, first| format!("host {h:?} is already listed at spec.hosts[{first}]"),
        );
        if self.http.is_empty() && self.tcp.is_empty() {
            errs.add("spec", "at least one `http` or `tcp` rule is required");
        }
        for (i, rule) in self.http.iter().enumerate() {
            rule.validate(errs, &format!("spec.http[{i}]"));
        }
        let named: Vec<(usize, &String)> = self
            .http
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.name.as_ref().map(|n| (i, n)))
            .collect();
        for (k, (i, name)) in named.iter().enumerate() {
            if let Some((first, _)) = named[..k].iter().find(|(_, n)| n == name) {
                errs.add(
                    format!("spec.http[{i}].name"),
                    format!("rule name {name:?} is already used by spec.http[{first}]"),
                );
            }
        }
        for (i, t) in self.tcp.iter().enumerate() {
            let path = format!("spec.tcp[{i}]");
            validate::port(errs, &format!("{path}.port"), t.port);
            weighted(errs, &format!("{path}.route"), &t.route);
        }
        validate::unique(
            errs,
            &self.tcp,
            |t| t.port,
            |i| format!("spec.tcp[{i}].port"),
            |t, first| format!("port {} already has a rule at spec.tcp[{first}]", t.port),
        );
    }

    /// Every destination this Route names, with its field path
    /// (`spec.http[1].route[0].destination`, `spec.http[0].mirror.destination`,
    /// `spec.tcp[0].route[0].destination`).
    pub fn destinations(&self) -> Vec<(String, &Destination)> {
        let mut out = Vec::new();
        for (i, rule) in self.http.iter().enumerate() {
            for (j, w) in rule.route.iter().enumerate() {
                out.push((
                    format!("spec.http[{i}].route[{j}].destination"),
                    &w.destination,
                ));
            }
            if let Some(m) = &rule.mirror {
                out.push((format!("spec.http[{i}].mirror.destination"), &m.destination));
            }
        }
        for (i, t) in self.tcp.iter().enumerate() {
            for (j, w) in t.route.iter().enumerate() {
                out.push((
                    format!("spec.tcp[{i}].route[{j}].destination"),
                    &w.destination,
                ));
            }
        }
        out
    }
}

fn destination(errs: &mut Errors, path: &str, d: &Destination) {
    validate::dns_label(errs, &format!("{path}.service"), "service", &d.service);
    if let Some(s) = &d.subset {
        validate::dns_label(errs, &format!("{path}.subset"), "subset", s);
    }
    if let Some(p) = d.port {
        validate::port(errs, &format!("{path}.port"), p);
    }
}

/// The weighted-destination rules shared by HTTP and TCP.
fn weighted(errs: &mut Errors, path: &str, route: &[WeightedDestination]) {
    if route.is_empty() {
        errs.add(path, "at least one destination is required");
        return;
    }
    let mut sum: u64 = 0;
    let mut missing = false;
    for (j, w) in route.iter().enumerate() {
        let p = format!("{path}[{j}]");
        destination(errs, &format!("{p}.destination"), &w.destination);
        match w.weight {
            Some(weight) if weight > TOTAL_WEIGHT => {
                errs.add(
                    format!("{p}.weight"),
                    format!("must be in 0..=100, got {weight}"),
                );
                missing = true; // the sum is meaningless now
            }
            Some(weight) => sum += u64::from(weight),
            None if route.len() > 1 => {
                errs.add(
                    format!("{p}.weight"),
                    "required when a rule has more than one destination",
                );
                missing = true;
            }
            None => sum += u64::from(TOTAL_WEIGHT),
        }
    }
    if !missing && sum != u64::from(TOTAL_WEIGHT) {
        errs.add(path, format!("weights sum to {sum}, expected 100"));
    }
    validate::unique(
        errs,
        route,
        |w| w.destination.clone(),
        |j| format!("{path}[{j}].destination"),
        |w, first| {
            format!(
                "destination {} is already listed at {path}[{first}]",
                w.destination
            )
        },
    );
}

fn header_ops(errs: &mut Errors, path: &str, ops: &HeaderOps) {
    for (name, value) in &ops.add {
        validate::header_name(errs, &format!("{path}.add"), name);
        validate::header_value(errs, &format!("{path}.add.{name}"), value);
    }
    for (i, name) in ops.remove.iter().enumerate() {
        validate::header_name(errs, &format!("{path}.remove[{i}]"), name);
    }
}

impl HttpRule {
    fn validate(&self, errs: &mut Errors, path: &str) {
        if let Some(n) = &self.name {
            validate::dns_label(errs, &format!("{path}.name"), "rule name", n);
        }
        for (i, m) in self.matches.iter().enumerate() {
            m.validate(errs, &format!("{path}.match[{i}]"));
        }
        match (&self.degrade, self.route.is_empty()) {
            (None, true) => errs.add(
                path,
                "exactly one of `route` or `degrade` must be set, found none",
            ),
            (Some(_), false) => errs.add(
                path,
                "exactly one of `route` or `degrade` must be set, found both",
            ),
            (None, false) => weighted(errs, &format!("{path}.route"), &self.route),
            (Some(d), true) => {
                d.validate(errs, &format!("{path}.degrade"));
                if self.retries.is_some() {
                    errs.add(
                        format!("{path}.retries"),
                        "has no effect on a rule that answers with `degrade`",
                    );
                }
                if self.mirror.is_some() {
                    errs.add(
                        format!("{path}.mirror"),
                        "has no effect on a rule that answers with `degrade`",
                    );
                }
            }
        }
        validate::positive_duration(errs, &format!("{path}.timeout"), self.timeout);
        if let Some(r) = &self.retries {
            let p = format!("{path}.retries");
            if r.attempts > MAX_RETRY_ATTEMPTS {
                errs.add(
                    format!("{p}.attempts"),
                    format!("must be in 0..={MAX_RETRY_ATTEMPTS}, got {}", r.attempts),
                );
            }
            if let Some(t) = r.per_try_timeout {
                if t.is_zero() {
                    errs.add(format!("{p}.perTryTimeout"), "must be greater than 0s");
                } else if t > self.timeout {
                    errs.add(
                        format!("{p}.perTryTimeout"),
                        format!("{t} exceeds the rule's timeout of {}", self.timeout),
                    );
                }
            }
            validate::unique(
                errs,
                &r.retry_on,
                |c| *c,
                |i| format!("{p}.retryOn[{i}]"),
                |_, first| format!("already listed at {p}.retryOn[{first}]"),
            );
        }
        if let Some(f) = &self.fault {
            let p = format!("{path}.fault");
            if f.delay.is_none() && f.abort.is_none() {
                errs.add(&p, "at least one of `delay` or `abort` is required");
            }
            if let Some(d) = &f.delay {
                validate::percent(errs, &format!("{p}.delay.percent"), d.percent);
                validate::positive_duration(errs, &format!("{p}.delay.fixedDelay"), d.fixed_delay);
            }
            if let Some(a) = &f.abort {
                let pa = format!("{p}.abort");
                validate::percent(errs, &format!("{pa}.percent"), a.percent);
                match (a.http_status, a.grpc_status) {
                    (Some(_), Some(_)) => errs.add(
                        &pa,
                        "exactly one of `httpStatus` or `grpcStatus` must be set, found both",
                    ),
                    (None, None) => errs.add(
                        &pa,
                        "exactly one of `httpStatus` or `grpcStatus` must be set, found none",
                    ),
                    (Some(s), None) => http_status(errs, &format!("{pa}.httpStatus"), s),
                    (None, Some(_)) => {}
                }
            }
        }
        if let Some(m) = &self.mirror {
            destination(errs, &format!("{path}.mirror.destination"), &m.destination);
            validate::percent(errs, &format!("{path}.mirror.percent"), m.percent);
        }
        if let Some(h) = &self.headers {
            if let Some(r) = &h.request {
                header_ops(errs, &format!("{path}.headers.request"), r);
            }
            if let Some(r) = &h.response {
                header_ops(errs, &format!("{path}.headers.response"), r);
            }
        }
    }
}

fn http_status(errs: &mut Errors, path: &str, status: u16) {
    if !(200..=599).contains(&status) {
        errs.add(
            path,
            format!("must be an HTTP status in 200..=599, got {status}"),
        );
    }
}

impl HttpMatch {
    fn validate(&self, errs: &mut Errors, path: &str) {
        if let Some(p) = &self.path {
            p.validate(errs, &format!("{path}.path"));
        }
        validate::methods(errs, &format!("{path}.method"), &self.method);
        for (name, m) in &self.headers {
            validate::header_name(errs, &format!("{path}.headers"), name);
            m.validate(errs, &format!("{path}.headers.{name}"));
        }
        validate::labels(errs, &format!("{path}.sourceLabels"), &self.source_labels);
    }
}

impl Degrade {
    fn validate(&self, errs: &mut Errors, path: &str) {
        http_status(errs, &format!("{path}.status"), self.status);
        if self.body.len() > MAX_DEGRADE_BODY_BYTES {
            errs.add(
                format!("{path}.body"),
                format!(
                    "body is {} bytes, over the limit of {MAX_DEGRADE_BODY_BYTES} bytes",
                    self.body.len()
                ),
            );
        }
        for (name, value) in &self.headers {
            validate::header_name(errs, &format!("{path}.headers"), name);
            validate::header_value(errs, &format!("{path}.headers.{name}"), value);
        }
    }
}
