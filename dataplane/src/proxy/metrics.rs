//! Request counters for Prometheus (`GET /metrics` on the admin endpoint):
//! `trellis_requests_total{direction,destination,code}` and
//! `trellis_retries_total{destination}`. A counter is an
//! atomic found under a read lock (uncontended: one atomic operation); the
//! write lock is taken only the first time a label set appears.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// Which listener a request came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// From the local application to another service.
    Outbound,
    /// From a peer sidecar to the local application.
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// The counters: (direction, code) → destination → count.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: RwLock<BTreeMap<(Direction, u16), BTreeMap<String, AtomicU64>>>,
    retries: RwLock<BTreeMap<String, AtomicU64>>,
}

impl Metrics {
    /// Counts one request to `destination` (`service/subset`, or the host
    /// when no destination was chosen) answered with `code`.
    pub fn request(&self, direction: Direction, destination: &str, code: u16) {
        if let Ok(m) = self.requests.read() {
            if let Some(c) = m
                .get(&(direction, code))
                .and_then(|by_dest| by_dest.get(destination))
            {
                c.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if let Ok(mut m) = self.requests.write() {
            m.entry((direction, code))
                .or_default()
                .entry(destination.to_string())
                .or_default()
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one retry to `destination` (`service/subset`).
    pub fn retry(&self, destination: &str) {
        if let Ok(m) = self.retries.read() {
            if let Some(c) = m.get(destination) {
                c.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if let Ok(mut m) = self.retries.write() {
            m.entry(destination.to_string())
                .or_default()
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Prometheus text format, with `trellis_config_revision`.
    pub fn render(&self, config_revision: u64) -> String {
        let mut out = String::new();
        out.push_str("# HELP trellis_requests_total Requests through this sidecar.\n");
        out.push_str("# TYPE trellis_requests_total counter\n");
        if let Ok(m) = self.requests.read() {
            for ((d, code), by_dest) in m.iter() {
                for (dest, n) in by_dest {
                    let _ = writeln!(
                    out,
                    "trellis_requests_total{{direction=\"{}\",destination=\"{}\",code=\"{code}\"}} {}",
                    d.as_str(),
                    escape(dest),
                    n.load(Ordering::Relaxed)
                );
                }
            }
        }
        out.push_str("# HELP trellis_retries_total Retries sent by this sidecar.\n");
        out.push_str("# TYPE trellis_retries_total counter\n");
        if let Ok(m) = self.retries.read() {
            for (dest, n) in m.iter() {
                let _ = writeln!(
                    out,
                    "trellis_retries_total{{destination=\"{}\"}} {}",
                    escape(dest),
                    n.load(Ordering::Relaxed)
                );
            }
        }
        out.push_str("# HELP trellis_config_revision Revision of the applied mesh config.\n");
        out.push_str("# TYPE trellis_config_revision gauge\n");
        let _ = writeln!(out, "trellis_config_revision {config_revision}");
        out
    }
}

/// Prometheus label value escaping.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts() {
        let m = Metrics::default();
        m.request(Direction::Outbound, "reviews/v1", 200);
        m.request(Direction::Outbound, "reviews/v1", 200);
        m.request(Direction::Inbound, "reviews", 502);
        m.retry("reviews/v1");
        let t = m.render(7);
        assert!(t.contains("trellis_retries_total{destination=\"reviews/v1\"} 1\n"));
        assert!(t.contains(
            "trellis_requests_total{direction=\"outbound\",destination=\"reviews/v1\",code=\"200\"} 2"
        ));
        assert!(t.contains("code=\"502\"} 1"));
        assert!(t.contains("trellis_config_revision 7\n"));
    }
}
