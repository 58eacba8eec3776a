//! `trellis-jepsen`: a Jepsen-style fault-injection harness for Trellis.
//!
//! The `jepsen` binary starts a fresh 3-node `trellisd` cluster on
//! loopback with short Raft timeouts, puts a userspace fault proxy on every
//! peer link, forwarding link and client link, runs register and watch
//! workloads while a seeded nemesis partitions, delays, drops, kills,
//! pauses and replaces nodes, records everything as a JSON-lines history,
//! and hands the history to the checkers of `trellis-jepsen-checker`
//! (linearizability per key, lost writes, the watch contract). Everything
//! stays on 127.0.0.1 and needs no root.
//!
//! | module | concern |
//! |---|---|
//! | [`proxy`] | the TCP fault proxy: pipes, `Pass` / `Blackhole` / `Delay` / `Loss`, down/up (refused connects), source resolution of forwarded connections |
//! | [`cluster`] | `trellisd` processes, slots and ids, proxy wiring (`--peer-dial`, advertised forward proxies), formation, kill / restart / pause / resume, membership remove / replace, health |
//! | [`nemesis`] | fault kinds, the seeded schedule, injecting and healing each fault, nemesis records |
//! | [`workload`] | register workers (read / write / cas with outcome classification), watchers, final reads |
//! | [`recorder`] | the history writer: thread-safe append with index and monotonic time, flushed per record |
//! | [`run`] | one run end to end, and its [`run::RunReport`] |
//!
//! The binary (`src/bin/jepsen.rs`) parses the command line, runs one or
//! more seeds, calls the checker, and writes `summary.txt` and
//! `latency.svg`. Clock skew (libfaketime) is not implemented.

pub mod cluster;
pub mod nemesis;
pub mod proxy;
pub mod recorder;
pub mod run;
pub mod workload;
