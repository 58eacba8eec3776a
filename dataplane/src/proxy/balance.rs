//! Endpoints and balancing: the healthy instances of a destination
//! (subset labels from the service's DestinationPolicy), and the pick among
//! them by the policy's `loadBalancer` ([`Balancer::pick`]):
//!
//! | policy | pick |
//! |---|---|
//! | `leastRequest` (default) | two distinct endpoints at random, the one with fewer requests in flight (P2C) |
//! | `roundRobin` | the next endpoint of a cursor per destination |
//! | `random` | uniformly at random |
//! | `weighted` | at random in proportion to the instances' `weight` |
//! | `consistentHash` | weighted rendezvous hashing of the `hashHeader` value: the same value goes to the same endpoint while it is healthy, and removing an endpoint moves only its own keys; a request without the header is picked at random |
//!
//! Which endpoints are candidates at all ([`endpoints`]) combines the
//! registry (subset labels, registered health), this sidecar's [`View`]
//! (active health checks, outlier ejections) and locality.
//!
//! In-flight counts live in [`InFlight`], keyed by endpoint address and
//! shared by all requests; an [`InFlightGuard`] holds one count until the
//! response body is finished (or dropped). Endpoints come from the config
//! snapshot each request took, so registry changes apply to the next
//! request while in-flight ones finish where they are.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use hyper::HeaderMap;
use trellis_resources::policy::{LbPolicy, LoadBalancer, DEFAULT_LB_POLICY};
use trellis_resources::Health;

use super::error::ProxyError;
use super::health_check::HealthChecks;
use super::locality::{self, Candidate, ZONE_LABEL};
use super::outlier::Outliers;
use super::route::Target;
use crate::mesh::MeshConfig;

/// One endpoint of a destination: its sidecar's inbound address and its
/// instance weight (for the `weighted` and `consistentHash` balancers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
}

/// What this sidecar knows about endpoints beyond the registry: the
/// caller's zone (for locality), active health-check results and outlier
/// ejections. [`View::default`] knows nothing (every registered-healthy
/// instance, no zone preference).
#[derive(Clone, Copy, Debug, Default)]
pub struct View<'a> {
    /// The caller's `zone` label.
    pub caller_zone: Option<&'a str>,
    /// Endpoints failing active health checks.
    pub health_checks: Option<&'a HealthChecks>,
    /// Ejected endpoints.
    pub outliers: Option<&'a Outliers>,
}

impl View<'_> {
    /// The per-endpoint test for this request, or `None` when nothing is
    /// failing or ejected (the common case: no per-endpoint locks).
    fn excluder(&self) -> Option<impl Fn(SocketAddr) -> bool + '_> {
        let health = self.health_checks.filter(|h| h.any_failing());
        let outliers = self.outliers.filter(|o| o.any_ejected());
        (health.is_some() || outliers.is_some()).then_some(move |ep: SocketAddr| {
            health.is_some_and(|h| h.is_failing(ep)) || outliers.is_some_and(|o| o.is_ejected(ep))
        })
    }
}

/// The endpoints of a destination a request may use.
#[derive(Debug)]
pub struct Pool {
    /// Candidates for the balancer (never empty).
    pub endpoints: Vec<Endpoint>,
    /// Instances of the whole service registered healthy (the size outlier
    /// detection's `maxEjectionPercent` is a share of).
    pub size: usize,
}

