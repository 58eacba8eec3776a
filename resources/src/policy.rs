//! `kind: DestinationPolicy` — what happens to traffic after routing chose a
//! service, like Istio's DestinationRule: subsets by labels, load balancing,
//! locality preference and failover, connection limits (the circuit
//! breaker), outlier detection, active health checks, backup (hedged)
//! requests and the retry budget.
//!
//! **Which policy applies.** The DestinationPolicy for service `S` in
//! namespace `N` is the one in `N` whose `spec.host` is `S`. By convention
//! it is also *named* `S` (`metadata.name == spec.host`); the store is
//! looked up by that name (see `check_references`), so keep to the
//! convention unless the policy is applied together with the Routes that
//! use it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::validate::{self, Errors};

/// Whether an instance in the caller's zone is preferred when no `locality`
/// block is given: yes — same-zone traffic is faster and, in clouds, free;
/// failover to other zones still happens when the local ones are unhealthy.
pub const DEFAULT_PREFER_LOCAL: bool = true;

/// Consecutive 5xx answers that eject an instance: 5, Envoy's and Istio's
/// default — enough to ride out a blip, few enough to stop sending to a
/// broken instance within a fraction of a second under load.
pub const DEFAULT_CONSECUTIVE_5XX_ERRORS: u32 = 5;

/// Consecutive gateway errors (502/503/504, connect failures) that eject an
/// instance: 0 = off, because 5xx counting already includes them.
pub const DEFAULT_CONSECUTIVE_GATEWAY_ERRORS: u32 = 0;

/// How often ejection decisions are re-evaluated: 10 s (Envoy default).
pub const DEFAULT_OUTLIER_INTERVAL: Duration = Duration::from_secs(10);

/// Minimum ejection time, multiplied by the number of times the instance
/// was ejected: 30 s (Envoy default), long enough for a restart.
pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);

/// Most of a service's instances that may be ejected at once: 10 % (Envoy
/// default), so a bad rule or a mesh-wide incident cannot eject everything.
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

/// Time between active health checks of one instance: 10 s, cheap for the
/// instance and quick enough next to passive outlier detection.
pub const DEFAULT_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Deadline of one health check: 1 s; a health endpoint slower than that is
/// as good as down.
pub const DEFAULT_HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Consecutive passing checks that mark an instance healthy again: 2, so one
/// lucky answer does not bring a flapping instance back.
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;

/// Consecutive failing checks that mark an instance unhealthy: 3, so one
/// lost packet does not remove a healthy instance.
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;

/// Latency percentile after which a backup request is sent: p90, motan-go's
/// BackupRequest default — the slowest 10 % are candidates, and the budget
/// (`maxPercent`) caps how many of them actually get a copy.
pub const DEFAULT_BACKUP_AFTER_PERCENTILE: f64 = 90.0;

/// Shortest wait before a backup request, whatever the percentile says:
/// 10 ms. Under that a second request costs more (a second upstream
/// request, a second app call) than the latency it can save, and a
/// sub-millisecond percentile of a fast service is mostly noise.
pub const DEFAULT_BACKUP_MIN_DELAY: Duration = Duration::from_millis(10);

/// Longest ejection, however many times an instance was ejected: 300 s
/// (Envoy's `max_ejection_time` default), so a recovered instance is never
/// kept out for more than five minutes.
pub const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// Share of a zone's instances that must be healthy for the zone to keep
/// its traffic: 70 %, close to Envoy's overprovisioning factor of 1.4
/// (1 / 1.4 ≈ 71 %), the point where the remaining instances of a zone
/// sized for its load start to run hot.
pub const DEFAULT_MIN_HEALTHY_PERCENT: u32 = 70;

/// Cap on backup requests as a percent of requests: 5 %, so hedging can
/// never add more than 5 % load, even when everything is slow.
pub const DEFAULT_BACKUP_MAX_PERCENT: f64 = 5.0;

/// Retries allowed as a percent of requests when no `retryBudget` is given:
/// 20 % (Finagle's and Linkerd's default) — retries absorb transient
/// failures but cannot multiply load during an outage.
pub const DEFAULT_RETRY_BUDGET_PERCENT: f64 = 20.0;

/// Retries per second always allowed regardless of the percent, so
/// low-traffic services can still retry: 10 (Finagle's default).
pub const DEFAULT_RETRY_BUDGET_MIN_PER_SECOND: u32 = 10;

