//! Backup (hedged) requests (the DestinationPolicy's `backupRequest`, part
//! of step 7 of the path in [`crate::proxy`]), as in motan-go's
//! BackupRequest HA strategy and "The Tail at Scale".
//!
//! [`Latencies`] keeps, per destination service, a histogram of how long
//! its answers took (try start to response headers), halved every
//! [`DECAY_EVERY`] samples so it follows the service's current behaviour.
//! [`Latencies::hedge_delay`] is the policy's `afterPercentile` of it, but
//! never under `minDelay`, and nothing until [`MIN_SAMPLES`] answers were
//! seen. [`race`] sends the try; if it has not answered after that delay,
//! and the destination's backup budget allows (`maxPercent` of its
//! requests, the same sliding window as the retry budget,
//! [`super::retry::RetryBudgets`]), it sends one copy to another endpoint
//! and takes the first good answer (below 500); the other is cancelled
//! (its HTTP/2 stream reset).
//!
//! Only requests that can be sent twice are hedged: GET, HEAD and OPTIONS
//! without a body.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Answers seen before a destination is hedged: the percentile of fewer is
/// a guess.
pub const MIN_SAMPLES: u64 = 100;

/// Samples after which the histogram is halved: about the last few
/// thousand answers weigh in, so a change in the service's latency shows
/// within seconds at a few hundred requests per second.
pub const DECAY_EVERY: u64 = 2_000;

/// Histogram buckets: 4 per doubling from 16 µs, 96 buckets, up to about
/// 16 µs × 2^24 ≈ 4.5 min. A bucket's upper bound is within 19 % of any
/// value in it.
const SUB: u32 = 4;
const BUCKETS: usize = 96;
const FIRST_US: f64 = 16.0;

fn bucket_of(us: u64) -> usize {
    if (us as f64) <= FIRST_US {
        return 0;
    }
    let i = ((us as f64 / FIRST_US).log2() * f64::from(SUB)).ceil() as usize;
    i.min(BUCKETS - 1)
}

fn upper_us(i: usize) -> f64 {
    FIRST_US * 2f64.powf(i as f64 / f64::from(SUB))
}

/// One destination's latency histogram.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU32; BUCKETS],
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU32::new(0)),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Adds one answer's latency.
    pub fn record(&self, d: Duration) {
        self.buckets[bucket_of(d.as_micros() as u64)].fetch_add(1, Ordering::Relaxed);
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(DECAY_EVERY) {
            // Racy by design: a sample added meanwhile may be halved or not.
            for b in &self.buckets {
                let v = b.load(Ordering::Relaxed);
                b.store(v / 2, Ordering::Relaxed);
            }
        }
    }

    /// Samples ever recorded.
    pub fn samples(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The `p`th percentile (0..100), as its bucket's upper bound.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let counts: [u64; BUCKETS] =
            std::array::from_fn(|i| u64::from(self.buckets[i].load(Ordering::Relaxed)));
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_micros(upper_us(i) as u64));
            }
        }
        Some(Duration::from_micros(upper_us(BUCKETS - 1) as u64))
    }
}

/// Latency histograms of every destination (`namespace/service`) with a
/// backup policy, created on first use.
#[derive(Debug, Default)]
pub struct Latencies {
    map: RwLock<HashMap<String, Arc<Histogram>>>,
}

impl Latencies {
    /// The histogram of `destination`.
    pub fn of(&self, destination: &str) -> Arc<Histogram> {
        super::keyed::shared(&self.map, destination)
    }

    /// How long a try to `destination` runs before its backup: the
    /// `percentile` of its latency, at least `min_delay`; `None` until
    /// [`MIN_SAMPLES`] answers were seen.
    pub fn hedge_delay(
        &self,
        destination: &str,
        percentile: f64,
        min_delay: Duration,
    ) -> Option<Duration> {
        let h = self.of(destination);
        if h.samples() < MIN_SAMPLES {
            return None;
        }
        h.percentile(percentile).map(|d| d.max(min_delay))
    }
}

/// Whether a request with this method may be sent twice (with no body):
/// GET, HEAD and OPTIONS, the methods the policy's doc promises.
pub fn may_hedge(method: &hyper::Method) -> bool {
    matches!(
        *method,
        hyper::Method::GET | hyper::Method::HEAD | hyper::Method::OPTIONS
    )
}

/// How [`race`] ended.
#[derive(Debug)]
pub struct Raced<T> {
    /// The answer taken.
    pub answer: T,
    /// A backup was sent.
    pub sent_backup: bool,
    /// The answer is the backup's.
    pub backup_won: bool,
}

