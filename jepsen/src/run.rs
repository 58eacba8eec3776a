//! One run, start to end: cluster up, watchers and workers on, the nemesis
//! schedule for the time limit, then heal everything, wait for a healthy
//! cluster, read every key once more, let the watchers catch up with the
//! final revision, and stop.
//!
//! The run produces `<out-dir>/history.jsonl` and the node logs under
//! `<out-dir>/nodes/`; [`RunReport`] carries what happened (its `Display`
//! is the run part of `summary.txt`). Checking the history is the caller's
//! job (the `jepsen` binary calls the checker crate).
//!
//! A harness failure (a node that does not start, a fault that cannot be
//! injected or healed, a cluster that does not recover) ends the run early
//! but still leaves a complete, checkable history: workers are stopped so
//! every operation is completed, and the nodes are stopped.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cluster::{admin_channel, Cluster, ClusterOptions, SLOTS};
use crate::nemesis::{self, Injected, Kind, Nemesis, Step};
use crate::recorder::{Counts, Entry, Recorder};
use crate::workload::{self, Shared, WatcherConfig, WorkerConfig};

/// How long the cluster may take to become healthy after the final heal.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the watchers may take to deliver up to the final revision.
const WATCH_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything a run needs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub time_limit: Duration,
    pub nemeses: Vec<Kind>,
    pub seed: u64,
    /// Operations per second over all workers.
    pub rate: f64,
    pub concurrency: usize,
    pub out_dir: PathBuf,
    pub trellisd: PathBuf,
    pub extra_args: Vec<String>,
}