fn yes() -> bool {
    DEFAULT_PREFER_LOCAL
}
fn d_5xx() -> u32 {
    DEFAULT_CONSECUTIVE_5XX_ERRORS
}
fn d_gateway() -> u32 {
    DEFAULT_CONSECUTIVE_GATEWAY_ERRORS
}
fn d_outlier_interval() -> Duration {
    DEFAULT_OUTLIER_INTERVAL
}
fn d_base_ejection() -> Duration {
    DEFAULT_BASE_EJECTION_TIME
}
fn d_max_ejection() -> u32 {
    DEFAULT_MAX_EJECTION_PERCENT
}
fn d_hc_interval() -> Duration {
    DEFAULT_HEALTH_CHECK_INTERVAL
}
fn d_hc_timeout() -> Duration {
    DEFAULT_HEALTH_CHECK_TIMEOUT
}
fn d_healthy() -> u32 {
    DEFAULT_HEALTHY_THRESHOLD
}
fn d_unhealthy() -> u32 {
    DEFAULT_UNHEALTHY_THRESHOLD
}
fn d_after_percentile() -> f64 {
    DEFAULT_BACKUP_AFTER_PERCENTILE
}
fn d_backup_max() -> f64 {
    DEFAULT_BACKUP_MAX_PERCENT
}
fn d_backup_min_delay() -> Duration {
    DEFAULT_BACKUP_MIN_DELAY
}
fn d_max_ejection_time() -> Duration {
    DEFAULT_MAX_EJECTION_TIME
}
fn d_min_healthy() -> u32 {
    DEFAULT_MIN_HEALTHY_PERCENT
}
fn d_budget_percent() -> f64 {
    DEFAULT_RETRY_BUDGET_PERCENT
}
fn d_budget_min() -> u32 {
    DEFAULT_RETRY_BUDGET_MIN_PER_SECOND
}

/// The `spec` of a DestinationPolicy. Every block is optional; what an
/// absent block means is documented on its field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationPolicySpec {
    /// The service (name in this namespace) this policy applies to.
    pub host: String,
    /// Named subsets of the service's instances that Routes can target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
    /// Balancer; absent means [`DEFAULT_LB_POLICY`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// Locality preference and failover; absent means prefer the caller's
    /// zone ([`DEFAULT_PREFER_LOCAL`]) and fail over to any zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<Locality>,
    /// Circuit-breaker limits; absent means no limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    /// Passive outlier detection; absent means off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Active health checking; absent means off (instances report their own
    /// health through their sidecar's registration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Backup (hedged) requests; absent means off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_request: Option<BackupRequest>,
    /// Cap on retries to this service; absent means
    /// [`DEFAULT_RETRY_BUDGET_PERCENT`] / [`DEFAULT_RETRY_BUDGET_MIN_PER_SECOND`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
}

/// A named subset of a service's instances: those carrying all `labels`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    /// Subset name (DNS-1123 label, e.g. `v1`), unique in the policy.
    pub name: String,
    /// Instance labels that select the subset; at least one.
    pub labels: BTreeMap<String, String>,
}

/// Load-balancing settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// The algorithm; default [`DEFAULT_LB_POLICY`].
    #[serde(default)]
    pub policy: LbPolicy,
    /// Request header whose value is hashed; required for, and only allowed
    /// with, `consistentHash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_header: Option<String>,
}

/// Balancer of a service whose policy does not choose one: least request by
/// power of two choices. It adapts to uneven instances and slow requests
/// without global state, costs two random picks per request, and avoids
/// round robin's herding onto a just-recovered instance.
pub const DEFAULT_LB_POLICY: LbPolicy = LbPolicy::LeastRequest;

/// Load-balancing algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LbPolicy {
    /// Pick two instances at random, send to the one with fewer requests in
    /// flight (P2C). The default ([`DEFAULT_LB_POLICY`]).
    LeastRequest,
    /// Round robin.
    RoundRobin,
    /// Uniformly random.
    Random,
    /// Hash of `hashHeader` (ring hash), for cache affinity.
    ConsistentHash,
    /// By instance `weight`.
    Weighted,
}

impl Default for LbPolicy {
    fn default() -> LbPolicy {
        DEFAULT_LB_POLICY
    }
}

