//! parse round trip, the whole report, the latency plot, and no panics on
//! malformed input.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{random_valid, Rng, H};
use trellis_jepsen_checker::history::{
    parse, to_json_lines, Function, Record, RecordType, WatchEvent,
};
use trellis_jepsen_checker::plot::{latency_svg, nemesis_windows};
use trellis_jepsen_checker::report::{check, CheckOptions, Verdict};

const TEXT: &str = r#"{"index":0,"time_ns":1200,"process":3,"type":"invoke","f":"write","key":"r7","value":"3-12"}
{"index":1,"time_ns":5400,"process":3,"type":"ok","f":"write","key":"r7","value":"3-12","node":2,"revision":41}

{"index":2,"time_ns":6100,"process":1,"type":"invoke","f":"cas","key":"r7","expected":"3-12","value":"1-5"}
{"index":3,"time_ns":9000,"process":1,"type":"fail","f":"cas","key":"r7","expected":"3-12","value":"1-5","error":"compare failed"}
{"index":4,"time_ns":9100,"process":100,"type":"ok","f":"watch","node":1,"revision":41,"events":[{"kind":"put","key":"r7","value":"3-12","mod_revision":41}]}
{"index":5,"time_ns":9900,"process":-1,"type":"info","f":"nemesis","value":"partition leader 2 from 1,3"}
{"index":6,"time_ns":9950,"process":100,"type":"info","f":"watch-start","node":2,"revision":42}
{"index":7,"time_ns":9990,"process":2,"type":"invoke","f":"read","key":"r7"}
{"index":8,"time_ns":9999,"process":2,"type":"ok","f":"read","key":"r7","value":null,"revision":0}
"#;

#[test]
fn parse_round_trip() {
    let records = parse("t.jsonl", TEXT).unwrap();
    assert_eq!(records.len(), 9);
    assert_eq!(records[1].kind, RecordType::Ok);
    assert_eq!(records[1].revision, Some(41));
    assert_eq!(records[2].expected.as_deref(), Some("3-12"));
    assert_eq!(records[3].error.as_deref(), Some("compare failed"));
    assert_eq!(
        records[4].events,
        vec![WatchEvent {
            kind: "put".into(),
            key: "r7".into(),
            value: Some("3-12".into()),
            mod_revision: 41
        }]
    );
    assert_eq!(records[5].process, -1);
    assert_eq!(records[6].f, Function::WatchStart);
    assert_eq!(records[8].value, None);
    let text = to_json_lines(&records).unwrap();
    assert_eq!(text.lines().count(), 9);
    assert_eq!(parse("again", &text).unwrap(), records);
    // errors name the line (1-based, blank lines counted)
    let bad = format!("{}\n\n{{\"index\":1}}\n", TEXT.lines().next().unwrap());
    let err = parse("bad.jsonl", &bad).unwrap_err().to_string();
    assert!(err.starts_with("bad.jsonl:3:"), "{err}");
}

#[test]
fn random_valid_history_report_is_valid() {
    let records = random_valid(3, 2000, 5, 10);
    let report = check(
        &records,
        CheckOptions {
            deadline: Duration::from_secs(30),
        },
    );
    let text = report.to_string();
    assert!(report.valid(), "{text}");
    assert!(text.starts_with(":valid? true\n"), "{text}");
    for name in ["history", "linearizable", "lost", "watch"] {
        assert!(report.checker(name).unwrap().verdict.is_pass(), "{text}");
    }
    let c = &report.counts;
    assert_eq!(c.keys, 5);
    assert_eq!(c.nemesis, 5);
    assert_eq!(c.watchers, 2);
    assert_eq!(c.watch_starts, 3);
    assert!(c.invokes() > 1900, "{c:?}");
    let n = |f: &str, t: &str| {
        c.ops
            .get(&(f.to_string(), t.to_string()))
            .copied()
            .unwrap_or(0)
    };
    assert!(
        n("write", "info") > 0
            && n("cas", "fail") > 0
            && n("cas", "ok") > 0
            && n("read", "info") > 0,
        "{c:?}"
    );
    assert_eq!(
        c.watch_deliveries,
        2 * (n("write", "ok") + n("cas", "ok") + count_effective_info(&records))
    );
}

/// info writes/cas that took effect (their value was delivered).
fn count_effective_info(records: &[Record]) -> usize {
    let delivered: std::collections::HashSet<&str> = records
        .iter()
        .filter(|r| r.f == Function::Watch && r.process == 100)
        .flat_map(|r| r.events.iter().filter_map(|e| e.value.as_deref()))
        .collect();
    records
        .iter()
        .filter(|r| matches!(r.f, Function::Write | Function::Cas) && r.kind == RecordType::Info)
        .filter(|r| delivered.contains(r.value.as_deref().unwrap()))
        .count()
}

