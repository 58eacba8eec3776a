//! Reconnect backoff with "full jitter" (AWS architecture blog, 2015): the
//! n-th consecutive failure waits a uniformly random time in
//! `[0, min(max, base * 2^n)]`. Randomizing the whole interval spreads a
//! thousand sidecars that lost the same control node over the window
//! instead of having them return in lockstep.
//!
//! Used by the connection manager ([`crate::control`]), the join loop and
//! certificate renewal ([`crate::identity`]). The RNG is a type parameter so
//! tests can seed it.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A connection that stayed up this long was healthy: the next failure
/// starts the backoff again from `base`.
pub const HEALTHY_CONNECTION: Duration = Duration::from_secs(5);

/// Exponentially growing, fully jittered delays.
#[derive(Debug)]
pub struct Backoff<R = StdRng> {
    base: Duration,
    max: Duration,
    failures: u32,
    rng: R,
}

impl Backoff<StdRng> {
    /// Backoff seeded from the OS.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff::with_rng(base, max, StdRng::from_os_rng())
    }
}

impl<R: Rng> Backoff<R> {
    /// Backoff drawing from `rng` (seed it for reproducible tests).
    pub fn with_rng(base: Duration, max: Duration, rng: R) -> Self {
        Backoff {
            base,
            max: max.max(base),
            failures: 0,
            rng,
        }
    }

    /// The cap for the current failure count: `min(max, base * 2^failures)`.
    pub fn cap(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// Records one more failure and returns how long to wait before the
    /// next attempt: uniform in `[0, cap]`.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap();
        self.failures = self.failures.saturating_add(1);
        let cap_ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(self.rng.random_range(0..=cap_ms))
    }

    /// Forget past failures (after a success).
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures recorded since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(seed: u64) -> Backoff<StdRng> {
        Backoff::with_rng(
            Duration::from_millis(50),
            Duration::from_millis(2_000),
            StdRng::seed_from_u64(seed),
        )
    }

    #[test]
    fn caps_double_up_to_max() {
        let mut b = seeded(1);
        let mut caps = Vec::new();
        for _ in 0..10 {
            caps.push(b.cap().as_millis());
            b.next_delay();
        }
        assert_eq!(caps, [50, 100, 200, 400, 800, 1600, 2000, 2000, 2000, 2000]);
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.cap(), Duration::from_millis(2_000), "no overflow");
        b.reset();
        assert_eq!(b.cap(), Duration::from_millis(50));
        assert_eq!(b.failures(), 0);
    }

    #[test]
    fn delays_stay_within_bounds_and_are_jittered() {
        let mut b = seeded(7);
        for _ in 0..1_000 {
            let cap = b.cap();
            let d = b.next_delay();
            assert!(d <= cap, "{d:?} > {cap:?}");
        }
        // At the max cap, 1,000 draws cover the whole window.
        let draws: Vec<Duration> = (0..1_000).map(|_| b.next_delay()).collect();
        let min = draws.iter().min().unwrap();
        let max = draws.iter().max().unwrap();
        assert!(*min < Duration::from_millis(200), "{min:?}");
        assert!(*max > Duration::from_millis(1_800), "{max:?}");
        let distinct: std::collections::BTreeSet<_> = draws.iter().collect();
        assert!(distinct.len() > 500, "jittered, not constant");
    }

    #[test]
    fn same_seed_same_delays() {
        let a: Vec<_> = {
            let mut b = seeded(42);
            (0..20).map(|_| b.next_delay()).collect()
        };
        let b: Vec<_> = {
            let mut b = seeded(42);
            (0..20).map(|_| b.next_delay()).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn max_below_base_is_raised_to_base() {
        let mut b = Backoff::with_rng(
            Duration::from_millis(100),
            Duration::from_millis(10),
            StdRng::seed_from_u64(3),
        );
        assert_eq!(b.cap(), Duration::from_millis(100));
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
