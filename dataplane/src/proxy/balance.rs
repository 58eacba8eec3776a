//! Endpoints and balancing: the healthy instances of a destination
//! (subset labels from the service's DestinationPolicy), and the
//! least-request power-of-two-choices pick among them.
//!
//! In-flight counts live in [`InFlight`], keyed by endpoint address and
//! shared by all requests; an [`InFlightGuard`] holds one count until the
//! response body is finished (or dropped). Endpoints come from the config
//! snapshot each request took, so registry changes apply to the next
//! request while in-flight ones finish where they are.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::error::ProxyError;
use super::route::Target;
use crate::mesh::MeshConfig;

/// The healthy endpoints of `target` (its sidecars' inbound addresses), in
/// registry key order. An unknown subset, or one without healthy
/// instances, is [`ProxyError::NoHealthyEndpoint`].
pub fn endpoints(cfg: &MeshConfig, target: &Target<'_>) -> Result<Vec<SocketAddr>, ProxyError> {
    let none = || ProxyError::NoHealthyEndpoint {
        service: target.service.to_string(),
        subset: target.subset.unwrap_or("-").to_string(),
    };
    let labels = match target.subset {
        None => None,
        Some(name) => {
            let (_, policy) = cfg
                .destination_policy(target.namespace, target.service)
                .ok_or_else(none)?;
            Some(&policy.subset(name).ok_or_else(none)?.labels)
        }
    };
    let eps: Vec<SocketAddr> = cfg
        .instances(target.namespace, target.service)
        .filter(|(_, i)| i.health.is_healthy())
        .filter(|(_, i)| {
            labels.is_none_or(|want| want.iter().all(|(k, v)| i.labels.get(k) == Some(v)))
        })
        .map(|(_, i)| SocketAddr::new(i.address, i.port))
        .collect();
    if eps.is_empty() {
        return Err(none());
    }
    Ok(eps)
}

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
            Ok(mut m) => Arc::clone(m.entry(ep).or_default()),
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

    /// Least request by power of two choices: two distinct endpoints at
    /// random, the one with fewer requests in flight wins (ties: the first).
    /// Returns the endpoint and its in-flight guard.
    pub fn pick(&self, eps: &[SocketAddr]) -> Option<(SocketAddr, InFlightGuard)> {
        let ep = match eps.len() {
            0 => return None,
            1 => eps[0],
            n => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                if self.load(eps[b]) < self.load(eps[a]) {
                    eps[b]
                } else {
                    eps[a]
                }
            }
        };
        let c = self.counter(ep);
        c.fetch_add(1, Ordering::Relaxed);
        Some((ep, InFlightGuard(c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p2c_prefers_the_idle_endpoint() {
        let f = InFlight::default();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let busy: Vec<_> = (0..10).map(|_| f.pick(&[a]).unwrap().1).collect();
        for _ in 0..100 {
            assert_eq!(f.pick(&[a, b]).unwrap().0, b);
        }
        drop(busy);
        assert_eq!(f.load(a), 0);
    }
}
