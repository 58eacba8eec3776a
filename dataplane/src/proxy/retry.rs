//! Retries (step 7a of the request path, around the upstream call): a rule's
//! `retries` policy re-sends a failed try to a freshly balanced endpoint.
//!
//! * **What is retried**: the try's outcome is classified ([`Outcome`]) and
//!   matched against the rule's `retryOn` ([`should_retry`]), Envoy's
//!   vocabulary: `5xx` (any 5xx, or no response: connect failure, reset,
//!   per-try timeout), `gateway-error` (502/503/504, or no response),
//!   `connect-failure`, `reset`, `retriable-4xx` (409), `refused-stream`,
//!   and the gRPC statuses `unavailable`/`cancelled`/`deadline-exceeded`/
//!   `resource-exhausted` (from a trailers-only `grpc-status`).
//! * **Which requests**: only those that can be replayed ([`replay_plan`]):
//!   an idempotent method without a body, or any method whose body has a
//!   known length of at most [`MAX_BUFFERED_BODY`] (buffered before the
//!   first try). Larger or streaming bodies are sent once.
//! * **Deadlines**: each try gets the policy's `perTryTimeout`, bounded by
//!   what is left of the rule's overall `timeout`.
//! * **Budget**: per destination service, retries may be at most `percent`
//!   of the requests of the last [`BUDGET_WINDOW`] plus `minPerSecond` ×
//!   the window ([`RetryBudgets`]); without budget the last failure is
//!   returned as is, so an outage is not multiplied into a retry storm.
//!
//! The final failure still becomes a response in [`super::error`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use hyper::{HeaderMap, Method};
use trellis_resources::policy::{
    RetryBudget, DEFAULT_RETRY_BUDGET_MIN_PER_SECOND, DEFAULT_RETRY_BUDGET_PERCENT,
};
use trellis_resources::route::RetryOn;

/// Largest request body buffered so the request can be retried: 64 KiB.
/// Typical API payloads fit; uploads stream through once, unbuffered.
pub const MAX_BUFFERED_BODY: u64 = 64 * 1024;

/// The header on a response that needed retries: how many.
pub const RETRIES_HEADER: &str = "x-trellis-retries";

/// Budget window: requests and retries of the last 10 s count.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// One-second buckets in the window.
const BUCKETS: usize = BUDGET_WINDOW.as_secs() as usize;

/// Why reading the caller's request body (to buffer it) failed.
#[derive(Debug, thiserror::Error)]
#[error("reading the request body failed: {0}")]
pub struct BufferError(pub String);

impl From<BufferError> for super::ProxyError {
    fn from(e: BufferError) -> Self {
        super::ProxyError::RequestBody { reason: e.0 }
    }
}

/// Reads the whole body (its length was checked by [`replay_plan`]), at
/// most [`MAX_BUFFERED_BODY`] bytes.
pub async fn buffer<B>(body: B) -> Result<Bytes, BufferError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let limited = http_body_util::Limited::new(body, MAX_BUFFERED_BODY as usize);
    http_body_util::BodyExt::collect(limited)
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| BufferError(e.to_string()))
}

/// How the request body is handled.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplayPlan {
    /// Buffer it (at most [`MAX_BUFFERED_BODY`]); the request may be retried.
    Buffer,
    /// Stream it through once; the request is never retried.
    Once,
}

/// True for the methods RFC 9110 calls idempotent.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Can the request be replayed? `end_stream`: the body is known empty;
/// `len`: its exact length when known (`Content-Length`).
pub fn replay_plan(method: &Method, end_stream: bool, len: Option<u64>) -> ReplayPlan {
    match (end_stream, len) {
        // Nothing to replay: an idempotent method is safe as is.
        (true, _) if is_idempotent(method) => ReplayPlan::Buffer,
        // Any other method whose (empty or small) body is held in full.
        (true, _) => ReplayPlan::Buffer,
        (false, Some(n)) if n <= MAX_BUFFERED_BODY => ReplayPlan::Buffer,
        // A streaming body of unknown length (chunked): idempotent or not,
        // its bytes cannot be sent twice without holding all of them.
        _ => ReplayPlan::Once,
    }
}

/// What one try came back with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status (and trailers-only `grpc-status`).
    Response { status: u16, grpc: Option<u32> },
    /// No connection could be made.
    ConnectFailure,
    /// The stream or connection broke; `refused`: HTTP/2 REFUSED_STREAM.
    Reset { refused: bool },
    /// The per-try deadline passed.
    Timeout,
}

