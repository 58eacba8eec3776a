//! The nemesis: which faults exist, when they happen (a schedule derived
//! from the seed alone), and how each is injected and healed.
//!
//! # Schedule
//!
//! [`schedule`] turns (seed, time limit, enabled kinds) into a list of
//! [`Step`]s: after a quiet start, a fault is held for 5–7 s, then
//! everything is healed for 3–5 s, and so on while a whole fault window
//! fits in the time limit. Kinds come in rounds: each round is a seeded
//! shuffle of every enabled kind, so a run of n × 8 windows sees every kind
//! n times. All random choices (kind, target, delay, loss rate, whether a
//! partition also cuts the clients) are made here, so one seed always gives
//! the same schedule; only "the leader" is resolved when the step runs
//! (with a seeded fallback slot when no leader is known).
//!
//! # Faults
//!
//! - `partition`: isolate the leader or a random node from the other two
//!   (every peer pipe across the cut blackholed, both directions). A coin
//!   decides whether the isolated node's clients are cut too: if they are,
//!   its workers see timeouts; if not, they keep talking to the isolated
//!   node and observe what a minority node answers (stale reads would
//!   show up here).
//! - `bridge`: the two other nodes cannot reach each other, the bridge
//!   node reaches both.
//! - `blackhole`: one direction only: everything a node sends to its peers
//!   (`outbound`), or everything it should receive from them (`inbound`),
//!   is dropped.
//! - `delay`: 20–300 ms added to every chunk on the peer pipes of one node
//!   or of all nodes.
//! - `loss`: 10–50 % of chunks held back for a retransmission timeout on
//!   the peer pipes of one node or of all nodes (see `proxy`).
//! - `kill`: SIGKILL the leader or a random node; restarted (same id, data
//!   and addresses) at the heal.
//! - `pause`: SIGSTOP the leader; SIGCONT at the heal.
//! - `membership`: remove the leader or a random node from the membership
//!   and stop it; at the heal a fresh node with a new id and an empty data
//!   directory takes its slot (`AddMember`, caught up by snapshot or log).
//!
//! Clock skew (libfaketime) is not implemented.
//!
//! Every step is recorded as two nemesis records: `start <kind> <details>`
//! when the fault is in place and `stop <kind>` when it is healed.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cluster::{Cluster, SLOTS};
use crate::proxy::{Endpoint, Fault as PipeFault, FaultMap};
use crate::recorder::{Entry, Recorder};

/// Quiet time before the first fault.
pub const QUIET_START: Duration = Duration::from_secs(3);
const HOLD_MS: std::ops::RangeInclusive<u64> = 5_000..=7_000;
const GAP_MS: std::ops::RangeInclusive<u64> = 3_000..=5_000;

/// A kind of fault, as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Partition,
    Bridge,
    Blackhole,
    Delay,
    Loss,
    Kill,
    Pause,
    Membership,
}

impl Kind {
    /// Every kind, in command-line order.
    pub const ALL: [Kind; 8] = [
        Kind::Partition,
        Kind::Kill,
        Kind::Pause,
        Kind::Delay,
        Kind::Loss,
        Kind::Blackhole,
        Kind::Bridge,
        Kind::Membership,
    ];

    /// The command-line and history name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Partition => "partition",
            Kind::Bridge => "bridge",
            Kind::Blackhole => "blackhole",
            Kind::Delay => "delay",
            Kind::Loss => "loss",
            Kind::Kill => "kill",
            Kind::Pause => "pause",
            Kind::Membership => "membership",
        }
    }

    /// Parse `all`, `none`, or a comma-separated list of names.
    pub fn parse_list(s: &str) -> Result<Vec<Kind>, String> {
        let s = s.trim();
        if s == "all" {
            return Ok(Kind::ALL.to_vec());
        }
        if s == "none" || s.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == "all" {
                return Ok(Kind::ALL.to_vec());
            }
            let k = Kind::ALL
                .into_iter()
                .find(|k| k.name() == part)
                .ok_or_else(|| {
                    format!(
                        "unknown nemesis {part:?}; expected all, none or a list of {}",
                        Kind::ALL.map(Kind::name).join(",")
                    )
                })?;
            if !out.contains(&k) {
                out.push(k);
            }
        }
        Ok(out)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which node a fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The current leader; `fallback` slot when no leader is known.
    Leader { fallback: usize },
    /// The node in this slot.
    Slot(usize),
}

/// Which peer pipes a delay or loss applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every peer pipe.
    All,
    /// The pipes from and to one node.
    Node(Target),
}

/// One fault with all its random choices made.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    Partition { target: Target, cut_clients: bool },
    Bridge { bridge: usize },
    Blackhole { target: Target, outbound: bool },
    Delay { scope: Scope, delay: Duration },
    Loss { scope: Scope, rate: f64 },
    Kill { target: Target },
    Pause,
    Membership { target: Target },
}

