//! The linearizability checker: passes valid histories, catches stale
//! reads and bad cas, handles info ops, and gives up with Unknown.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{random_valid, H};
use trellis_jepsen_checker::history::{Function, RecordType};
use trellis_jepsen_checker::linearizable::{
    check_history, check_ops, explain, KeyResult, RegisterOp, RegisterOpKind,
};

const DEADLINE: Duration = Duration::from_secs(30);

fn only_key(h: &H) -> KeyResult {
    let lin = check_history(&h.records(), DEADLINE);
    assert_eq!(lin.keys.len(), 1, "{lin:?}");
    lin.keys.into_values().next().unwrap()
}

#[test]
fn valid_concurrent_history_with_info_ops_passes() {
    let mut h = H::new();
    // p1 write a [0,100], p2 write b [50,150] overlap; p3 reads b in [120,200];
    // p4 reads a in [10,60] (a may take effect first); p5 info write c at 160 (never seen);
    // p1 cas b->d [210,260] ok; p2 read d [270,300].
    h.write_ok(1, "x", "a", 0, 100, 1)
        .write_ok(2, "x", "b", 50, 150, 2)
        .read_ok(4, "x", Some("a"), 10, 60, 1)
        .read_ok(3, "x", Some("b"), 120, 200, 2)
        .write(5, "x", "c", 160, 400, RecordType::Info, None)
        .cas(1, "x", Some("b"), "d", 210, 260, RecordType::Ok, Some(3))
        .cas(2, "x", Some("a"), "e", 205, 265, RecordType::Fail, None)
        .read_ok(2, "x", Some("d"), 270, 300, 3)
        // an info cas that may or may not have happened
        .cas(3, "x", Some("d"), "f", 280, 500, RecordType::Info, None)
        .read_ok(1, "x", Some("d"), 310, 320, 3);
    assert_eq!(only_key(&h), KeyResult::Ok);
}

#[test]
fn reads_of_initially_absent_key_pass() {
    let mut h = H::new();
    h.read_ok(1, "x", None, 0, 10, 0)
        .write_ok(2, "x", "a", 5, 30, 1)
        .read_ok(3, "x", None, 8, 20, 0)
        .read_ok(1, "x", Some("a"), 31, 40, 1);
    assert_eq!(only_key(&h), KeyResult::Ok);
}

#[test]
fn stale_read_is_a_violation() {
    let mut h = H::new();
    h.write_ok(1, "x", "a", 0, 10, 1)
        .write_ok(1, "x", "b", 20, 30, 2)
        // p2 reads the old value after the second write completed
        .read_ok(2, "x", Some("a"), 40, 50, 1);
    let KeyResult::Violation(v) = only_key(&h) else {
        panic!("expected a violation")
    };
    // The search gets as far as the first write; the second cannot follow,
    // as the read of "a" (records #4..#5) still needs "a".
    assert_eq!(v.prefix.len(), 1, "{v:?}");
    assert_eq!(
        v.prefix[0].kind,
        RegisterOpKind::Write { value: "a".into() }
    );
    assert_eq!(v.state.as_deref(), Some("a"));
    let first = &v.unplaced[0];
    assert_eq!(first.op.kind, RegisterOpKind::Write { value: "b".into() });
    assert_eq!(
        (first.op.invoke_index, first.op.complete_index),
        (2, Some(3))
    );
    assert!(
        first
            .reason
            .contains("overwrite \"a\", which p2 read -> \"a\" [#4..#5] still needs"),
        "{}",
        first.reason
    );
    let line = explain("x", &v);
    assert!(line.starts_with("[#2..#3] key \"x\""), "{line}");
}

#[test]
fn stale_read_explained_by_the_read_when_it_has_nothing_to_wait_for() {
    let mut h = H::new();
    // The read of "a" is concurrent with nothing that could explain it.
    h.write_ok(1, "x", "a", 0, 10, 1)
        .write_ok(1, "x", "b", 20, 30, 2)
        .read_ok(2, "x", Some("b"), 40, 50, 2)
        .read_ok(2, "x", Some("a"), 60, 70, 1);
    let KeyResult::Violation(v) = only_key(&h) else {
        panic!("expected a violation")
    };
    assert!(
        v.unplaced
            .iter()
            .any(|u| u.op.invoke_index == 6 || u.reason.contains("[#6..#7]")),
        "{v:?}"
    );
}

#[test]
fn read_of_absent_after_completed_write_is_a_violation() {
    let mut h = H::new();
    h.write_ok(1, "x", "a", 0, 10, 1)
        .read_ok(2, "x", None, 20, 30, 0);
    assert!(matches!(only_key(&h), KeyResult::Violation(_)));
}

