//! The JSON access log: one line per request or TCP connection, written by
//! a background task in batches, never on the request path. The request
//! path only moves an [`Entry`] into a bounded channel (`try_send`); when
//! the writer falls behind, lines are dropped and counted
//! (`trellis_access_log_dropped_total`) rather than slowing traffic.
//!
//! Off unless `access_log` is set (a file path, or `-` for stdout), as in
//! Istio, because a log line per request is the largest cost a busy proxy
//! can add to itself.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::metrics::Metrics;

/// Lines buffered between the request path and the writer: about a second
/// of a busy sidecar's traffic, a few MB at most.
pub const CHANNEL_CAPACITY: usize = 16_384;
/// Lines written per batch (one `write` + flush per batch).
pub const BATCH_LINES: usize = 512;

/// One access-log line.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Start time, RFC 3339 UTC with microseconds.
    pub start_time: String,
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// `HTTP/1.1`, `HTTP/2` or `TCP`.
    pub protocol: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// HTTP status (0 for TCP).
    pub code: u16,
    /// Arrival to response headers (HTTP) or connection lifetime (TCP).
    pub duration_us: u64,
    /// `namespace/service` of the caller.
    pub source: String,
    /// `namespace/service/subset` (outbound) or `namespace/service`.
    pub destination: String,
    /// The Route rule's name, `-` if none.
    pub route: String,
    /// The endpoint that answered (peer sidecar or local app).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Retries sent.
    #[serde(skip_serializing_if = "is_zero")]
    pub retries: u32,
    /// Resilience events of the request: an injected delay, a backup that
    /// answered, outlier ejections it caused and returns it noticed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resilience: Vec<String>,
    /// The `x-trellis-error` of a synthetic response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
    /// TCP bytes to / from the far side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
}

/// What an HTTP request's line says about the request and where it went;
/// [`HttpLine::finish`] adds what the answer says.
#[derive(Debug)]
pub struct HttpLine {
    pub start_time: String,
    pub direction: &'static str,
    pub protocol: &'static str,
    pub method: String,
    pub authority: Option<String>,
    pub path: String,
    pub source: String,
    pub destination: String,
    pub route: String,
    pub upstream: Option<String>,
    pub retries: u32,
    pub notes: Vec<String>,
}

impl HttpLine {
    /// The line for an answer with `code` and `headers` after `elapsed`,
    /// in the trace `span`; a synthetic answer's `x-trellis-error` is the
    /// line's error.
    pub fn finish(
        self,
        code: u16,
        headers: &hyper::HeaderMap,
        elapsed: std::time::Duration,
        span: &super::trace::Span,
    ) -> Entry {
        Entry {
            start_time: self.start_time,
            direction: self.direction,
            protocol: self.protocol,
            method: Some(self.method),
            authority: self.authority,
            path: Some(self.path),
            code,
            duration_us: elapsed.as_micros() as u64,
            source: self.source,
            destination: self.destination,
            route: self.route,
            upstream: self.upstream,
            retries: self.retries,
            resilience: self.notes,
            error: headers
                .get(super::error::ERROR_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            trace_id: Some(span.trace_hex()),
            span_id: Some(span.span_hex()),
            parent_span_id: span.parent_hex(),
            bytes_sent: None,
            bytes_received: None,
        }
    }
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    File(PathBuf),
}

impl Sink {
    /// `-` is stdout, anything else a file path (appended to).
    pub fn parse(s: &str) -> Sink {
        if s == "-" {
            Sink::Stdout
        } else {
            Sink::File(PathBuf::from(s))
        }
    }
}

/// The request path's handle. Disabled: every call is a no-op.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<Entry>>,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    /// A log that writes nothing.
    pub fn disabled(metrics: Arc<Metrics>) -> AccessLog {
        AccessLog { tx: None, metrics }
    }

    /// True if lines are written (callers skip building entries if not).
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues `entry`; drops (and counts) it if the writer is behind.
    pub fn log(&self, entry: Entry) {
        if let Some(tx) = &self.tx {
            if tx.try_send(entry).is_err() {
                self.metrics.access_log_dropped();
            }
        }
    }

    /// Opens `sink` and starts the writer task; it ends once every handle
    /// is dropped and the queue is written out.
    pub async fn start(sink: Sink, metrics: Arc<Metrics>) -> std::io::Result<AccessLog> {
        let out: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = match &sink {
            Sink::Stdout => Box::new(tokio::io::stdout()),
            Sink::File(p) => Box::new(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .await?,
            ),
        };
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        tokio::spawn(writer(rx, out, sink));
        Ok(AccessLog {
            tx: Some(tx),
            metrics,
        })
    }
}

async fn writer(
    mut rx: mpsc::Receiver<Entry>,
    mut out: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    sink: Sink,
) {
    let mut batch = Vec::with_capacity(BATCH_LINES);
    let mut buf = Vec::new();
    while rx.recv_many(&mut batch, BATCH_LINES).await > 0 {
        buf.clear();
        for e in batch.drain(..) {
            if serde_json::to_writer(&mut buf, &e).is_ok() {
                buf.push(b'\n');
            }
        }
        let r = async {
            out.write_all(&buf).await?;
            out.flush().await
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(sink = ?sink, error = %e, "access log write failed; lines lost");
        }
    }
}

/// Now as RFC 3339 UTC with microseconds (`2026-11-26T09:30:00.123456Z`).
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(code: u16) -> Entry {
        Entry {
            start_time: now_rfc3339(),
            direction: "outbound",
            protocol: "HTTP/1.1",
            method: Some("GET".into()),
            authority: Some("reviews".into()),
            path: Some("/r".into()),
            code,
            duration_us: 120,
            source: "default/productpage".into(),
            destination: "default/reviews/v1".into(),
            route: "split".into(),
            upstream: Some("127.0.0.1:1".into()),
            retries: 0,
            resilience: vec!["ejected 127.0.0.1:2 for 30000 ms (ejection 1)".into()],
            error: None,
            trace_id: None,
            span_id: None,
            parent_span_id: None,
            bytes_sent: None,
            bytes_received: None,
        }
    }

    #[tokio::test]
    async fn lines_reach_the_file_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let metrics = Arc::new(Metrics::default());
        let log = AccessLog::start(Sink::File(path.clone()), Arc::clone(&metrics))
            .await
            .unwrap();
        for code in [200, 503] {
            log.log(entry(code));
        }
        drop(log);
        // The writer drains and ends when the last handle is gone; wait
        // for the file to hold both lines.
        let text = loop {
            let t = tokio::fs::read_to_string(&path).await.unwrap_or_default();
            if t.lines().count() == 2 {
                break t;
            }
            tokio::task::yield_now().await;
        };
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["code"], 200);
        assert_eq!(lines[1]["code"], 503);
        assert_eq!(lines[0]["destination"], "default/reviews/v1");
        assert_eq!(
            lines[0]["resilience"][0],
            "ejected 127.0.0.1:2 for 30000 ms (ejection 1)"
        );
        assert!(lines[0].get("retries").is_none());
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 27, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T");
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let metrics = Arc::new(Metrics::default());
        let (tx, _rx) = mpsc::channel(1);
        let log = AccessLog {
            tx: Some(tx),
            metrics: Arc::clone(&metrics),
        };
        log.log(entry(200));
        log.log(entry(200));
        assert!(metrics
            .render(0)
            .contains("trellis_access_log_dropped_total 1\n"));
    }
}
