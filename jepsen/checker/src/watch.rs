//! The watch contract, per watcher (a process with `watch`/`watch-start`
//! records), against the committed log — the union of every watcher's
//! deliveries plus the revisions of `ok` writes and cas:
//!
//! - **order**: delivered revisions strictly increase, within a
//!   subscription and across resubscriptions; a subscription from `S`
//!   delivers nothing older than `S` (going back in time);
//! - **no duplicates**: no revision is delivered twice to one watcher
//!   (a revision split over two records shows up as this);
//! - **atomic**: a delivery carries events, all of its own revision;
//! - **no gaps**: between two consecutive deliveries to a watcher (or a
//!   subscription's start and its first delivery) no committed revision
//!   was skipped;
//! - **agreement**: all watchers deliver the same events for a revision,
//!   which include the put of the `ok` write/cas acknowledged at that
//!   revision (key and value), and of an `ok` read's value at its
//!   mod_revision; no two `ok` writes/cas claim one revision.
//!
//! The runner resubscribes from the last revision received + 1; when it
//! deviates, that is a note, and the check follows what it asked for
//! (a resubscription from an older revision may re-deliver revisions, one
//! skipping ahead is not a gap).
//!
//! Revisions after a watcher's last delivery are not required (it may
//! have stopped first); the lag is a note.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::committed::{fmt_events, CommittedLog};
use crate::history::{Function, Record, RecordType};
use crate::lost::fmt_ranges;
use crate::ops::{client_ops, ClientOp, Outcome};
use crate::report::CheckerResult;

/// How many skipped revisions a gap anomaly lists.
const LISTED: usize = 5;

/// Per-watcher progress.
#[derive(Default)]
struct Watcher {
    /// Start revision and record index of the current subscription.
    sub: Option<(u64, u64)>,
    /// Last revision (and its record) delivered in the current subscription.
    sub_last: Option<(u64, u64)>,
    sub_seen: HashSet<u64>,
    /// Highest revision delivered so far, with its record.
    last: Option<(u64, u64)>,
    /// Revision -> first record that delivered it.
    seen: HashMap<u64, u64>,
    deliveries: usize,
}

