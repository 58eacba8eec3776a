//! Deliberate bugs for the Jepsen harness to catch (`jepsen/`), compiled
//! only with the `bug-injection` cargo feature. Release builds leave the
//! feature out, so [`active`] is then a constant `false` and the bug paths
//! disappear.
//!
//! `trellisd --inject-bug NAME` (feature builds only) turns one on:
//!
//! - `stale-read`: linearizable gets are served from the local state
//!   without a read-index round and without forwarding to the leader, so a
//!   partitioned or lagging node answers with old values.
//! - `early-ack`: the leader acknowledges a put as soon as it is proposed,
//!   before it is committed, so a put lost with its leader was still
//!   reported as done.

/// The bugs that can be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    StaleRead,
    EarlyAck,
}

impl Bug {
    /// Every bug, with its `--inject-bug` name.
    pub const ALL: [(Bug, &'static str); 2] =
        [(Bug::StaleRead, "stale-read"), (Bug::EarlyAck, "early-ack")];

    /// The bug named `name`.
    pub fn parse(name: &str) -> Option<Bug> {
        Bug::ALL.iter().find(|(_, n)| *n == name).map(|(b, _)| *b)
    }
}

#[cfg(feature = "bug-injection")]
static ENABLED: std::sync::OnceLock<Vec<Bug>> = std::sync::OnceLock::new();

/// Turn `bugs` on for the life of the process (the first call wins).
#[cfg(feature = "bug-injection")]
pub fn enable(bugs: Vec<Bug>) {
    if !bugs.is_empty() {
        tracing::warn!(
            ?bugs,
            "BUG INJECTION ENABLED: this node breaks its guarantees on purpose"
        );
    }
    let _ = ENABLED.set(bugs);
}

/// Is `bug` on?
#[cfg(feature = "bug-injection")]
pub fn active(bug: Bug) -> bool {
    ENABLED.get().is_some_and(|b| b.contains(&bug))
}

/// Is `bug` on? (Never, without the `bug-injection` feature.)
#[cfg(not(feature = "bug-injection"))]
#[inline(always)]
pub const fn active(_bug: Bug) -> bool {
    false
}
