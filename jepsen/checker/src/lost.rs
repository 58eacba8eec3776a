//! "No acknowledged write is lost, nothing is committed that nobody wrote."
//!
//! Inputs: the committed change log as the watchers saw it
//! ([`CommittedLog`]), the client operations, and for each key its final
//! read — the last `ok` read of that key (the runner ends with one
//! linearizable read of every key after healing).
//!
//! Anomalies (fail):
//! - an `ok` write/cas whose put never appears in the log, when the log is
//!   complete — every revision from the first subscribed one to the
//!   highest delivered one was delivered to some watcher;
//! - an `ok` write/cas that completed before a key's final read began but
//!   has a higher revision than the value that read saw (it was rolled
//!   back, or the read is stale);
//! - a committed put (or a final read) of a value no operation wrote
//!   (phantom), or only a `fail`ed one wrote; a value committed at two
//!   revisions (applied twice);
//! - watchers disagreeing on a revision (the log is ambiguous).
//!
//! When the log is incomplete (holes, or no watcher at all), acknowledged
//! writes missing from it cannot be judged: the verdict is `Unknown`.

use std::collections::{BTreeMap, HashMap};

use crate::committed::{fmt_events, CommittedLog};
use crate::history::{Function, Record};
use crate::ops::{client_ops, show, ClientOp, Outcome};
use crate::report::{CheckerResult, Verdict};

/// How many unverified writes the `Unknown` reason lists.
const LISTED: usize = 3;

