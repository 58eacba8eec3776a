//! Connections to the trellisd admin endpoints, with failover.
//!
//! Channels are opened lazily (on first use of an endpoint, bounded by
//! `Endpoint::connect_timeout` and the request deadline) and cached for the
//! rest of the run. [`Client::unary`] tries the endpoints in order and moves
//! on after a connect/transport error, `UNAVAILABLE` or `DEADLINE_EXCEEDED`;
//! every other status is final. [`Client::call_at`] talks to one address
//! (used to reach each member in turn).
//!
//! With `--ca-file` every channel is TLS (`https://`, see `tls.rs`);
//! transport failures are then looked at more closely so that a TLS /
//! plaintext mismatch or a rejected certificate says so
//! ([`Failure::Tls`]) instead of "transport error".

use std::collections::HashMap;
use std::error::Error as _;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::error::{exit, exit_code, CliError};
use crate::tls::{self, TlsFiles};

/// The URI for an endpoint given as `host:port`, `http://host:port` or
/// `https://host:port` (a bare `host:port` gets `http://`; for parsing).
pub fn endpoint_uri(addr: &str) -> String {
    let addr = addr.trim();
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// `host:port` of an endpoint, without a scheme or a trailing `/`.
pub fn hostport(addr: &str) -> &str {
    let addr = addr.trim();
    let addr = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    addr.trim_end_matches('/')
}

/// Why one attempt at one endpoint failed.
#[derive(Debug)]
pub enum Failure {
    /// Could not open a connection (refused, unresolvable, connect timeout).
    Connect(String),
    /// The call returned a gRPC status (possibly produced locally by tonic).
    Status(Status),
    /// TLS trouble: a TLS/plaintext mismatch or a rejected certificate,
    /// with the exit code (2: the flags do not match the server, 7: not
    /// authorized) and a message that says what to change.
    Tls { code: u8, message: String },
}

impl Failure {
    /// Whether trying another endpoint may help.
    pub fn retryable(&self) -> bool {
        match self {
            // Another node may be set up right; nothing reached the server.
            Failure::Connect(_) | Failure::Tls { .. } => true,
            Failure::Status(s) => match s.code() {
                Code::Unavailable | Code::DeadlineExceeded => true,
                // tonic reports a broken connection this way.
                Code::Unknown => s.message().starts_with("Service was not ready"),
                _ => false,
            },
        }
    }

    /// Whether a *write* may be sent again elsewhere: only if it provably
    /// did not take effect — the connection never opened, or the server
    /// said so (`x-trellis-retry-safe: true`, e.g. no leader, nothing
    /// proposed). A deadline or a broken connection mid-call leaves the
    /// outcome unknown, so the write is not repeated.
    pub fn write_resendable(&self) -> bool {
        match self {
            // A failed TLS session never carried a request to the service.
            Failure::Connect(_) | Failure::Tls { .. } => true,
            Failure::Status(s) => s
                .metadata()
                .get("x-trellis-retry-safe")
                .is_some_and(|v| v.as_bytes() == b"true"),
        }
    }

    /// The gRPC code, if the call got that far.
    pub fn code(&self) -> Option<Code> {
        match self {
            Failure::Connect(_) | Failure::Tls { .. } => None,
            Failure::Status(s) => Some(s.code()),
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Connect(_) => exit::UNAVAILABLE,
            Failure::Tls { code, .. } => *code,
            Failure::Status(_) if self.retryable() => exit::UNAVAILABLE,
            Failure::Status(s) => exit_code(s.code()),
        }
    }

    /// A one-line description: the gRPC message plus the causes tonic knows.
    pub fn message(&self) -> String {
        match self {
            Failure::Connect(m) | Failure::Tls { message: m, .. } => m.clone(),
            Failure::Status(s) => {
                let mut msg = s.message().to_string();
                append_sources(&mut msg, s.source());
                if msg.is_empty() {
                    msg = s.code().description().to_string();
                }
                msg
            }
        }
    }

    /// `<what>: <message> (endpoint <endpoint>)` with the right exit code.
    /// A message of several lines (one problem per line, e.g. invalid
    /// documents) is kept as is, below `<what> (endpoint <endpoint>):`.
    pub fn into_error(self, what: &str, endpoint: &str) -> CliError {
        let message = self.message();
        let text = if message.contains('\n') {
            format!("{what} (endpoint {endpoint}):\n{}", message.trim_end())
        } else {
            format!("{what}: {message} (endpoint {endpoint})")
        };
        CliError::new(self.exit_code(), text)
    }
}

/// Appends the distinct messages of an error's cause chain.
fn append_sources(msg: &mut String, mut source: Option<&(dyn std::error::Error + 'static)>) {
    while let Some(err) = source {
        let text = err.to_string();
        if !text.is_empty() && !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
        source = err.source();
    }
}

/// Formats a duration the way `--timeout` accepts it.
pub fn fmt_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.subsec_millis() * 1_000_000 == d.subsec_nanos() {
        format!("{}ms", d.as_millis())
    } else {
        format!("{d:?}")
    }
}

/// A successful answer and the endpoint that gave it.
pub struct Answer<T> {
    pub value: T,
    pub endpoint: String,
}

/// The admin endpoints of one run and their (lazily opened) channels.
pub struct Client {
    endpoints: Vec<String>,
    timeout: Duration,
    /// `Some`: every channel is TLS with these files (`--ca-file`, ...).
    tls: Option<TlsFiles>,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Client {
    pub fn new(endpoints: Vec<String>, timeout: Duration, tls: Option<TlsFiles>) -> Self {
        Self {
            endpoints,
            timeout,
            tls,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// The URI this client dials for `endpoint`: `https://` with TLS,
    /// `http://` without.
    pub fn uri(&self, endpoint: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", hostport(endpoint))
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the channels are TLS (`--ca-file`).
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Calls `call` on the endpoints in order until one answers or fails
    /// with a final status. `call` gets a channel and the request deadline
    /// (to put on the request with [`with_deadline`]).
    pub async fn unary<T, F, Fut>(&self, what: &str, call: F) -> Result<Answer<T>, CliError>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.unary_with(what, Failure::retryable, call).await
    }

    /// Like [`Client::unary`] for calls that change state: moves to the
    /// next endpoint only when the failure proves nothing was applied
    /// ([`Failure::write_resendable`]).
    pub async fn unary_write<T, F, Fut>(&self, what: &str, call: F) -> Result<Answer<T>, CliError>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.unary_with(what, Failure::write_resendable, call).await
    }

    async fn unary_with<T, F, Fut>(
        &self,
        what: &str,
        try_next: fn(&Failure) -> bool,
        mut call: F,
    ) -> Result<Answer<T>, CliError>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut last: Option<(Failure, &str)> = None;
        for endpoint in &self.endpoints {
            match self.call_at(endpoint, &mut call).await {
                Ok(value) => {
                    return Ok(Answer {
                        value,
                        endpoint: endpoint.clone(),
                    })
                }
                Err(f) if try_next(&f) => keep_telling(&mut last, f, endpoint),
                Err(f) => return Err(f.into_error(what, endpoint)),
            }
        }
        Err(self.all_failed(what, last))
    }

    /// The error after every endpoint failed (`last` is the final failure).
    pub fn all_failed(&self, what: &str, last: Option<(Failure, &str)>) -> CliError {
        match last {
            Some((failure, endpoint)) if self.endpoints.len() > 1 => failure.into_error(
                &format!(
                    "{what} (no endpoint answered, tried {})",
                    self.endpoints.len()
                ),
                endpoint,
            ),
            Some((failure, endpoint)) => failure.into_error(what, endpoint),
            None => CliError::new(exit::USAGE, format!("{what}: no endpoints given")),
        }
    }

    /// One attempt at one address: connect (or reuse the channel), then run
    /// `call` within the request deadline.
    pub async fn call_at<T, F, Fut>(&self, endpoint: &str, mut call: F) -> Result<T, Failure>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let (channel, fresh) = match self.channel(endpoint).await {
            Ok(opened) => opened,
            Err(f) => return Err(self.diagnose(f, endpoint).await),
        };
        match tokio::time::timeout(self.timeout, call(channel, self.timeout)).await {
            Err(_) => Err(Failure::Status(self.deadline_status())),
            // Only the first call on a new connection can fail because the
            // two ends disagree on TLS; later ones are a node going away.
            Ok(Err(status)) if fresh => {
                let failure = Failure::Status(self.normalize(status));
                Err(self.diagnose(failure, endpoint).await)
            }
            Ok(Err(status)) => Err(Failure::Status(self.normalize(status))),
            Ok(Ok(response)) => Ok(response.into_inner()),
        }
    }

    /// A closer look at a transport failure (TLS mismatch, rejected
    /// certificate; see `tls::diagnose`).
    async fn diagnose(&self, failure: Failure, endpoint: &str) -> Failure {
        let limit = self.timeout.min(PROBE_TIMEOUT);
        tls::diagnose(failure, hostport(endpoint), self.tls.is_some(), limit).await
    }

    fn deadline_status(&self) -> Status {
        Status::deadline_exceeded(format!(
            "no answer within {} (see --timeout)",
            fmt_duration(self.timeout)
        ))
    }

    /// tonic reports an expired `grpc-timeout` as CANCELLED "Timeout
    /// expired"; it is a deadline.
    fn normalize(&self, status: Status) -> Status {
        if status.code() == Code::Cancelled && status.message() == "Timeout expired" {
            self.deadline_status()
        } else {
            status
        }
    }

    /// The channel to `endpoint` and whether it was opened just now.
    async fn channel(&self, endpoint: &str) -> Result<(Channel, bool), Failure> {
        let uri = self.uri(endpoint);
        if let Some(channel) = self.lock().get(&uri) {
            return Ok((channel.clone(), false));
        }
        let mut ep = Endpoint::from_shared(uri.clone())
            .map_err(|e| Failure::Connect(format!("invalid endpoint address: {e}")))?
            .connect_timeout(self.timeout)
            .tcp_nodelay(true);
        if let Some(files) = &self.tls {
            ep = tls::configure(ep, files)?;
        }
        let channel = match tokio::time::timeout(self.timeout, ep.connect()).await {
            Err(_) => {
                return Err(Failure::Connect(format!(
                    "cannot connect within {}",
                    fmt_duration(self.timeout)
                )))
            }
            Ok(Err(e)) => {
                let mut msg = String::from("cannot connect");
                append_sources(&mut msg, e.source());
                return Err(Failure::Connect(msg));
            }
            Ok(Ok(channel)) => channel,
        };
        self.lock().insert(uri, channel.clone());
        Ok((channel, true))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        self.channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Longest probe of an address after a transport failure (`tls::probe`).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Remembers the failure to report after every endpoint failed: the latest
/// one, except that a TLS diagnosis (which says what to change) is not
/// replaced by a mere connection failure of another endpoint.
pub fn keep_telling<'a>(
    last: &mut Option<(Failure, &'a str)>,
    failure: Failure,
    endpoint: &'a str,
) {
    let keep =
        matches!(last, Some((Failure::Tls { .. }, _))) && matches!(failure, Failure::Connect(_));
    if !keep {
        *last = Some((failure, endpoint));
    }
}

/// Wraps a message in a request that carries the deadline (`grpc-timeout`).
pub fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_resent_only_when_nothing_was_applied() {
        assert!(Failure::Connect("refused".into()).write_resendable());
        assert!(!Failure::Status(Status::deadline_exceeded("late")).write_resendable());
        assert!(!Failure::Status(Status::unavailable("timeout")).write_resendable());
        let mut s = Status::unavailable("no leader");
        s.metadata_mut().insert(
            "x-trellis-retry-safe",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        assert!(Failure::Status(s).write_resendable());
    }

    #[test]
    fn retryable_failures() {
        assert!(Failure::Connect("refused".into()).retryable());
        assert!(Failure::Status(Status::unavailable("no leader")).retryable());
        assert!(Failure::Status(Status::deadline_exceeded("late")).retryable());
        assert!(
            Failure::Status(Status::unknown("Service was not ready: transport error")).retryable()
        );
        assert!(!Failure::Status(Status::unknown("boom")).retryable());
        assert!(!Failure::Status(Status::not_found("no key")).retryable());
        assert!(!Failure::Status(Status::failed_precondition("rev 7")).retryable());
        assert!(!Failure::Status(Status::internal("bug")).retryable());
    }

    #[test]
    fn tls_failures_are_kept_over_connect_failures() {
        let mut last = None;
        keep_telling(
            &mut last,
            Failure::Tls {
                code: exit::NOT_AUTHORIZED,
                message: "rejected".into(),
            },
            "a:1",
        );
        keep_telling(&mut last, Failure::Connect("refused".into()), "b:1");
        assert!(matches!(last, Some((Failure::Tls { code: 7, .. }, "a:1"))));
        keep_telling(&mut last, Failure::Status(Status::unavailable("x")), "c:1");
        assert!(matches!(last, Some((Failure::Status(_), "c:1"))));
    }

    #[test]
    fn failure_exit_codes() {
        assert_eq!(Failure::Connect("x".into()).exit_code(), 5);
        assert_eq!(Failure::Status(Status::not_found("x")).exit_code(), 3);
        assert_eq!(Failure::Status(Status::aborted("x")).exit_code(), 4);
        assert_eq!(
            Failure::Status(Status::invalid_argument("x")).exit_code(),
            2
        );
        assert_eq!(
            Failure::Status(Status::unknown("Service was not ready: x")).exit_code(),
            5
        );
        assert_eq!(Failure::Status(Status::unauthenticated("x")).exit_code(), 7);
        assert_eq!(
            Failure::Status(Status::permission_denied("x")).exit_code(),
            7
        );
    }

    #[test]
    fn error_line_format() {
        let e = Failure::Status(Status::not_found("key not found")).into_error("get \"a\"", "h:1");
        assert_eq!(e.code, 3);
        assert_eq!(
            e.message.as_deref(),
            Some("get \"a\": key not found (endpoint h:1)")
        );
        let e = Failure::Status(Status::invalid_argument(
            "a.yaml: x: bad\nb.yaml:3:1: y: worse",
        ))
        .into_error("apply", "h:1");
        assert_eq!(e.code, 2);
        assert_eq!(
            e.message.as_deref(),
            Some("apply (endpoint h:1):\na.yaml: x: bad\nb.yaml:3:1: y: worse")
        );
        let empty = Failure::Status(Status::new(Code::Unavailable, "")).message();
        assert!(!empty.is_empty());
    }

    #[test]
    fn uris_and_durations() {
        assert_eq!(endpoint_uri("a:1"), "http://a:1");
        assert_eq!(hostport("https://a:1/"), "a:1");
        assert_eq!(hostport(" http://a:1"), "a:1");
        assert_eq!(hostport("[::1]:1"), "[::1]:1");
        let plain = Client::new(vec![], Duration::from_secs(1), None);
        assert_eq!(plain.uri("http://a:1"), "http://a:1");
        let tls = Client::new(
            vec![],
            Duration::from_secs(1),
            Some(TlsFiles {
                ca_pem: String::new(),
                identity: None,
            }),
        );
        assert_eq!(tls.uri("a:1"), "https://a:1");
        assert_eq!(endpoint_uri("http://a:1"), "http://a:1");
        assert_eq!(fmt_duration(Duration::from_secs(5)), "5s");
        assert_eq!(fmt_duration(Duration::from_millis(500)), "500ms");
    }
}
