//! Fault injection from a Route rule's `fault` (step 3b of the path in
//! [`crate::proxy`]): delay a share of requests by a fixed time, and/or
//! abort a share with an HTTP or gRPC status, without calling the
//! destination.
//!
//! The two draws are independent, as in Istio: a request may be delayed and
//! then aborted. The delay happens before the route timeout starts (the
//! fault stands for a slow network or caller, not a slow backend), and an
//! abort answers before any endpoint is picked, so the backend sees
//! nothing. Aborts are answered by [`super::error`] like every other
//! synthetic response (`x-trellis-error: fault injected ...`).

use std::time::Duration;

use trellis_resources::route::Fault;

/// What the draw decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Injected {
    /// Wait this long before going on.
    pub delay: Option<Duration>,
    /// Answer with this instead of forwarding.
    pub abort: Option<Abort>,
}

/// An injected error answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// This HTTP status (gRPC callers get the matching `grpc-status`).
    Http(u16),
    /// This gRPC status, as a trailers-only response.
    Grpc(u8),
}

/// True with probability `percent` / 100 (`percent` in 0..=100, fractions
/// allowed). `draw` is uniform in [0, 1).
fn hit(percent: f64, draw: f64) -> bool {
    draw * 100.0 < percent
}

/// Draws the rule's faults for one request.
pub fn draw(fault: &Fault) -> Injected {
    draw_with(fault, rand::random::<f64>(), rand::random::<f64>())
}

fn draw_with(fault: &Fault, delay_draw: f64, abort_draw: f64) -> Injected {
    let delay = fault
        .delay
        .as_ref()
        .filter(|d| hit(d.percent, delay_draw))
        .map(|d| d.fixed_delay.as_std());
    let abort = fault
        .abort
        .as_ref()
        .filter(|a| hit(a.percent, abort_draw))
        .and_then(|a| match (a.grpc_status, a.http_status) {
            (Some(g), _) => Some(Abort::Grpc(g.code())),
            (None, Some(h)) => Some(Abort::Http(h)),
            // Validation requires one of them.
            (None, None) => None,
        });
    Injected { delay, abort }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_resources::route::{FaultAbort, FaultDelay};

    fn fault(delay_pct: f64, abort_pct: f64) -> Fault {
        Fault {
            delay: Some(FaultDelay {
                percent: delay_pct,
                fixed_delay: trellis_resources::duration::Duration::from_millis(7),
            }),
            abort: Some(FaultAbort {
                percent: abort_pct,
                http_status: Some(503),
                grpc_status: None,
            }),
        }
    }

    #[test]
    fn draws_follow_the_percent() {
        let f = fault(25.0, 0.5);
        let i = draw_with(&f, 0.2499, 0.0049);
        assert_eq!(i.delay, Some(Duration::from_millis(7)));
        assert_eq!(i.abort, Some(Abort::Http(503)));
        let i = draw_with(&f, 0.25, 0.005);
        assert_eq!(i, Injected::default());
        assert_eq!(draw_with(&fault(0.0, 0.0), 0.0, 0.0), Injected::default());
        let all = draw_with(&fault(100.0, 100.0), 0.999_999, 0.999_999);
        assert!(all.delay.is_some() && all.abort.is_some());
    }

    #[test]
    fn measured_share_is_close_to_the_percent() {
        let f = fault(10.0, 30.0);
        let n = 100_000;
        let (mut d, mut a) = (0, 0);
        for _ in 0..n {
            let i = draw(&f);
            d += usize::from(i.delay.is_some());
            a += usize::from(i.abort.is_some());
        }
        let pct = |x: usize| x as f64 * 100.0 / n as f64;
        assert!((pct(d) - 10.0).abs() < 0.6, "delay {}", pct(d));
        assert!((pct(a) - 30.0).abs() < 0.6, "abort {}", pct(a));
    }
}
