//! Runs every checker over a history and summarizes: [`check`] returns a
//! [`Report`] whose [`Report::valid`] is true only if every checker passed,
//! and whose `Display` is the human-readable summary (`:valid? true`, each
//! checker's result, the first few anomalies with their record indices).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use crate::history::{Function, Record, RecordType};
use crate::{linearizable, lost, watch, wellformed};

/// How to check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckOptions {
    /// Time budget of the linearizability search (all keys together); keys
    /// not finished in time are `Unknown`, which is not valid.
    pub deadline: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            deadline: Duration::from_secs(60),
        }
    }
}

/// One checker's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// The anomalies found, each naming the records involved as `#index`.
    Fail(Vec<String>),
    /// Could not decide (deadline, missing data): not a pass.
    Unknown(String),
}

impl Verdict {
    pub fn is_pass(&self) -> bool {
        matches!(self, Verdict::Pass)
    }
}

/// One checker's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckerResult {
    /// `history`, `linearizable`, `lost` or `watch`.
    pub name: &'static str,
    pub verdict: Verdict,
    /// Context that is not an anomaly (coverage, counts, runner deviations).
    pub notes: Vec<String>,
}

impl CheckerResult {
    /// `Fail(anomalies)` if there are any, else `Pass`.
    pub fn from_anomalies(name: &'static str, anomalies: Vec<String>, notes: Vec<String>) -> Self {
        CheckerResult {
            name,
            verdict: if anomalies.is_empty() {
                Verdict::Pass
            } else {
                Verdict::Fail(anomalies)
            },
            notes,
        }
    }
}

/// What the history contains.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub records: usize,
    /// Client records (`read`/`write`/`cas`) by `(f, type)`, e.g. `("cas", "fail")`.
    pub ops: BTreeMap<(String, String), usize>,
    /// Distinct keys of client operations.
    pub keys: usize,
    pub nemesis: usize,
    /// `ok` `watch` records.
    pub watch_deliveries: usize,
    /// `watch-start` records.
    pub watch_starts: usize,
    /// Distinct processes with watch records.
    pub watchers: usize,
}

impl Counts {
    pub fn of(records: &[Record]) -> Self {
        let mut c = Counts {
            records: records.len(),
            ..Counts::default()
        };
        let mut keys = BTreeSet::new();
        let mut watchers = BTreeSet::new();
        for r in records {
            match r.f {
                Function::Read | Function::Write | Function::Cas => {
                    *c.ops
                        .entry((r.f.as_str().to_string(), r.kind.as_str().to_string()))
                        .or_default() += 1;
                    if let Some(k) = &r.key {
                        keys.insert(k.as_str());
                    }
                }
                Function::Nemesis => c.nemesis += 1,
                Function::Watch => {
                    watchers.insert(r.process);
                    if r.kind == RecordType::Ok {
                        c.watch_deliveries += 1;
                    }
                }
                Function::WatchStart => {
                    watchers.insert(r.process);
                    c.watch_starts += 1;
                }
            }
        }
        c.keys = keys.len();
        c.watchers = watchers.len();
        c
    }

    /// Client operations invoked.
    pub fn invokes(&self) -> usize {
        self.ops
            .iter()
            .filter(|((_, t), _)| t == "invoke")
            .map(|(_, n)| n)
            .sum()
    }
}

/// The result of [`check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub counts: Counts,
    /// `history`, `linearizable`, `lost`, `watch`, in that order.
    pub checkers: Vec<CheckerResult>,
}

impl Report {
    /// True only if every checker passed (`Unknown` is not a pass).
    pub fn valid(&self) -> bool {
        self.checkers.iter().all(|c| c.verdict.is_pass())
    }

    /// The result of the checker called `name`.
    pub fn checker(&self, name: &str) -> Option<&CheckerResult> {
        self.checkers.iter().find(|c| c.name == name)
    }
}

/// Run every checker.
pub fn check(records: &[Record], opts: CheckOptions) -> Report {
    Report {
        counts: Counts::of(records),
        checkers: vec![
            wellformed::check(records),
            linearizable::checker(records, opts.deadline),
            lost::check(records),
            watch::check(records),
        ],
    }
}

/// How many anomalies per checker `Display` shows.
const SHOWN: usize = 5;

fn valid_word(v: &Verdict) -> &'static str {
    match v {
        Verdict::Pass => "true",
        Verdict::Fail(_) => "false",
        Verdict::Unknown(_) => "unknown",
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        writeln!(f, ":valid? {}", self.valid())?;
        writeln!(
            f,
            ":history {} records: {} client ops on {} keys, {} nemesis records, {} watch deliveries to {} watchers ({} subscriptions)",
            c.records,
            c.invokes(),
            c.keys,
            c.nemesis,
            c.watch_deliveries,
            c.watchers,
            c.watch_starts
        )?;
        let mut by_f: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for ((func, t), n) in &c.ops {
            by_f.entry(func).or_default().push(format!("{t} {n}"));
        }
        for (func, parts) in by_f {
            writeln!(f, "    {func:<6} {}", parts.join(", "))?;
        }
        for ch in &self.checkers {
            write!(f, ":{:<13} :valid? {}", ch.name, valid_word(&ch.verdict))?;
            match &ch.verdict {
                Verdict::Pass => writeln!(f)?,
                Verdict::Unknown(why) => writeln!(f, " — {why}")?,
                Verdict::Fail(anomalies) => {
                    writeln!(
                        f,
                        " — {} anomal{}",
                        anomalies.len(),
                        if anomalies.len() == 1 { "y" } else { "ies" }
                    )?;
                    for a in anomalies.iter().take(SHOWN) {
                        writeln!(f, "    - {a}")?;
                    }
                    if anomalies.len() > SHOWN {
                        writeln!(f, "    … and {} more", anomalies.len() - SHOWN)?;
                    }
                }
            }
            for n in ch.notes.iter().take(SHOWN) {
                writeln!(f, "    ({n})")?;
            }
            if ch.notes.len() > SHOWN {
                writeln!(f, "    (… and {} more notes)", ch.notes.len() - SHOWN)?;
            }
        }
        Ok(())
    }
}