/// Runs `primary`; if it is still running after `after`, starts the backup
/// `start_backup` gives (if any) and takes the first answer that is
/// `good`. When the backup finishes first and is not good, the primary is
/// awaited (the request's own deadline bounds it). When the primary
/// finishes first and is not good, the backup gets `after` more to do
/// better — a stalled backup must not turn a fast error into a timeout —
/// and otherwise the primary's answer stands.
pub async fn race<T, P, B>(
    primary: P,
    after: Duration,
    start_backup: impl FnOnce() -> Option<B>,
    good: impl Fn(&T) -> bool,
) -> Raced<T>
where
    P: Future<Output = T>,
    B: Future<Output = T>,
{
    tokio::pin!(primary);
    tokio::select! {
        a = &mut primary => return Raced { answer: a, sent_backup: false, backup_won: false },
        _ = tokio::time::sleep(after) => {}
    }
    let Some(backup) = start_backup() else {
        return Raced {
            answer: primary.await,
            sent_backup: false,
            backup_won: false,
        };
    };
    tokio::pin!(backup);
    tokio::select! {
        a = &mut primary => {
            if good(&a) {
                return Raced { answer: a, sent_backup: true, backup_won: false };
            }
            match tokio::time::timeout(after, backup).await {
                Ok(b) if good(&b) => Raced { answer: b, sent_backup: true, backup_won: true },
                _ => Raced { answer: a, sent_backup: true, backup_won: false },
            }
        }
        b = &mut backup => {
            if good(&b) {
                return Raced { answer: b, sent_backup: true, backup_won: true };
            }
            Raced { answer: primary.await, sent_backup: true, backup_won: false }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_within_a_bucket() {
        let h = Histogram::default();
        for i in 1..=1000u64 {
            h.record(Duration::from_micros(i * 100));
        }
        let p90 = h.percentile(90.0).unwrap().as_micros() as f64;
        assert!((90_000.0..=90_000.0 * 1.19).contains(&p90), "p90 {p90}");
        let p50 = h.percentile(50.0).unwrap().as_micros() as f64;
        assert!((50_000.0..=50_000.0 * 1.19).contains(&p50), "p50 {p50}");
        assert_eq!(Histogram::default().percentile(90.0), None);
    }

    #[test]
    fn hedge_delay_needs_samples_and_has_a_floor() {
        let l = Latencies::default();
        let floor = Duration::from_millis(10);
        for _ in 0..MIN_SAMPLES - 1 {
            l.of("d").record(Duration::from_micros(500));
        }
        assert_eq!(l.hedge_delay("d", 90.0, floor), None);
        l.of("d").record(Duration::from_micros(500));
        assert_eq!(l.hedge_delay("d", 90.0, floor), Some(floor));
        for _ in 0..1000 {
            l.of("d").record(Duration::from_millis(40));
        }
        let d = l.hedge_delay("d", 90.0, floor).unwrap();
        assert!(
            d >= Duration::from_millis(40) && d < Duration::from_millis(48),
            "{d:?}"
        );
    }

    #[test]
    fn decay_follows_a_change() {
        let h = Histogram::default();
        for _ in 0..DECAY_EVERY * 2 {
            h.record(Duration::from_millis(100));
        }
        for _ in 0..DECAY_EVERY * 3 {
            h.record(Duration::from_millis(1));
        }
        let p90 = h.percentile(90.0).unwrap();
        assert!(p90 < Duration::from_millis(2), "{p90:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn race_takes_the_first_good_answer() {
        let ms = Duration::from_millis;
        let slow = async {
            tokio::time::sleep(ms(100)).await;
            200u16
        };
        let r = race(
            slow,
            ms(10),
            || {
                Some(async {
                    tokio::time::sleep(ms(5)).await;
                    201u16
                })
            },
            |s| *s < 500,
        )
        .await;
        assert!(r.sent_backup && r.backup_won && r.answer == 201);
        // Fast primary: no backup.
        let r = race(
            async { 200u16 },
            ms(10),
            || Some(async { 201u16 }),
            |s| *s < 500,
        )
        .await;
        assert!(!r.sent_backup && r.answer == 200);
        // A failing backup does not beat a slow good primary.
        let slow = async {
            tokio::time::sleep(ms(50)).await;
            200u16
        };
        let r = race(slow, ms(10), || Some(async { 503u16 }), |s| *s < 500).await;
        assert!(r.sent_backup && !r.backup_won && r.answer == 200);
        // No budget: the primary alone.
        let slow = async {
            tokio::time::sleep(ms(50)).await;
            200u16
        };
        let r = race(
            slow,
            ms(10),
            || None::<std::future::Ready<u16>>,
            |s| *s < 500,
        )
        .await;
        assert!(!r.sent_backup && r.answer == 200);
        // A failing primary does not wait long for a stalled backup.
        let failing = async {
            tokio::time::sleep(ms(20)).await;
            503u16
        };
        let t = tokio::time::Instant::now();
        let r = race(
            failing,
            ms(10),
            || Some(std::future::pending::<u16>()),
            |s| *s < 500,
        )
        .await;
        assert!(r.sent_backup && !r.backup_won && r.answer == 503);
        assert_eq!(t.elapsed(), ms(30));
    }
}
