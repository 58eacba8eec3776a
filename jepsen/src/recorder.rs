//! The history writer: appends [`Record`]s as JSON lines, in the order they
//! are made, each stamped with its index and the monotonic time since the
//! run started, and flushed at once (a run that dies still leaves a usable
//! history).
//!
//! The recorder is shared by every worker, watcher and the nemesis; one
//! mutex orders index, time and the write, so `index` and `time_ns` both
//! increase along the file. An I/O error does not stop the run: the first
//! one is kept and reported by [`Recorder::finish`] (the run then ends as a
//! harness error).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use trellis_jepsen_checker::history::{Function, Record, RecordType, WatchEvent, NEMESIS_PROCESS};

/// A record before it gets its index and time.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub process: i64,
    pub kind: RecordType,
    pub f: Function,
    pub key: Option<String>,
    pub value: Option<String>,
    pub expected: Option<String>,
    pub node: Option<u64>,
    pub revision: Option<u64>,
    pub events: Vec<WatchEvent>,
    pub error: Option<String>,
}

impl Entry {
    /// A record with only the mandatory fields set.
    pub fn new(process: i64, kind: RecordType, f: Function) -> Self {
        Entry {
            process,
            kind,
            f,
            key: None,
            value: None,
            expected: None,
            node: None,
            revision: None,
            events: Vec::new(),
            error: None,
        }
    }

    /// A nemesis record (`process` -1, type `info`, f `nemesis`).
    pub fn nemesis(value: String) -> Self {
        Entry {
            value: Some(value),
            ..Entry::new(NEMESIS_PROCESS, RecordType::Info, Function::Nemesis)
        }
    }
}

/// Counts of what was recorded, for the summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Client operations by (function, completion type); invokes are not
    /// counted here.
    pub completions: BTreeMap<(String, String), u64>,
    /// Invocations.
    pub invokes: u64,
    /// `watch` records by the node that served them.
    pub watch_by_node: BTreeMap<u64, u64>,
    /// `watch-start` records.
    pub watch_starts: u64,
    /// Nemesis records.
    pub nemesis: u64,
    /// All records.
    pub total: u64,
}

struct Inner {
    out: BufWriter<File>,
    next_index: u64,
    counts: Counts,
    error: Option<String>,
}

/// Thread-safe, append-only history file.
pub struct Recorder {
    path: PathBuf,
    start: Instant,
    inner: Mutex<Inner>,
}

impl Recorder {
    /// Create (truncate) the history file at `path`; time 0 is now.
    pub fn create(path: &Path) -> Result<Self> {
        let file =
            File::create(path).with_context(|| format!("creating history {}", path.display()))?;
        Ok(Recorder {
            path: path.to_path_buf(),
            start: Instant::now(),
            inner: Mutex::new(Inner {
                out: BufWriter::new(file),
                next_index: 0,
                counts: Counts::default(),
                error: None,
            }),
        })
    }

    /// The history file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Nanoseconds since the run started.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Append one record (stamped now) and flush it. Returns the record as
    /// written.
    pub fn record(&self, e: Entry) -> Record {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let record = Record {
            index: inner.next_index,
            time_ns: self.now_ns(),
            process: e.process,
            kind: e.kind,
            f: e.f,
            key: e.key,
            value: e.value,
            expected: e.expected,
            node: e.node,
            revision: e.revision,
            events: e.events,
            error: e.error,
        };
        inner.next_index += 1;
        count(&mut inner.counts, &record);
        let written = serde_json::to_string(&record)
            .map_err(|e| e.to_string())
            .and_then(|line| {
                inner
                    .out
                    .write_all(line.as_bytes())
                    .and_then(|()| inner.out.write_all(b"\n"))
                    .and_then(|()| inner.out.flush())
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            if inner.error.is_none() {
                tracing::error!(path = %self.path.display(), error = %e, "cannot write the history");
                inner.error = Some(e);
            }
        }
        record
    }

    /// What was recorded so far.
    pub fn counts(&self) -> Counts {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .counts
            .clone()
    }

    /// Flush and sync the file; fails if any write failed.
    pub fn finish(&self) -> Result<()> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = &inner.error {
            return Err(anyhow!("writing history {}: {e}", self.path.display()));
        }
        inner
            .out
            .flush()
            .and_then(|()| inner.out.get_ref().sync_all())
            .with_context(|| format!("syncing history {}", self.path.display()))
    }
}

fn count(c: &mut Counts, r: &Record) {
    c.total += 1;
    match r.f {
        Function::Nemesis => c.nemesis += 1,
        Function::WatchStart => c.watch_starts += 1,
        Function::Watch => {
            if let Some(n) = r.node {
                *c.watch_by_node.entry(n).or_default() += 1;
            }
        }
        Function::Read | Function::Write | Function::Cas => {
            if r.kind == RecordType::Invoke {
                c.invokes += 1;
            } else {
                *c.completions
                    .entry((r.f.as_str().to_string(), r.kind.as_str().to_string()))
                    .or_default() += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_indexed_timed_and_parseable() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("history.jsonl");
        let rec = Recorder::create(&path)?;
        let mut w = Entry::new(3, RecordType::Invoke, Function::Write);
        w.key = Some("r1".into());
        w.value = Some("3-0".into());
        rec.record(w.clone());
        w.kind = RecordType::Ok;
        w.revision = Some(7);
        w.node = Some(2);
        rec.record(w);
        rec.record(Entry::nemesis("start kill n1".into()));
        rec.finish()?;
        let text = std::fs::read_to_string(&path)?;
        let records = trellis_jepsen_checker::history::parse("h", &text)?;
        assert_eq!(records.len(), 3);
        assert_eq!(
            records.iter().map(|r| r.index).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert!(records.windows(2).all(|w| w[0].time_ns <= w[1].time_ns));
        assert_eq!(records[1].revision, Some(7));
        assert_eq!(records[2].process, NEMESIS_PROCESS);
        let c = rec.counts();
        assert_eq!(c.invokes, 1);
        assert_eq!(c.completions.get(&("write".into(), "ok".into())), Some(&1));
        assert_eq!(c.nemesis, 1);
        Ok(())
    }
}