impl Fault {
    pub fn kind(&self) -> Kind {
        match self {
            Fault::Partition { .. } => Kind::Partition,
            Fault::Bridge { .. } => Kind::Bridge,
            Fault::Blackhole { .. } => Kind::Blackhole,
            Fault::Delay { .. } => Kind::Delay,
            Fault::Loss { .. } => Kind::Loss,
            Fault::Kill { .. } => Kind::Kill,
            Fault::Pause => Kind::Pause,
            Fault::Membership { .. } => Kind::Membership,
        }
    }
}

/// A fault window: inject at `at` (from the start of the workload), heal
/// `hold` later.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    pub at: Duration,
    pub hold: Duration,
    pub fault: Fault,
}

/// The schedule of a run; a pure function of its arguments.
pub fn schedule(seed: u64, time_limit: Duration, kinds: &[Kind]) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6e65_6d65_7369_7321);
    let mut steps = Vec::new();
    if kinds.is_empty() {
        return steps;
    }
    let mut round: Vec<Kind> = Vec::new();
    let mut at = QUIET_START;
    loop {
        let hold = Duration::from_millis(rng.random_range(HOLD_MS));
        if at + hold > time_limit {
            break;
        }
        if round.is_empty() {
            round = kinds.to_vec();
            round.shuffle(&mut rng);
        }
        let kind = round.remove(0);
        let fault = choose(kind, &mut rng);
        steps.push(Step { at, hold, fault });
        at += hold + Duration::from_millis(rng.random_range(GAP_MS));
    }
    steps
}

fn choose(kind: Kind, rng: &mut StdRng) -> Fault {
    let mut target = |rng: &mut StdRng| {
        let fallback = rng.random_range(0..SLOTS);
        if rng.random_bool(0.5) {
            Target::Leader { fallback }
        } else {
            Target::Slot(fallback)
        }
    };
    let scope = |rng: &mut StdRng, target: &mut dyn FnMut(&mut StdRng) -> Target| {
        if rng.random_bool(0.5) {
            Scope::All
        } else {
            Scope::Node(target(rng))
        }
    };
    match kind {
        Kind::Partition => Fault::Partition {
            target: target(rng),
            cut_clients: rng.random_bool(0.5),
        },
        Kind::Bridge => Fault::Bridge {
            bridge: rng.random_range(0..SLOTS),
        },
        Kind::Blackhole => Fault::Blackhole {
            target: target(rng),
            outbound: rng.random_bool(0.5),
        },
        Kind::Delay => {
            let scope = scope(rng, &mut target);
            let delay = [20, 50, 100, 200, 300][rng.random_range(0..5)];
            Fault::Delay {
                scope,
                delay: Duration::from_millis(delay),
            }
        }
        Kind::Loss => {
            let scope = scope(rng, &mut target);
            let rate = [0.1, 0.2, 0.3, 0.5][rng.random_range(0..4)];
            Fault::Loss { scope, rate }
        }
        Kind::Kill => Fault::Kill {
            target: target(rng),
        },
        Kind::Pause => Fault::Pause,
        Kind::Membership => Fault::Membership {
            target: target(rng),
        },
    }
}

/// A fault that was injected, for the summary.
#[derive(Clone, Debug, PartialEq)]
pub struct Injected {
    pub kind: Kind,
    /// What exactly (`isolate n2 (leader) from n1 n3; clients cut`).
    pub details: String,
    /// Nanoseconds since the run started (history time).
    pub start_ns: u64,
    pub end_ns: Option<u64>,
    /// What the heal did (`restarted n2`, `n4 joined in its place`).
    pub healed: Option<String>,
}

/// What has to be undone at the heal.
enum Active {
    Network,
    Killed(usize),
    Paused(usize),
    Removed(usize),
}

/// Runs the schedule against a cluster.
pub struct Nemesis {
    cluster: Cluster,
    recorder: Arc<Recorder>,
    injected: Vec<Injected>,
}

impl Nemesis {
    pub fn new(cluster: Cluster, recorder: Arc<Recorder>) -> Self {
        Nemesis {
            cluster,
            recorder,
            injected: Vec::new(),
        }
    }

    /// Give the cluster back, with the list of injected faults.
    pub fn into_parts(self) -> (Cluster, Vec<Injected>) {
        (self.cluster, self.injected)
    }

