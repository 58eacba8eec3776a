//! End to end: `jepsen run` against real `trellisd` processes.
//!
//! Needs `trellisd` built in the same profile as this test (next to the
//! `jepsen` binary) or in `target/release/`: run
//! `cargo build --release --bins` first.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use trellis_jepsen_checker::history::{self, Function, Record, RecordType, NEMESIS_PROCESS};

fn jepsen() -> &'static str {
    env!("CARGO_BIN_EXE_jepsen")
}

fn trellisd() -> PathBuf {
    let next_to_jepsen = Path::new(jepsen()).with_file_name("trellisd");
    if next_to_jepsen.is_file() {
        return next_to_jepsen;
    }
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/trellisd");
    assert!(
        release.is_file(),
        "trellisd not found next to {} nor at {}; build it first with `cargo build --release --bins`",
        jepsen(),
        release.display()
    );
    release
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr (tail) ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    )
}

fn ok_ops(records: &[Record], f: Function) -> usize {
    records
        .iter()
        .filter(|r| r.f == f && r.kind == RecordType::Ok)
        .count()
}

#[test]
fn run_20s_seed_1_is_valid_and_complete() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out_dir = dir.path().join("run");
    let out = Command::new(jepsen())
        .args(["run", "--time-limit", "20s", "--seed", "1", "--out-dir"])
        .arg(&out_dir)
        .arg("--trellisd")
        .arg(trellisd())
        .output()
        .expect("running jepsen");
    let shown = show(&out);
    if out.status.code() != Some(0) {
        // Keep the evidence.
        let kept = dir.keep();
        panic!("jepsen run failed (kept {}):\n{shown}", kept.display());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("seed 1"), "{shown}");
    assert!(stdout.contains("repro: jepsen run"), "{shown}");

    let path = out_dir.join("history.jsonl");
    let records = history::read(&path.display().to_string()).expect("history parses");

    // Ok operations of every kind.
    for f in [Function::Read, Function::Write, Function::Cas] {
        assert!(
            ok_ops(&records, f) > 0,
            "no ok {f:?} in the history\n{shown}"
        );
    }

    // Watch deliveries from every node: the three first members, and any
    // node that answered a client operation.
    let watch_nodes: BTreeSet<u64> = records
        .iter()
        .filter(|r| r.f == Function::Watch && r.kind == RecordType::Ok)
        .filter_map(|r| r.node)
        .collect();
    let mut expected: BTreeSet<u64> = [1, 2, 3].into();
    expected.extend(
        records
            .iter()
            .filter(|r| matches!(r.f, Function::Read | Function::Write | Function::Cas))
            .filter(|r| r.kind == RecordType::Ok)
            .filter_map(|r| r.node),
    );
    assert!(
        expected.is_subset(&watch_nodes),
        "watch records from {watch_nodes:?}, expected at least {expected:?}\n{shown}"
    );
    assert!(records
        .iter()
        .any(|r| r.f == Function::WatchStart && r.kind == RecordType::Info));

    // Nemesis windows: each start has its stop.
    let nemesis: Vec<&str> = records
        .iter()
        .filter(|r| r.f == Function::Nemesis)
        .inspect(|r| {
            assert_eq!(r.process, NEMESIS_PROCESS);
            assert_eq!(r.kind, RecordType::Info);
        })
        .filter_map(|r| r.value.as_deref())
        .collect();
    let starts = nemesis.iter().filter(|v| v.starts_with("start ")).count();
    let stops = nemesis.iter().filter(|v| v.starts_with("stop ")).count();
    assert!(starts >= 1, "no nemesis start records: {nemesis:?}");
    assert_eq!(starts, stops, "{nemesis:?}");

    // The other outputs.
    let summary = std::fs::read_to_string(out_dir.join("summary.txt")).expect("summary.txt");
    assert!(summary.contains(":valid? true"), "{summary}");
    assert!(summary.contains("seed:          1"), "{summary}");
    let svg = std::fs::read_to_string(out_dir.join("latency.svg")).expect("latency.svg");
    assert!(
        svg.starts_with("<svg") || svg.starts_with("<?xml"),
        "not an SVG"
    );
    assert!(out_dir.join("nodes/n1.log").is_file());

    // `jepsen check` agrees on the saved history...
    let check = Command::new(jepsen())
        .arg("check")
        .arg(&path)
        .output()
        .expect("running jepsen check");
    assert_eq!(check.status.code(), Some(0), "{}", show(&check));

    // ...and finds a violation once a final read is made to return a
    // value nobody wrote (exit 1).
    let mut tampered = records.clone();
    let last_read = tampered
        .iter_mut()
        .rev()
        .find(|r| r.f == Function::Read && r.kind == RecordType::Ok)
        .expect("a final read");
    last_read.value = Some("999999-999999".into());
    let bad = dir.path().join("tampered.jsonl");
    std::fs::write(&bad, history::to_json_lines(&tampered).expect("serialize")).expect("write");
    let check = Command::new(jepsen())
        .arg("check")
        .arg(&bad)
        .output()
        .expect("running jepsen check");
    assert_eq!(check.status.code(), Some(1), "{}", show(&check));
}

#[test]
fn harness_errors_exit_2() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(jepsen())
        .args(["run", "--time-limit", "5s", "--seed", "1", "--out-dir"])
        .arg(dir.path())
        .args(["--trellisd", "/nonexistent/trellisd"])
        .output()
        .expect("running jepsen");
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let summary = std::fs::read_to_string(dir.path().join("summary.txt")).expect("summary.txt");
    assert!(summary.contains("trellisd binary not found"), "{summary}");

    let out = Command::new(jepsen())
        .args(["check", "/nonexistent/history.jsonl"])
        .output()
        .expect("running jepsen check");
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
}
