//! Passive outlier detection (the DestinationPolicy's `outlierDetection`):
//! an endpoint that keeps failing is ejected from balancing for a while.
//!
//! Every answered (or failed) try to a destination with the block is
//! [`Outliers::record`]ed: a success resets the endpoint's counts; a 5xx
//! (including the sidecar's own 502/503/504 for resets, refused connections
//! and timeouts) adds to the consecutive-5xx count, and a gateway error
//! (502, 503, 504, connect failure, reset, timeout) also to the
//! consecutive-gateway count. Reaching `consecutive5xxErrors` or
//! `consecutiveGatewayErrors` ejects the endpoint for
//! `baseEjectionTime × ejections`, capped at `maxEjectionTime` — unless
//! the ejected share of the service's endpoints has already reached
//! `maxEjectionPercent` (Envoy's rule: an ejection is allowed while the
//! share is below the percent, so one endpoint can always go). Ejection
//! decisions are serialized, so concurrent failures cannot overshoot the
//! cap. The multiplier decays by one per `interval` the endpoint spends
//! back in the pool without a new ejection.
//!
//! [`Outliers::any_ejected`] is one atomic load, so while nothing is
//! ejected the request path does not look further;
//! [`Outliers::is_ejected`] is one read lock and one atomic load per
//! endpoint. Returns are noticed lazily by
//! [`Outliers::returns`] (the first request after an ejection ends), which
//! also reports them, so metrics and the access log see both events.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use trellis_resources::policy::OutlierDetection;

/// What a try's result says about the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// An answer below 500.
    Success,
    /// A 5xx answer that is not a gateway error (500, 501, ...).
    ServerError,
    /// 502/503/504, or no answer at all (connect failure, reset, timeout).
    GatewayError,
}

impl Observed {
    /// From an HTTP status.
    pub fn of_status(status: u16) -> Observed {
        match status {
            502..=504 => Observed::GatewayError,
            500..=599 => Observed::ServerError,
            _ => Observed::Success,
        }
    }
}

/// An ejection or a return, for metrics and the access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Ejected {
        destination: String,
        endpoint: SocketAddr,
        duration: Duration,
        ejections: u32,
    },
    Returned {
        destination: String,
        endpoint: SocketAddr,
    },
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Ejected {
                endpoint,
                duration,
                ejections,
                ..
            } => write!(
                f,
                "ejected {endpoint} for {} ms (ejection {ejections})",
                duration.as_millis()
            ),
            Event::Returned { endpoint, .. } => write!(f, "returned {endpoint}"),
        }
    }
}

#[derive(Debug, Default)]
struct EndpointState {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Milliseconds since [`Outliers::start`] until which it is ejected
    /// (0: not ejected).
    ejected_until_ms: AtomicU64,
    book: Mutex<Book>,
}

#[derive(Debug, Default)]
struct Book {
    destination: String,
    ejections: u32,
    /// When it last came back (ms since start), for the decay.
    returned_ms: u64,
    /// Ejected and not yet reported back.
    out: bool,
}

/// Outlier state of every endpoint this sidecar has sent to.
#[derive(Debug)]
pub struct Outliers {
    start: Instant,
    map: RwLock<HashMap<SocketAddr, Arc<EndpointState>>>,
    /// Earliest end of a current ejection (ms since start; u64::MAX: none),
    /// so [`Outliers::returns`] costs one load while nothing is due.
    next_return_ms: AtomicU64,
    /// Endpoints ejected and not yet returned.
    ejected: AtomicU64,
    /// Serializes ejection decisions (check the cap, then eject).
    ejecting: Mutex<()>,
}

impl Default for Outliers {
    fn default() -> Self {
        Outliers {
            start: Instant::now(),
            map: RwLock::new(HashMap::new()),
            next_return_ms: AtomicU64::new(u64::MAX),
            ejected: AtomicU64::new(0),
            ejecting: Mutex::new(()),
        }
    }
}

/// Endpoints whose state is forgotten past this many entries when idle:
/// more than one sidecar talks to, cheap to scan.
pub const OUTLIER_PRUNE_AT: usize = 4096;

impl Outliers {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn state(&self, ep: SocketAddr) -> Arc<EndpointState> {
        if let Ok(m) = self.map.read() {
            if let Some(s) = m.get(&ep) {
                return Arc::clone(s);
            }
        }
        match self.map.write() {
            Ok(mut m) => {
                if m.len() >= OUTLIER_PRUNE_AT && !m.contains_key(&ep) {
                    m.retain(|_, s| {
                        Arc::strong_count(s) > 1 || s.ejected_until_ms.load(Ordering::Acquire) != 0
                    });
                }
                Arc::clone(m.entry(ep).or_default())
            }
            Err(_) => Arc::new(EndpointState::default()),
        }
    }

    /// Whether any endpoint is (or was until its return is noticed)
    /// ejected: one atomic load.
    pub fn any_ejected(&self) -> bool {
        self.ejected.load(Ordering::Acquire) > 0
    }