impl RunOptions {
    /// A command line that runs the same schedule and workload again.
    pub fn repro(&self) -> String {
        let nemesis = if self.nemeses == Kind::ALL.to_vec() {
            "all".to_string()
        } else if self.nemeses.is_empty() {
            "none".to_string()
        } else {
            self.nemeses
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut s = format!(
            "jepsen run --time-limit {} --nemesis {nemesis} --seed {} --rate {} --concurrency {}",
            fmt_duration(self.time_limit),
            self.seed,
            self.rate,
            self.concurrency
        );
        for a in &self.extra_args {
            s.push_str(" --extra-trellisd-arg=");
            s.push_str(&shell_quote(a));
        }
        s
    }
}

/// `60s`, `1500ms`.
pub fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Parse `60s`, `2m`, `1500ms`, `1h`, or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration such as 60s, 2m or 500ms"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?}: not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=.,/:@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// What happened in a run (everything but the checker's verdict).
#[derive(Debug, Default)]
pub struct RunReport {
    pub seed: u64,
    pub repro: String,
    pub out_dir: PathBuf,
    pub history: PathBuf,
    pub time_limit: Duration,
    pub nemeses: Vec<Kind>,
    /// The planned schedule.
    pub schedule: Vec<Step>,
    /// Faults actually injected.
    pub injected: Vec<Injected>,
    /// How long the workload ran.
    pub workload_time: Duration,
    /// Whole run.
    pub total_time: Duration,
    pub counts: Counts,
    /// Every node id started, and the final members.
    pub node_ids: Vec<u64>,
    pub final_members: Vec<u64>,
    pub final_revision: Option<u64>,
    pub final_reads: usize,
    /// Per slot: the revision its watcher had everything up to at the end.
    pub watcher_progress: Vec<u64>,
    /// (accepted, dropped chunks, delayed chunks, resets, unresolved).
    pub proxy_totals: (u64, u64, u64, u64, u64),
    /// Harness errors (the run is not judged valid when there are any).
    pub errors: Vec<String>,
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nem = if self.nemeses.is_empty() {
            "none".to_string()
        } else {
            self.nemeses
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(",")
        };
        writeln!(f, "Trellis Jepsen run")?;
        writeln!(f, "  seed:          {}", self.seed)?;
        writeln!(f, "  repro:         {}", self.repro)?;
        writeln!(f, "  out dir:       {}", self.out_dir.display())?;
        writeln!(
            f,
            "  time:          limit {}, workload {:.1} s, whole run {:.1} s",
            fmt_duration(self.time_limit),
            self.workload_time.as_secs_f64(),
            self.total_time.as_secs_f64()
        )?;
        writeln!(f, "  nemeses:       {nem} (clock skew: not implemented)")?;
        let ids: Vec<String> = self.node_ids.iter().map(|i| format!("n{i}")).collect();
        let members: Vec<String> = self.final_members.iter().map(|i| format!("n{i}")).collect();
        writeln!(
            f,
            "  nodes:         started {}; final members {}",
            ids.join(" "),
            members.join(" ")
        )?;
        let c = &self.counts;
        writeln!(
            f,
            "  operations:    {} invoked ({} records in the history)",
            c.invokes, c.total
        )?;
        for func in ["read", "write", "cas"] {
            let n = |t: &str| {
                c.completions
                    .get(&(func.to_string(), t.to_string()))
                    .copied()
                    .unwrap_or(0)
            };
            writeln!(
                f,
                "    {func:<6} ok {:>6}  fail {:>6}  info {:>6}",
                n("ok"),
                n("fail"),
                n("info")
            )?;
        }
        let by_node: Vec<String> = c
            .watch_by_node
            .iter()
            .map(|(n, k)| format!("n{n} {k}"))
            .collect();
        writeln!(
            f,
            "  watches:       {} deliveries ({}), {} subscriptions",
            c.watch_by_node.values().sum::<u64>(),
            by_node.join(", "),
            c.watch_starts
        )?;
        match self.final_revision {
            Some(r) => {
                let caught: Vec<String> = self
                    .watcher_progress
                    .iter()
                    .enumerate()
                    .map(|(s, p)| {
                        format!("slot {s} {}", if *p >= r { "caught up" } else { "BEHIND" })
                    })
                    .collect();
                writeln!(
                    f,
                    "  final state:   revision {r}; {} keys read at the end; watchers: {}",
                    self.final_reads,
                    caught.join(", ")
                )?;
            }
            None => writeln!(f, "  final state:   not reached")?,
        }
        writeln!(
            f,
            "  faults:        {} injected of {} planned",
            self.injected.len(),
            self.schedule.len()
        )?;
        for i in &self.injected {
            let end = i
                .end_ns
                .map_or("…".to_string(), |e| format!("{:.1}", e as f64 / 1e9));
            let healed = i
                .healed
                .as_deref()
                .map_or(String::new(), |h| format!("; then {h}"));
            writeln!(
                f,
                "    {:>6.1}–{:<6} s  {:<10} {}{healed}",
                i.start_ns as f64 / 1e9,
                end,
                i.kind.name(),
                i.details
            )?;
        }
        let (acc, dropped, delayed, resets, unresolved) = self.proxy_totals;
        writeln!(
            f,
            "  proxies:       {acc} connections, {dropped} chunks blackholed, {delayed} chunks delayed, {resets} connections reset{}",
            if unresolved > 0 {
                format!(", {unresolved} forwarded connections of unknown origin (not faulted)")
            } else {
                String::new()
            }
        )?;
        if self.errors.is_empty() {
            writeln!(f, "  harness:       ok")?;
        } else {
            writeln!(f, "  harness:       {} ERROR(S)", self.errors.len())?;
            for e in &self.errors {
                for (i, line) in e.lines().enumerate() {
                    writeln!(f, "    {}{line}", if i == 0 { "- " } else { "  " })?;
                }
            }
        }
        Ok(())
    }
}

/// Run once with `opts`. Never fails: harness errors end up in
/// [`RunReport::errors`].
pub async fn run(opts: &RunOptions) -> RunReport {
    let started = Instant::now();
    let mut report = RunReport {
        seed: opts.seed,
        repro: opts.repro(),
        out_dir: opts.out_dir.clone(),
        history: opts.out_dir.join("history.jsonl"),
        time_limit: opts.time_limit,
        nemeses: opts.nemeses.clone(),
        schedule: nemesis::schedule(opts.seed, opts.time_limit, &opts.nemeses),
        ..RunReport::default()
    };
    if let Err(e) = run_inner(opts, &mut report).await {
        report.errors.push(format!("{e:#}"));
    }
    report.total_time = started.elapsed();
    report
}

