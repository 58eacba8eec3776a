//! Linearizability of the register workload, per key.
//!
//! A register is a P-compositional object (Herlihy & Wing: a history is
//! linearizable iff each key's sub-history is), so each key is searched on
//! its own, in parallel threads, all sharing one deadline.
//!
//! The search is Wing & Gong's, as refined by Lowe ("just-in-time"
//! linearization) and implemented by Porcupine: the call and return
//! entries of the operations, sorted by time, sit in a doubly linked list
//! (an index arena here); the search walks it from the head, linearizes a
//! call entry whose operation is legal in the current register state by
//! *lifting* its call and return entries out of the list, and backtracks
//! (*unlifting*) when it meets the return entry of an operation it has not
//! linearized — that operation had to take effect before returning.
//! Visited configurations `(set of linearized ops as a bitset, register
//! value)` are memoized, so no configuration is explored twice.
//!
//! Two register-specific prunings keep the search near-linear on valid
//! histories with much overlap (both proven against a brute-force checker
//! in the tests):
//! - a read that is legal now is linearized at once and never branched on:
//!   it changes nothing, and every operation that had to precede it
//!   already has, so if any completion exists, one starts with it;
//! - a step that overwrites a value that can never come back — "absent",
//!   or a value with a single writer — while a required operation not yet
//!   linearized still needs it (a read of it, a cas expecting it) is not
//!   taken: no completion exists from there.
//!
//! Operations:
//! - the call time is the invoke record's `time_ns` and the return time
//!   the completion's; at equal times calls sort before returns (the
//!   operations count as concurrent — the lenient choice);
//! - `fail` operations and non-`ok` reads are dropped (no effect, no
//!   information);
//! - `info` (and never completed) writes and cas have no return entry:
//!   they may be linearized anywhere after their call, or left out;
//!   the search succeeds once every `ok` operation is linearized.
//!   Two sound reductions keep them cheap: one whose value no `ok` read
//!   or cas ever observes is dropped (leaving it out is always at least as
//!   good), and one with a unique value observed by an `ok` operation
//!   must precede its earliest-returning observer, so it gets that
//!   observer's return time and is no longer optional;
//! - every key starts absent.
//!
//! A search that reaches the deadline (or its memory budget) answers
//! [`KeyResult::Unknown`], which the report counts as not valid.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::history::{Function, Record};
use crate::ops::{client_ops, show, ClientOp, Outcome};
use crate::report::{CheckerResult, Verdict};

/// The memo caches of the keys searched at once (one per thread) may use
/// about this many bytes together; a search that needs more gives up with
/// [`KeyResult::Unknown`].
pub const CACHE_BUDGET_BYTES: usize = 2 << 30;

/// What a register operation does.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RegisterOpKind {
    /// Returned `value` (`None`: absent).
    Read { value: Option<String> },
    /// Put `value`.
    Write { value: String },
    /// Put `value` if the register holds `expected` (`None`: absent).
    Cas {
        expected: Option<String>,
        value: String,
    },
}

/// One operation of one key's sub-history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterOp {
    pub kind: RegisterOpKind,
    /// Call time.
    pub call: u64,
    /// Return time; `None` for an indeterminate (`info`) operation, which
    /// may be linearized at any point after `call`, or not at all.
    pub ret: Option<u64>,
    pub process: i64,
    pub invoke_index: u64,
    pub complete_index: Option<u64>,
}

impl RegisterOp {
    /// From a paired client operation; `None` for operations that carry no
    /// constraint (`fail`, non-`ok` reads, writes without a value).
    pub fn from_client(op: &ClientOp) -> Option<RegisterOp> {
        if op.outcome == Outcome::Fail {
            return None;
        }
        let kind = match op.f {
            Function::Read if op.outcome == Outcome::Ok => RegisterOpKind::Read {
                value: op.value.clone(),
            },
            Function::Write => RegisterOpKind::Write {
                value: op.value.clone()?,
            },
            Function::Cas => RegisterOpKind::Cas {
                expected: op.expected.clone(),
                value: op.value.clone()?,
            },
            _ => return None,
        };
        let ret = if op.outcome == Outcome::Ok {
            Some(op.complete_time.unwrap_or(u64::MAX).max(op.invoke_time))
        } else {
            None
        };
        Some(RegisterOp {
            kind,
            call: op.invoke_time,
            ret,
            process: op.process,
            invoke_index: op.invoke_index,
            complete_index: op.complete_index,
        })
    }

