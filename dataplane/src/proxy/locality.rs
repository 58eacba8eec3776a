//! Locality-aware endpoint choice (the DestinationPolicy's `locality`,
//! step 4 of the path in [`crate::proxy`]): which zone's endpoints a
//! request may use.
//!
//! An endpoint's zone is its instance's `zone` label ([`ZONE_LABEL`]); the
//! caller's zone is its own instance's. [`select`] takes every instance of
//! the destination (subset applied) with whether it is usable now
//! (registered healthy, passing active checks, not ejected) and returns the
//! usable endpoints of one zone:
//!
//! 1. zones listed as `shift[].from` are evacuated: their endpoints are
//!    never chosen, and a caller in an evacuated zone acts as if it were in
//!    the `to` zone;
//! 2. without a caller zone, or with `preferLocal: false`, every usable
//!    endpoint (of zones not evacuated) is a candidate;
//! 3. otherwise zones are tried in order — the caller's zone, then its
//!    `failover[].to` list, then every other zone by name (instances
//!    without a zone label form one more zone, tried last) — and the first
//!    zone with at least `minHealthyPercent` of its instances usable wins;
//! 4. if no zone reaches the threshold, the first zone in that order with
//!    any usable endpoint.
//!
//! A zone below the threshold gives up all its traffic (not a share): the
//! rule is easy to predict, and a zone that lost most of its capacity would
//! overload what is left.

use std::collections::BTreeSet;

use trellis_resources::policy::{Locality, DEFAULT_MIN_HEALTHY_PERCENT, DEFAULT_PREFER_LOCAL};

use super::balance::Endpoint;

/// The instance label that names its zone (Kubernetes' `topology` zone,
/// shortened; any string the operator uses consistently).
pub const ZONE_LABEL: &str = "zone";

/// One instance of the destination.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub endpoint: Endpoint,
    /// Its `zone` label.
    pub zone: Option<&'a str>,
    /// Registered healthy.
    pub registered: bool,
    /// Registered healthy, passing active checks, not ejected.
    pub usable: bool,
    /// Reports itself unhealthy (not draining): the last resort of panic
    /// routing ([`super::balance::endpoints`]).
    pub reported_unhealthy: bool,
}

/// Whether `zone` is evacuated by the policy's `shift`.
pub fn evacuated(zone: Option<&str>, locality: Option<&Locality>) -> bool {
    zone.is_some_and(|z| locality.is_some_and(|l| l.shift.iter().any(|s| s.from == z)))
}