struct Tasks<T> {
    handles: Vec<JoinHandle<Result<T>>>,
}

impl<T> Tasks<T> {
    async fn join(self, errors: &mut Vec<String>, what: &str) -> Vec<T> {
        let mut out = Vec::new();
        for h in self.handles {
            match tokio::time::timeout(Duration::from_secs(10), h).await {
                Ok(Ok(Ok(v))) => out.push(v),
                Ok(Ok(Err(e))) => errors.push(format!("{what}: {e:#}")),
                Ok(Err(e)) => errors.push(format!("{what} task: {e}")),
                Err(_) => errors.push(format!("{what} did not stop within 10 s")),
            }
        }
        out
    }
}

async fn run_inner(opts: &RunOptions, report: &mut RunReport) -> Result<()> {
    if opts.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if !(opts.rate > 0.0 && opts.rate.is_finite()) {
        bail!("--rate must be positive");
    }
    nemesis::check_time_limit(opts.time_limit)?;
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("creating {}", opts.out_dir.display()))?;
    let recorder = Arc::new(Recorder::create(&report.history)?);

    tracing::info!(
        seed = opts.seed,
        "starting a 3-node cluster behind fault proxies"
    );
    let cluster = Cluster::start(ClusterOptions {
        trellisd: opts.trellisd.clone(),
        dir: opts.out_dir.join("nodes"),
        extra_args: opts.extra_args.clone(),
        seed: opts.seed,
    })
    .await?;
    let net = cluster.net();
    let shared = Arc::new(Shared::new(
        recorder.clone(),
        (opts.concurrency + SLOTS) as i64,
    ));

    // Watchers first, so they see every revision from the first one.
    let (watch_stop_tx, watch_stop) = watch::channel(false);
    let mut progress = Vec::new();
    let mut confirmed = Vec::new();
    let mut watchers = Tasks {
        handles: Vec::new(),
    };
    for slot in 0..SLOTS {
        let p = Arc::new(AtomicU64::new(0));
        let c = Arc::new(AtomicU64::new(0));
        progress.push(p.clone());
        confirmed.push(c.clone());
        watchers.handles.push(tokio::spawn(workload::watcher(
            shared.clone(),
            WatcherConfig {
                slot,
                process: (opts.concurrency + slot) as i64,
                addr: net.client_addr(slot),
                progress: p,
                confirmed: c,
            },
            watch_stop.clone(),
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while confirmed.iter().any(|c| c.load(Ordering::Relaxed) == 0) {
        if Instant::now() > deadline {
            bail!("the watchers did not subscribe within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Workers and the nemesis.
    let (stop_tx, stop) = watch::channel(false);
    let interval = Duration::from_secs_f64(opts.concurrency as f64 / opts.rate);
    let mut workers = Tasks {
        handles: Vec::new(),
    };
    for index in 0..opts.concurrency {
        let slot = index % SLOTS;
        workers.handles.push(tokio::spawn(workload::worker(
            shared.clone(),
            WorkerConfig {
                index,
                slot,
                addr: net.client_addr(slot),
                interval,
                seed: opts.seed,
                slot_node: cluster.slot_id_watch(slot),
            },
            stop.clone(),
        )));
    }
    let start = Instant::now();
    tracing::info!(
        time_limit = %fmt_duration(opts.time_limit),
        faults = report.schedule.len(),
        "workload started"
    );
    let (nemesis_stop_tx, nemesis_stop) = watch::channel(false);
    let steps = report.schedule.clone();
    let mut nemesis_task = tokio::spawn({
        let recorder = recorder.clone();
        async move {
            let mut n = Nemesis::new(cluster, recorder);
            let r = n.run(&steps, start, nemesis_stop).await;
            (n, r)
        }
    });
    let end = start + opts.time_limit;
    let joined = tokio::select! {
        () = tokio::time::sleep_until(end) => {
            let _ = nemesis_stop_tx.send(true);
            nemesis_task.await
        }
        r = &mut nemesis_task => r,
    };
    let (nemesis, nemesis_result) = joined.context("the nemesis task panicked")?;
    let (mut cluster, injected) = nemesis.into_parts();
    report.injected = injected;
    match nemesis_result {
        // The schedule is done: the workload still runs to the time limit.
        Ok(()) => tokio::time::sleep_until(end).await,
        // A fault could not be injected or healed: stop now.
        Err(e) => report.errors.push(format!("nemesis: {e:#}")),
    }
    let _ = stop_tx.send(true);
    let counts: Vec<u64> = workers.join(&mut report.errors, "worker").await;
    report.workload_time = start.elapsed();
    tracing::info!(
        ops = counts.iter().sum::<u64>(),
        "workload stopped; healing"
    );

    // Heal everything that may still be broken.
    let result = finish(report, &mut cluster, &shared, &progress).await;
    let _ = watch_stop_tx.send(true);
    watchers.join(&mut report.errors, "watcher").await;
    report.watcher_progress = progress.iter().map(|p| p.load(Ordering::Relaxed)).collect();
    report.node_ids = cluster.all_ids();
    report.final_members = cluster.member_ids();
    report.proxy_totals = net.totals();
    cluster.stop().await;
    report.counts = recorder.counts();
    recorder.finish()?;
    result
}

/// The end of a run: heal, recover, final reads, watchers catch up.
async fn finish(
    report: &mut RunReport,
    cluster: &mut Cluster,
    shared: &Shared,
    progress: &[Arc<AtomicU64>],
) -> Result<()> {
    let net = cluster.net();
    net.faults.heal();
    if let Some(last) = report.injected.last_mut() {
        if last.end_ns.is_none() {
            // The nemesis failed in the middle of a fault: close its window.
            let r = shared
                .recorder
                .record(Entry::nemesis(format!("stop {}", last.kind)));
            last.end_ns = Some(r.time_ns);
        }
    }
    let healed = cluster.heal_processes().await?;
    if !healed.is_empty() {
        tracing::info!(?healed, "healed process faults");
    }
    let health = cluster
        .wait_healthy(RECOVERY_TIMEOUT)
        .await
        .context("the cluster did not recover after healing every fault")?;
    tracing::info!(
        leader = health.leader,
        term = health.term,
        "cluster healthy"
    );

    let mut channels = Vec::new();
    for slot in 0..SLOTS {
        channels.push((cluster.id(slot), admin_channel(cluster.admin_addr(slot))?));
    }
    report.final_reads = workload::final_reads(shared, &channels).await?;
    let health = cluster
        .wait_healthy(RECOVERY_TIMEOUT)
        .await
        .context("the cluster was not healthy after the final reads")?;
    report.final_revision = Some(health.revision);

    let deadline = Instant::now() + WATCH_CATCH_UP_TIMEOUT;
    while progress
        .iter()
        .any(|p| p.load(Ordering::Relaxed) < health.revision)
    {
        if Instant::now() > deadline {
            let behind: Vec<String> = progress
                .iter()
                .enumerate()
                .map(|(s, p)| format!("slot {s} at {}", p.load(Ordering::Relaxed)))
                .collect();
            // Not a harness error: a watcher that never catches up is
            // what the watch checker judges (it sees the missing tail).
            tracing::warn!(
                final_revision = health.revision,
                behind = %behind.join(", "),
                "watchers did not catch up within {WATCH_CATCH_UP_TIMEOUT:?}"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("20"), Ok(Duration::from_secs(20)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
        assert_eq!(fmt_duration(Duration::from_secs(60)), "60s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn repro_line() {
        let o = RunOptions {
            time_limit: Duration::from_secs(60),
            nemeses: Kind::ALL.to_vec(),
            seed: 42,
            rate: 200.0,
            concurrency: 6,
            out_dir: PathBuf::from("/tmp/x"),
            trellisd: PathBuf::from("/bin/true"),
            extra_args: vec!["--durability".into(), "kill safe".into()],
        };
        assert_eq!(
            o.repro(),
            "jepsen run --time-limit 60s --nemesis all --seed 42 --rate 200 --concurrency 6 \
             --extra-trellisd-arg=--durability --extra-trellisd-arg='kill safe'"
        );
    }
}