    /// `#3..#9` or `#3` (no completion record, or not an `ok` one).
    pub fn span(&self) -> String {
        match (self.ret, self.complete_index) {
            (Some(_), Some(c)) => format!("#{}..#{}", self.invoke_index, c),
            (None, Some(c)) => format!("#{}..#{} info", self.invoke_index, c),
            _ => format!("#{}", self.invoke_index),
        }
    }

    /// E.g. `p3 read -> "a" [#3..#9]`.
    pub fn describe(&self) -> String {
        format!("{} [{}]", self.what(), self.span())
    }

    /// E.g. `p3 read -> "a"`.
    pub fn what(&self) -> String {
        let what = match &self.kind {
            RegisterOpKind::Read { value } => format!("read -> {}", show(value.as_deref())),
            RegisterOpKind::Write { value } => format!("write {value:?}"),
            RegisterOpKind::Cas { expected, value } => {
                format!("cas {} -> {value:?}", show(expected.as_deref()))
            }
        };
        format!("p{} {what}", self.process)
    }
}

/// An operation that could not be linearized next, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unplaced {
    pub op: RegisterOp,
    pub reason: String,
}

/// Why a key's history is not linearizable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The longest legal linearization the search found, in order.
    pub prefix: Vec<RegisterOp>,
    /// The register's value after `prefix` (`None`: absent).
    pub state: Option<String>,
    /// After `prefix`: first the operation that returned without any way
    /// to linearize it, then the other candidates that could not go next.
    pub unplaced: Vec<Unplaced>,
}

/// The verdict for one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyResult {
    Ok,
    Violation(Violation),
    /// The search did not finish (deadline or memory budget): not a pass.
    Unknown(String),
}

/// Per-key verdicts of a whole history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Linearizability {
    pub keys: BTreeMap<String, KeyResult>,
    /// Operations searched per key (after dropping those without effect).
    pub ops_per_key: BTreeMap<String, usize>,
}

impl Linearizability {
    /// True when every key is [`KeyResult::Ok`].
    pub fn valid(&self) -> bool {
        self.keys.values().all(|r| *r == KeyResult::Ok)
    }
}

/// Check every key of `records` within `deadline` (shared by all keys).
pub fn check_history(records: &[Record], deadline: Duration) -> Linearizability {
    let end = Instant::now().checked_add(deadline);
    let paired = client_ops(records);
    let mut by_key: BTreeMap<String, Vec<RegisterOp>> = BTreeMap::new();
    for op in &paired.ops {
        let entry = by_key.entry(op.key.clone()).or_default();
        if let Some(rop) = RegisterOp::from_client(op) {
            entry.push(rop);
        }
    }
    let ops_per_key = by_key.iter().map(|(k, v)| (k.clone(), v.len())).collect();
    // Smallest keys first, so a pathological key does not starve the rest.
    let mut work: Vec<(String, Vec<RegisterOp>)> = by_key.into_iter().collect();
    work.sort_by_key(|(_, ops)| ops.len());
    let results: Mutex<Vec<Option<KeyResult>>> = Mutex::new(vec![None; work.len()]);
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, work.len().max(1));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((_, ops)) = work.get(i) else { break };
                    let result = check_ops_until(ops, end, CACHE_BUDGET_BYTES / threads);
                    let mut guard = results.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(slot) = guard.get_mut(i) {
                        *slot = Some(result);
                    }
                })
            })
            .collect();
        for h in handles {
            // A panicking worker leaves its keys without a result: Unknown below.
            let _ = h.join();
        }
    });
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let keys = work
        .into_iter()
        .zip(results)
        .map(|((key, _), r)| {
            (
                key,
                r.unwrap_or_else(|| KeyResult::Unknown("checker thread failed".to_string())),
            )
        })
        .collect();
    Linearizability { keys, ops_per_key }
}

/// Check one key's operations, giving up after `deadline`.
pub fn check_ops(ops: &[RegisterOp], deadline: Duration) -> KeyResult {
    check_ops_until(
        ops,
        Instant::now().checked_add(deadline),
        CACHE_BUDGET_BYTES,
    )
}