/// Locality-aware routing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Locality {
    /// Prefer instances in the caller's zone; default [`DEFAULT_PREFER_LOCAL`].
    #[serde(default = "yes")]
    pub prefer_local: bool,
    /// Ordered failover targets per zone; zones not listed fail over to any
    /// zone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<Failover>,
    /// A zone keeps its traffic while at least this percent of its
    /// instances are healthy (registered healthy, passing health checks,
    /// not ejected), 1..=100; below it the next zone in the failover order
    /// takes over. Default [`DEFAULT_MIN_HEALTHY_PERCENT`].
    #[serde(default = "d_min_healthy")]
    pub min_healthy_percent: u32,
    /// Evacuated zones: instances in `from` get no traffic at all, and
    /// callers in `from` treat `to` as their own zone. One apply moves a
    /// data centre's traffic elsewhere (and removing the entry moves it
    /// back).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shift: Vec<Shift>,
}

/// Move all traffic of zone `from` to zone `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Shift {
    /// The evacuated zone.
    pub from: String,
    /// The zone that takes its traffic (not `from`, not itself evacuated).
    pub to: String,
}

/// When zone `from` has no healthy instances, try `to` in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Failover {
    /// The caller's zone (an instance's `zone` label value).
    pub from: String,
    /// Zones to try, in order; at least one, not `from`, no repeats.
    pub to: Vec<String>,
}

/// Circuit-breaker limits per caller sidecar; each is optional and, when
/// set, at least 1.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPool {
    /// Open connections to the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection; more are rejected with 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight; more are rejected with 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
}

/// Passive outlier detection: eject instances that keep failing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx that eject; 0 = off; default
    /// [`DEFAULT_CONSECUTIVE_5XX_ERRORS`].
    #[serde(rename = "consecutive5xxErrors", default = "d_5xx")]
    pub consecutive_5xx_errors: u32,
    /// Consecutive gateway errors that eject; 0 = off; default
    /// [`DEFAULT_CONSECUTIVE_GATEWAY_ERRORS`].
    #[serde(default = "d_gateway")]
    pub consecutive_gateway_errors: u32,
    /// Evaluation interval, > 0; default [`DEFAULT_OUTLIER_INTERVAL`].
    #[serde(default = "d_outlier_interval")]
    pub interval: Duration,
    /// Base ejection time, > 0; default [`DEFAULT_BASE_EJECTION_TIME`].
    #[serde(default = "d_base_ejection")]
    pub base_ejection_time: Duration,
    /// Most instances ejected at once, percent 0..=100; default
    /// [`DEFAULT_MAX_EJECTION_PERCENT`].
    #[serde(default = "d_max_ejection")]
    pub max_ejection_percent: u32,
    /// Cap on one ejection (base time × ejections), ≥ `baseEjectionTime`;
    /// default [`DEFAULT_MAX_EJECTION_TIME`].
    #[serde(default = "d_max_ejection_time")]
    pub max_ejection_time: Duration,
}

/// Active health checking: exactly one of `http` or `tcp`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheck {
    /// Check by `GET path`; 2xx is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpHealthCheck>,
    /// Check by opening a TCP connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpHealthCheck>,
    /// Time between checks, > 0; default [`DEFAULT_HEALTH_CHECK_INTERVAL`].
    #[serde(default = "d_hc_interval")]
    pub interval: Duration,
    /// Deadline of one check, > 0 and < `interval`; default
    /// [`DEFAULT_HEALTH_CHECK_TIMEOUT`].
    #[serde(default = "d_hc_timeout")]
    pub timeout: Duration,
    /// Passing checks to become healthy, ≥ 1; default [`DEFAULT_HEALTHY_THRESHOLD`].
    #[serde(default = "d_healthy")]
    pub healthy_threshold: u32,
    /// Failing checks to become unhealthy, ≥ 1; default
    /// [`DEFAULT_UNHEALTHY_THRESHOLD`].
    #[serde(default = "d_unhealthy")]
    pub unhealthy_threshold: u32,
}

/// HTTP health check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHealthCheck {
    /// Path to `GET`, starting with `/`.
    pub path: String,
}

/// TCP health check (connect only); written `tcp: {}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpHealthCheck {}