impl Outcome {
    /// The outcome of a response with these status and headers.
    pub fn of_response(status: u16, headers: &HeaderMap) -> Outcome {
        let grpc = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Outcome::Response { status, grpc }
    }
}

/// Does `outcome` match one of `retry_on`?
pub fn should_retry(retry_on: &[RetryOn], outcome: Outcome) -> bool {
    retry_on.iter().any(|c| matches_condition(*c, outcome))
}

fn matches_condition(c: RetryOn, o: Outcome) -> bool {
    let grpc = |code: u32| matches!(o, Outcome::Response { grpc: Some(g), .. } if g == code);
    match c {
        RetryOn::Status5xx => match o {
            Outcome::Response { status, .. } => status >= 500,
            _ => true,
        },
        RetryOn::GatewayError => match o {
            Outcome::Response { status, .. } => matches!(status, 502..=504),
            _ => true,
        },
        RetryOn::ConnectFailure => o == Outcome::ConnectFailure,
        RetryOn::Reset => matches!(o, Outcome::Reset { .. }),
        RetryOn::Retriable4xx => matches!(o, Outcome::Response { status: 409, .. }),
        RetryOn::RefusedStream => o == Outcome::Reset { refused: true },
        RetryOn::Cancelled => grpc(1),
        RetryOn::DeadlineExceeded => grpc(4),
        RetryOn::ResourceExhausted => grpc(8),
        RetryOn::Unavailable => grpc(14),
    }
}

/// The budget of one destination: requests and retries per one-second
/// bucket over the window, behind one small mutex.
#[derive(Debug, Default)]
pub struct Budget {
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// Per bucket: (second it belongs to, requests, retries).
    buckets: [(u64, u64, u64); BUCKETS],
}

impl Window {
    fn bucket(&mut self, sec: u64) -> &mut (u64, u64, u64) {
        let b = &mut self.buckets[(sec % BUCKETS as u64) as usize];
        if b.0 != sec {
            *b = (sec, 0, 0);
        }
        b
    }

    fn totals(&self, sec: u64) -> (u64, u64) {
        self.buckets
            .iter()
            .filter(|b| b.0 + (BUCKETS as u64) > sec && b.0 <= sec)
            .fold((0, 0), |(r, t), b| (r + b.1, t + b.2))
    }
}

impl Budget {
    /// Counts one request at second `sec`.
    pub fn deposit(&self, sec: u64) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        w.bucket(sec).1 += 1;
    }

    /// Takes one retry at second `sec` if the budget allows it: retries in
    /// the window < `percent` % of its requests + `min_per_second` × window.
    pub fn withdraw(&self, sec: u64, percent: f64, min_per_second: u32) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let (requests, retries) = w.totals(sec);
        let allowed = (requests as f64 * percent / 100.0).floor() as u64
            + u64::from(min_per_second) * BUCKETS as u64;
        if retries >= allowed {
            return false;
        }
        w.bucket(sec).2 += 1;
        true
    }
}

/// Budgets of all destinations (`namespace/service`), created on first use.
#[derive(Debug)]
pub struct RetryBudgets {
    start: Instant,
    budgets: RwLock<HashMap<String, Arc<Budget>>>,
}

impl Default for RetryBudgets {
    fn default() -> Self {
        RetryBudgets {
            start: Instant::now(),
            budgets: RwLock::new(HashMap::new()),
        }
    }
}

