//! Prometheus metrics of the data path (`GET /metrics` on the admin
//! endpoint):
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `trellis_requests_total` | counter | direction, source, destination, route, code |
//! | `trellis_request_duration_seconds` | histogram | direction, source, destination, route, code |
//! | `trellis_retries_total` | counter | destination |
//! | `trellis_tcp_connections_total` | counter | direction, source, destination |
//! | `trellis_tcp_open_connections` | gauge | direction, source, destination |
//! | `trellis_tcp_sent_bytes_total`, `trellis_tcp_received_bytes_total` | counter | direction, source, destination |
//! | `trellis_faults_injected_total` | counter | destination, kind (`delay`, `abort`) |
//! | `trellis_circuit_open_total` | counter | destination, limit |
//! | `trellis_backup_requests_total`, `trellis_backup_wins_total` | counter | destination |
//! | `trellis_outlier_ejections_total`, `trellis_outlier_returns_total` | counter | destination |
//! | `trellis_access_log_dropped_total` | counter | |
//! | `trellis_config_revision` | gauge | |
//!
//! `source` and `destination` are `namespace/service` (plus `/subset` for
//! an outbound destination); `route` is the Route rule's name (`-` when the
//! rule has none or no Route applied). Request duration runs from the
//! request's arrival to its response headers.
//!
//! A series is a set of atomics found under a read lock (uncontended: a hash
//! and a few atomic adds per request); the write lock is taken only the
//! first time a label set appears.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::keyed::shared;

/// Which listener traffic came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// From the local application to another service.
    Outbound,
    /// From a peer sidecar to the local application.
    Inbound,
}

impl Direction {
    /// `outbound` or `inbound`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Upper bounds (seconds) of the latency histogram buckets: 100 µs (a
/// loopback hop) to 10 s (near the default 15 s route timeout), about
/// 2.5× apart.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// The labels of one request series.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestLabels {
    pub direction: Direction,
    pub source: String,
    pub destination: String,
    pub route: String,
    pub code: u16,
}

/// The labels of one TCP series.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpLabels {
    pub direction: Direction,
    pub source: String,
    pub destination: String,
}

