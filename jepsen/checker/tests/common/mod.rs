//! Hand-built histories for the tests.
#![allow(dead_code, clippy::unwrap_used, clippy::too_many_arguments)]

use trellis_jepsen_checker::history::{Function, Record, RecordType, WatchEvent, NEMESIS_PROCESS};

/// Collects records with explicit times; `records()` orders them by time
/// (stable: equal times keep insertion order) and numbers them.
#[derive(Default)]
pub struct H {
    recs: Vec<Record>,
}

fn rec(t: u64, p: i64, kind: RecordType, f: Function) -> Record {
    Record {
        index: 0,
        time_ns: t,
        process: p,
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

impl H {
    pub fn new() -> Self {
        H::default()
    }

    pub fn push(&mut self, r: Record) -> &mut Self {
        self.recs.push(r);
        self
    }

    pub fn records(&self) -> Vec<Record> {
        let mut v = self.recs.clone();
        v.sort_by_key(|r| r.time_ns);
        for (i, r) in v.iter_mut().enumerate() {
            r.index = i as u64;
        }
        v
    }

    /// Invoke record.
    pub fn invoke(
        &mut self,
        t: u64,
        p: i64,
        f: Function,
        key: &str,
        value: Option<&str>,
        expected: Option<&str>,
    ) -> &mut Self {
        let mut r = rec(t, p, RecordType::Invoke, f);
        r.key = Some(key.into());
        r.value = value.map(Into::into);
        r.expected = expected.map(Into::into);
        self.push(r)
    }

    /// Completion record.
    pub fn complete(
        &mut self,
        t: u64,
        p: i64,
        kind: RecordType,
        f: Function,
        key: &str,
        value: Option<&str>,
        expected: Option<&str>,
        revision: Option<u64>,
    ) -> &mut Self {
        let mut r = rec(t, p, kind, f);
        r.key = Some(key.into());
        r.value = value.map(Into::into);
        r.expected = expected.map(Into::into);
        r.revision = revision;
        r.node = Some(1);
        self.push(r)
    }

    /// write key := v over [t0, t1] with outcome `kind` (revision if ok).
    pub fn write(
        &mut self,
        p: i64,
        key: &str,
        v: &str,
        t0: u64,
        t1: u64,
        kind: RecordType,
        rev: Option<u64>,
    ) -> &mut Self {
        self.invoke(t0, p, Function::Write, key, Some(v), None);
        self.complete(
            t1,
            p,
            kind,
            Function::Write,
            key,
            Some(v),
            None,
            if kind == RecordType::Ok { rev } else { None },
        )
    }

    pub fn write_ok(
        &mut self,
        p: i64,
        key: &str,
        v: &str,
        t0: u64,
        t1: u64,
        rev: u64,
    ) -> &mut Self {
        self.write(p, key, v, t0, t1, RecordType::Ok, Some(rev))
    }

    /// ok read of key returning v (None = absent) at mod_revision rev.
    pub fn read_ok(
        &mut self,
        p: i64,
        key: &str,
        v: Option<&str>,
        t0: u64,
        t1: u64,
        rev: u64,
    ) -> &mut Self {
        self.invoke(t0, p, Function::Read, key, None, None);
        self.complete(
            t1,
            p,
            RecordType::Ok,
            Function::Read,
            key,
            v,
            None,
            Some(rev),
        )
    }

    /// cas key expected -> v with outcome `kind`.
    pub fn cas(
        &mut self,
        p: i64,
        key: &str,
        expected: Option<&str>,
        v: &str,
        t0: u64,
        t1: u64,
        kind: RecordType,
        rev: Option<u64>,
    ) -> &mut Self {
        self.invoke(t0, p, Function::Cas, key, Some(v), expected);
        self.complete(
            t1,
            p,
            kind,
            Function::Cas,
            key,
            Some(v),
            expected,
            if kind == RecordType::Ok { rev } else { None },
        )
    }

    pub fn watch_start(&mut self, t: u64, p: i64, from: u64) -> &mut Self {
        let mut r = rec(t, p, RecordType::Info, Function::WatchStart);
        r.revision = Some(from);
        r.node = Some(1);
        self.push(r)
    }

    /// A delivery of `rev` with puts `(key, value)` (mod_revision = rev).
    pub fn watch(&mut self, t: u64, p: i64, rev: u64, puts: &[(&str, &str)]) -> &mut Self {
        let mut r = rec(t, p, RecordType::Ok, Function::Watch);
        r.revision = Some(rev);
        r.node = Some(1);
        r.events = puts
            .iter()
            .map(|(k, v)| WatchEvent {
                kind: "put".into(),
                key: (*k).into(),
                value: Some((*v).into()),
                mod_revision: rev,
            })
            .collect();
        self.push(r)
    }

    pub fn nemesis(&mut self, t: u64, value: &str) -> &mut Self {
        let mut r = rec(t, NEMESIS_PROCESS, RecordType::Info, Function::Nemesis);
        r.value = Some(value.into());
        self.push(r)
    }
}

/// splitmix64.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    /// True with probability p.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// A random valid history: a sequential register execution over `keys`
/// keys (one global revision), with overlapping call/return intervals
/// around each operation's linearization point; some info ops (effective
/// or not), failed cas, two watchers (one reconnecting), nemesis windows
/// and a final read of every key.
pub fn random_valid(seed: u64, n_ops: usize, keys: usize, procs: usize) -> Vec<Record> {
    random_valid_spread(seed, n_ops, keys, procs, 3)
}

/// As [`random_valid`], with calls and returns up to `spread` linearization
/// slots before / after the linearization point (more overlap).
pub fn random_valid_spread(
    seed: u64,
    n_ops: usize,
    keys: usize,
    procs: usize,
    spread: u64,
) -> Vec<Record> {
    let mut rng = Rng(seed);
    let mut h = H::new();
    let key_names: Vec<String> = (0..keys).map(|k| format!("r{k}")).collect();
    let mut state: Vec<(Option<String>, u64)> = vec![(None, 0); keys];
    let mut busy = vec![0u64; procs];
    let mut rev = 0u64;
    let mut committed: Vec<(u64, String, String, u64)> = Vec::new(); // (rev, key, value, commit time)
    let slot = 1_000_000u64; // 1 ms between linearization points
    let mut t_lin = 10 * slot;
    let mut written = 0usize;
    for i in 0..n_ops {
        t_lin += slot;
        let free: Vec<usize> = (0..procs).filter(|&p| busy[p] + 1 < t_lin).collect();
        if free.is_empty() {
            t_lin = busy.iter().copied().min().unwrap() + 2 * slot;
            continue;
        }
        let p = free[rng.range(0, free.len() as u64 - 1) as usize];
        let room = (t_lin - busy[p] - 1).min(spread * slot);
        let call = t_lin - rng.range(1, room);
        let ret = t_lin + rng.range(1, spread * slot);
        busy[p] = ret;
        let pid = p as i64;
        let k = rng.range(0, keys as u64 - 1) as usize;
        let key = key_names[k].clone();
        let dice = rng.next() % 100;
        if dice < 40 {
            // read
            if rng.chance(0.03) {
                h.invoke(call, pid, Function::Read, &key, None, None);
                h.complete(
                    ret,
                    pid,
                    RecordType::Info,
                    Function::Read,
                    &key,
                    None,
                    None,
                    None,
                );
            } else {
                let (v, m) = state[k].clone();
                h.read_ok(pid, &key, v.as_deref(), call, ret, m);
            }
        } else if dice < 75 {
            written += 1;
            let v = format!("{pid}-{i}");
            if rng.chance(0.03) {
                // info write that never happened
                h.write(pid, &key, &v, call, ret, RecordType::Info, None);
            } else {
                rev += 1;
                state[k] = (Some(v.clone()), rev);
                committed.push((rev, key.clone(), v.clone(), t_lin));
                let kind = if rng.chance(0.06) {
                    RecordType::Info
                } else {
                    RecordType::Ok
                };
                h.write(pid, &key, &v, call, ret, kind, Some(rev));
            }
        } else {
            let v = format!("{pid}-{i}");
            let expected = if rng.chance(0.6) {
                state[k].0.clone()
            } else if rng.chance(0.5) {
                None
            } else {
                Some(format!("stale-{i}"))
            };
            if expected == state[k].0 {
                rev += 1;
                state[k] = (Some(v.clone()), rev);
                committed.push((rev, key.clone(), v.clone(), t_lin));
                let kind = if rng.chance(0.06) {
                    RecordType::Info
                } else {
                    RecordType::Ok
                };
                h.cas(
                    pid,
                    &key,
                    expected.as_deref(),
                    &v,
                    call,
                    ret,
                    kind,
                    Some(rev),
                );
            } else {
                let kind = if rng.chance(0.05) {
                    RecordType::Info
                } else {
                    RecordType::Fail
                };
                h.cas(pid, &key, expected.as_deref(), &v, call, ret, kind, None);
            }
        }
    }
    let _ = written;
    let end = busy.iter().copied().max().unwrap_or(0).max(t_lin) + slot;
    // Final reads.
    for (k, key) in key_names.iter().enumerate() {
        let t0 = end + (k as u64) * 10 * slot;
        let (v, m) = state[k].clone();
        h.read_ok(0, key, v.as_deref(), t0, t0 + slot, m);
    }
    // Watchers: 100 delivers everything; 101 reconnects in the middle.
    h.watch_start(0, 100, 1);
    h.watch_start(0, 101, 1);
    let cut = committed.len() / 2;
    for (j, (r, key, v, t)) in committed.iter().enumerate() {
        h.watch(t + 200_000, 100, *r, &[(key.as_str(), v.as_str())]);
        if j == cut {
            h.watch_start(t + 300_000, 101, *r);
        }
        h.watch(t + 400_000, 101, *r, &[(key.as_str(), v.as_str())]);
    }
    // Nemesis windows.
    let span = end / 4;
    h.nemesis(span, "start partition-leader 2 from 1,3");
    h.nemesis(2 * span, "stop partition-leader");
    h.nemesis(2 * span + slot, "start kill 1");
    h.nemesis(3 * span, "stop kill");
    h.nemesis(3 * span + slot, "membership change");
    h.records()
}