/// The linearizability checker as a report entry.
pub fn checker(records: &[Record], deadline: Duration) -> CheckerResult {
    let lin = check_history(records, deadline);
    from_linearizability(&lin)
}

/// Turn per-key results into a report entry: a violation on any key fails,
/// else any unfinished key makes it unknown.
pub fn from_linearizability(lin: &Linearizability) -> CheckerResult {
    let mut anomalies = Vec::new();
    let mut unknown = Vec::new();
    for (key, r) in &lin.keys {
        match r {
            KeyResult::Ok => {}
            KeyResult::Violation(v) => anomalies.push(explain(key, v)),
            KeyResult::Unknown(why) => unknown.push(format!("key {key:?}: {why}")),
        }
    }
    let total: usize = lin.ops_per_key.values().sum();
    let mut notes = vec![format!(
        "{} keys, {} operations searched; {} keys linearizable",
        lin.keys.len(),
        total,
        lin.keys.values().filter(|r| **r == KeyResult::Ok).count()
    )];
    let verdict = if !anomalies.is_empty() {
        notes.extend(unknown.iter().map(|u| format!("also unfinished: {u}")));
        Verdict::Fail(anomalies)
    } else if !unknown.is_empty() {
        Verdict::Unknown(unknown.join("; "))
    } else {
        Verdict::Pass
    };
    CheckerResult {
        name: "linearizable",
        verdict,
        notes,
    }
}

/// One line explaining a violation: where the search got stuck.
pub fn explain(key: &str, v: &Violation) -> String {
    const TAIL: usize = 3;
    let mut s = String::new();
    if let Some(first) = v.unplaced.first() {
        s.push_str(&format!(
            "[{}] key {key:?}: {} cannot be linearized: {}",
            first.op.span(),
            first.op.what(),
            first.reason
        ));
    } else {
        s.push_str(&format!("key {key:?}: not linearizable"));
    }
    s.push_str(&format!(
        "; longest linearizable prefix: {} ops",
        v.prefix.len()
    ));
    if !v.prefix.is_empty() {
        let tail: Vec<String> = v
            .prefix
            .iter()
            .skip(v.prefix.len().saturating_sub(TAIL))
            .map(RegisterOp::describe)
            .collect();
        s.push_str(&format!(", ending … {}", tail.join(", ")));
    }
    s.push_str(&format!(
        ", leaving the register {}",
        show(v.state.as_deref())
    ));
    let others: Vec<String> = v
        .unplaced
        .iter()
        .skip(1)
        .take(4)
        .map(|u| format!("{} ({})", u.op.describe(), u.reason))
        .collect();
    if !others.is_empty() {
        s.push_str(&format!("; nor could the concurrent {}", others.join(", ")));
        if v.unplaced.len() > 5 {
            s.push_str(&format!(" and {} more", v.unplaced.len() - 5));
        }
    }
    s
}

// ---------------------------------------------------------------------------
// The search.

/// Interned register value: 0 is "absent".
type Val = u32;

#[derive(Clone, Copy, Debug)]
enum Step {
    Read(Val),
    Write(Val),
    Cas(Val, Val),
}

#[derive(Clone, Copy, Debug)]
struct SearchOp {
    step: Step,
    call: u64,
    ret: Option<u64>,
    /// Index into the caller's ops.
    orig: usize,
}

fn apply(state: Val, step: Step) -> Option<Val> {
    match step {
        Step::Read(v) => (state == v).then_some(state),
        Step::Write(v) => Some(v),
        Step::Cas(e, v) => (state == e).then_some(v),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct BitSet(Box<[u64]>);

impl BitSet {
    fn new(n: usize) -> Self {
        BitSet(vec![0u64; n.div_ceil(64).max(1)].into_boxed_slice())
    }
    fn set(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1u64 << (i % 64);
        }
    }
    fn get(&self, i: usize) -> bool {
        self.0
            .get(i / 64)
            .is_some_and(|w| w & (1u64 << (i % 64)) != 0)
    }
    fn clear(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w &= !(1u64 << (i % 64));
        }
    }
}

struct Interner<'a> {
    ids: HashMap<&'a str, Val>,
    names: Vec<&'a str>,
}

