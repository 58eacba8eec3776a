//! The committed change log as the watchers saw it: for each revision, the
//! event set delivered (every distinct version of it, with who delivered
//! which, so disagreements stay visible instead of being resolved by
//! whoever came first).

use std::collections::BTreeMap;

use crate::history::{Function, Record, RecordType, WatchEvent};

/// One distinct event set delivered for a revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variant {
    /// The events, in a canonical order (key, kind, value, mod_revision).
    pub events: Vec<WatchEvent>,
    /// `(process, record index)` of each delivery of exactly these events.
    pub deliveries: Vec<(i64, u64)>,
}

/// What the watchers delivered for one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Revision {
    /// Distinct versions, in order of first delivery; more than one means
    /// the watchers disagree.
    pub variants: Vec<Variant>,
}

impl Revision {
    /// The events of the first delivery.
    pub fn events(&self) -> &[WatchEvent] {
        self.variants
            .first()
            .map(|v| v.events.as_slice())
            .unwrap_or(&[])
    }

    /// True when every delivery of this revision carried the same events.
    pub fn agreed(&self) -> bool {
        self.variants.len() <= 1
    }

    /// True when some version has a `put` of `key` with `value`.
    pub fn has_put(&self, key: &str, value: &str) -> bool {
        self.variants.iter().any(|v| {
            v.events
                .iter()
                .any(|e| e.kind == "put" && e.key == key && e.value.as_deref() == Some(value))
        })
    }

    /// True when every version has a `put` of `key` with `value`.
    pub fn all_have_put(&self, key: &str, value: &str) -> bool {
        !self.variants.is_empty()
            && self.variants.iter().all(|v| {
                v.events
                    .iter()
                    .any(|e| e.kind == "put" && e.key == key && e.value.as_deref() == Some(value))
            })
    }
}

/// The committed change log reconstructed from `ok` `watch` records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommittedLog {
    pub revisions: BTreeMap<u64, Revision>,
}

/// Sort events into the canonical order used to compare deliveries.
pub fn canonical(events: &[WatchEvent]) -> Vec<WatchEvent> {
    let mut v = events.to_vec();
    v.sort_by(|a, b| {
        (&a.key, &a.kind, &a.value, a.mod_revision).cmp(&(
            &b.key,
            &b.kind,
            &b.value,
            b.mod_revision,
        ))
    });
    v
}

/// `put r1="a"@7, delete r2@7` (at most `limit` events, then `…`).
pub fn fmt_events(events: &[WatchEvent]) -> String {
    const LIMIT: usize = 4;
    let mut parts: Vec<String> = events
        .iter()
        .take(LIMIT)
        .map(|e| match &e.value {
            Some(v) => format!("{} {}={v:?}@{}", e.kind, e.key, e.mod_revision),
            None => format!("{} {}@{}", e.kind, e.key, e.mod_revision),
        })
        .collect();
    if events.len() > LIMIT {
        parts.push(format!("… {} more", events.len() - LIMIT));
    }
    if parts.is_empty() {
        "no events".to_string()
    } else {
        parts.join(", ")
    }
}

impl CommittedLog {
    /// Every `ok` `watch` record that carries a revision, by revision.
    pub fn from_history(records: &[Record]) -> Self {
        let mut log = CommittedLog::default();
        for r in records {
            if r.f != Function::Watch || r.kind != RecordType::Ok {
                continue;
            }
            let Some(rev) = r.revision else { continue };
            let events = canonical(&r.events);
            let entry = log.revisions.entry(rev).or_default();
            match entry.variants.iter_mut().find(|v| v.events == events) {
                Some(v) => v.deliveries.push((r.process, r.index)),
                None => entry.variants.push(Variant {
                    events,
                    deliveries: vec![(r.process, r.index)],
                }),
            }
        }
        log
    }

    /// The highest revision delivered.
    pub fn max_revision(&self) -> Option<u64> {
        self.revisions.keys().next_back().copied()
    }

    /// Ranges `(first, last)` of revisions in `from..=max` nobody delivered.
    pub fn holes(&self, from: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut expect = from;
        for &rev in self.revisions.range(from..).map(|(r, _)| r) {
            if rev > expect {
                out.push((expect, rev - 1));
            }
            expect = rev.saturating_add(1);
        }
        out
    }

    /// Revisions at which some version has a `put` of `key` with `value`.
    pub fn puts_of(&self, key: &str, value: &str) -> Vec<u64> {
        self.revisions
            .iter()
            .filter(|(_, r)| r.has_put(key, value))
            .map(|(rev, _)| *rev)
            .collect()
    }
}
