//! `trellis-jepsen-checker`: checks Jepsen-style histories of Trellis.
//!
//! Data enters as a JSON-lines history written by the runner
//! (`jepsen/src`), parsed by [`history::parse`] / [`history::read`] into
//! [`history::Record`]s, and leaves as a [`report::Report`] from
//! [`report::check`] (`valid()`, per-checker verdicts, a readable
//! `Display`) and an SVG from [`plot::latency_svg`].
//!
//! | module | what it does | main items |
//! |---|---|---|
//! | [`history`] | the record format (the contract with the runner) and its parser | [`history::Record`], [`history::parse`], [`history::read`] |
//! | [`ops`] | pairs invokes with completions into client operations | [`ops::ClientOp`], [`ops::client_ops`] |
//! | [`committed`] | the committed change log as the watchers delivered it | [`committed::CommittedLog`] |
//! | [`wellformed`] | checker `history`: the records follow the format's rules | [`wellformed::check`] |
//! | [`linearizable`] | checker `linearizable`: per-key register linearizability (Porcupine-style search, deadline-bounded) | [`linearizable::check_history`], [`linearizable::check_ops`], [`linearizable::KeyResult`] |
//! | [`lost`] | checker `lost`: no acknowledged write lost, no phantom commit | [`lost::check`] |
//! | [`watch`] | checker `watch`: order, no duplicates, atomicity, no gaps, agreement | [`watch::check`] |
//! | [`report`] | runs all checkers, counts, verdicts, summary | [`report::check`], [`report::CheckOptions`], [`report::Report`], [`report::Verdict`] |
//! | [`plot`] | latency-over-time SVG with nemesis windows | [`plot::latency_svg`], [`plot::nemesis_windows`] |
//!
//! A verdict is `Pass`, `Fail(anomalies)` or `Unknown(reason)`; only
//! `Pass` counts as valid. Anomalies name the records involved as
//! `#index` (the `index` field of the history). No input makes the
//! checkers panic: malformed records are anomalies of the `history`
//! checker.

pub mod committed;
pub mod history;
pub mod linearizable;
pub mod lost;
pub mod ops;
pub mod plot;
pub mod report;
pub mod watch;
pub mod wellformed;

pub use history::{parse, read, Record};
pub use report::{check, CheckOptions, CheckerResult, Report, Verdict};