/// Backup (hedged) requests: when a request is slower than the service's
/// `afterPercentile` latency, send a copy to another instance and take the
/// first answer. Only for idempotent methods (GET, HEAD, OPTIONS).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackupRequest {
    /// Latency percentile to wait for, 50..=99.9; default
    /// [`DEFAULT_BACKUP_AFTER_PERCENTILE`].
    #[serde(default = "d_after_percentile")]
    pub after_percentile: f64,
    /// Budget: backups as a percent of requests, 0..=100; default
    /// [`DEFAULT_BACKUP_MAX_PERCENT`].
    #[serde(default = "d_backup_max")]
    pub max_percent: f64,
    /// Never wait less than this before the backup, > 0; default
    /// [`DEFAULT_BACKUP_MIN_DELAY`].
    #[serde(default = "d_backup_min_delay")]
    pub min_delay: Duration,
}

/// Retry budget: retries to this service may be at most `percent` of
/// requests, plus `minPerSecond`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Percent of requests, 0..=100; default [`DEFAULT_RETRY_BUDGET_PERCENT`].
    #[serde(default = "d_budget_percent")]
    pub percent: f64,
    /// Retries per second always allowed; default
    /// [`DEFAULT_RETRY_BUDGET_MIN_PER_SECOND`].
    #[serde(default = "d_budget_min")]
    pub min_per_second: u32,
}

