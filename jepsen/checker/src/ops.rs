//! Client operations: pairs each `invoke` record of `read`/`write`/`cas`
//! with its completion (the next completion record of the same process),
//! reporting records that do not fit the pairing rules as problems instead
//! of panicking or guessing silently.
//!
//! Rules (see [`crate::history`]): a process runs one operation at a time,
//! so its completion is the next `ok`/`fail`/`info` record of that process.
//! An invoke that is never completed (the history was cut short) is
//! [`Outcome::Pending`], which every checker treats like `info`.

use std::collections::HashMap;

use crate::history::{Function, Record, RecordType};

/// How a client operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// It happened.
    Ok,
    /// It certainly did not happen.
    Fail,
    /// Indeterminate: it may have taken effect at any time after its invoke, or never.
    Info,
    /// No completion in the history: treated like [`Outcome::Info`].
    Pending,
}

impl Outcome {
    /// `ok`, `fail`, `info` or `pending`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Fail => "fail",
            Outcome::Info => "info",
            Outcome::Pending => "pending",
        }
    }

    /// `info` or `pending`: may or may not have happened.
    pub fn is_indeterminate(self) -> bool {
        matches!(self, Outcome::Info | Outcome::Pending)
    }
}

/// One client operation (`read`, `write` or `cas`): an invoke and its completion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOp {
    pub process: i64,
    /// [`Function::Read`], [`Function::Write`] or [`Function::Cas`].
    pub f: Function,
    pub key: String,
    /// `read`: the value read (only meaningful when `ok`; `None` = absent).
    /// `write`/`cas`: the value put.
    pub value: Option<String>,
    /// `cas`: the value compared against (`None` = absent).
    pub expected: Option<String>,
    pub outcome: Outcome,
    pub invoke_index: u64,
    /// When the operation was invoked: `time_ns`, or the record index when
    /// the history carries no times (every `time_ns` is 0).
    pub invoke_time: u64,
    pub complete_index: Option<u64>,
    /// When it completed (same basis as `invoke_time`, never before it).
    pub complete_time: Option<u64>,
    /// The revision of an `ok` completion (read: the key's mod_revision).
    pub revision: Option<u64>,
    /// The node that answered.
    pub node: Option<u64>,
}

impl ClientOp {
    /// `#12` or `#12..#15`: the records of this operation.
    pub fn span(&self) -> String {
        match self.complete_index {
            Some(c) => format!("#{}..#{}", self.invoke_index, c),
            None => format!("#{}", self.invoke_index),
        }
    }

    /// A one-line description, e.g. `p3 cas r1 "a" -> "b" ok rev 7 [#4..#9]`.
    pub fn describe(&self) -> String {
        format!("{} [{}]", self.what(), self.span())
    }

    /// [`ClientOp::describe`] without the record span.
    pub fn what(&self) -> String {
        let what = match self.f {
            Function::Read => {
                if self.outcome == Outcome::Ok {
                    format!("read {} -> {}", self.key, show(self.value.as_deref()))
                } else {
                    format!("read {}", self.key)
                }
            }
            Function::Write => format!("write {} := {}", self.key, show(self.value.as_deref())),
            Function::Cas => format!(
                "cas {} {} -> {}",
                self.key,
                show(self.expected.as_deref()),
                show(self.value.as_deref())
            ),
            other => format!("{other:?} {}", self.key),
        };
        let rev = match self.revision {
            Some(r) if self.outcome == Outcome::Ok => format!(" rev {r}"),
            _ => String::new(),
        };
        format!("p{} {what} {}{rev}", self.process, self.outcome.as_str())
    }
}

/// A register value for messages: `"v"` quoted, or `absent`.
pub fn show(value: Option<&str>) -> String {
    match value {
        Some(v) => format!("{v:?}"),
        None => "absent".to_string(),
    }
}

/// The client operations of a history, in invoke order, and what did not fit.
#[derive(Clone, Debug, Default)]
pub struct ClientOps {
    pub ops: Vec<ClientOp>,
    /// Records that break the pairing rules, each starting with `[#index]`.
    pub problems: Vec<String>,
}

/// True for the client functions `read`, `write`, `cas`.
pub fn is_client(f: Function) -> bool {
    matches!(f, Function::Read | Function::Write | Function::Cas)
}