/// The endpoints a request from `caller_zone` may use (see the module doc);
/// empty when no candidate is usable.
pub fn select(
    candidates: &[Candidate<'_>],
    caller_zone: Option<&str>,
    locality: Option<&Locality>,
) -> Vec<Endpoint> {
    let prefer_local = locality.map_or(DEFAULT_PREFER_LOCAL, |l| l.prefer_local);
    let min_pct = locality.map_or(DEFAULT_MIN_HEALTHY_PERCENT, |l| l.min_healthy_percent);
    let shift = locality.map_or(&[][..], |l| &l.shift[..]);
    let evacuated = |z: Option<&str>| evacuated(z, locality);
    let kept = candidates.iter().filter(|c| !evacuated(c.zone));
    let caller_zone = caller_zone.map(|z| {
        shift
            .iter()
            .find(|s| s.from == z)
            .map_or(z, |s| s.to.as_str())
    });
    let usable_in = |zone: Option<&str>| -> Vec<Endpoint> {
        kept.clone()
            .filter(|c| c.usable && c.zone == zone)
            .map(|c| c.endpoint)
            .collect()
    };
    let Some(home) = caller_zone.filter(|_| prefer_local) else {
        return kept.filter(|c| c.usable).map(|c| c.endpoint).collect();
    };
    // The order zones are tried in.
    let mut order: Vec<Option<&str>> = vec![Some(home)];
    if let Some(f) = locality.and_then(|l| l.failover.iter().find(|f| f.from == home)) {
        order.extend(f.to.iter().map(|z| Some(z.as_str())));
    }
    let others: BTreeSet<&str> = kept.clone().filter_map(|c| c.zone).collect();
    for z in others {
        if !order.contains(&Some(z)) {
            order.push(Some(z));
        }
    }
    order.push(None);
    let mut fallback: Option<Vec<Endpoint>> = None;
    for zone in order {
        if evacuated(zone) {
            continue;
        }
        let total = kept.clone().filter(|c| c.zone == zone).count();
        if total == 0 {
            continue;
        }
        let usable = usable_in(zone);
        if usable.len() * 100 >= min_pct as usize * total {
            return usable;
        }
        if fallback.is_none() && !usable.is_empty() {
            fallback = Some(usable);
        }
    }
    fallback.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use trellis_resources::policy::{Failover, Shift};

    fn c(port: u16, zone: Option<&'static str>, usable: bool) -> Candidate<'static> {
        Candidate {
            endpoint: Endpoint {
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                weight: 100,
            },
            zone,
            registered: true,
            usable,
            reported_unhealthy: false,
        }
    }

    fn ports(eps: &[Endpoint]) -> Vec<u16> {
        let mut p: Vec<u16> = eps.iter().map(|e| e.addr.port()).collect();
        p.sort();
        p
    }

    fn loc(failover: &[(&str, &[&str])], shift: &[(&str, &str)]) -> Locality {
        Locality {
            prefer_local: true,
            failover: failover
                .iter()
                .map(|(f, t)| Failover {
                    from: f.to_string(),
                    to: t.iter().map(|z| z.to_string()).collect(),
                })
                .collect(),
            min_healthy_percent: DEFAULT_MIN_HEALTHY_PERCENT,
            shift: shift
                .iter()
                .map(|(f, t)| Shift {
                    from: f.to_string(),
                    to: t.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn local_zone_first_then_failover_order_then_any() {
        let all = [
            c(1, Some("a"), true),
            c(2, Some("a"), true),
            c(3, Some("b"), true),
            c(4, Some("c"), true),
            c(5, None, true),
        ];
        assert_eq!(ports(&select(&all, Some("a"), None)), [1, 2]);
        // No caller zone: everything.
        assert_eq!(ports(&select(&all, None, None)), [1, 2, 3, 4, 5]);
        // preferLocal off: everything.
        let off = Locality {
            prefer_local: false,
            ..loc(&[], &[])
        };
        assert_eq!(ports(&select(&all, Some("a"), Some(&off))).len(), 5);
        // Zone a half down (50 % < 70 %): failover order a → c.
        let half = [
            c(1, Some("a"), true),
            c(2, Some("a"), false),
            c(3, Some("b"), true),
            c(4, Some("c"), true),
        ];
        let l = loc(&[("a", &["c", "b"])], &[]);
        assert_eq!(ports(&select(&half, Some("a"), Some(&l))), [4]);
        // Without a failover list: other zones by name.
        assert_eq!(ports(&select(&half, Some("a"), None)), [3]);
        // Nothing reaches the threshold: the first zone with anything.
        let weak = [
            c(1, Some("a"), false),
            c(2, Some("a"), false),
            c(3, Some("b"), true),
            c(4, Some("b"), false),
            c(5, Some("b"), false),
        ];
        assert_eq!(ports(&select(&weak, Some("a"), None)), [3]);
        let dead = [c(1, Some("a"), false)];
        assert!(select(&dead, Some("a"), None).is_empty());
    }

    #[test]
    fn shift_evacuates_a_zone_and_moves_its_callers() {
        let all = [
            c(1, Some("a"), true),
            c(2, Some("b"), true),
            c(3, Some("c"), true),
        ];
        let l = loc(&[], &[("a", "b")]);
        // A caller in a goes to b; nobody goes to a.
        assert_eq!(ports(&select(&all, Some("a"), Some(&l))), [2]);
        assert_eq!(ports(&select(&all, Some("c"), Some(&l))), [3]);
        assert_eq!(ports(&select(&all, None, Some(&l))), [2, 3]);
        // Even when b is down, a stays evacuated.
        let b_down = [
            c(1, Some("a"), true),
            c(2, Some("b"), false),
            c(3, Some("c"), true),
        ];
        assert_eq!(ports(&select(&b_down, Some("a"), Some(&l))), [3]);
    }
}