/// Run the check.
pub fn check(records: &[Record]) -> CheckerResult {
    let log = CommittedLog::from_history(records);
    let ops = client_ops(records).ops;
    let mut anomalies = Vec::new();
    let mut notes = Vec::new();

    let mut acked: BTreeMap<u64, Vec<&ClientOp>> = BTreeMap::new();
    for op in &ops {
        if op.outcome == Outcome::Ok && matches!(op.f, Function::Write | Function::Cas) {
            if let Some(r) = op.revision {
                acked.entry(r).or_default().push(op);
            }
        }
    }
    let committed: BTreeSet<u64> = log
        .revisions
        .keys()
        .copied()
        .chain(acked.keys().copied())
        .filter(|r| *r > 0)
        .collect();

    // Per watcher, in history order.
    let mut watchers: BTreeMap<i64, Watcher> = BTreeMap::new();
    for r in records {
        match (r.f, r.kind) {
            (Function::WatchStart, _) => {
                let w = watchers.entry(r.process).or_default();
                let next = w.last.map_or(1, |(l, _)| l.saturating_add(1));
                let start = r.revision.unwrap_or(next);
                if let Some((l, li)) = w.last {
                    if start <= l {
                        notes.push(format!(
                            "[#{}] watcher p{} resubscribed from {start} although it had received up to {l} (#{li}); re-deliveries from {start} allowed",
                            r.index, r.process
                        ));
                    } else if start > next {
                        notes.push(format!(
                            "[#{}] watcher p{} resubscribed from {start}, skipping {next}..={} by its own choice",
                            r.index,
                            r.process,
                            start - 1
                        ));
                    }
                }
                w.sub = Some((start, r.index));
                w.sub_last = None;
                w.sub_seen.clear();
            }
            (Function::Watch, RecordType::Ok) => {
                let Some(rev) = r.revision else { continue };
                let w = watchers.entry(r.process).or_default();
                w.deliveries += 1;
                deliver(w, r, rev, &committed, &mut anomalies);
            }
            _ => {}
        }
    }

    // Atomicity of each delivery.
    for r in records {
        if r.f != Function::Watch || r.kind != RecordType::Ok {
            continue;
        }
        let Some(rev) = r.revision else { continue };
        if r.events.is_empty() {
            anomalies.push(format!(
                "[#{}] watcher p{}: revision {rev} delivered with no events",
                r.index, r.process
            ));
        }
        let foreign: Vec<u64> = r
            .events
            .iter()
            .map(|e| e.mod_revision)
            .filter(|m| *m != rev)
            .collect::<BTreeSet<u64>>()
            .into_iter()
            .collect();
        if !foreign.is_empty() {
            anomalies.push(format!(
                "[#{}] watcher p{}: the delivery of revision {rev} carries events of revision(s) {foreign:?}: {} (not atomic)",
                r.index,
                r.process,
                fmt_events(&r.events)
            ));
        }
    }

    // Agreement between watchers.
    for (rev, entry) in &log.revisions {
        if entry.agreed() {
            continue;
        }
        let who: Vec<String> = entry
            .variants
            .iter()
            .map(|v| {
                let by: Vec<String> = v
                    .deliveries
                    .iter()
                    .take(3)
                    .map(|(p, i)| format!("p{p} #{i}"))
                    .collect();
                format!("[{}] ({})", fmt_events(&v.events), by.join(", "))
            })
            .collect();
        let first = entry
            .variants
            .iter()
            .filter_map(|v| v.deliveries.first())
            .map(|d| d.1)
            .min()
            .unwrap_or(0);
        anomalies.push(format!(
            "[#{first}] watchers disagree on revision {rev}: {}",
            who.join(" vs ")
        ));
    }

    // Agreement with acknowledged writes/cas.
    for (rev, writes) in &acked {
        if writes.len() > 1 {
            let all: Vec<String> = writes.iter().map(|w| w.describe()).collect();
            anomalies.push(format!(
                "[{}] revision {rev} acknowledged to {} writes: {}",
                writes.first().map(|w| w.span()).unwrap_or_default(),
                writes.len(),
                all.join(", ")
            ));
        }
        let Some(entry) = log.revisions.get(rev) else {
            continue;
        };
        for w in writes {
            let Some(v) = w.value.as_deref() else {
                continue;
            };
            if !entry.all_have_put(&w.key, v) {
                let got: Vec<String> = entry
                    .variants
                    .iter()
                    .map(|x| format!("[{}]", fmt_events(&x.events)))
                    .collect();
                anomalies.push(format!(
                    "[{}] {} but watchers delivered for revision {rev}: {}",
                    w.span(),
                    w.what(),
                    got.join(" / ")
                ));
            }
        }
    }

    // Agreement with ok reads' mod_revision.
    for op in &ops {
        if op.f != Function::Read || op.outcome != Outcome::Ok {
            continue;
        }
        let (Some(v), Some(m)) = (op.value.as_deref(), op.revision) else {
            continue;
        };
        let Some(entry) = log.revisions.get(&m) else {
            continue;
        };
        if !entry.all_have_put(&op.key, v) {
            anomalies.push(format!(
                "[{}] {} but watchers delivered for revision {m}: [{}]",
                op.span(),
                op.what(),
                fmt_events(entry.events())
            ));
        }
    }

    let max = committed.iter().next_back().copied();
    let total: usize = watchers.values().map(|w| w.deliveries).sum();
    notes.insert(
        0,
        format!(
            "{} watchers, {total} deliveries, {} committed revisions known (highest {})",
            watchers.len(),
            committed.len(),
            max.map_or("none".to_string(), |m| m.to_string())
        ),
    );
    if let Some(max) = max {
        let lo = records
            .iter()
            .filter(|r| r.f == Function::WatchStart)
            .filter_map(|r| r.revision)
            .min()
            .unwrap_or(1)
            .max(1);
        let mut unknown = Vec::new();
        let mut expect = lo;
        for &rev in committed.range(lo..) {
            if rev > expect {
                unknown.push((expect, rev - 1));
            }
            expect = rev.saturating_add(1);
        }
        if !unknown.is_empty() && max >= lo {
            notes.push(format!(
                "revisions {} were never delivered to any watcher nor acknowledged to any write (out of scope, or an indeterminate write every watcher missed)",
                fmt_ranges(&unknown)
            ));
        }
        for (p, w) in &watchers {
            match w.last {
                Some((l, _)) if l < max => notes.push(format!(
                    "watcher p{p} stopped at revision {l}, {} known revisions after it",
                    committed.range(l + 1..).count()
                )),
                None => notes.push(format!("watcher p{p} received nothing")),
                _ => {}
            }
        }
    }
    CheckerResult::from_anomalies("watch", anomalies, notes)
}