impl DestinationPolicySpec {
    /// The subset with this name.
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }

    pub(crate) fn validate(&self, errs: &mut Errors) {
        validate::dns_label(errs, "spec.host", "host", &self.host);
        for (i, s) in self.subsets.iter().enumerate() {
            let p = format!("spec.subsets[{i}]");
            validate::dns_label(errs, &format!("{p}.name"), "subset name", &s.name);
            validate::non_empty_labels(errs, &format!("{p}.labels"), &s.labels);
        }
        validate::unique(
            errs,
            &self.subsets,
            |s| s.name.clone(),
            |i| format!("spec.subsets[{i}].name"),
            |s, first| {
                format!(
                    "subset {:?} is already defined at spec.subsets[{first}]",
                    s.name
                )
            },
        );
        if let Some(lb) = &self.load_balancer {
            match (lb.policy, &lb.hash_header) {
                (LbPolicy::ConsistentHash, None) => errs.add(
                    "spec.loadBalancer.hashHeader",
                    "required when policy is consistentHash",
                ),
                (LbPolicy::ConsistentHash, Some(h)) => {
                    validate::header_name(errs, "spec.loadBalancer.hashHeader", h)
                }
                (_, Some(_)) => errs.add(
                    "spec.loadBalancer.hashHeader",
                    "only allowed when policy is consistentHash",
                ),
                (_, None) => {}
            }
        }
        if let Some(l) = &self.locality {
            for (i, f) in l.failover.iter().enumerate() {
                let p = format!("spec.locality.failover[{i}]");
                zone(errs, &format!("{p}.from"), &f.from);
                if f.to.is_empty() {
                    errs.add(format!("{p}.to"), "at least one zone is required");
                }
                for (j, z) in f.to.iter().enumerate() {
                    let pz = format!("{p}.to[{j}]");
                    zone(errs, &pz, z);
                    if *z == f.from {
                        errs.add(&pz, format!("zone {z:?} cannot fail over to itself"));
                    } else if f.to[..j].contains(z) {
                        errs.add(&pz, format!("zone {z:?} is listed twice"));
                    }
                }
            }
            if !(1..=100).contains(&l.min_healthy_percent) {
                errs.add(
                    "spec.locality.minHealthyPercent",
                    format!("must be in 1..=100, got {}", l.min_healthy_percent),
                );
            }
            for (i, sh) in l.shift.iter().enumerate() {
                let p = format!("spec.locality.shift[{i}]");
                zone(errs, &format!("{p}.from"), &sh.from);
                zone(errs, &format!("{p}.to"), &sh.to);
                if sh.to == sh.from {
                    errs.add(
                        format!("{p}.to"),
                        format!("zone {:?} cannot shift to itself", sh.to),
                    );
                } else if l.shift.iter().any(|o| o.from == sh.to) {
                    errs.add(
                        format!("{p}.to"),
                        format!("zone {:?} is itself shifted away", sh.to),
                    );
                }
            }
            validate::unique(
                errs,
                &l.shift,
                |s| s.from.clone(),
                |i| format!("spec.locality.shift[{i}].from"),
                |s, first| {
                    format!(
                        "zone {:?} is already shifted at spec.locality.shift[{first}]",
                        s.from
                    )
                },
            );
            validate::unique(
                errs,
                &l.failover,
                |f| f.from.clone(),
                |i| format!("spec.locality.failover[{i}].from"),
                |f, first| {
                    format!(
                        "zone {:?} already has failover at spec.locality.failover[{first}]",
                        f.from
                    )
                },
            );
        }
        if let Some(c) = &self.connection_pool {
            for (name, v) in [
                ("maxConnections", c.max_connections),
                ("maxPendingRequests", c.max_pending_requests),
                ("maxConcurrentRequests", c.max_concurrent_requests),
            ] {
                if v == Some(0) {
                    errs.add(
                        format!("spec.connectionPool.{name}"),
                        "must be at least 1 (leave it out for no limit)",
                    );
                }
            }
        }
        if let Some(o) = &self.outlier_detection {
            let p = "spec.outlierDetection";
            if o.consecutive_5xx_errors == 0 && o.consecutive_gateway_errors == 0 {
                errs.add(
                    p,
                    "consecutive5xxErrors and consecutiveGatewayErrors are both 0, so nothing would \
                     ever be ejected (leave the block out to turn outlier detection off)",
                );
            }
            validate::positive_duration(errs, &format!("{p}.interval"), o.interval);
            validate::positive_duration(
                errs,
                &format!("{p}.baseEjectionTime"),
                o.base_ejection_time,
            );
            validate::positive_duration(errs, &format!("{p}.maxEjectionTime"), o.max_ejection_time);
            if o.max_ejection_time < o.base_ejection_time {
                errs.add(
                    format!("{p}.maxEjectionTime"),
                    format!(
                        "must be at least baseEjectionTime ({}), got {}",
                        o.base_ejection_time, o.max_ejection_time
                    ),
                );
            }
            if o.max_ejection_percent > 100 {
                errs.add(
                    format!("{p}.maxEjectionPercent"),
                    format!("must be in 0..=100, got {}", o.max_ejection_percent),
                );
            }
        }
        if let Some(h) = &self.health_check {
            let p = "spec.healthCheck";
            match (&h.http, &h.tcp) {
                (Some(_), Some(_)) => {
                    errs.add(p, "exactly one of `http` or `tcp` must be set, found both")
                }
                (None, None) => {
                    errs.add(p, "exactly one of `http` or `tcp` must be set, found none")
                }
                (Some(http), None) => {
                    if !http.path.starts_with('/') {
                        errs.add(
                            format!("{p}.http.path"),
                            format!("must start with \"/\", got {:?}", http.path),
                        );
                    } else if http
                        .path
                        .chars()
                        .any(|c| c.is_whitespace() || c.is_control())
                    {
                        errs.add(
                            format!("{p}.http.path"),
                            "must not contain whitespace or control characters",
                        );
                    }
                }
                (None, Some(_)) => {}
            }
            validate::positive_duration(errs, &format!("{p}.interval"), h.interval);
            validate::positive_duration(errs, &format!("{p}.timeout"), h.timeout);
            if !h.timeout.is_zero() && h.timeout >= h.interval {
                errs.add(
                    format!("{p}.timeout"),
                    format!(
                        "must be shorter than the interval ({}), got {}",
                        h.interval, h.timeout
                    ),
                );
            }
            for (name, v) in [
                ("healthyThreshold", h.healthy_threshold),
                ("unhealthyThreshold", h.unhealthy_threshold),
            ] {
                if v == 0 {
                    errs.add(format!("{p}.{name}"), "must be at least 1");
                }
            }
        }
        if let Some(b) = &self.backup_request {
            if !(50.0..=99.9).contains(&b.after_percentile) {
                errs.add(
                    "spec.backupRequest.afterPercentile",
                    format!("must be in 50..=99.9, got {}", b.after_percentile),
                );
            }
            validate::percent(errs, "spec.backupRequest.maxPercent", b.max_percent);
            validate::positive_duration(errs, "spec.backupRequest.minDelay", b.min_delay);
        }
        if let Some(r) = &self.retry_budget {
            validate::percent(errs, "spec.retryBudget.percent", r.percent);
        }
    }
}

/// Zones are label values (an instance's `zone` label), and not empty.
fn zone(errs: &mut Errors, path: &str, z: &str) {
    if z.is_empty() || !validate::is_label_value(z) {
        errs.add(
            path,
            format!(
                "invalid zone {z:?}: expected up to 63 letters, digits, '-', '_' or '.', \
                 starting and ending with a letter or digit"
            ),
        );
    }
}