impl<'a> Interner<'a> {
    fn new() -> Self {
        Interner {
            ids: HashMap::new(),
            names: vec![""],
        }
    }
    fn id(&mut self, v: Option<&'a str>) -> Val {
        let Some(v) = v else { return 0 };
        if let Some(&id) = self.ids.get(v) {
            return id;
        }
        let id = Val::try_from(self.names.len()).unwrap_or(Val::MAX);
        self.names.push(v);
        self.ids.insert(v, id);
        id
    }
    fn name(&self, id: Val) -> Option<String> {
        if id == 0 {
            None
        } else {
            self.names.get(id as usize).map(|s| s.to_string())
        }
    }
}

/// Apply the reductions for indeterminate operations (see the module docs).
fn prepare<'a>(ops: &'a [RegisterOp], intern: &mut Interner<'a>) -> Vec<SearchOp> {
    let mut out: Vec<SearchOp> = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let step = match &op.kind {
            RegisterOpKind::Read { value } => Step::Read(intern.id(value.as_deref())),
            RegisterOpKind::Write { value } => Step::Write(intern.id(Some(value))),
            RegisterOpKind::Cas { expected, value } => {
                Step::Cas(intern.id(expected.as_deref()), intern.id(Some(value)))
            }
        };
        let ret = op.ret.map(|r| r.max(op.call));
        out.push(SearchOp {
            step,
            call: op.call,
            ret,
            orig: i,
        });
    }
    // Observers of each value: any read/cas that needs it (ok or not), and
    // the earliest return among `ok` ones.
    let mut observed: HashMap<Val, Option<u64>> = HashMap::new();
    let mut writers: HashMap<Val, usize> = HashMap::new();
    for op in &out {
        let (needs, ok_ret) = match op.step {
            Step::Read(v) => (Some(v), op.ret),
            Step::Cas(e, v) => {
                *writers.entry(v).or_default() += 1;
                (Some(e), op.ret)
            }
            Step::Write(v) => {
                *writers.entry(v).or_default() += 1;
                (None, None)
            }
        };
        if let Some(v) = needs {
            let slot = observed.entry(v).or_insert(None);
            if let Some(r) = ok_ret {
                *slot = Some(slot.map_or(r, |s: u64| s.min(r)));
            }
        }
    }
    out.retain_mut(|op| {
        if op.ret.is_some() {
            return true;
        }
        let v = match op.step {
            Step::Write(v) | Step::Cas(_, v) => v,
            Step::Read(_) => return false,
        };
        match observed.get(&v) {
            None => false,
            Some(first_ok) => {
                if writers.get(&v).copied() == Some(1) {
                    if let Some(r) = first_ok {
                        if *r >= op.call {
                            op.ret = Some(*r);
                        }
                    }
                }
                true
            }
        }
    });
    out
}

/// A value no operation puts, needed by an `ok` operation: it can never
/// be linearized, whatever the order.
fn impossible(ops: &[SearchOp]) -> Option<(usize, Val)> {
    let written: HashSet<Val> = ops
        .iter()
        .filter_map(|o| match o.step {
            Step::Write(v) | Step::Cas(_, v) => Some(v),
            Step::Read(_) => None,
        })
        .collect();
    ops.iter().enumerate().find_map(|(i, o)| {
        let need = match o.step {
            Step::Read(v) | Step::Cas(v, _) => v,
            Step::Write(_) => return None,
        };
        (o.ret.is_some() && need != 0 && !written.contains(&need)).then_some((i, need))
    })
}

/// The arena-backed doubly linked list of call/return entries.
/// Node 0 is the head sentinel; node k (k >= 1) is entry k - 1.
struct EntryList {
    next: Vec<Option<usize>>,
    prev: Vec<usize>,
    /// Search op of each node.
    op: Vec<usize>,
    /// For a call node, its return node.
    ret_of: Vec<Option<usize>>,
    is_call: Vec<bool>,
    /// Call node of each search op.
    call_node: Vec<usize>,
}