/// The endpoints of `target` (its sidecars' inbound addresses) a request
/// may use, in registry key order: instances of the subset that are
/// registered healthy, pass their active health checks and are not
/// ejected, narrowed by locality ([`super::locality`], which counts every
/// instance of a zone, usable or not). If checks and ejections leave
/// nothing, every registered-healthy instance outside evacuated zones is
/// used, and if no instance is registered healthy, those that report
/// themselves unhealthy (Envoy's "panic" routing: a mis-set health check
/// must not take a whole service down); draining instances never are. An
/// unknown subset, or one with no instance left, is
/// [`ProxyError::NoHealthyEndpoint`].
pub fn endpoints(
    cfg: &MeshConfig,
    target: &Target<'_>,
    view: &View<'_>,
) -> Result<Pool, ProxyError> {
    let none = || ProxyError::NoHealthyEndpoint {
        service: target.service.to_string(),
        subset: target.subset.unwrap_or("-").to_string(),
    };
    let policy = cfg
        .destination_policy(target.namespace, target.service)
        .map(|(_, p)| p);
    let labels = match target.subset {
        None => None,
        Some(name) => Some(
            &policy
                .ok_or_else(none)?
                .subset(name)
                .ok_or_else(none)?
                .labels,
        ),
    };
    let excluded = view.excluder();
    let mut size = 0;
    let mut candidates: Vec<Candidate<'_>> = Vec::new();
    for (_, i) in cfg.instances(target.namespace, target.service) {
        let registered = i.health.is_healthy();
        size += usize::from(registered);
        if !labels.is_none_or(|want| want.iter().all(|(k, v)| i.labels.get(k) == Some(v))) {
            continue;
        }
        let endpoint = Endpoint {
            addr: SocketAddr::new(i.address, i.port),
            weight: i.weight.max(1),
        };
        candidates.push(Candidate {
            endpoint,
            zone: i.labels.get(ZONE_LABEL).map(String::as_str),
            registered,
            usable: registered && !excluded.as_ref().is_some_and(|x| x(endpoint.addr)),
            reported_unhealthy: i.health == Health::Unhealthy,
        });
    }
    let locality = policy.and_then(|p| p.locality.as_ref());
    let mut eps = locality::select(&candidates, view.caller_zone, locality);
    if eps.is_empty() {
        eps = candidates
            .iter()
            .filter(|c| c.registered && !locality::evacuated(c.zone, locality))
            .map(|c| c.endpoint)
            .collect();
        if eps.is_empty() {
            // Every instance reports itself unhealthy: a health check that
            // fails everywhere (a wrong path, a shared dependency down) must
            // not turn into a service-wide 503 on its own.
            eps = candidates
                .iter()
                .filter(|c| c.reported_unhealthy && !locality::evacuated(c.zone, locality))
                .map(|c| c.endpoint)
                .collect();
        }
        if !eps.is_empty() {
            tracing::debug!(
                service = target.service,
                "every endpoint failing checks, ejected or reported unhealthy: panic routing to all"
            );
        }
    }
    if eps.is_empty() {
        return Err(none());
    }
    Ok(Pool {
        endpoints: eps,
        size,
    })
}

/// Entries in the in-flight map before idle ones are pruned: more
/// endpoints than a sidecar usually talks to, few enough that a prune is
/// cheap.
pub const INFLIGHT_PRUNE_AT: usize = 4096;

/// Requests in flight per endpoint, for least-request balancing.
#[derive(Debug, Default)]
pub struct InFlight {
    counts: RwLock<HashMap<SocketAddr, Arc<AtomicU64>>>,
}

