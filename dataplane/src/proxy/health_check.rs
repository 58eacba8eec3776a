//! Active health checks (placeholder interface; filled in by the health
//! check work): which endpoints currently fail their DestinationPolicy's
//! `healthCheck`, so the balancer leaves them out.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::RwLock;

/// Endpoints failing their active health checks, shared with the request
/// path (read per request, written by the checker task).
#[derive(Debug, Default)]
pub struct HealthChecks {
    failing: RwLock<HashSet<SocketAddr>>,
}

impl HealthChecks {
    /// Whether `ep` is currently failing its checks (so gets no traffic).
    pub fn is_failing(&self, ep: SocketAddr) -> bool {
        self.failing.read().is_ok_and(|s| s.contains(&ep))
    }
}