impl EntryList {
    fn new(ops: &[SearchOp]) -> Self {
        // (time, 0 = call / 1 = return, op)
        let mut entries: Vec<(u64, u8, usize)> = Vec::with_capacity(ops.len() * 2);
        for (i, o) in ops.iter().enumerate() {
            entries.push((o.call, 0, i));
            if let Some(r) = o.ret {
                entries.push((r, 1, i));
            }
        }
        entries.sort_unstable();
        let m = entries.len();
        let mut list = EntryList {
            next: vec![None; m + 1],
            prev: vec![0; m + 1],
            op: vec![usize::MAX; m + 1],
            ret_of: vec![None; m + 1],
            is_call: vec![false; m + 1],
            call_node: vec![0; ops.len()],
        };
        for (k, &(_, kind, i)) in entries.iter().enumerate() {
            let node = k + 1;
            list.next[k] = Some(node);
            list.prev[node] = k;
            list.op[node] = i;
            list.is_call[node] = kind == 0;
            if kind == 0 {
                list.call_node[i] = node;
            } else {
                let c = list.call_node[i];
                list.ret_of[c] = Some(node);
            }
        }
        list
    }

    fn first(&self) -> Option<usize> {
        self.next[0]
    }

    fn unlink(&mut self, node: usize) {
        let p = self.prev[node];
        let n = self.next[node];
        self.next[p] = n;
        if let Some(n) = n {
            self.prev[n] = p;
        }
    }

    fn relink(&mut self, node: usize) {
        let p = self.prev[node];
        let n = self.next[node];
        self.next[p] = Some(node);
        if let Some(n) = n {
            self.prev[n] = node;
        }
    }

    /// Remove a call node and its return node.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        if let Some(r) = self.ret_of[call] {
            self.unlink(r);
        }
    }

    /// Undo the last `lift(call)`.
    fn unlift(&mut self, call: usize) {
        if let Some(r) = self.ret_of[call] {
            self.relink(r);
        }
        self.relink(call);
    }
}

/// The deepest dead end seen: what to explain if the search fails.
struct Best {
    prefix: Vec<usize>,
    state: Val,
    /// (search op, why) — the blocking op first.
    unplaced: Vec<(usize, String)>,
}

/// The value an operation needs the register to hold.
fn needs(step: Step) -> Option<Val> {
    match step {
        Step::Read(v) | Step::Cas(v, _) => Some(v),
        Step::Write(_) => None,
    }
}

/// Why an operation cannot go next.
enum Blocked {
    /// Its precondition does not hold.
    Illegal,
    /// It would overwrite a value that can never come back while a
    /// required operation still needs it.
    Overwrites(Val),
}

/// Search state besides the entry list.
struct Search<'s> {
    ops: &'s [SearchOp],
    /// Per value: no operation other than its single writer can produce
    /// it again once overwritten (always true of "absent").
    unique: Vec<bool>,
    /// Per value: required operations not yet linearized that need it.
    need: Vec<u32>,
}

impl Search<'_> {
    fn new(ops: &[SearchOp], values: usize) -> Search<'_> {
        let mut writers = vec![0u32; values];
        let mut need = vec![0u32; values];
        for op in ops {
            if let Step::Write(v) | Step::Cas(_, v) = op.step {
                if let Some(w) = writers.get_mut(v as usize) {
                    *w += 1;
                }
            }
            if op.ret.is_some() {
                if let Some(n) = needs(op.step).and_then(|v| need.get_mut(v as usize)) {
                    *n += 1;
                }
            }
        }
        let mut unique: Vec<bool> = writers.iter().map(|w| *w <= 1).collect();
        if let Some(u) = unique.first_mut() {
            *u = true;
        }
        Search { ops, unique, need }
    }

    /// The state after op `i`, if it may go next in `state`.
    ///
    /// Besides the model's precondition this prunes a step that overwrites
    /// a value which can never be produced again (its only writer already
    /// took effect, or it is "absent") while some required operation not
    /// yet linearized still needs it: no completion exists from there.
    fn step(&self, state: Val, i: usize) -> Result<Val, Blocked> {
        let Some(op) = self.ops.get(i) else {
            return Err(Blocked::Illegal);
        };
        let new = apply(state, op.step).ok_or(Blocked::Illegal)?;
        if new != state && self.unique.get(state as usize).copied().unwrap_or(false) {
            let mut remaining = self.need.get(state as usize).copied().unwrap_or(0);
            if op.ret.is_some() && needs(op.step) == Some(state) {
                remaining = remaining.saturating_sub(1);
            }
            if remaining > 0 {
                return Err(Blocked::Overwrites(state));
            }
        }
        Ok(new)
    }

    fn linearized(&mut self, i: usize, done: bool) {
        let Some(op) = self.ops.get(i) else { return };
        if op.ret.is_none() {
            return;
        }
        if let Some(n) = needs(op.step).and_then(|v| self.need.get_mut(v as usize)) {
            if done {
                *n = n.saturating_sub(1);
            } else {
                *n += 1;
            }
        }
    }

    /// Why op `i` cannot go next in `state`, for explanations.
    fn why_not(
        &self,
        state: Val,
        i: usize,
        linearized: &BitSet,
        intern: &Interner<'_>,
        resolve: &dyn Fn(usize) -> RegisterOp,
    ) -> String {
        let held = show(intern.name(state).as_deref());
        let Some(op) = self.ops.get(i) else {
            return String::new();
        };
        match (self.step(state, i), op.step) {
            (Err(Blocked::Illegal), Step::Read(v)) => format!(
                "it read {} but the register held {held}",
                show(intern.name(v).as_deref())
            ),
            (Err(Blocked::Illegal), Step::Cas(e, _)) => format!(
                "it expected {} but the register held {held}",
                show(intern.name(e).as_deref())
            ),
            (Err(Blocked::Overwrites(v)), _) => {
                let needer = self.ops.iter().enumerate().find(|(j, o)| {
                    *j != i && o.ret.is_some() && needs(o.step) == Some(v) && !linearized.get(*j)
                });
                match needer {
                    Some((j, _)) => format!(
                        "it would overwrite {held}, which {} still needs",
                        resolve(j).describe()
                    ),
                    None => format!("it would overwrite {held}, which is still needed"),
                }
            }
            _ => "every state it leads to was already explored and failed".to_string(),
        }
    }
}