/// One request counted against an endpoint until dropped.
#[derive(Debug)]
pub struct InFlightGuard(Arc<AtomicU64>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl InFlight {
    fn counter(&self, ep: SocketAddr) -> Arc<AtomicU64> {
        if let Ok(m) = self.counts.read() {
            if let Some(c) = m.get(&ep) {
                return Arc::clone(c);
            }
        }
        match self.counts.write() {
            Ok(mut m) => {
                // Endpoints come and go with deployments: past a bound,
                // forget the idle ones (a forgotten count was zero).
                if m.len() >= INFLIGHT_PRUNE_AT && !m.contains_key(&ep) {
                    m.retain(|_, c| Arc::strong_count(c) > 1 || c.load(Ordering::Relaxed) > 0);
                }
                Arc::clone(m.entry(ep).or_default())
            }
            // A poisoned map only loses balancing precision.
            Err(_) => Arc::new(AtomicU64::new(0)),
        }
    }

    fn load(&self, ep: SocketAddr) -> u64 {
        self.counts
            .read()
            .ok()
            .and_then(|m| m.get(&ep).map(|c| c.load(Ordering::Relaxed)))
            .unwrap_or(0)
    }

    /// Counts one request against `ep` until the guard drops.
    pub fn acquire(&self, ep: SocketAddr) -> InFlightGuard {
        let c = self.counter(ep);
        c.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(c)
    }

    /// Requests in flight to `ep` now.
    pub fn in_flight(&self, ep: SocketAddr) -> u64 {
        self.load(ep)
    }
}

/// Balancer state shared by all requests: in-flight counts and round-robin
/// cursors.
#[derive(Debug, Default)]
pub struct Balancer {
    /// Requests in flight per endpoint (least request; `/endpoints`).
    pub inflight: InFlight,
    cursors: RwLock<HashMap<String, Arc<AtomicUsize>>>,
}

impl Balancer {
    /// Picks one of `eps` (non-empty, else `None`) for a request with
    /// `headers` to the destination `pool` (`ns/service/subset`, the key of
    /// the round-robin cursor) by `lb` (absent: [`DEFAULT_LB_POLICY`]).
    /// Returns the endpoint and its in-flight guard.
    pub fn pick(
        &self,
        lb: Option<&LoadBalancer>,
        pool: &str,
        eps: &[Endpoint],
        headers: &HeaderMap,
    ) -> Option<(SocketAddr, InFlightGuard)> {
        if eps.is_empty() {
            return None;
        }
        let policy = lb.map_or(DEFAULT_LB_POLICY, |l| l.policy);
        let ep = match (eps.len(), policy) {
            (1, _) => eps[0].addr,
            (_, LbPolicy::LeastRequest) => self.least_request(eps),
            (n, LbPolicy::RoundRobin) => {
                eps[self.cursor(pool).fetch_add(1, Ordering::Relaxed) % n].addr
            }
            (n, LbPolicy::Random) => eps[rand::random_range(0..n)].addr,
            (_, LbPolicy::Weighted) => weighted(eps),
            (n, LbPolicy::ConsistentHash) => {
                let key = lb
                    .and_then(|l| l.hash_header.as_deref())
                    .and_then(|h| headers.get(h));
                match key {
                    Some(k) => rendezvous(eps, k.as_bytes()),
                    None => eps[rand::random_range(0..n)].addr,
                }
            }
        };
        Some((ep, self.inflight.acquire(ep)))
    }

    fn least_request(&self, eps: &[Endpoint]) -> SocketAddr {
        let n = eps.len();
        let a = rand::random_range(0..n);
        let mut b = rand::random_range(0..n - 1);
        if b >= a {
            b += 1;
        }
        if self.inflight.load(eps[b].addr) < self.inflight.load(eps[a].addr) {
            eps[b].addr
        } else {
            eps[a].addr
        }
    }

    fn cursor(&self, pool: &str) -> Arc<AtomicUsize> {
        super::keyed::shared(&self.cursors, pool)
    }
}

/// At random in proportion to weight.
fn weighted(eps: &[Endpoint]) -> SocketAddr {
    let total: u64 = eps.iter().map(|e| u64::from(e.weight)).sum();
    let mut x = rand::random_range(0..total.max(1));
    for e in eps {
        let w = u64::from(e.weight);
        if x < w {
            return e.addr;
        }
        x -= w;
    }
    eps[eps.len() - 1].addr
}

/// FNV-1a, then a splitmix64 finaliser: stable across builds and hosts
/// (every sidecar maps a key to the same endpoint), well mixed.
fn hash64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Weighted rendezvous hashing: each endpoint scores
/// `-weight / ln(u)` with `u` in (0, 1) from hash(key, endpoint); the
/// highest wins.
fn rendezvous(eps: &[Endpoint], key: &[u8]) -> SocketAddr {
    let mut best = eps[0].addr;
    let mut best_score = f64::MIN;
    for e in eps {
        let mut buf = [0u8; 18];
        let n = match e.addr.ip() {
            std::net::IpAddr::V4(ip) => {
                buf[..4].copy_from_slice(&ip.octets());
                4
            }
            std::net::IpAddr::V6(ip) => {
                buf[..16].copy_from_slice(&ip.octets());
                16
            }
        };
        buf[n..n + 2].copy_from_slice(&e.addr.port().to_be_bytes());
        let h = hash64(&[key, &buf[..n + 2]]);
        // 53 random bits into (0, 1).
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = -f64::from(e.weight) / u.ln();
        if score > best_score {
            best_score = score;
            best = e.addr;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn eps(n: u16) -> Vec<Endpoint> {
        (1..=n)
            .map(|p| Endpoint {
                addr: SocketAddr::from(([127, 0, 0, 1], p)),
                weight: 100,
            })
            .collect()
    }

    fn lb(policy: LbPolicy) -> LoadBalancer {
        LoadBalancer {
            policy,
            hash_header: (policy == LbPolicy::ConsistentHash).then(|| "x-user".to_string()),
        }
    }

    fn counts(
        b: &Balancer,
        l: &LoadBalancer,
        e: &[Endpoint],
        n: usize,
    ) -> HashMap<SocketAddr, usize> {
        let mut c = HashMap::new();
        for _ in 0..n {
            let (ep, _) = b.pick(Some(l), "ns/svc/-", e, &HeaderMap::new()).unwrap();
            *c.entry(ep).or_default() += 1;
        }
        c
    }

    #[test]
    fn p2c_prefers_the_idle_endpoint() {
        let b = Balancer::default();
        let e = eps(2);
        let busy: Vec<_> = (0..10).map(|_| b.inflight.acquire(e[0].addr)).collect();
        for _ in 0..100 {
            assert_eq!(
                b.pick(None, "p", &e, &HeaderMap::new()).unwrap().0,
                e[1].addr
            );
        }
        drop(busy);
        assert_eq!(b.inflight.in_flight(e[0].addr), 0);
    }

    #[test]
    fn round_robin_cycles_in_order() {
        let b = Balancer::default();
        let e = eps(3);
        let l = lb(LbPolicy::RoundRobin);
        let picks: Vec<SocketAddr> = (0..6)
            .map(|_| b.pick(Some(&l), "p", &e, &HeaderMap::new()).unwrap().0)
            .collect();
        assert_eq!(&picks[..3], &picks[3..]);
        let mut first: Vec<_> = picks[..3].to_vec();
        first.sort();
        assert_eq!(first, e.iter().map(|x| x.addr).collect::<Vec<_>>());
    }

    #[test]
    fn random_and_weighted_follow_their_shares() {
        let b = Balancer::default();
        let c = counts(&b, &lb(LbPolicy::Random), &eps(4), 40_000);
        for n in c.values() {
            assert!((9_000..=11_000).contains(n), "{c:?}");
        }
        let mut e = eps(2);
        e[1].weight = 300;
        let c = counts(&b, &lb(LbPolicy::Weighted), &e, 40_000);
        let heavy = c[&e[1].addr] as f64 / 40_000.0;
        assert!((0.73..=0.77).contains(&heavy), "{c:?}");
    }

    #[test]
    fn consistent_hash_is_sticky_and_moves_only_the_removed_keys() {
        let b = Balancer::default();
        let l = lb(LbPolicy::ConsistentHash);
        let all = eps(5);
        let pick = |e: &[Endpoint], user: usize| {
            let mut h = HeaderMap::new();
            h.insert(
                "x-user",
                HeaderValue::from_str(&format!("user-{user}")).unwrap(),
            );
            b.pick(Some(&l), "p", e, &h).unwrap().0
        };
        let before: Vec<SocketAddr> = (0..1000).map(|u| pick(&all, u)).collect();
        for (u, b) in before.iter().enumerate() {
            assert_eq!(pick(&all, u), *b, "not sticky");
        }
        let spread: std::collections::HashSet<_> = before.iter().collect();
        assert_eq!(spread.len(), 5);
        let removed = all[2].addr;
        let fewer: Vec<Endpoint> = all.iter().copied().filter(|e| e.addr != removed).collect();
        for (u, b) in before.iter().enumerate() {
            let now = pick(&fewer, u);
            if *b != removed {
                assert_eq!(now, *b, "key {u} moved though its endpoint stayed");
            }
        }
    }
}