    /// Whether `ep` is ejected now.
    pub fn is_ejected(&self, ep: SocketAddr) -> bool {
        let until = self
            .map
            .read()
            .ok()
            .and_then(|m| {
                m.get(&ep)
                    .map(|s| s.ejected_until_ms.load(Ordering::Acquire))
            })
            .unwrap_or(0);
        until != 0 && self.now_ms() < until
    }

    /// Records one try's result from `ep` of `destination` (`ns/service`),
    /// which has `pool_size` endpoints; returns the ejection it caused.
    pub fn record(
        &self,
        destination: &str,
        ep: SocketAddr,
        observed: Observed,
        cfg: &OutlierDetection,
        pool_size: usize,
    ) -> Option<Event> {
        if observed == Observed::Success {
            // Only touch an endpoint that has counts: the common case is a
            // read lock and two loads.
            if let Some(s) = self.map.read().ok().and_then(|m| m.get(&ep).cloned()) {
                for c in [&s.consecutive_5xx, &s.consecutive_gateway] {
                    if c.load(Ordering::Acquire) != 0 {
                        c.store(0, Ordering::Release);
                    }
                }
            }
            return None;
        }
        let s = self.state(ep);
        let n5 = s.consecutive_5xx.fetch_add(1, Ordering::AcqRel) + 1;
        let ngw = if observed == Observed::GatewayError {
            s.consecutive_gateway.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            s.consecutive_gateway.store(0, Ordering::Release);
            0
        };
        let trips = (cfg.consecutive_5xx_errors > 0 && n5 >= cfg.consecutive_5xx_errors)
            || (cfg.consecutive_gateway_errors > 0 && ngw >= cfg.consecutive_gateway_errors);
        if !trips || self.is_ejected(ep) {
            return None;
        }
        self.eject(destination, ep, &s, cfg, pool_size)
    }

    fn eject(
        &self,
        destination: &str,
        ep: SocketAddr,
        s: &EndpointState,
        cfg: &OutlierDetection,
        pool_size: usize,
    ) -> Option<Event> {
        let _one_at_a_time = self.ejecting.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.now_ms();
        let out = self.ejected_in(destination, now);
        if out * 100 >= pool_size.max(1) * cfg.max_ejection_percent as usize {
            return None;
        }
        let mut book = s.book.lock().unwrap_or_else(|e| e.into_inner());
        if book.out && s.ejected_until_ms.load(Ordering::Acquire) > now {
            return None;
        }
        // Decay: one step per interval spent back in the pool.
        let interval = cfg.interval.as_std().as_millis().max(1) as u64;
        if book.ejections > 0 && book.returned_ms > 0 {
            let steps = now.saturating_sub(book.returned_ms) / interval;
            book.ejections = book
                .ejections
                .saturating_sub(steps.min(u32::MAX as u64) as u32);
        }
        book.ejections = book.ejections.saturating_add(1);
        book.destination = destination.to_string();
        // Out already: an ejection that ended unnoticed is extended, and
        // counted once.
        let was_out = std::mem::replace(&mut book.out, true);
        let base = cfg.base_ejection_time.as_std();
        let duration = base
            .saturating_mul(book.ejections)
            .min(cfg.max_ejection_time.as_std());
        let until = now.saturating_add(duration.as_millis() as u64);
        s.ejected_until_ms.store(until.max(1), Ordering::Release);
        if !was_out {
            self.ejected.fetch_add(1, Ordering::AcqRel);
        }
        s.consecutive_5xx.store(0, Ordering::Release);
        s.consecutive_gateway.store(0, Ordering::Release);
        self.next_return_ms.fetch_min(until, Ordering::AcqRel);
        Some(Event::Ejected {
            destination: destination.to_string(),
            endpoint: ep,
            duration,
            ejections: book.ejections,
        })
    }

    /// Endpoints of `destination` ejected at `now`.
    fn ejected_in(&self, destination: &str, now: u64) -> usize {
        let Ok(m) = self.map.read() else { return 0 };
        m.values()
            .filter(|s| s.ejected_until_ms.load(Ordering::Acquire) > now)
            .filter(|s| {
                s.book
                    .lock()
                    .map(|b| b.destination == destination)
                    .unwrap_or(false)
            })
            .count()
    }