#[derive(Debug, Default)]
struct RequestSeries {
    count: AtomicU64,
    /// Cumulative at render time; here each bucket counts its own range
    /// (the last one is +Inf).
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

/// One TCP series; shared with the connections it counts.
#[derive(Debug, Default)]
pub struct TcpSeries {
    opened: AtomicU64,
    open: AtomicI64,
    sent: AtomicU64,
    received: AtomicU64,
}

impl TcpSeries {
    /// Counts bytes sent to / received from the far side.
    pub fn bytes(&self, sent: u64, received: u64) {
        self.sent.fetch_add(sent, Ordering::Relaxed);
        self.received.fetch_add(received, Ordering::Relaxed);
    }
}

/// An open connection of a [`TcpSeries`]; closing is counted on drop.
#[derive(Debug)]
pub struct TcpConnGuard(Arc<TcpSeries>);

impl TcpConnGuard {
    /// The series, for byte counts.
    pub fn series(&self) -> &TcpSeries {
        &self.0
    }
}

impl Drop for TcpConnGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A resilience event, counted per destination service (`ns/service`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Event {
    /// Fault injection delayed a request.
    FaultDelay,
    /// Fault injection aborted a request.
    FaultAbort,
    /// A circuit-breaker limit (its policy field name) refused a request.
    CircuitOpen(&'static str),
    /// A backup request was sent.
    BackupSent,
    /// A backup request's answer was taken.
    BackupWon,
    /// Outlier detection ejected an endpoint.
    OutlierEjection,
    /// An ejected endpoint came back.
    OutlierReturn,
}

impl Event {
    /// (metric name, help, extra label name and value).
    fn describe(
        self,
    ) -> (
        &'static str,
        &'static str,
        Option<(&'static str, &'static str)>,
    ) {
        match self {
            Event::FaultDelay => (
                "trellis_faults_injected_total",
                "Requests delayed or aborted by a Route's fault injection.",
                Some(("kind", "delay")),
            ),
            Event::FaultAbort => (
                "trellis_faults_injected_total",
                "Requests delayed or aborted by a Route's fault injection.",
                Some(("kind", "abort")),
            ),
            Event::CircuitOpen(limit) => (
                "trellis_circuit_open_total",
                "Requests refused because a connectionPool limit was full.",
                Some(("limit", limit)),
            ),
            Event::BackupSent => (
                "trellis_backup_requests_total",
                "Backup (hedged) requests sent.",
                None,
            ),
            Event::BackupWon => (
                "trellis_backup_wins_total",
                "Backup requests whose answer was taken.",
                None,
            ),
            Event::OutlierEjection => (
                "trellis_outlier_ejections_total",
                "Endpoints ejected by outlier detection.",
                None,
            ),
            Event::OutlierReturn => (
                "trellis_outlier_returns_total",
                "Ejected endpoints returned to their pool.",
                None,
            ),
        }
    }
}

/// All series of one sidecar.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: RwLock<HashMap<RequestLabels, Arc<RequestSeries>>>,
    retries: RwLock<HashMap<String, Arc<AtomicU64>>>,
    events: RwLock<HashMap<(Event, String), Arc<AtomicU64>>>,
    tcp: RwLock<HashMap<TcpLabels, Arc<TcpSeries>>>,
    access_log_dropped: AtomicU64,
}

impl Metrics {
    /// Counts one request and its duration (arrival to response headers).
    pub fn request(&self, labels: &RequestLabels, elapsed: Duration) {
        let s = shared(&self.requests, labels);
        s.count.fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        s.buckets[i].fetch_add(1, Ordering::Relaxed);
        s.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Counts one retry to `destination` (`ns/service/subset`).
    pub fn retry(&self, destination: &str) {
        shared(&self.retries, destination).fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one resilience `event` for `destination`.
    pub fn event(&self, event: Event, destination: &str) {
        shared(&self.events, &(event, destination.to_string())).fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one TCP connection; it is open until the guard drops.
    pub fn tcp_open(&self, labels: &TcpLabels) -> TcpConnGuard {
        let s = shared(&self.tcp, labels);
        s.opened.fetch_add(1, Ordering::Relaxed);
        s.open.fetch_add(1, Ordering::Relaxed);
        TcpConnGuard(s)
    }

    /// Counts one access-log line dropped because the writer fell behind.
    pub fn access_log_dropped(&self) {
        self.access_log_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text format, with `trellis_config_revision`.
    pub fn render(&self, config_revision: u64) -> String {
        let mut out = String::new();
        let mut reqs: Vec<(RequestLabels, Arc<RequestSeries>)> = self
            .requests
            .read()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect())
            .unwrap_or_default();
        reqs.sort_by(|a, b| a.0.cmp(&b.0));
        header(
            &mut out,
            "trellis_requests_total",
            "counter",
            "Requests through this sidecar.",
        );
        for (l, s) in &reqs {
            let _ = writeln!(
                out,
                "trellis_requests_total{{{}}} {}",
                request_labels(l),
                s.count.load(Ordering::Relaxed)
            );
        }
        header(
            &mut out,
            "trellis_request_duration_seconds",
            "histogram",
            "Time from a request's arrival to its response headers.",
        );
        for (l, s) in &reqs {
            let labels = request_labels(l);
            let mut cumulative = 0;
            for (i, b) in s.buckets.iter().enumerate() {
                cumulative += b.load(Ordering::Relaxed);
                let le = LATENCY_BUCKETS
                    .get(i)
                    .map_or("+Inf".to_string(), |v| v.to_string());
                let _ = writeln!(
                    out,
                    "trellis_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "trellis_request_duration_seconds_sum{{{labels}}} {}",
                s.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "trellis_request_duration_seconds_count{{{labels}}} {cumulative}"
            );
        }
        header(
            &mut out,
            "trellis_retries_total",
            "counter",
            "Retries sent by this sidecar.",
        );
        let mut retries: Vec<(String, u64)> = self
            .retries
            .read()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed)))
                    .collect()
            })
            .unwrap_or_default();
        retries.sort();
        for (dest, n) in retries {
            let _ = writeln!(
                out,
                "trellis_retries_total{{destination=\"{}\"}} {n}",
                escape(&dest)
            );
        }
        let mut tcp: Vec<(TcpLabels, Arc<TcpSeries>)> = self
            .tcp
            .read()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect())
            .unwrap_or_default();
        tcp.sort_by(|a, b| a.0.cmp(&b.0));
        type Field = fn(&TcpSeries) -> i64;
        let fields: [(&str, &str, &str, Field); 4] = [
            (
                "trellis_tcp_connections_total",
                "counter",
                "TCP connections proxied.",
                |s| s.opened.load(Ordering::Relaxed) as i64,
            ),
            (
                "trellis_tcp_open_connections",
                "gauge",
                "TCP connections open now.",
                |s| s.open.load(Ordering::Relaxed),
            ),
            (
                "trellis_tcp_sent_bytes_total",
                "counter",
                "Bytes sent to the far side of proxied TCP connections.",
                |s| s.sent.load(Ordering::Relaxed) as i64,
            ),
            (
                "trellis_tcp_received_bytes_total",
                "counter",
                "Bytes received from the far side of proxied TCP connections.",
                |s| s.received.load(Ordering::Relaxed) as i64,
            ),
        ];
        for (name, kind, help, get) in fields {
            header(&mut out, name, kind, help);
            for (l, s) in &tcp {
                let _ = writeln!(
                    out,
                    "{name}{{direction=\"{}\",source=\"{}\",destination=\"{}\"}} {}",
                    l.direction.as_str(),
                    escape(&l.source),
                    escape(&l.destination),
                    get(s)
                );
            }
        }
        let mut events: Vec<(Event, String, u64)> = self
            .events
            .read()
            .map(|m| {
                m.iter()
                    .map(|((e, d), v)| (*e, d.clone(), v.load(Ordering::Relaxed)))
                    .collect()
            })
            .unwrap_or_default();
        events.sort_by(|a, b| (a.0.describe().0, &a.1, a.0).cmp(&(b.0.describe().0, &b.1, b.0)));
        let mut last_family = "";
        for (e, dest, n) in events {
            let (name, help, extra) = e.describe();
            if name != last_family {
                header(&mut out, name, "counter", help);
                last_family = name;
            }
            let extra = extra.map_or(String::new(), |(k, v)| format!(",{k}=\"{}\"", escape(v)));
            let _ = writeln!(
                out,
                "{name}{{destination=\"{}\"{extra}}} {n}",
                escape(&dest)
            );
        }
        header(
            &mut out,
            "trellis_access_log_dropped_total",
            "counter",
            "Access-log lines dropped because the writer fell behind.",
        );
        let _ = writeln!(
            out,
            "trellis_access_log_dropped_total {}",
            self.access_log_dropped.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "trellis_config_revision",
            "gauge",
            "Revision of the applied mesh config.",
        );
        let _ = writeln!(out, "trellis_config_revision {config_revision}");
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn request_labels(l: &RequestLabels) -> String {
    format!(
        "direction=\"{}\",source=\"{}\",destination=\"{}\",route=\"{}\",code=\"{}\"",
        l.direction.as_str(),
        escape(&l.source),
        escape(&l.destination),
        escape(&l.route),
        l.code
    )
}

/// Prometheus label value escaping.
/// A Prometheus label value, escaped.
pub(crate) fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(direction: Direction, destination: &str, code: u16) -> RequestLabels {
        RequestLabels {
            direction,
            source: "default/productpage".into(),
            destination: destination.into(),
            route: "split".into(),
            code,
        }
    }

    #[test]
    fn renders_counts_and_histograms() {
        let m = Metrics::default();
        let ok = labels(Direction::Outbound, "default/reviews/v1", 200);
        m.request(&ok, Duration::from_micros(80));
        m.request(&ok, Duration::from_millis(3));
        m.request(
            &labels(Direction::Inbound, "default/reviews", 502),
            Duration::from_secs(20),
        );
        m.retry("default/reviews/v1");
        m.event(Event::CircuitOpen("maxConnections"), "default/reviews");
        m.event(Event::FaultAbort, "default/reviews/v1");
        m.event(Event::FaultAbort, "default/reviews/v1");
        m.event(Event::FaultDelay, "default/reviews/v1");
        let t = m.render(7);
        let l = "direction=\"outbound\",source=\"default/productpage\",destination=\"default/reviews/v1\",route=\"split\",code=\"200\"";
        assert!(
            t.contains(&format!("trellis_requests_total{{{l}}} 2\n")),
            "{t}"
        );
        // 80 µs is in the first bucket; 3 ms first counts at le=0.005.
        assert!(t.contains(&format!(
            "trellis_request_duration_seconds_bucket{{{l},le=\"0.0001\"}} 1\n"
        )));
        assert!(t.contains(&format!(
            "trellis_request_duration_seconds_bucket{{{l},le=\"0.0025\"}} 1\n"
        )));
        assert!(t.contains(&format!(
            "trellis_request_duration_seconds_bucket{{{l},le=\"0.005\"}} 2\n"
        )));
        assert!(t.contains(&format!(
            "trellis_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} 2\n"
        )));
        assert!(t.contains(&format!(
            "trellis_request_duration_seconds_sum{{{l}}} 0.00308\n"
        )));
        // 20 s is above every finite bucket.
        assert!(t.contains("code=\"502\",le=\"10\"} 0\n"), "{t}");
        assert!(t.contains("code=\"502\",le=\"+Inf\"} 1\n"), "{t}");
        assert!(t.contains("trellis_retries_total{destination=\"default/reviews/v1\"} 1\n"));
        assert!(t.contains("trellis_config_revision 7\n"));
        assert!(t.contains(
            "trellis_circuit_open_total{destination=\"default/reviews\",limit=\"maxConnections\"} 1\n"
        ));
        assert!(t.contains(
            "trellis_faults_injected_total{destination=\"default/reviews/v1\",kind=\"abort\"} 2\n"
        ));
        assert!(t.contains(
            "trellis_faults_injected_total{destination=\"default/reviews/v1\",kind=\"delay\"} 1\n"
        ));
        // One HELP/TYPE per family.
        assert_eq!(
            t.matches("# TYPE trellis_faults_injected_total").count(),
            1,
            "{t}"
        );
    }

    #[test]
    fn tcp_connections_bytes_and_open_gauge() {
        let m = Metrics::default();
        let l = TcpLabels {
            direction: Direction::Outbound,
            source: "default/a".into(),
            destination: "default/db/-".into(),
        };
        let g1 = m.tcp_open(&l);
        let g2 = m.tcp_open(&l);
        g1.series().bytes(10, 20);
        drop(g1);
        let t = m.render(1);
        let ls = "direction=\"outbound\",source=\"default/a\",destination=\"default/db/-\"";
        assert!(
            t.contains(&format!("trellis_tcp_connections_total{{{ls}}} 2\n")),
            "{t}"
        );
        assert!(t.contains(&format!("trellis_tcp_open_connections{{{ls}}} 1\n")));
        assert!(t.contains(&format!("trellis_tcp_sent_bytes_total{{{ls}}} 10\n")));
        assert!(t.contains(&format!("trellis_tcp_received_bytes_total{{{ls}}} 20\n")));
        drop(g2);
        assert!(m
            .render(1)
            .contains(&format!("trellis_tcp_open_connections{{{ls}}} 0\n")));
    }
}
