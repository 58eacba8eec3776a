//! Circuit breaking (step 4a of the path in [`crate::proxy`]): the
//! DestinationPolicy's `connectionPool` limits, counted per destination
//! service by this sidecar, refused fast with 503 and
//! `x-trellis-error: circuit open ...` instead of queueing.
//!
//! | limit | counts | taken |
//! |---|---|---|
//! | `maxConcurrentRequests` | HTTP requests in flight to the service (headers sent until the response body ends) | before an endpoint is picked |
//! | `maxPendingRequests` | requests waiting for a connection to an endpoint to be made (TCP + TLS + HTTP/2 handshake) | while the connection is made |
//! | `maxConnections` | TCP connections proxied to the service (each is its own tunnel) | for the life of the connection |
//!
//! HTTP requests share one multiplexed connection per endpoint
//! ([`super::upstream`]), so their concurrency is what
//! `maxConcurrentRequests` bounds; `maxConnections` bounds opaque TCP.
//! A destination without a limit is not counted at all.
//!
//! The main type is [`Circuits`]; a [`Permit`] holds one unit of a limit
//! until dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use trellis_resources::policy::ConnectionPool;

/// Which limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `maxConcurrentRequests`.
    Requests,
    /// `maxPendingRequests`.
    Pending,
    /// `maxConnections`.
    Connections,
}

impl Limit {
    /// The policy field's name, as in `x-trellis-error` and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Requests => "maxConcurrentRequests",
            Limit::Pending => "maxPendingRequests",
            Limit::Connections => "maxConnections",
        }
    }

    fn max(self, pool: &ConnectionPool) -> Option<u32> {
        match self {
            Limit::Requests => pool.max_concurrent_requests,
            Limit::Pending => pool.max_pending_requests,
            Limit::Connections => pool.max_connections,
        }
    }
}

/// A limit was reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{limit} of {max} reached")]
pub struct Overflow {
    pub limit: &'static str,
    pub max: u32,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU32,
    pending: AtomicU32,
    connections: AtomicU32,
}

impl Counters {
    fn of(&self, limit: Limit) -> &AtomicU32 {
        match limit {
            Limit::Requests => &self.requests,
            Limit::Pending => &self.pending,
            Limit::Connections => &self.connections,
        }
    }
}

/// One unit of a limit, given back on drop.
#[derive(Debug)]
pub struct Permit {
    counters: Arc<Counters>,
    limit: Limit,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.counters.of(self.limit).fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counters of every destination service (`namespace/service`) that has
/// limits, created on first use.
#[derive(Debug, Default)]
pub struct Circuits {
    map: RwLock<HashMap<String, Arc<Counters>>>,
}

impl Circuits {
    fn counters(&self, destination: &str) -> Arc<Counters> {
        super::keyed::shared(&self.map, destination)
    }

    /// Takes one unit of `limit` for `destination` under `pool`: `Ok(None)`
    /// when the policy sets no such limit (nothing is counted),
    /// `Ok(Some(permit))` while under it, [`Overflow`] when it is full.
    pub fn acquire(
        &self,
        destination: &str,
        pool: Option<&ConnectionPool>,
        limit: Limit,
    ) -> Result<Option<Permit>, Overflow> {
        let Some(max) = pool.and_then(|p| limit.max(p)) else {
            return Ok(None);
        };
        let counters = self.counters(destination);
        let n = counters.of(limit);
        let mut cur = n.load(Ordering::Acquire);
        loop {
            if cur >= max {
                return Err(Overflow {
                    limit: limit.as_str(),
                    max,
                });
            }
            match n.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        Ok(Some(Permit { counters, limit }))
    }

    /// Units of `limit` held for `destination` now.
    #[cfg(test)]
    fn in_use(&self, destination: &str, limit: Limit) -> u32 {
        self.map
            .read()
            .ok()
            .and_then(|m| {
                m.get(destination)
                    .map(|c| c.of(limit).load(Ordering::Acquire))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_refuse_past_max_and_recover_on_release() {
        let c = Circuits::default();
        let pool = ConnectionPool {
            max_concurrent_requests: Some(2),
            ..Default::default()
        };
        let a = c.acquire("ns/s", Some(&pool), Limit::Requests).unwrap();
        let b = c.acquire("ns/s", Some(&pool), Limit::Requests).unwrap();
        assert!(a.is_some() && b.is_some());
        let e = c.acquire("ns/s", Some(&pool), Limit::Requests).unwrap_err();
        assert_eq!(e.to_string(), "maxConcurrentRequests of 2 reached");
        // Another destination has its own count.
        assert!(c.acquire("ns/t", Some(&pool), Limit::Requests).is_ok());
        drop(a);
        assert_eq!(c.in_use("ns/s", Limit::Requests), 1);
        assert!(c.acquire("ns/s", Some(&pool), Limit::Requests).is_ok());
        // No limit set: not counted.
        assert!(c
            .acquire("ns/s", Some(&pool), Limit::Connections)
            .unwrap()
            .is_none());
        assert!(c.acquire("ns/s", None, Limit::Requests).unwrap().is_none());
    }
}