    /// Ejections that have ended since the last call, each reported once.
    /// One atomic load while none is due.
    pub fn returns(&self) -> Vec<Event> {
        let now = self.now_ms();
        if now < self.next_return_ms.load(Ordering::Acquire) {
            return Vec::new();
        }
        let Ok(m) = self.map.read() else {
            return Vec::new();
        };
        // Claim the scan; an ejection made meanwhile lowers the mark again
        // (fetch_min), and the scan's own result is merged in, not stored.
        self.next_return_ms.store(u64::MAX, Ordering::Release);
        let mut events = Vec::new();
        let mut next = u64::MAX;
        for (ep, s) in m.iter() {
            let until = s.ejected_until_ms.load(Ordering::Acquire);
            if until == 0 {
                continue;
            }
            if until > now {
                next = next.min(until);
                continue;
            }
            let mut book = s.book.lock().unwrap_or_else(|e| e.into_inner());
            // Re-read under the lock: a new ejection may have just begun.
            let until = s.ejected_until_ms.load(Ordering::Acquire);
            if until > now {
                next = next.min(until);
                continue;
            }
            if book.out {
                book.out = false;
                self.ejected.fetch_sub(1, Ordering::AcqRel);
                book.returned_ms = now;
                s.ejected_until_ms.store(0, Ordering::Release);
                events.push(Event::Returned {
                    destination: book.destination.clone(),
                    endpoint: *ep,
                });
            }
        }
        self.next_return_ms.fetch_min(next, Ordering::AcqRel);
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_resources::Duration as D;

    fn cfg() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx_errors: 3,
            consecutive_gateway_errors: 0,
            interval: D::from_millis(10_000),
            base_ejection_time: D::from_millis(40),
            max_ejection_percent: 50,
            max_ejection_time: D::from_millis(100),
        }
    }

    fn ep(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn consecutive_errors_eject_and_success_resets() {
        let o = Outliers::default();
        let c = cfg();
        assert_eq!(o.record("d", ep(1), Observed::ServerError, &c, 4), None);
        assert_eq!(o.record("d", ep(1), Observed::GatewayError, &c, 4), None);
        // A success in between starts the count again.
        assert_eq!(o.record("d", ep(1), Observed::Success, &c, 4), None);
        assert_eq!(o.record("d", ep(1), Observed::ServerError, &c, 4), None);
        assert_eq!(o.record("d", ep(1), Observed::ServerError, &c, 4), None);
        assert!(!o.is_ejected(ep(1)));
        let e = o.record("d", ep(1), Observed::ServerError, &c, 4);
        assert!(
            matches!(e, Some(Event::Ejected { ejections: 1, duration, .. }) if duration == std::time::Duration::from_millis(40)),
            "{e:?}"
        );
        assert!(o.is_ejected(ep(1)));
        assert!(!o.is_ejected(ep(2)));
    }

    #[test]
    fn max_percent_bounds_ejections_but_one_is_always_allowed() {
        let o = Outliers::default();
        let c = OutlierDetection {
            max_ejection_percent: 10,
            ..cfg()
        };
        for _ in 0..3 {
            o.record("d", ep(1), Observed::GatewayError, &c, 3);
        }
        assert!(o.is_ejected(ep(1)), "10% of 3 still allows one");
        for _ in 0..3 {
            o.record("d", ep(2), Observed::GatewayError, &c, 3);
        }
        assert!(!o.is_ejected(ep(2)), "a second would exceed 10%");
        // Other destinations are counted on their own.
        for _ in 0..3 {
            o.record("e", ep(3), Observed::GatewayError, &c, 3);
        }
        assert!(o.is_ejected(ep(3)));
    }

    #[test]
    fn ejection_ends_is_reported_once_and_grows_capped() {
        let o = Outliers::default();
        let c = cfg();
        for _ in 0..3 {
            o.record("d", ep(1), Observed::ServerError, &c, 2);
        }
        assert!(o.returns().is_empty());
        assert!(o.any_ejected());
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert!(!o.is_ejected(ep(1)));
        assert_eq!(
            o.returns(),
            vec![Event::Returned {
                destination: "d".into(),
                endpoint: ep(1)
            }]
        );
        assert!(o.returns().is_empty());
        assert!(!o.any_ejected());
        // Second ejection: 2 × 40 ms; third: capped at 100 ms.
        let mut last = None;
        for _ in 0..3 {
            last = o.record("d", ep(1), Observed::ServerError, &c, 2);
        }
        assert!(
            matches!(last, Some(Event::Ejected { ejections: 2, duration, .. }) if duration.as_millis() == 80)
        );
        std::thread::sleep(std::time::Duration::from_millis(90));
        assert_eq!(o.returns().len(), 1);
        for _ in 0..3 {
            last = o.record("d", ep(1), Observed::ServerError, &c, 2);
        }
        assert!(
            matches!(last, Some(Event::Ejected { ejections: 3, duration, .. }) if duration.as_millis() == 100)
        );
    }

    #[test]
    fn gateway_threshold_counts_only_gateway_errors() {
        let o = Outliers::default();
        let c = OutlierDetection {
            consecutive_5xx_errors: 0,
            consecutive_gateway_errors: 2,
            ..cfg()
        };
        o.record("d", ep(1), Observed::GatewayError, &c, 2);
        o.record("d", ep(1), Observed::ServerError, &c, 2);
        o.record("d", ep(1), Observed::GatewayError, &c, 2);
        assert!(!o.is_ejected(ep(1)), "a 500 broke the gateway run");
        o.record("d", ep(1), Observed::GatewayError, &c, 2);
        assert!(o.is_ejected(ep(1)));
    }
}