impl RetryBudgets {
    fn now(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    fn budget(&self, destination: &str) -> Arc<Budget> {
        super::keyed::shared(&self.budgets, destination)
    }

    /// Counts a request to `destination`.
    pub fn deposit(&self, destination: &str) {
        self.budget(destination).deposit(self.now());
    }

    /// Takes one retry to `destination` under `policy` (the
    /// DestinationPolicy's, or the defaults) if the budget allows it.
    pub fn withdraw(&self, destination: &str, policy: Option<&RetryBudget>) -> bool {
        let (percent, min) = policy.map_or(
            (
                DEFAULT_RETRY_BUDGET_PERCENT,
                DEFAULT_RETRY_BUDGET_MIN_PER_SECOND,
            ),
            |p| (p.percent, p.min_per_second),
        );
        self.budget(destination).withdraw(self.now(), percent, min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_percent_floor_and_window() {
        let b = Budget::default();
        for _ in 0..100 {
            b.deposit(0);
        }
        // 20 % of 100 + floor 1/s × 10 s = 30.
        let granted = (0..100).filter(|_| b.withdraw(0, 20.0, 1)).count();
        assert_eq!(granted, 30);
        // Still inside the window at second 9: nothing new.
        assert!(!b.withdraw(9, 20.0, 1));
        // Second 10: second 0 left the window; only the floor remains.
        let granted = (0..100).filter(|_| b.withdraw(10, 20.0, 1)).count();
        assert_eq!(granted, 10);
        // No floor, no requests: no retries.
        let b = Budget::default();
        assert!(!b.withdraw(0, 50.0, 0));
        b.deposit(0);
        b.deposit(0);
        assert!(b.withdraw(0, 50.0, 0));
        assert!(!b.withdraw(0, 50.0, 0));
    }

    #[test]
    fn budgets_use_policy_or_defaults() {
        let bs = RetryBudgets::default();
        let n = (0..1000).filter(|_| bs.withdraw("ns/a", None)).count();
        assert_eq!(
            n as u32,
            DEFAULT_RETRY_BUDGET_MIN_PER_SECOND * BUCKETS as u32
        );
        let p = RetryBudget {
            percent: 10.0,
            min_per_second: 0,
        };
        for _ in 0..50 {
            bs.deposit("ns/b");
        }
        let n = (0..1000).filter(|_| bs.withdraw("ns/b", Some(&p))).count();
        assert_eq!(n, 5);
    }

    #[test]
    fn replay_decision() {
        assert_eq!(replay_plan(&Method::GET, true, Some(0)), ReplayPlan::Buffer);
        assert_eq!(replay_plan(&Method::POST, true, None), ReplayPlan::Buffer);
        assert_eq!(
            replay_plan(&Method::POST, false, Some(100)),
            ReplayPlan::Buffer
        );
        assert_eq!(
            replay_plan(&Method::PUT, false, Some(MAX_BUFFERED_BODY)),
            ReplayPlan::Buffer
        );
        assert_eq!(
            replay_plan(&Method::PUT, false, Some(MAX_BUFFERED_BODY + 1)),
            ReplayPlan::Once
        );
        assert_eq!(replay_plan(&Method::POST, false, None), ReplayPlan::Once);
        assert_eq!(replay_plan(&Method::GET, false, None), ReplayPlan::Once);
        assert!(is_idempotent(&Method::DELETE));
        assert!(!is_idempotent(&Method::POST));
        assert!(!is_idempotent(&Method::PATCH));
    }

    #[test]
    fn retry_on_classification() {
        let st = |status| Outcome::Response { status, grpc: None };
        let all = [
            Outcome::ConnectFailure,
            Outcome::Reset { refused: false },
            Outcome::Timeout,
        ];
        assert!(should_retry(&[RetryOn::Status5xx], st(500)));
        assert!(!should_retry(&[RetryOn::Status5xx], st(409)));
        assert!(all.iter().all(|o| should_retry(&[RetryOn::Status5xx], *o)));
        assert!(should_retry(&[RetryOn::GatewayError], st(503)));
        assert!(!should_retry(&[RetryOn::GatewayError], st(500)));
        assert!(should_retry(&[RetryOn::Retriable4xx], st(409)));
        assert!(!should_retry(&[RetryOn::Retriable4xx], st(404)));
        assert!(should_retry(
            &[RetryOn::ConnectFailure],
            Outcome::ConnectFailure
        ));
        assert!(!should_retry(&[RetryOn::ConnectFailure], st(503)));
        assert!(should_retry(
            &[RetryOn::Reset],
            Outcome::Reset { refused: false }
        ));
        assert!(!should_retry(
            &[RetryOn::RefusedStream],
            Outcome::Reset { refused: false }
        ));
        assert!(should_retry(
            &[RetryOn::RefusedStream],
            Outcome::Reset { refused: true }
        ));
        let mut h = HeaderMap::new();
        h.insert("grpc-status", "14".parse().unwrap());
        let o = Outcome::of_response(200, &h);
        assert!(should_retry(&[RetryOn::Unavailable], o));
        assert!(!should_retry(&[RetryOn::Cancelled, RetryOn::Status5xx], o));
        assert!(!should_retry(&[], st(503)));
    }
}