#[test]
fn invalid_history_report_names_checkers_and_records() {
    let mut h = H::new();
    h.watch_start(0, 100, 1)
        .write_ok(1, "x", "a", 10, 20, 1)
        .watch(21, 100, 1, &[("x", "a")])
        .write_ok(1, "x", "b", 30, 40, 2)
        .watch(41, 100, 2, &[("x", "b")])
        .read_ok(2, "x", Some("a"), 50, 60, 1); // stale
    let records = h.records();
    let report = check(&records, CheckOptions::default());
    assert!(!report.valid());
    let text = report.to_string();
    assert!(text.starts_with(":valid? false\n"), "{text}");
    assert!(text.contains(":linearizable  :valid? false"), "{text}");
    assert!(
        text.contains("- [#4..#5] key \"x\": p1 write \"b\" cannot be linearized"),
        "{text}"
    );
    assert!(
        text.contains("p2 read -> \"a\" [#7..#8] still needs"),
        "{text}"
    );
    assert!(text.contains(":watch         :valid? true"), "{text}");
    // the final read is stale too: lost flags the write of revision 2
    assert!(
        matches!(&report.checker("lost").unwrap().verdict, Verdict::Fail(a) if a[0].contains("LOST")),
        "{text}"
    );
}

#[test]
fn report_with_unfinished_search_is_not_valid() {
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
    let report = check(
        &h.records(),
        CheckOptions {
            deadline: Duration::from_millis(100),
        },
    );
    assert!(!report.valid());
    assert!(matches!(
        report.checker("linearizable").unwrap().verdict,
        Verdict::Unknown(_)
    ));
    assert!(
        report
            .to_string()
            .contains(":linearizable  :valid? unknown — key \"x\": deadline reached"),
        "{report}"
    );
}

#[test]
fn malformed_histories_fail_the_history_checker() {
    let mut h = H::new();
    h.complete(
        5,
        1,
        RecordType::Ok,
        Function::Write,
        "x",
        Some("a"),
        None,
        Some(1),
    ) // no invoke
    .invoke(10, 2, Function::Write, "x", Some("b"), None)
    .invoke(20, 2, Function::Write, "x", Some("c"), None) // second invoke while open
    .complete(
        30,
        2,
        RecordType::Ok,
        Function::Read,
        "x",
        Some("c"),
        None,
        Some(1),
    ) // wrong f
    .invoke(40, 3, Function::Write, "x", Some("d"), None)
    .complete(
        50,
        3,
        RecordType::Ok,
        Function::Write,
        "x",
        Some("d"),
        None,
        None,
    ); // no revision
    let report = check(&h.records(), CheckOptions::default());
    let Verdict::Fail(a) = &report.checker("history").unwrap().verdict else {
        panic!("{report}")
    };
    assert!(
        a.iter().any(|x| x.contains("without an open invoke")),
        "{a:#?}"
    );
    assert!(a.iter().any(|x| x.contains("still open")), "{a:#?}");
    assert!(
        a.iter()
            .any(|x| x.contains("function Read but invoked Write")),
        "{a:#?}"
    );
    assert!(a.iter().any(|x| x.contains("without a revision")), "{a:#?}");
    assert!(!report.valid());
}