#[test]
fn cas_against_a_value_that_was_not_current_is_a_violation() {
    let mut h = H::new();
    h.write_ok(1, "x", "a", 0, 10, 1)
        .write_ok(1, "x", "b", 20, 30, 2)
        // expected "a", but "b" was current since 30
        .cas(2, "x", Some("a"), "c", 40, 50, RecordType::Ok, Some(3));
    let KeyResult::Violation(v) = only_key(&h) else {
        panic!("expected a violation")
    };
    let line = explain("x", &v);
    assert!(line.contains("cas \"a\" -> \"c\" [#4..#5]"), "{line}");
}

#[test]
fn cas_against_absent_on_existing_key_is_a_violation() {
    let mut h = H::new();
    h.write_ok(1, "x", "a", 0, 10, 1)
        .cas(2, "x", None, "c", 40, 50, RecordType::Ok, Some(2));
    assert!(matches!(only_key(&h), KeyResult::Violation(_)));
}

#[test]
fn concurrent_cas_can_be_ordered_first() {
    let mut h = H::new();
    // cas a->c overlaps write b; it can go before b, then the read of b is fine.
    h.write_ok(1, "x", "a", 0, 10, 1)
        .write_ok(1, "x", "b", 20, 40, 3)
        .cas(2, "x", Some("a"), "c", 15, 50, RecordType::Ok, Some(2))
        .read_ok(3, "x", Some("b"), 60, 70, 3);
    assert_eq!(only_key(&h), KeyResult::Ok);
}

#[test]
fn both_successful_cas_from_same_value_is_a_violation() {
    let mut h = H::new();
    h.write_ok(1, "x", "a", 0, 10, 1)
        .cas(2, "x", Some("a"), "b", 20, 50, RecordType::Ok, Some(2))
        .cas(3, "x", Some("a"), "c", 20, 50, RecordType::Ok, Some(3));
    assert!(matches!(only_key(&h), KeyResult::Violation(_)));
}

#[test]
fn info_write_that_later_becomes_visible_passes() {
    let mut h = H::new();
    h.write_ok(1, "x", "a", 0, 10, 1)
        // times out; took effect at some point
        .write(2, "x", "b", 20, 30, RecordType::Info, None)
        .read_ok(3, "x", Some("a"), 35, 40, 1)
        .read_ok(3, "x", Some("b"), 100, 110, 2)
        .read_ok(1, "x", Some("b"), 120, 130, 2);
    assert_eq!(only_key(&h), KeyResult::Ok);
    // An info write that never shows up is fine too.
    let mut h = H::new();
    h.write_ok(1, "x", "a", 0, 10, 1)
        .write(2, "x", "b", 20, 30, RecordType::Info, None)
        .read_ok(3, "x", Some("a"), 100, 110, 1);
    assert_eq!(only_key(&h), KeyResult::Ok);
}

#[test]
fn info_write_visible_before_its_invoke_is_a_violation() {
    let mut h = H::new();
    h.read_ok(3, "x", Some("b"), 0, 10, 1)
        .write(2, "x", "b", 20, 30, RecordType::Info, None);
    assert!(matches!(only_key(&h), KeyResult::Violation(_)));
}

#[test]
fn never_completed_write_counts_as_info() {
    let mut h = H::new();
    h.invoke(0, 2, Function::Write, "x", Some("b"), None)
        .read_ok(3, "x", Some("b"), 50, 60, 1);
    assert_eq!(only_key(&h), KeyResult::Ok);
}

#[test]
fn failed_write_has_no_effect() {
    let mut h = H::new();
    h.write(1, "x", "a", 0, 10, RecordType::Fail, None)
        .read_ok(2, "x", Some("a"), 20, 30, 1);
    let KeyResult::Violation(v) = only_key(&h) else {
        panic!("expected a violation")
    };
    assert!(
        v.unplaced[0].reason.contains("no operation ever put"),
        "{v:?}"
    );
}

#[test]
fn keys_are_checked_independently() {
    let mut h = H::new();
    h.write_ok(1, "x", "a", 0, 10, 1)
        .write_ok(1, "y", "b", 20, 30, 2)
        .read_ok(2, "x", Some("a"), 40, 50, 1)
        .read_ok(2, "y", None, 60, 70, 0);
    let lin = check_history(&h.records(), DEADLINE);
    assert_eq!(lin.keys["x"], KeyResult::Ok);
    assert!(matches!(lin.keys["y"], KeyResult::Violation(_)));
    assert!(!lin.valid());
}

