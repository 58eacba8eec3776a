//! The lost-write checker and the watch-contract checker: each anomaly
//! is flagged, and the valid variants pass.
#![allow(clippy::unwrap_used)]

mod common;

use common::H;
use trellis_jepsen_checker::history::{Record, RecordType};
use trellis_jepsen_checker::report::{CheckerResult, Verdict};
use trellis_jepsen_checker::{lost, watch};

fn anomalies(r: &CheckerResult) -> &[String] {
    match &r.verdict {
        Verdict::Fail(a) => a,
        other => panic!(
            "{} expected Fail, got {other:?} (notes {:?})",
            r.name, r.notes
        ),
    }
}

fn assert_pass(r: &CheckerResult) {
    assert_eq!(r.verdict, Verdict::Pass, "{}: notes {:?}", r.name, r.notes);
}

fn assert_flags(r: &CheckerResult, needle: &str) {
    let a = anomalies(r);
    assert!(
        a.iter().any(|x| x.contains(needle)),
        "{}: no anomaly containing {needle:?} in {a:#?}",
        r.name
    );
}

/// Two writes on x and one on y, both watchers see revisions 1..=3.
fn base() -> H {
    let mut h = H::new();
    h.watch_start(0, 100, 1)
        .watch_start(0, 101, 1)
        .write_ok(1, "x", "a", 10, 20, 1)
        .watch(21, 100, 1, &[("x", "a")])
        .watch(22, 101, 1, &[("x", "a")])
        .write_ok(2, "y", "b", 30, 40, 2)
        .watch(41, 100, 2, &[("y", "b")])
        .watch(42, 101, 2, &[("y", "b")])
        .write_ok(1, "x", "c", 50, 60, 3)
        .watch(61, 100, 3, &[("x", "c")])
        .watch(62, 101, 3, &[("x", "c")])
        .read_ok(3, "x", Some("c"), 100, 110, 3)
        .read_ok(3, "y", Some("b"), 120, 130, 2);
    h
}

#[test]
fn base_history_passes() {
    let r = base().records();
    assert_pass(&lost::check(&r));
    assert_pass(&watch::check(&r));
}

// ---------------------------------------------------------------- lost

#[test]
fn acknowledged_write_missing_from_complete_log_is_lost() {
    let mut h = H::new();
    h.watch_start(0, 100, 1)
        .write_ok(1, "x", "a", 10, 20, 1)
        .watch(21, 100, 1, &[("x", "a")])
        .write_ok(1, "x", "b", 30, 40, 2)
        .write_ok(2, "y", "c", 50, 60, 3)
        // revision 2 delivered with y=c, revision 3 with y=d: x=b is nowhere
        .watch(61, 100, 2, &[("y", "c")])
        .write(2, "y", "d", 70, 80, RecordType::Info, None)
        .watch(81, 100, 3, &[("y", "d")]);
    let r = h.records();
    let res = lost::check(&r);
    assert_flags(&res, "LOST");
    assert_flags(&res, "x := \"b\"");
}

#[test]
fn acknowledged_write_not_seen_by_final_read_is_lost() {
    let mut h = H::new();
    h.watch_start(0, 100, 1)
        .write_ok(1, "x", "a", 10, 20, 1)
        .watch(21, 100, 1, &[("x", "a")])
        .write_ok(1, "x", "b", 30, 40, 2)
        // nobody ever delivers revision 2, and the final read sees a
        .read_ok(2, "x", Some("a"), 100, 110, 1);
    let r = h.records();
    let res = lost::check(&r);
    let a = anomalies(&res);
    assert!(
        a.iter()
            .any(|x| x.contains("LOST") && x.contains("final read")),
        "{a:#?}"
    );
    assert!(
        a.iter()
            .any(|x| x.contains("beyond the last delivered revision 1")),
        "{a:#?}"
    );
}