/// Random records of every shape: nothing may panic.
#[test]
fn random_garbage_does_not_panic() {
    let mut rng = Rng(42);
    let fs = [
        Function::Read,
        Function::Write,
        Function::Cas,
        Function::WatchStart,
        Function::Watch,
        Function::Nemesis,
    ];
    let ts = [
        RecordType::Invoke,
        RecordType::Ok,
        RecordType::Fail,
        RecordType::Info,
    ];
    let pick = |rng: &mut Rng, n: u64| rng.range(0, n - 1) as usize;
    for round in 0..30 {
        let mut records = Vec::new();
        for i in 0..300u64 {
            let opt = |rng: &mut Rng, s: &str| {
                if rng.chance(0.7) {
                    Some(format!("{s}{}", rng.range(0, 3)))
                } else {
                    None
                }
            };
            let f = fs[pick(&mut rng, 6)];
            let events = (0..rng.range(0, 2))
                .map(|_| WatchEvent {
                    kind: if rng.chance(0.8) {
                        "put".into()
                    } else {
                        "delete".into()
                    },
                    key: format!("k{}", rng.range(0, 2)),
                    value: opt(&mut rng, "v"),
                    mod_revision: rng.range(0, 20),
                })
                .collect();
            records.push(Record {
                index: if rng.chance(0.95) {
                    i
                } else {
                    rng.range(0, 300)
                },
                time_ns: if round % 5 == 0 {
                    0
                } else {
                    rng.range(0, 1_000_000_000)
                },
                process: rng.range(0, 6) as i64 - 1,
                kind: ts[pick(&mut rng, 4)],
                f,
                key: opt(&mut rng, "k"),
                value: if f == Function::Nemesis && rng.chance(0.5) {
                    Some(format!(
                        "{} n{}",
                        if rng.chance(0.5) { "start" } else { "stop" },
                        rng.range(0, 2)
                    ))
                } else {
                    opt(&mut rng, "v")
                },
                expected: opt(&mut rng, "v"),
                node: Some(rng.range(1, 3)),
                revision: if rng.chance(0.8) {
                    Some(rng.range(0, 20))
                } else {
                    None
                },
                events,
                error: None,
            });
        }
        let report = check(
            &records,
            CheckOptions {
                deadline: Duration::from_millis(200),
            },
        );
        let _ = report.to_string();
        let svg = latency_svg(&records);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(
            !svg.contains("NaN") && !svg.contains("\"inf") && !svg.contains("\"-inf"),
            "{svg}"
        );
    }
    // And the empty history.
    let report = check(&[], CheckOptions::default());
    assert!(report.valid(), "{report}");
    let svg = latency_svg(&[]);
    assert!(svg.contains("</svg>") && !svg.contains("NaN"));
}

#[test]
fn latency_plot_has_dots_windows_axes_and_legend() {
    let mut h = H::new();
    let ms = 1_000_000u64;
    h.nemesis(100 * ms, "start partition-leader 2 from 1,3")
        .nemesis(150 * ms, "start kill 1")
        .nemesis(200 * ms, "start partition-leader again")
        .nemesis(300 * ms, "stop partition-leader") // closes the second partition window
        .nemesis(400 * ms, "stop kill")
        .nemesis(500 * ms, "stop partition-leader")
        .nemesis(600 * ms, "heal <everything> & more")
        .nemesis(700 * ms, "stop nothing-open")
        .nemesis(800 * ms, "start pause 3"); // never stopped
    h.write_ok(1, "x", "a", 10 * ms, 12 * ms, 1)
        .write(2, "x", "b", 20 * ms, 1020 * ms, RecordType::Info, None)
        .cas(
            3,
            "x",
            Some("zz"),
            "c",
            30 * ms,
            31 * ms,
            RecordType::Fail,
            None,
        )
        .read_ok(1, "x", Some("a"), 900 * ms, 900 * ms + 5000, 1);
    let records = h.records();
    let (windows, points) = nemesis_windows(&records);
    let spans: Vec<(&str, u64, Option<u64>)> = windows
        .iter()
        .map(|w| {
            (
                w.name.as_str(),
                w.start_time / ms,
                w.end_time.map(|t| t / ms),
            )
        })
        .collect();
    assert_eq!(
        spans,
        vec![
            ("partition-leader", 100, Some(500)),
            ("kill", 150, Some(400)),
            ("partition-leader", 200, Some(300)),
            ("pause", 800, None)
        ]
    );
    assert_eq!(points.len(), 2);
    let svg = latency_svg(&records);
    assert_eq!(
        svg.matches("<circle cx").count(),
        4 + 3,
        "4 dots + 3 legend markers"
    );
    assert_eq!(
        svg.matches("fill-opacity=\"0.15\"").count(),
        4,
        "4 shaded windows"
    );
    assert!(svg.contains("#2ca02c") && svg.contains("#d62728") && svg.contains("#ff7f0e"));
    assert!(
        svg.contains(">ok (2)<") && svg.contains(">fail (1)<") && svg.contains(">info (1)<"),
        "{svg}"
    );
    assert!(
        svg.contains(">partition-leader<") && svg.contains(">kill<") && svg.contains(">pause<")
    );
    assert!(svg.contains("heal &lt;everything&gt; &amp; more"));
    assert!(svg.contains("time (s)") && svg.contains("latency (ms, log)"));
    // log-scale decade ticks from 0.001 ms (5 µs read) up to 1000 ms (the 1 s info write)
    for tick in [
        ">0.001<", ">0.01<", ">0.1<", ">1<", ">10<", ">100<", ">1000<",
    ] {
        assert!(svg.contains(tick), "missing tick {tick}");
    }
}
