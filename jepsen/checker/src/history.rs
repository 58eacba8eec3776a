//! The history format: one JSON object per line, written by the runner as
//! operations happen and read back by the checkers (`jepsen check FILE`).
//!
//! Client operations come in pairs: an `invoke` record when a process
//! starts an operation, then exactly one completion for it from the same
//! process — `ok` (it happened), `fail` (it certainly did not happen) or
//! `info` (unknown: a timeout or a broken connection; it may or may not
//! have happened, at any time after the invoke). A process runs one
//! operation at a time. Watch deliveries, watch (re)subscriptions and
//! nemesis actions are single records.
//!
//! ```text
//! {"index":0,"time_ns":1200,"process":3,"type":"invoke","f":"write","key":"r7","value":"3-12"}
//! {"index":1,"time_ns":5400,"process":3,"type":"ok","f":"write","key":"r7","value":"3-12","node":2,"revision":41}
//! {"index":2,"time_ns":6100,"process":1,"type":"invoke","f":"cas","key":"r7","expected":"3-12","value":"1-5"}
//! {"index":3,"time_ns":9000,"process":1,"type":"fail","f":"cas","key":"r7","expected":"3-12","value":"1-5","error":"compare failed"}
//! {"index":4,"time_ns":9100,"process":100,"type":"ok","f":"watch","node":1,"revision":41,"events":[{"kind":"put","key":"r7","value":"3-12","mod_revision":41}]}
//! {"index":5,"time_ns":9900,"process":-1,"type":"info","f":"nemesis","value":"partition leader 2 from 1,3"}
//! ```
//!
//! Nemesis fault windows: a `nemesis` record whose `value` starts with
//! `"start "` opens a fault window named by the next word (`"start
//! partition-leader 2 from 1,3"` opens `partition-leader`; the rest is
//! free text), and one whose `value` starts with `"stop "` closes the most
//! recently opened window of the same name (`"stop partition-leader"`).
//! A window never closed lasts until the end of the history; a `stop`
//! with no open window of its name, and any other nemesis value, is a
//! point event. Only the latency plot ([`crate::plot`]) uses windows.
//!
//! ```text
//! {"index":7,"time_ns":20000,"process":-1,"type":"info","f":"nemesis","value":"start partition-leader 2 from 1,3"}
//! {"index":9,"time_ns":30000,"process":-1,"type":"info","f":"nemesis","value":"stop partition-leader"}
//! ```

use serde::{Deserialize, Serialize};

/// The process id of nemesis records.
pub const NEMESIS_PROCESS: i64 = -1;

/// What kind of record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordType {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// The operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Function {
    /// Linearizable read of `key`; `ok` carries the value read in `value`
    /// (`null` when the key does not exist) and the key's `mod_revision`
    /// in `revision` (0 when absent).
    Read,
    /// Put `value` (unique across the history) at `key`; `ok` carries the
    /// write's revision.
    Write,
    /// Put `value` at `key` only if its current value is `expected`
    /// (`null`: only if absent). `ok` = swapped, `fail` = the compare did
    /// not hold (nothing changed).
    Cas,
    /// A watcher (re)subscribed on `node` from `revision` (the first
    /// revision it wants). Type `info`.
    WatchStart,
    /// Events of one revision delivered to watcher `process` by `node`.
    /// Type `ok`.
    Watch,
    /// A fault started or ended; `value` describes it. Type `info`.
    Nemesis,
}

/// One event inside a `watch` record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    /// `put` or `delete`.
    pub kind: String,
    pub key: String,
    /// The value put; `null` for deletes.
    #[serde(default)]
    pub value: Option<String>,
    pub mod_revision: u64,
}

/// One line of the history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the file, from 0.
    pub index: u64,
    /// Monotonic nanoseconds since the run started.
    pub time_ns: u64,
    /// Client worker, watcher, or [`NEMESIS_PROCESS`].
    pub process: i64,
    #[serde(rename = "type")]
    pub kind: RecordType,
    pub f: Function,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// For `cas`: the value compared against (`null`: absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    /// The control node that answered (or served the watch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<WatchEvent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A history file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: String,
        line: usize,
        message: String,
    },
}

/// Parse a whole history (JSON lines; blank lines are skipped).
pub fn parse(path: &str, text: &str) -> Result<Vec<Record>, HistoryError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(line).map_err(|e| HistoryError::Parse {
            path: path.to_string(),
            line: i + 1,
            message: e.to_string(),
        })?;
        out.push(record);
    }
    Ok(out)
}

/// Read and parse the history file at `path`.
pub fn read(path: &str) -> Result<Vec<Record>, HistoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| HistoryError::Io {
        path: path.to_string(),
        source,
    })?;
    parse(path, &text)
}

impl RecordType {
    /// The name used in the format: `invoke`, `ok`, `fail`, `info`.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordType::Invoke => "invoke",
            RecordType::Ok => "ok",
            RecordType::Fail => "fail",
            RecordType::Info => "info",
        }
    }
}

impl Function {
    /// The name used in the format: `read`, `write`, `cas`, `watch-start`,
    /// `watch`, `nemesis`.
    pub fn as_str(self) -> &'static str {
        match self {
            Function::Read => "read",
            Function::Write => "write",
            Function::Cas => "cas",
            Function::WatchStart => "watch-start",
            Function::Watch => "watch",
            Function::Nemesis => "nemesis",
        }
    }
}

/// Write records back as JSON lines (the inverse of [`parse`]).
pub fn to_json_lines(records: &[Record]) -> Result<String, serde_json::Error> {
    let mut out = String::new();
    for r in records {
        out.push_str(&serde_json::to_string(r)?);
        out.push('\n');
    }
    Ok(out)
}