/// Run the check.
pub fn check(records: &[Record]) -> CheckerResult {
    let log = CommittedLog::from_history(records);
    let ops = client_ops(records).ops;
    let mut anomalies = Vec::new();
    let mut notes = Vec::new();

    let lo = records
        .iter()
        .filter(|r| r.f == Function::WatchStart)
        .filter_map(|r| r.revision)
        .min()
        .unwrap_or(1)
        .max(1);
    let max = log.max_revision();
    let holes = log.holes(lo);
    let complete = max.is_some() && holes.is_empty();
    match max {
        None => notes.push("no watch deliveries: the committed log is unknown".to_string()),
        Some(max) => notes.push(format!(
            "committed log: revisions {lo}..={max}, {} delivered, {}",
            log.revisions.range(lo..).count(),
            if complete {
                "complete".to_string()
            } else {
                format!("holes at {}", fmt_ranges(&holes))
            }
        )),
    }

    // Where each (key, value) was committed, with one delivery record each.
    let mut committed: BTreeMap<(&str, &str), Vec<(u64, u64)>> = BTreeMap::new();
    for (rev, entry) in &log.revisions {
        if !entry.agreed() {
            let who: Vec<String> = entry
                .variants
                .iter()
                .map(|v| {
                    let (p, i) = v.deliveries.first().copied().unwrap_or((0, 0));
                    format!("[{}] by p{p} (#{i})", fmt_events(&v.events))
                })
                .collect();
            anomalies.push(format!(
                "revision {rev}: watchers disagree, the committed log is ambiguous: {}",
                who.join(" vs ")
            ));
        }
        for v in &entry.variants {
            let first = v.deliveries.first().map(|d| d.1).unwrap_or(0);
            for e in &v.events {
                if e.kind != "put" {
                    continue;
                }
                let Some(val) = e.value.as_deref() else {
                    continue;
                };
                let revs = committed.entry((e.key.as_str(), val)).or_default();
                if !revs.iter().any(|(r, _)| r == rev) {
                    revs.push((*rev, first));
                }
            }
        }
    }

    // Who put each (key, value).
    let mut writers: HashMap<(&str, &str), Vec<&ClientOp>> = HashMap::new();
    for op in &ops {
        if matches!(op.f, Function::Write | Function::Cas) {
            if let Some(v) = op.value.as_deref() {
                writers.entry((op.key.as_str(), v)).or_default().push(op);
            }
        }
    }

    // 1. Every acknowledged write/cas is in the log.
    let mut acked = 0usize;
    let mut found = 0usize;
    let mut unverified: Vec<String> = Vec::new();
    for op in &ops {
        if op.outcome != Outcome::Ok || !matches!(op.f, Function::Write | Function::Cas) {
            continue;
        }
        let Some(v) = op.value.as_deref() else {
            continue;
        };
        acked += 1;
        if committed.contains_key(&(op.key.as_str(), v)) {
            found += 1;
            continue;
        }
        let in_range = op.revision.is_none_or(|r| r >= lo);
        match (complete, max) {
            (true, Some(max)) if in_range => {
                let beyond = match op.revision {
                    Some(r) if r > max => {
                        format!(" (its revision {r} is beyond the last delivered revision {max})")
                    }
                    _ => String::new(),
                };
                anomalies.push(format!(
                    "[{}] LOST: {} was acknowledged but never appears in the complete committed log{beyond}",
                    op.span(),
                    op.what()
                ));
            }
            _ => unverified.push(op.describe()),
        }
    }

    // 2. Everything committed was written, once, by an operation that did not fail.
    for ((key, val), revs) in &committed {
        let (rev, idx) = revs.first().copied().unwrap_or((0, 0));
        match writers.get(&(*key, *val)) {
            None => anomalies.push(format!(
                "[#{idx}] PHANTOM: revision {rev} puts {key}={val:?}, which no operation wrote"
            )),
            Some(ws) if ws.iter().all(|w| w.outcome == Outcome::Fail) => {
                let spans: Vec<String> = ws.iter().map(|w| w.describe()).collect();
                anomalies.push(format!(
                    "[#{idx}] revision {rev} puts {key}={val:?}, but the only operation writing it failed: {}",
                    spans.join(", ")
                ));
            }
            Some(_) => {}
        }
        if revs.len() > 1 {
            let where_: Vec<String> = revs.iter().map(|(r, i)| format!("{r} (#{i})")).collect();
            anomalies.push(format!(
                "[#{idx}] {key}={val:?} committed at {} revisions: {} (applied more than once)",
                revs.len(),
                where_.join(", ")
            ));
        }
    }

    // 3. Final reads: the last ok read of each key.
    let mut finals: BTreeMap<&str, &ClientOp> = BTreeMap::new();
    for op in &ops {
        if op.f == Function::Read && op.outcome == Outcome::Ok {
            let later = finals
                .get(op.key.as_str())
                .is_none_or(|f| op.complete_index > f.complete_index);
            if later {
                finals.insert(op.key.as_str(), op);
            }
        }
    }
    let mut by_key: HashMap<&str, Vec<&ClientOp>> = HashMap::new();
    for op in &ops {
        if op.outcome == Outcome::Ok && matches!(op.f, Function::Write | Function::Cas) {
            by_key.entry(op.key.as_str()).or_default().push(op);
        }
    }
    for (key, read) in &finals {
        if let Some(v) = read.value.as_deref() {
            if !writers.contains_key(&(*key, v)) {
                anomalies.push(format!(
                    "[{}] PHANTOM: final read {} returned a value no operation wrote",
                    read.span(),
                    read.what()
                ));
            }
        }
        let Some(seen) = read.revision else { continue };
        for w in by_key.get(key).map(Vec::as_slice).unwrap_or(&[]) {
            let before = w.complete_time.is_some_and(|t| t < read.invoke_time);
            let Some(wr) = w.revision else { continue };
            if !before {
                continue;
            }
            if wr > seen {
                anomalies.push(format!(
                    "[{}] LOST: {} completed before the final read {} began, which saw revision {seen} ({})",
                    w.span(),
                    w.what(),
                    read.describe(),
                    show(read.value.as_deref())
                ));
            } else if wr == seen && w.value != read.value {
                anomalies.push(format!(
                    "[{}] {} and the final read {} claim the same revision with different values",
                    w.span(),
                    w.what(),
                    read.describe()
                ));
            }
        }
    }
    notes.push(format!(
        "{acked} acknowledged writes/cas, {found} found in the committed log; final reads of {} keys",
        finals.len()
    ));

    let verdict = if !anomalies.is_empty() {
        if !unverified.is_empty() {
            notes.push(format!(
                "also {} acknowledged writes unverifiable against the incomplete log",
                unverified.len()
            ));
        }
        Verdict::Fail(anomalies)
    } else if !unverified.is_empty() {
        let why = match max {
            None => "there are no watch deliveries".to_string(),
            Some(_) if !holes.is_empty() => {
                format!("the committed log has holes at {}", fmt_ranges(&holes))
            }
            Some(_) => format!("their revisions precede the first subscribed revision {lo}"),
        };
        let first: Vec<String> = unverified.iter().take(LISTED).cloned().collect();
        Verdict::Unknown(format!(
            "{} acknowledged writes are not in the committed log and cannot be judged because {why}: {}{}",
            unverified.len(),
            first.join("; "),
            if unverified.len() > LISTED { "; …" } else { "" }
        ))
    } else {
        Verdict::Pass
    };
    CheckerResult {
        name: "lost",
        verdict,
        notes,
    }
}

/// `3..=5, 9` (at most a few ranges, then `…`).
pub fn fmt_ranges(ranges: &[(u64, u64)]) -> String {
    const LIMIT: usize = 5;
    let mut parts: Vec<String> = ranges
        .iter()
        .take(LIMIT)
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}..={b}")
            }
        })
        .collect();
    if ranges.len() > LIMIT {
        parts.push(format!("… ({} ranges)", ranges.len()));
    }
    parts.join(", ")
}