#[test]
fn incomplete_log_is_unknown_not_pass() {
    let mut h = H::new();
    h.watch_start(0, 100, 1)
        .write_ok(1, "x", "a", 10, 20, 1)
        .write_ok(1, "x", "b", 30, 40, 2)
        .write_ok(1, "x", "c", 50, 60, 3)
        // revision 2 (x=b) was never delivered: a hole
        .watch(21, 100, 1, &[("x", "a")])
        .watch(61, 100, 3, &[("x", "c")]);
    let res = lost::check(&h.records());
    assert!(
        matches!(&res.verdict, Verdict::Unknown(why) if why.contains("holes at 2")),
        "{res:?}"
    );
    // And no watcher at all: unknown too.
    let mut h = H::new();
    h.write_ok(1, "x", "a", 10, 20, 1);
    assert!(matches!(
        lost::check(&h.records()).verdict,
        Verdict::Unknown(_)
    ));
}

#[test]
fn phantom_and_failed_writes_in_log_are_flagged() {
    let mut h = H::new();
    h.watch_start(0, 100, 1)
        .write(1, "x", "a", 10, 20, RecordType::Fail, None)
        .watch(21, 100, 1, &[("x", "a")])
        .watch(22, 100, 2, &[("x", "ghost")]);
    let res = lost::check(&h.records());
    assert_flags(&res, "PHANTOM");
    assert_flags(&res, "the only operation writing it failed");
}

#[test]
fn value_committed_twice_is_flagged() {
    let mut h = H::new();
    h.watch_start(0, 100, 1)
        .write_ok(1, "x", "a", 10, 20, 1)
        .watch(21, 100, 1, &[("x", "a")])
        .watch(22, 100, 2, &[("x", "a")]);
    assert_flags(&lost::check(&h.records()), "applied more than once");
}

#[test]
fn info_write_that_committed_is_not_lost_or_phantom() {
    let mut h = H::new();
    h.watch_start(0, 100, 1)
        .write(1, "x", "a", 10, 20, RecordType::Info, None)
        .watch(30, 100, 1, &[("x", "a")])
        .write(2, "x", "never", 40, 50, RecordType::Info, None)
        .read_ok(3, "x", Some("a"), 100, 110, 1);
    let r = h.records();
    assert_pass(&lost::check(&r));
    assert_pass(&watch::check(&r));
}

// ---------------------------------------------------------------- watch

/// Watcher 100 as in `base`, but watcher 101's deliveries replaced.
fn with_101(deliveries: &[(u64, u64, &str, &str)], resub: &[(u64, u64)]) -> Vec<Record> {
    let mut h = H::new();
    h.watch_start(0, 100, 1)
        .watch_start(0, 101, 1)
        .write_ok(1, "x", "a", 10, 20, 1)
        .watch(21, 100, 1, &[("x", "a")])
        .write_ok(2, "y", "b", 30, 40, 2)
        .watch(41, 100, 2, &[("y", "b")])
        .write_ok(1, "x", "c", 50, 60, 3)
        .watch(61, 100, 3, &[("x", "c")])
        .write_ok(2, "y", "d", 70, 80, 4)
        .watch(81, 100, 4, &[("y", "d")]);
    for (t, rev, k, v) in deliveries {
        h.watch(*t, 101, *rev, &[(k, v)]);
    }
    for (t, from) in resub {
        h.watch_start(*t, 101, *from);
    }
    h.records()
}

#[test]
fn valid_watch_with_resubscription_passes() {
    let r = with_101(
        &[
            (100, 1, "x", "a"),
            (101, 2, "y", "b"),
            (110, 3, "x", "c"),
            (111, 4, "y", "d"),
        ],
        &[(105, 3)],
    );
    assert_pass(&watch::check(&r));
}

#[test]
fn out_of_order_delivery_is_flagged() {
    let r = with_101(
        &[
            (100, 1, "x", "a"),
            (101, 3, "x", "c"),
            (102, 2, "y", "b"),
            (103, 4, "y", "d"),
        ],
        &[],
    );
    assert_flags(&watch::check(&r), "out of order");
}