/// Check one delivery of `rev` (record `r`) to watcher `w`.
fn deliver(
    w: &mut Watcher,
    r: &Record,
    rev: u64,
    committed: &BTreeSet<u64>,
    anomalies: &mut Vec<String>,
) {
    let p = r.process;
    let (start, start_index) = match w.sub {
        Some(s) => s,
        None => {
            anomalies.push(format!(
                "[#{}] watcher p{p}: revision {rev} delivered before any watch-start",
                r.index
            ));
            w.sub = Some((rev, r.index));
            (rev, r.index)
        }
    };
    let mut ordered = true;
    if rev < start {
        let back = match w.last {
            Some((l, li)) if rev <= l => {
                format!("; back in time: it had already received up to {l} (#{li})")
            }
            _ => String::new(),
        };
        anomalies.push(format!(
            "[#{}] watcher p{p}: revision {rev} is older than its subscription's start {start} (watch-start #{start_index}){back}",
            r.index
        ));
        ordered = false;
    } else if let Some((sl, sli)) = w.sub_last {
        if rev <= sl {
            if w.sub_seen.contains(&rev) {
                let first = w.seen.get(&rev).copied().unwrap_or(sli);
                anomalies.push(format!(
                    "[#{}] watcher p{p}: revision {rev} delivered again (first at #{first})",
                    r.index
                ));
            } else {
                anomalies.push(format!(
                    "[#{}] watcher p{p}: revision {rev} delivered after revision {sl} (#{sli}): out of order",
                    r.index
                ));
            }
            ordered = false;
        }
    }
    if ordered {
        // Gap: committed revisions between the previous delivery (or the
        // subscription start) and this one that this watcher skipped.
        let from = match w.sub_last {
            Some((sl, _)) => sl.saturating_add(1),
            None => start,
        };
        if from < rev {
            let skipped: Vec<u64> = committed
                .range(from..rev)
                .copied()
                .filter(|c| !w.seen.contains_key(c))
                .collect();
            if !skipped.is_empty() {
                let after = match w.sub_last {
                    Some((sl, sli)) => format!("revision {sl} (#{sli})"),
                    None => format!("subscribing from {start} (#{start_index})"),
                };
                let listed: Vec<String> = skipped.iter().take(LISTED).map(u64::to_string).collect();
                anomalies.push(format!(
                    "[#{}] watcher p{p}: gap: skipped committed revision{} {}{} between {after} and revision {rev}",
                    r.index,
                    if skipped.len() == 1 { "" } else { "s" },
                    listed.join(", "),
                    if skipped.len() > LISTED {
                        format!(" (… {} in all)", skipped.len())
                    } else {
                        String::new()
                    }
                ));
            }
        }
        w.sub_last = Some((rev, r.index));
    }
    w.sub_seen.insert(rev);
    w.seen.entry(rev).or_insert(r.index);
    if w.last.is_none_or(|(l, _)| rev > l) {
        w.last = Some((rev, r.index));
    }
}