/// Where the search loop is.
enum Mode {
    /// Just linearized something (or starting): look for a forced read.
    Fresh,
    /// Trying the entries from this one on.
    Walk(Option<usize>),
    /// Undo the last choice.
    Backtrack,
}

fn check_ops_until(ops: &[RegisterOp], deadline: Option<Instant>, budget: usize) -> KeyResult {
    let mut intern = Interner::new();
    let sops = prepare(ops, &mut intern);
    let n = sops.len();
    let required_total = sops.iter().filter(|o| o.ret.is_some()).count();
    if required_total == 0 {
        return KeyResult::Ok;
    }
    let resolve = |i: usize| -> RegisterOp {
        let orig = sops.get(i).map(|s| s.orig).unwrap_or(0);
        ops.get(orig).cloned().unwrap_or(RegisterOp {
            kind: RegisterOpKind::Read { value: None },
            call: 0,
            ret: None,
            process: 0,
            invoke_index: 0,
            complete_index: None,
        })
    };
    if let Some((i, need)) = impossible(&sops) {
        let name = show(intern.name(need).as_deref());
        return KeyResult::Violation(Violation {
            prefix: Vec::new(),
            state: None,
            unplaced: vec![Unplaced {
                op: resolve(i),
                reason: format!("no operation ever put {name}"),
            }],
        });
    }

    let mut search = Search::new(&sops, intern.names.len());
    let mut list = EntryList::new(&sops);
    let words = n.div_ceil(64).max(1);
    let entry_bytes = words * 8 + 64;
    let max_entries = budget / entry_bytes;
    let mut cache: HashSet<(BitSet, Val)> = HashSet::new();
    let mut linearized = BitSet::new(n);
    let mut state: Val = 0;
    // (call node, state before it, forced)
    let mut stack: Vec<(usize, Val, bool)> = Vec::new();
    let mut required_left = required_total;
    let mut best: Option<Best> = None;
    let mut mode = Mode::Fresh;
    let mut steps: u64 = 0;

    loop {
        if steps % 1024 == 0 {
            if let Some(d) = deadline {
                if Instant::now() >= d {
                    return KeyResult::Unknown(format!(
                        "deadline reached after {steps} search steps (at best {} ops linearized, {required_total} required; {} configurations cached)",
                        best.as_ref().map_or(stack.len(), |b| b.prefix.len().max(stack.len())),
                        cache.len()
                    ));
                }
            }
            if cache.len() > max_entries {
                return KeyResult::Unknown(format!(
                    "memo cache budget ({} MiB) exhausted after {steps} search steps",
                    budget >> 20
                ));
            }
        }
        steps += 1;
        // Linearize call node `node` (op `i`) as the next operation, leading to
        // `new_state`; false if that configuration was already explored.
        macro_rules! linearize {
            ($node:expr, $i:expr, $new_state:expr, $forced:expr) => {{
                let mut next_set = linearized.clone();
                next_set.set($i);
                if cache.insert((next_set.clone(), $new_state)) {
                    stack.push(($node, state, $forced));
                    state = $new_state;
                    linearized = next_set;
                    list.lift($node);
                    search.linearized($i, true);
                    if sops.get($i).is_some_and(|o| o.ret.is_some()) {
                        required_left -= 1;
                        if required_left == 0 {
                            return KeyResult::Ok;
                        }
                    }
                    true
                } else {
                    false
                }
            }};
        }
        match mode {
            Mode::Fresh => {
                // A read that is legal now can go first without loss of
                // generality (it changes nothing, and everything that had to
                // precede it already has), so take it and never branch on it.
                let mut cur = list.first();
                let mut forced = None;
                while let Some(c) = cur {
                    if !list.is_call[c] {
                        break;
                    }
                    let i = list.op[c];
                    if sops
                        .get(i)
                        .is_some_and(|o| matches!(o.step, Step::Read(v) if v == state))
                    {
                        forced = Some((c, i));
                        break;
                    }
                    cur = list.next[c];
                }
                mode = match forced {
                    Some((c, i)) => {
                        if linearize!(c, i, state, true) {
                            Mode::Fresh
                        } else {
                            // Explored with the read taken, and failed.
                            Mode::Backtrack
                        }
                    }
                    None => Mode::Walk(list.first()),
                };
            }
            Mode::Walk(Some(node)) if list.is_call[node] => {
                let i = list.op[node];
                if let Ok(new_state) = search.step(state, i) {
                    if linearize!(node, i, new_state, false) {
                        mode = Mode::Fresh;
                        continue;
                    }
                }
                mode = Mode::Walk(list.next[node]);
            }
            Mode::Walk(dead_end) => {
                // The return entry of an op not yet linearized (or,
                // defensively, the end of the list): remember the deepest
                // such point, then backtrack.
                if best.as_ref().is_none_or(|b| stack.len() > b.prefix.len()) {
                    let mut unplaced = Vec::new();
                    if let Some(r) = dead_end {
                        let i = list.op[r];
                        unplaced.push((
                            i,
                            format!(
                                "it had to take effect before returning, but {}",
                                search.why_not(state, i, &linearized, &intern, &resolve)
                            ),
                        ));
                    }
                    let mut cur = list.first();
                    while let Some(c) = cur {
                        if Some(c) == dead_end {
                            break;
                        }
                        if list.is_call[c] {
                            let i = list.op[c];
                            if !unplaced.iter().any(|(j, _)| *j == i) {
                                unplaced.push((
                                    i,
                                    search.why_not(state, i, &linearized, &intern, &resolve),
                                ));
                            }
                        }
                        cur = list.next[c];
                    }
                    best = Some(Best {
                        prefix: stack.iter().map(|(c, _, _)| list.op[*c]).collect(),
                        state,
                        unplaced,
                    });
                }
                mode = Mode::Backtrack;
            }
            Mode::Backtrack => {
                let Some((node, old_state, forced)) = stack.pop() else {
                    let b = best.unwrap_or(Best {
                        prefix: Vec::new(),
                        state: 0,
                        unplaced: Vec::new(),
                    });
                    return KeyResult::Violation(Violation {
                        prefix: b.prefix.iter().map(|&i| resolve(i)).collect(),
                        state: intern.name(b.state),
                        unplaced: b
                            .unplaced
                            .into_iter()
                            .map(|(i, reason)| Unplaced {
                                op: resolve(i),
                                reason,
                            })
                            .collect(),
                    });
                };
                let i = list.op[node];
                list.unlift(node);
                linearized.clear(i);
                search.linearized(i, false);
                state = old_state;
                if sops.get(i).is_some_and(|o| o.ret.is_some()) {
                    required_left += 1;
                }
                // A forced read had no alternatives: keep backtracking.
                mode = if forced {
                    Mode::Backtrack
                } else {
                    Mode::Walk(list.next[node])
                };
            }
        }
    }
}