#[test]
fn duplicated_revision_is_flagged() {
    let r = with_101(
        &[
            (100, 1, "x", "a"),
            (101, 2, "y", "b"),
            (102, 2, "y", "b"),
            (103, 3, "x", "c"),
        ],
        &[],
    );
    assert_flags(&watch::check(&r), "revision 2 delivered again");
}

#[test]
fn disagreeing_watchers_are_flagged() {
    let r = with_101(
        &[(100, 1, "x", "a"), (101, 2, "y", "zzz"), (103, 3, "x", "c")],
        &[],
    );
    let res = watch::check(&r);
    assert_flags(&res, "watchers disagree on revision 2");
    // and it disagrees with the acknowledged write of revision 2
    assert_flags(&res, "write y := \"b\"");
}

#[test]
fn gap_is_flagged() {
    let r = with_101(
        &[(100, 1, "x", "a"), (101, 3, "x", "c"), (102, 4, "y", "d")],
        &[],
    );
    assert_flags(&watch::check(&r), "gap: skipped committed revision 2 ");
}

#[test]
fn gap_known_only_from_an_acknowledged_write_is_flagged() {
    let mut h = H::new();
    h.watch_start(0, 100, 1)
        .write_ok(1, "x", "a", 10, 20, 1)
        .write_ok(1, "x", "b", 30, 40, 2)
        .write_ok(1, "x", "c", 50, 60, 3)
        .watch(21, 100, 1, &[("x", "a")])
        .watch(61, 100, 3, &[("x", "c")]);
    assert_flags(&watch::check(&h.records()), "skipped committed revision 2");
}

#[test]
fn going_back_in_time_after_resubscribe_is_flagged() {
    // received 1..=3, resubscribed from 4, then got 2
    let r = with_101(
        &[
            (100, 1, "x", "a"),
            (101, 2, "y", "b"),
            (102, 3, "x", "c"),
            (110, 2, "y", "b"),
            (111, 4, "y", "d"),
        ],
        &[(105, 4)],
    );
    let res = watch::check(&r);
    assert_flags(&res, "older than its subscription's start 4");
    assert_flags(&res, "back in time");
}

#[test]
fn first_delivery_after_subscription_start_must_not_skip() {
    // subscribed from 1 but the first delivery is 2
    let r = with_101(&[(100, 2, "y", "b"), (101, 3, "x", "c")], &[]);
    assert_flags(
        &watch::check(&r),
        "skipped committed revision 1 between subscribing from 1",
    );
}

#[test]
fn non_atomic_delivery_is_flagged() {
    let mut h = H::new();
    h.watch_start(0, 100, 1)
        .write_ok(1, "x", "a", 10, 20, 1)
        .write_ok(1, "x", "b", 30, 40, 2);
    let mut rs = h.records();
    // one record carrying both revisions' events
    let mut merged = rs.last().unwrap().clone();
    merged.index = rs.len() as u64;
    merged.time_ns = 50;
    merged.process = 100;
    merged.kind = RecordType::Ok;
    merged.f = trellis_jepsen_checker::history::Function::Watch;
    merged.key = None;
    merged.value = None;
    merged.revision = Some(2);
    merged.events = vec![
        trellis_jepsen_checker::history::WatchEvent {
            kind: "put".into(),
            key: "x".into(),
            value: Some("a".into()),
            mod_revision: 1,
        },
        trellis_jepsen_checker::history::WatchEvent {
            kind: "put".into(),
            key: "x".into(),
            value: Some("b".into()),
            mod_revision: 2,
        },
    ];
    rs.push(merged);
    assert_flags(&watch::check(&rs), "not atomic");
}

#[test]
fn read_revision_disagreeing_with_log_is_flagged() {
    let mut h = base();
    h.read_ok(4, "x", Some("a"), 200, 210, 3); // x=a was revision 1, not 3
    assert_flags(&watch::check(&h.records()), "read x -> \"a\"");
}

#[test]
fn two_writes_with_one_revision_are_flagged() {
    let mut h = base();
    h.write_ok(4, "y", "e", 200, 210, 3);
    assert_flags(
        &watch::check(&h.records()),
        "revision 3 acknowledged to 2 writes",
    );
}