/// Whether the history uses record indices as time (every `time_ns` is 0).
pub fn index_time(records: &[Record]) -> bool {
    !records.is_empty() && records.iter().all(|r| r.time_ns == 0)
}

/// The time of a record on the basis chosen by [`index_time`].
pub fn time_of(record: &Record, by_index: bool) -> u64 {
    if by_index {
        record.index
    } else {
        record.time_ns
    }
}

/// Pair invokes with completions. Never panics; malformed records become
/// `problems` (and an operation with a mismatched completion becomes `info`).
pub fn client_ops(records: &[Record]) -> ClientOps {
    let by_index = index_time(records);
    let mut out = ClientOps::default();
    // process -> index into out.ops of its open operation
    let mut open: HashMap<i64, usize> = HashMap::new();
    for r in records {
        if !is_client(r.f) {
            continue;
        }
        let t = time_of(r, by_index);
        match r.kind {
            RecordType::Invoke => {
                if let Some(prev) = open.remove(&r.process) {
                    let prev_index = out.ops.get(prev).map(|o| o.invoke_index).unwrap_or(0);
                    out.problems.push(format!(
                        "[#{}] process {} invoked a new operation while #{} was still open (treated as info)",
                        r.index, r.process, prev_index
                    ));
                }
                let Some(key) = r.key.clone() else {
                    out.problems.push(format!(
                        "[#{}] {:?} invoke without a key (ignored)",
                        r.index, r.f
                    ));
                    continue;
                };
                if matches!(r.f, Function::Write | Function::Cas) && r.value.is_none() {
                    out.problems
                        .push(format!("[#{}] {:?} invoke without a value", r.index, r.f));
                }
                open.insert(r.process, out.ops.len());
                out.ops.push(ClientOp {
                    process: r.process,
                    f: r.f,
                    key,
                    value: if r.f == Function::Read {
                        None
                    } else {
                        r.value.clone()
                    },
                    expected: r.expected.clone(),
                    outcome: Outcome::Pending,
                    invoke_index: r.index,
                    invoke_time: t,
                    complete_index: None,
                    complete_time: None,
                    revision: None,
                    node: None,
                });
            }
            RecordType::Ok | RecordType::Fail | RecordType::Info => {
                let Some(slot) = open.remove(&r.process) else {
                    out.problems.push(format!(
                        "[#{}] {:?} completion from process {} without an open invoke (ignored)",
                        r.index, r.f, r.process
                    ));
                    continue;
                };
                let Some(op) = out.ops.get_mut(slot) else {
                    continue;
                };
                op.complete_index = Some(r.index);
                op.complete_time = Some(t.max(op.invoke_time));
                op.node = r.node;
                let mismatch = if op.f != r.f {
                    Some(format!("function {:?} but invoked {:?}", r.f, op.f))
                } else if r.key.is_some() && r.key.as_deref() != Some(op.key.as_str()) {
                    Some(format!("key {:?} but invoked {:?}", r.key, op.key))
                } else if op.f != Function::Read
                    && r.value.is_some()
                    && op.value.is_some()
                    && r.value != op.value
                {
                    Some(format!("value {:?} but invoked {:?}", r.value, op.value))
                } else {
                    None
                };
                if let Some(m) = mismatch {
                    out.problems.push(format!(
                        "[#{}] completion of #{} has {m} (treated as info)",
                        r.index, op.invoke_index
                    ));
                    op.outcome = Outcome::Info;
                    continue;
                }
                op.outcome = match r.kind {
                    RecordType::Ok => Outcome::Ok,
                    RecordType::Fail => Outcome::Fail,
                    _ => Outcome::Info,
                };
                if op.value.is_none() && op.f != Function::Read {
                    op.value = r.value.clone();
                }
                if op.outcome == Outcome::Ok {
                    op.revision = r.revision;
                    if op.f == Function::Read {
                        op.value = r.value.clone();
                    }
                    if r.revision.is_none() {
                        out.problems
                            .push(format!("[#{}] ok {:?} without a revision", r.index, op.f));
                    }
                    if op.f == Function::Read {
                        match (&r.value, r.revision) {
                            (Some(_), Some(0)) => out.problems.push(format!(
                                "[#{}] ok read returned a value with mod_revision 0",
                                r.index
                            )),
                            (None, Some(rev)) if rev != 0 => out.problems.push(format!(
                                "[#{}] ok read of an absent key with mod_revision {rev}",
                                r.index
                            )),
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    out
}