#[test]
fn large_random_valid_history_passes_within_the_deadline() {
    let records = random_valid(7, 2000, 5, 10);
    let started = Instant::now();
    let lin = check_history(&records, DEADLINE);
    let took = started.elapsed();
    assert_eq!(lin.keys.len(), 5);
    for (k, r) in &lin.keys {
        assert_eq!(*r, KeyResult::Ok, "key {k}");
    }
    let ops: usize = lin.ops_per_key.values().sum();
    assert!(ops > 1500, "{ops}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn heavily_overlapping_valid_history_passes() {
    // one key, 30 processes, each op spanning up to 30 others on both sides
    let records = common::random_valid_spread(5, 5000, 1, 30, 30);
    let started = Instant::now();
    let lin = check_history(&records, DEADLINE);
    assert!(lin.valid(), "{:?}", lin.keys);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn stale_read_injected_into_large_history_is_found() {
    let mut records = random_valid(11, 2000, 5, 10);
    // Find a late ok read of a key written at least twice before it was invoked,
    // and make it return the first value written to that key.
    let mut target = None;
    'outer: for (i, r) in records.iter().enumerate().rev() {
        if r.f != Function::Read || r.kind != RecordType::Ok || r.value.is_none() {
            continue;
        }
        let key = r.key.clone();
        // its invoke
        let inv = records[..i]
            .iter()
            .rposition(|x| x.process == r.process && x.kind == RecordType::Invoke)
            .unwrap();
        let acked: Vec<&str> = records[..inv]
            .iter()
            .filter(|x| x.f == Function::Write && x.kind == RecordType::Ok && x.key == key)
            .map(|x| x.value.as_deref().unwrap())
            .collect();
        if acked.len() >= 3 && Some(acked[0]) != r.value.as_deref() {
            target = Some((i, acked[0].to_string()));
            break 'outer;
        }
    }
    let (i, old) = target.expect("a suitable read");
    let key = records[i].key.clone().unwrap();
    records[i].value = Some(old);
    let lin = check_history(&records, DEADLINE);
    let KeyResult::Violation(v) = &lin.keys[&key] else {
        panic!("expected a violation on {key}: {:?}", lin.keys[&key])
    };
    let line = explain(&key, v);
    assert!(
        line.contains(&format!("..#{}]", records[i].index)),
        "{line}"
    );
    for (k, r) in &lin.keys {
        if *k != key {
            assert_eq!(*r, KeyResult::Ok);
        }
    }
}

/// 40 mutually concurrent writes, then a write, then a read of one of the
/// first 40 values: not linearizable, but proving it takes ~40 * 2^40 steps.
fn hard_history() -> H {
    let mut h = H::new();
    for p in 0..40 {
        h.write_ok(
            p,
            "x",
            &format!("v{p}"),
            p as u64,
            1000 + p as u64,
            1 + p as u64,
        );
    }
    h.write_ok(50, "x", "last", 2000, 2100, 41)
        .read_ok(51, "x", Some("v0"), 3000, 3100, 1);
    h
}

#[test]
fn deadline_returns_unknown() {
    let h = hard_history();
    let started = Instant::now();
    let lin = check_history(&h.records(), Duration::from_millis(200));
    assert!(started.elapsed() < Duration::from_secs(5));
    let r = &lin.keys["x"];
    assert!(
        matches!(r, KeyResult::Unknown(why) if why.contains("deadline")),
        "{r:?}"
    );
    assert!(!lin.valid(), "unknown must not count as valid");
}

#[test]
fn zero_deadline_returns_unknown() {
    let mut h = H::new();
    h.write_ok(1, "x", "a", 0, 10, 1)
        .read_ok(2, "x", Some("a"), 20, 30, 1);
    let lin = check_history(&h.records(), Duration::ZERO);
    assert!(matches!(lin.keys["x"], KeyResult::Unknown(_)));
}

#[test]
fn check_ops_direct() {
    let w = |v: &str, call, ret| RegisterOp {
        kind: RegisterOpKind::Write { value: v.into() },
        call,
        ret,
        process: 1,
        invoke_index: call,
        complete_index: ret,
    };
    let r = |v: Option<&str>, call, ret| RegisterOp {
        kind: RegisterOpKind::Read {
            value: v.map(Into::into),
        },
        call,
        ret: Some(ret),
        process: 2,
        invoke_index: call,
        complete_index: Some(ret),
    };
    // Non-unique values: the info write of "a" must be used to explain the last read.
    let ops = vec![
        w("a", 0, Some(10)),
        w("b", 20, Some(30)),
        w("a", 25, None),
        r(Some("a"), 40, 50),
    ];
    assert_eq!(check_ops(&ops, DEADLINE), KeyResult::Ok);
    let ops = vec![
        w("a", 0, Some(10)),
        w("b", 20, Some(30)),
        r(Some("a"), 40, 50),
    ];
    assert!(matches!(check_ops(&ops, DEADLINE), KeyResult::Violation(_)));
    assert_eq!(check_ops(&[], DEADLINE), KeyResult::Ok);
}

/// Brute force: is there an order of all required ops and some of the
/// optional (info) ones that respects real time (a before b when a
/// returned strictly before b was called) and the register's semantics?
fn brute_force(ops: &[RegisterOp]) -> bool {
    fn go(ops: &[RegisterOp], placed: &mut Vec<bool>, state: Option<String>) -> bool {
        if ops
            .iter()
            .zip(placed.iter())
            .all(|(o, p)| *p || o.ret.is_none())
        {
            return true;
        }
        for x in 0..ops.len() {
            if placed[x] {
                continue;
            }
            // every unplaced required op that returned before x was called must go first
            let blocked = ops
                .iter()
                .enumerate()
                .any(|(y, o)| y != x && !placed[y] && o.ret.is_some_and(|r| r < ops[x].call));
            if blocked {
                continue;
            }
            let next = match &ops[x].kind {
                RegisterOpKind::Read { value } => (*value == state).then(|| state.clone()),
                RegisterOpKind::Write { value } => Some(Some(value.clone())),
                RegisterOpKind::Cas { expected, value } => {
                    (*expected == state).then(|| Some(value.clone()))
                }
            };
            if let Some(next) = next {
                placed[x] = true;
                if go(ops, placed, next) {
                    return true;
                }
                placed[x] = false;
            }
        }
        false
    }
    go(ops, &mut vec![false; ops.len()], None)
}

#[test]
fn agrees_with_brute_force_on_small_random_histories() {
    let mut rng = common::Rng(2024);
    let (mut valid, mut invalid) = (0, 0);
    for case in 0..60_000 {
        // alternate sparse and dense overlap
        let (spread, length) = if case % 2 == 0 { (20, 10) } else { (6, 6) };
        let n = rng.range(1, 9) as usize;
        let mut written: Vec<String> = Vec::new();
        let mut ops = Vec::new();
        for i in 0..n {
            let call = rng.range(0, spread);
            let ret = Some(call + rng.range(0, length));
            let any_value = |rng: &mut common::Rng, written: &[String]| -> Option<String> {
                if written.is_empty() || rng.chance(0.2) {
                    None
                } else if rng.chance(0.05) {
                    Some("never".to_string())
                } else {
                    Some(written[rng.range(0, written.len() as u64 - 1) as usize].clone())
                }
            };
            let fresh = |rng: &mut common::Rng, written: &mut Vec<String>| -> String {
                // mostly unique values, sometimes a repeat
                let v = if !written.is_empty() && rng.chance(0.15) {
                    written[rng.range(0, written.len() as u64 - 1) as usize].clone()
                } else {
                    format!("v{i}")
                };
                written.push(v.clone());
                v
            };
            let dice = rng.range(0, 99);
            let (kind, ret) = if dice < 40 {
                (
                    RegisterOpKind::Read {
                        value: any_value(&mut rng, &written),
                    },
                    ret,
                )
            } else if dice < 75 {
                let v = fresh(&mut rng, &mut written);
                (
                    RegisterOpKind::Write { value: v },
                    if rng.chance(0.3) { None } else { ret },
                )
            } else {
                let e = any_value(&mut rng, &written);
                let v = fresh(&mut rng, &mut written);
                (
                    RegisterOpKind::Cas {
                        expected: e,
                        value: v,
                    },
                    if rng.chance(0.3) { None } else { ret },
                )
            };
            ops.push(RegisterOp {
                kind,
                call,
                ret,
                process: i as i64,
                invoke_index: 2 * i as u64,
                complete_index: ret.map(|_| 2 * i as u64 + 1),
            });
        }
        // reads of values written only later in `ops` are fine: order is by time
        let expected = brute_force(&ops);
        let got = check_ops(&ops, DEADLINE);
        match (&got, expected) {
            (KeyResult::Ok, true) => valid += 1,
            (KeyResult::Violation(_), false) => invalid += 1,
            _ => panic!("case {case}: checker says {got:?}, brute force says {expected}: {ops:#?}"),
        }
    }
    assert!(
        valid > 10_000 && invalid > 10_000,
        "valid {valid}, invalid {invalid}"
    );
}