    /// Run `steps` (times relative to `start`) until they are done or
    /// `stop` turns true; a fault in place when stopping is healed first.
    pub async fn run(
        &mut self,
        steps: &[Step],
        start: Instant,
        mut stop: watch::Receiver<bool>,
    ) -> Result<()> {
        for step in steps {
            let stopped = tokio::select! {
                () = tokio::time::sleep_until(start + step.at) => false,
                _ = stop.wait_for(|s| *s) => true,
            };
            if stopped {
                break;
            }
            let kind = step.fault.kind();
            let (details, active) = self.inject(&step.fault).await?;
            let r = self
                .recorder
                .record(Entry::nemesis(format!("start {kind} {details}")));
            tracing::info!(%kind, %details, "fault injected");
            self.injected.push(Injected {
                kind,
                details,
                start_ns: r.time_ns,
                end_ns: None,
                healed: None,
            });
            tokio::select! {
                () = tokio::time::sleep(step.hold) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            let healed = self.heal(active).await?;
            let r = self.recorder.record(Entry::nemesis(format!("stop {kind}")));
            tracing::info!(%kind, %healed, "fault healed");
            if let Some(last) = self.injected.last_mut() {
                last.end_ns = Some(r.time_ns);
                last.healed = Some(healed);
            }
            if *stop.borrow() {
                break;
            }
        }
        Ok(())
    }

    async fn resolve(&self, target: Target) -> (usize, String) {
        match target {
            Target::Slot(s) => (s, format!("n{}", self.cluster.id(s))),
            Target::Leader { fallback } => match self.cluster.leader_slot().await {
                Some(s) => (s, format!("n{} (leader)", self.cluster.id(s))),
                None => (
                    fallback,
                    format!("n{} (no leader known)", self.cluster.id(fallback)),
                ),
            },
        }
    }

    fn node_name(&self, slot: usize) -> String {
        format!("n{}", self.cluster.id(slot))
    }

    fn others(&self, slot: usize) -> (Vec<usize>, String) {
        let v: Vec<usize> = (0..SLOTS).filter(|s| *s != slot).collect();
        let names = v
            .iter()
            .map(|s| self.node_name(*s))
            .collect::<Vec<_>>()
            .join(" ");
        (v, names)
    }

    fn set_pipes(&self, f: impl FnOnce(&mut FaultMap)) {
        self.cluster.net().faults.update(f);
    }

    /// Put `fault` in place; returns its description and what to undo.
    async fn inject(&mut self, fault: &Fault) -> Result<(String, Active)> {
        let bh = PipeFault::Blackhole;
        Ok(match *fault {
            Fault::Partition {
                target,
                cut_clients,
            } => {
                let (t, name) = self.resolve(target).await;
                let (others, names) = self.others(t);
                self.set_pipes(|m| {
                    for o in &others {
                        m.set(Endpoint::Node(t), Endpoint::Node(*o), bh);
                        m.set(Endpoint::Node(*o), Endpoint::Node(t), bh);
                    }
                    if cut_clients {
                        m.set(Endpoint::Client(t), Endpoint::Node(t), bh);
                        m.set(Endpoint::Node(t), Endpoint::Client(t), bh);
                    }
                });
                let clients = if cut_clients {
                    "its clients cut too"
                } else {
                    "its clients still reach it"
                };
                (
                    format!("isolate {name} from {names}; {clients}"),
                    Active::Network,
                )
            }
            Fault::Bridge { bridge } => {
                let (others, _) = self.others(bridge);
                let (a, b) = (others[0], others[1]);
                self.set_pipes(|m| {
                    m.set(Endpoint::Node(a), Endpoint::Node(b), bh);
                    m.set(Endpoint::Node(b), Endpoint::Node(a), bh);
                });
                (
                    format!(
                        "{} and {} cut from each other, {} bridges",
                        self.node_name(a),
                        self.node_name(b),
                        self.node_name(bridge)
                    ),
                    Active::Network,
                )
            }
            Fault::Blackhole { target, outbound } => {
                let (t, name) = self.resolve(target).await;
                let (others, names) = self.others(t);
                self.set_pipes(|m| {
                    for o in &others {
                        if outbound {
                            m.set(Endpoint::Node(t), Endpoint::Node(*o), bh);
                        } else {
                            m.set(Endpoint::Node(*o), Endpoint::Node(t), bh);
                        }
                    }
                });
                let what = if outbound {
                    format!("everything {name} sends to {names} is dropped")
                } else {
                    format!("everything {names} send to {name} is dropped")
                };
                (what, Active::Network)
            }
            Fault::Delay { scope, delay } => {
                let (pairs, where_) = self.scope_pairs(scope).await;
                self.set_pipes(|m| {
                    for (a, b) in pairs {
                        m.set(
                            Endpoint::Node(a),
                            Endpoint::Node(b),
                            PipeFault::Delay(delay),
                        );
                    }
                });
                (
                    format!("+{} ms per chunk on {where_}", delay.as_millis()),
                    Active::Network,
                )
            }
            Fault::Loss { scope, rate } => {
                let (pairs, where_) = self.scope_pairs(scope).await;
                self.set_pipes(|m| {
                    for (a, b) in pairs {
                        m.set(Endpoint::Node(a), Endpoint::Node(b), PipeFault::Loss(rate));
                    }
                });
                (
                    format!(
                        "{:.0}% of chunks held back {} ms on {where_}",
                        rate * 100.0,
                        crate::proxy::LOSS_RETRANSMIT_DELAY.as_millis()
                    ),
                    Active::Network,
                )
            }
            Fault::Kill { target } => {
                let (t, name) = self.resolve(target).await;
                self.cluster.kill(t).await?;
                (format!("SIGKILL {name}"), Active::Killed(t))
            }
            Fault::Pause => {
                let (t, name) = self.resolve(Target::Leader { fallback: 0 }).await;
                self.cluster.pause(t).await?;
                (format!("SIGSTOP {name}"), Active::Paused(t))
            }
            Fault::Membership { target } => {
                let (t, name) = self.resolve(target).await;
                self.cluster.remove(t).await?;
                (
                    format!("removed {name} from the membership and stopped it"),
                    Active::Removed(t),
                )
            }
        })
    }

    /// The directed node pairs of a delay/loss scope and its description.
    async fn scope_pairs(&self, scope: Scope) -> (Vec<(usize, usize)>, String) {
        match scope {
            Scope::All => {
                let mut v = Vec::new();
                for a in 0..SLOTS {
                    for b in 0..SLOTS {
                        if a != b {
                            v.push((a, b));
                        }
                    }
                }
                (v, "all peer links".into())
            }
            Scope::Node(target) => {
                let (t, name) = self.resolve(target).await;
                let mut v = Vec::new();
                for o in (0..SLOTS).filter(|o| *o != t) {
                    v.push((t, o));
                    v.push((o, t));
                }
                (v, format!("the peer links of {name}"))
            }
        }
    }

    /// Undo a fault; says what was done.
    async fn heal(&mut self, active: Active) -> Result<String> {
        Ok(match active {
            Active::Network => {
                self.cluster.net().faults.heal();
                "every link passes".to_string()
            }
            Active::Killed(slot) => format!("restarted n{}", self.cluster.restart(slot).await?),
            Active::Paused(slot) => format!("resumed n{}", self.cluster.resume(slot).await?),
            Active::Removed(slot) => format!(
                "n{} joined in its place",
                self.cluster.add_replacement(slot).await?
            ),
        })
    }
}

/// Check that a time limit leaves room for at least the quiet start.
pub fn check_time_limit(time_limit: Duration) -> Result<()> {
    if time_limit < Duration::from_secs(1) {
        bail!("--time-limit must be at least 1s");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_schedule() {
        let t = Duration::from_secs(120);
        let a = schedule(7, t, &Kind::ALL);
        let b = schedule(7, t, &Kind::ALL);
        assert_eq!(a, b);
        assert!(!a.is_empty());
        let c = schedule(8, t, &Kind::ALL);
        assert_ne!(a, c, "different seeds should give different schedules");
    }

    #[test]
    fn steps_fit_and_alternate() {
        let t = Duration::from_secs(60);
        let steps = schedule(1, t, &Kind::ALL);
        assert!(steps.len() >= 4, "{steps:?}");
        let mut end = Duration::ZERO;
        for s in &steps {
            assert!(s.at >= end + Duration::from_millis(*GAP_MS.start()) || end.is_zero());
            assert!(s.at >= QUIET_START);
            assert!(HOLD_MS.contains(&(s.hold.as_millis() as u64)));
            end = s.at + s.hold;
            assert!(end <= t);
        }
    }

    #[test]
    fn rounds_cover_every_kind() {
        let steps = schedule(3, Duration::from_secs(8 * 12 + 3), &Kind::ALL);
        assert!(steps.len() >= 8);
        let mut first_round: Vec<Kind> = steps[..8].iter().map(|s| s.fault.kind()).collect();
        first_round.sort();
        let mut all = Kind::ALL.to_vec();
        all.sort();
        assert_eq!(first_round, all);
    }

    #[test]
    fn only_enabled_kinds() {
        let kinds = [Kind::Kill, Kind::Pause];
        let steps = schedule(5, Duration::from_secs(100), &kinds);
        assert!(!steps.is_empty());
        assert!(steps.iter().all(|s| kinds.contains(&s.fault.kind())));
        assert!(schedule(5, Duration::from_secs(100), &[]).is_empty());
    }

    #[test]
    fn parse_nemesis_lists() {
        assert_eq!(Kind::parse_list("all"), Ok(Kind::ALL.to_vec()));
        assert_eq!(
            Kind::parse_list("kill,partition"),
            Ok(vec![Kind::Kill, Kind::Partition])
        );
        assert_eq!(Kind::parse_list("none"), Ok(vec![]));
        assert!(Kind::parse_list("kill,clock").is_err());
    }
}
