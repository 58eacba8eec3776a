//! `trellis-bench`: load generator comparing the Trellis control plane with
//! etcd on this machine. Every subcommand starts the cluster(s) it measures
//! itself (3 members each, on 127.0.0.1) and tears them down at the end.
//!
//! - `kv`: put throughput/latency at each `--concurrency` level, then
//!   linearizable gets, to the leader, `--runs` times, targets interleaved
//!   workload by workload (order flipped every run) so both see the same
//!   machine state; per-run lines, medians, a side-by-side table, `--json`.
//! - `failover`: a background writer puts every ~5 ms to whichever node
//!   answers; the leader is killed with SIGKILL and the time from the kill to
//!   the first acknowledged put after it is reported; the node is restarted
//!   and allowed to catch up before the next run.
//! - `soak`: puts at a moderate rate against Trellis for a long time while
//!   polling every node's Status each second; reports leader/term changes
//!   (the target is zero; the exit code is 1 otherwise).
//!
//! - `watchers`: one process opens 1,000 QUIC watch sessions over the three
//!   nodes, times each put's arrival at all of them and the reconnect storm
//!   after a node is killed (see `watchers.rs`).
//! - `http`: the sidecar data path: added latency, throughput, CPU and RSS
//!   of a Trellis sidecar pair (mTLS) vs an nginx pair vs direct, HTTP/1.1
//!   and HTTP/2 (see `http.rs`).
//!
//! Progress goes to stderr, results to stdout. `trellisd` must be built in
//! the same profile (`cargo build --release --bins`); etcd comes from PATH.

mod http;
mod watchers;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use tonic::transport::Channel;
use trellis_proto::admin::kv_client::KvClient;
use trellis_proto::admin::{CompactRequest, GetRequest, PutRequest};
use trellis_tests::etcdpb;
use trellis_tests::{
    connect, lazy_channel, median, parse_duration, Cluster, ClusterOptions, EtcdCluster, Latencies,
};

#[derive(Parser, Debug)]
#[command(
    name = "trellis-bench",
    about = "Trellis vs etcd load generator (starts the clusters itself)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Put and linearizable-get throughput and latency against the leader.
    Kv(KvArgs),
    /// Time from SIGKILL of the leader to the next acknowledged put.
    Failover(FailoverArgs),
    /// Long steady load against Trellis; counts leader/term changes.
    Soak(SoakArgs),
    /// Fan-out of committed puts to 1,000 QUIC watch sessions, and the
    /// reconnect storm after a node is killed.
    Watchers(watchers::WatchersArgs),
    /// Data path: direct vs a Trellis sidecar pair (mTLS) vs an nginx pair,
    /// at fixed rates and at saturation, HTTP/1.1 and HTTP/2.
    Http(http::HttpArgs),
    /// The backend process of `http` (HTTP/1.1 + h2c, "hello world").
    #[command(hide = true)]
    Backend(http::BackendArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum TargetSel {
    Trellis,
    Etcd,
    Both,
}

impl TargetSel {
    fn targets(self) -> Vec<Target> {
        match self {
            Self::Trellis => vec![Target::Trellis],
            Self::Etcd => vec![Target::Etcd],
            Self::Both => vec![Target::Trellis, Target::Etcd],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
enum Target {
    Trellis,
    Etcd,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Trellis => "trellis",
            Self::Etcd => "etcd",
        })
    }
}

fn duration_arg(s: &str) -> Result<Duration> {
    parse_duration(s)
}

#[derive(clap::Args, Debug, Clone, Serialize)]
struct KvArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value = "both")]
    #[serde(skip)]
    target: TargetSel,
    /// Measured time per workload and run (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = duration_arg)]
    duration: Duration,
    /// Unmeasured load before each measurement.
    #[arg(long, default_value = "1s", value_parser = duration_arg)]
    warmup: Duration,
    /// Bytes per value.
    #[arg(long, default_value_t = 1024)]
    value_size: usize,
    /// Put concurrency levels (concurrent requests in flight), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    concurrency: Vec<usize>,
    /// Concurrency of the linearizable-get workload (0 skips it).
    #[arg(long, default_value_t = 64)]
    read_concurrency: usize,
    /// HTTP/2 connections the requests are spread over (capped at the
    /// concurrency, so concurrency 1 uses one).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Repetitions; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Size of the key space (keys are preloaded so gets always hit).
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Do not compact between runs.
    #[arg(long)]
    no_compact: bool,
    /// Write all runs and medians as JSON here.
    #[arg(long)]
    #[serde(skip)]
    json: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
struct FailoverArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value = "both")]
    target: TargetSel,
    /// Kills per target.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Interval between two puts of the background writer.
    #[arg(long, default_value = "5ms", value_parser = duration_arg)]
    interval: Duration,
    /// Per-put timeout; a put that fails or times out moves the writer to
    /// the next node.
    #[arg(long, default_value = "1s", value_parser = duration_arg)]
    request_timeout: Duration,
    /// Bytes per value.
    #[arg(long, default_value_t = 1024)]
    value_size: usize,
    /// Write all runs and medians as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
struct SoakArgs {
    /// How long to run (e.g. 600s, 10m).
    #[arg(long, default_value = "600s", value_parser = duration_arg)]
    duration: Duration,
    /// Concurrent writers.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Total puts per second across all writers.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 1024)]
    value_size: usize,
    /// Size of the key space.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Kv(a) => kv_bench(a).await,
            Cmd::Failover(a) => failover_bench(a).await,
            Cmd::Soak(a) => soak(a).await,
            Cmd::Watchers(a) => watchers::watchers_bench(a).await,
            Cmd::Http(a) => http::http_bench(a).await,
            Cmd::Backend(a) => http::backend(a).await,
        }
    })
}

// ---------------------------------------------------------------------------
// Targets and clients
// ---------------------------------------------------------------------------

/// The running clusters.
#[derive(Default)]
struct Env {
    trellis: Option<Cluster>,
    etcd: Option<EtcdCluster>,
}

impl Env {
    async fn start(targets: &[Target]) -> Result<Self> {
        let mut env = Env::default();
        for t in targets {
            let started = Instant::now();
            eprintln!("starting 3-node {t} cluster ...");
            match t {
                Target::Trellis => {
                    // Diagnostics: TRELLIS_BENCH_NODES=1 measures the local
                    // write path without replication; TRELLIS_BENCH_NODE_ARGS
                    // adds trellisd flags (e.g. "--durability kill-safe").
                    let nodes = std::env::var("TRELLIS_BENCH_NODES")
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(3);
                    let extra_args = std::env::var("TRELLIS_BENCH_NODE_ARGS")
                        .map(|v| v.split_whitespace().map(str::to_string).collect())
                        .unwrap_or_default();
                    let opts = ClusterOptions {
                        nodes,
                        extra_args,
                        ..ClusterOptions::default()
                    };
                    env.trellis = Some(
                        Cluster::start_with(opts)
                            .await
                            .context("starting trellis")?,
                    )
                }
                Target::Etcd => {
                    env.etcd = Some(EtcdCluster::start(3).await.context("starting etcd")?)
                }
            }
            eprintln!("{t} cluster up in {:.2}s", started.elapsed().as_secs_f64());
        }
        Ok(env)
    }

    fn trellis(&mut self) -> Result<&mut Cluster> {
        self.trellis.as_mut().context("trellis cluster not started")
    }

    fn etcd(&mut self) -> Result<&mut EtcdCluster> {
        self.etcd.as_mut().context("etcd cluster not started")
    }

    /// Leader's member id (trellis node id or etcd member number).
    async fn leader(&mut self, t: Target) -> Result<u64> {
        match t {
            Target::Trellis => self.trellis()?.leader().await,
            Target::Etcd => self.etcd()?.leader().await,
        }
    }

    fn addr(&mut self, t: Target, id: u64) -> Result<SocketAddr> {
        match t {
            Target::Trellis => Ok(self.trellis()?.admin_addr(id)),
            Target::Etcd => self.etcd()?.client_addr(id),
        }
    }

    fn ids(&mut self, t: Target) -> Result<Vec<u64>> {
        match t {
            Target::Trellis => Ok(self.trellis()?.ids()),
            Target::Etcd => Ok(self.etcd()?.ids()),
        }
    }

    async fn kill(&mut self, t: Target, id: u64) -> Result<()> {
        match t {
            Target::Trellis => self.trellis()?.kill(id).await,
            Target::Etcd => self.etcd()?.kill(id).await,
        }
    }

    /// Restarts a killed member and waits until it has caught up with the
    /// leader and everyone agrees on the leader.
    async fn restart_and_rejoin(&mut self, t: Target, id: u64) -> Result<()> {
        match t {
            Target::Trellis => {
                let c = self.trellis()?;
                c.restart(id).await?;
                let leader = c.leader().await?;
                let rev = c.status(leader).await?.revision;
                c.wait_for_revision(id, rev).await?;
                c.wait_converged().await?;
            }
            Target::Etcd => {
                let c = self.etcd()?;
                c.restart(id).await?;
                let leader = c.leader().await?;
                let target_index = c.status(leader).await?.raft_index;
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let s = c.status(id).await;
                    if let Ok(s) = &s {
                        if s.raft_applied_index >= target_index {
                            break;
                        }
                    }
                    if Instant::now() > deadline {
                        bail!("etcd e{id} did not catch up to index {target_index}: {s:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Ok(())
    }
}

/// A KV client for either system.
#[derive(Clone)]
enum Kv {
    Trellis(KvClient<Channel>),
    Etcd(etcdpb::kv_client::KvClient<Channel>),
}

impl Kv {
    fn new(t: Target, ch: Channel) -> Self {
        match t {
            Target::Trellis => Kv::Trellis(KvClient::new(ch)),
            Target::Etcd => Kv::Etcd(etcdpb::kv_client::KvClient::new(ch)),
        }
    }

    /// Put; returns the store revision of the write.
    async fn put(&mut self, key: String, value: Vec<u8>) -> Result<u64, tonic::Status> {
        match self {
            Kv::Trellis(c) => {
                let r = c
                    .put(PutRequest {
                        key,
                        value,
                        ..PutRequest::default()
                    })
                    .await?;
                Ok(r.into_inner().header.map_or(0, |h| h.revision))
            }
            Kv::Etcd(c) => {
                let r = c
                    .put(etcdpb::PutRequest {
                        key: key.into_bytes(),
                        value,
                        ..etcdpb::PutRequest::default()
                    })
                    .await?;
                Ok(r.into_inner()
                    .header
                    .map_or(0, |h| h.revision.max(0) as u64))
            }
        }
    }

    /// Linearizable get (trellis default; etcd Range with serializable=false).
    async fn get(&mut self, key: String) -> Result<(), tonic::Status> {
        match self {
            Kv::Trellis(c) => {
                c.get(GetRequest {
                    key,
                    serializable: false,
                })
                .await?;
            }
            Kv::Etcd(c) => {
                c.range(etcdpb::RangeRequest {
                    key: key.into_bytes(),
                    serializable: false,
                    ..etcdpb::RangeRequest::default()
                })
                .await?;
            }
        }
        Ok(())
    }

    async fn compact(&mut self, revision: u64) -> Result<(), tonic::Status> {
        match self {
            Kv::Trellis(c) => {
                c.compact(CompactRequest { revision }).await?;
            }
            Kv::Etcd(c) => {
                c.compact(etcdpb::CompactionRequest {
                    revision: i64::try_from(revision).unwrap_or(i64::MAX),
                    physical: true,
                })
                .await?;
            }
        }
        Ok(())
    }
}

fn key_name(i: usize) -> String {
    format!("bench/key-{i:06}")
}

fn random_value(size: usize) -> Vec<u8> {
    (0..size).map(|_| rand::random::<u8>()).collect()
}

fn ms(d: Option<Duration>) -> f64 {
    d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

fn write_json(path: &PathBuf, v: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).context("encoding JSON")?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

// ---------------------------------------------------------------------------
// kv
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
enum Op {
    Put,
    Get,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
struct Workload {
    op: Op,
    concurrency: usize,
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let op = match self.op {
            Op::Put => "put",
            Op::Get => "get",
        };
        write!(f, "{op} c={}", self.concurrency)
    }
}

#[derive(Clone, Debug, Serialize)]
struct RunResult {
    target: Target,
    workload: Workload,
    run: usize,
    connections: usize,
    ops: u64,
    errors: u64,
    seconds: f64,
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    first_error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
struct Summary {
    target: Target,
    workload: Workload,
    runs: usize,
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    errors: u64,
}

impl Summary {
    fn of(runs: &[&RunResult]) -> Option<Self> {
        let first = runs.first()?;
        let med = |f: fn(&RunResult) -> f64| {
            median(&runs.iter().map(|r| f(r)).collect::<Vec<_>>()).unwrap_or(f64::NAN)
        };
        Some(Self {
            target: first.target,
            workload: first.workload,
            runs: runs.len(),
            ops_per_sec: med(|r| r.ops_per_sec),
            p50_ms: med(|r| r.p50_ms),
            p99_ms: med(|r| r.p99_ms),
            p999_ms: med(|r| r.p999_ms),
            errors: runs.iter().map(|r| r.errors).sum(),
        })
    }
}

fn fmt_line(label: &str, ops: f64, p50: f64, p99: f64, p999: f64, errors: u64) -> String {
    format!(
        "{label:<30} {ops:>10.0} ops/s  p50 {p50:>7.3} ms  p99 {p99:>7.3} ms  p99.9 {p999:>7.3} ms  errors {errors}"
    )
}

#[derive(Serialize)]
struct KvReport<'a> {
    config: &'a KvArgs,
    targets: Vec<Target>,
    runs: &'a [RunResult],
    medians: &'a [Summary],
}

async fn kv_bench(a: KvArgs) -> Result<()> {
    if a.concurrency.contains(&0) || a.connections == 0 || a.runs == 0 || a.keys == 0 {
        bail!("--concurrency, --connections, --runs and --keys must be positive");
    }
    let targets = a.target.targets();
    let mut env = Env::start(&targets).await?;
    let value = random_value(a.value_size);

    for &t in &targets {
        let leader = env.leader(t).await?;
        let addr = env.addr(t, leader)?;
        eprintln!(
            "{t}: preloading {} keys via leader {leader} ({addr}) ...",
            a.keys
        );
        preload(t, addr, a.keys, &value).await?;
    }

    let mut workloads: Vec<Workload> = a
        .concurrency
        .iter()
        .map(|&c| Workload {
            op: Op::Put,
            concurrency: c,
        })
        .collect();
    if a.read_concurrency > 0 {
        workloads.push(Workload {
            op: Op::Get,
            concurrency: a.read_concurrency,
        });
    }

    let mut results: Vec<RunResult> = Vec::new();
    let mut last_rev: BTreeMap<Target, u64> = BTreeMap::new();
    for run in 1..=a.runs {
        let mut order = targets.clone();
        if run % 2 == 0 {
            order.reverse();
        }
        for w in &workloads {
            for &t in &order {
                let leader = env.leader(t).await?;
                let addr = env.addr(t, leader)?;
                let spec = MeasureSpec {
                    target: t,
                    addr,
                    workload: *w,
                    connections: a.connections.min(w.concurrency).max(1),
                    warmup: a.warmup,
                    duration: a.duration,
                    keys: a.keys,
                    value: value.clone(),
                };
                let (r, rev) = measure(&spec, run).await?;
                if rev > 0 {
                    last_rev.insert(t, rev);
                }
                println!(
                    "{}",
                    fmt_line(
                        &format!("[run {run}/{}] {t} {w}", a.runs),
                        r.ops_per_sec,
                        r.p50_ms,
                        r.p99_ms,
                        r.p999_ms,
                        r.errors
                    )
                );
                if let Some(e) = &r.first_error {
                    println!("    first error: {e}");
                }
                results.push(r);
            }
        }
        if !a.no_compact {
            for &t in &order {
                if let Some(&rev) = last_rev.get(&t) {
                    let leader = env.leader(t).await?;
                    let addr = env.addr(t, leader)?;
                    let mut kv = Kv::new(t, lazy_channel(addr)?);
                    match kv.compact(rev).await {
                        Ok(()) => eprintln!("{t}: compacted at revision {rev}"),
                        Err(e) => eprintln!("{t}: compaction at {rev} failed (ignored): {e}"),
                    }
                }
            }
        }
    }

    let mut summaries = Vec::new();
    for w in &workloads {
        for &t in &targets {
            let rs: Vec<&RunResult> = results
                .iter()
                .filter(|r| r.target == t && r.workload == *w)
                .collect();
            if let Some(s) = Summary::of(&rs) {
                summaries.push(s);
            }
        }
    }

    println!();
    println!(
        "medians of {} run(s), {} s each, {}-byte values, {} connection(s) max:",
        a.runs,
        a.duration.as_secs_f64(),
        a.value_size,
        a.connections
    );
    for s in &summaries {
        println!(
            "{}",
            fmt_line(
                &format!("{} {}", s.target, s.workload),
                s.ops_per_sec,
                s.p50_ms,
                s.p99_ms,
                s.p999_ms,
                s.errors
            )
        );
    }
    print_side_by_side(&targets, &workloads, &summaries);

    if let Some(path) = &a.json {
        write_json(
            path,
            &KvReport {
                config: &a,
                targets: targets.clone(),
                runs: &results,
                medians: &summaries,
            },
        )?;
    }
    Ok(())
}

fn print_side_by_side(targets: &[Target], workloads: &[Workload], summaries: &[Summary]) {
    println!();
    let mut header = format!("{:<10}", "workload");
    for t in targets {
        header.push_str(&format!(
            " | {:>10} {:>8} {:>8} {:>8} {:>5}",
            format!("{t} ops/s"),
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "err"
        ));
    }
    let both = targets.len() == 2;
    if both {
        header.push_str(" | trellis/etcd ops");
    }
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    for w in workloads {
        let mut line = format!("{:<10}", w.to_string());
        let mut ops = Vec::new();
        for t in targets {
            match summaries
                .iter()
                .find(|s| s.target == *t && s.workload == *w)
            {
                Some(s) => {
                    line.push_str(&format!(
                        " | {:>10.0} {:>8.3} {:>8.3} {:>8.3} {:>5}",
                        s.ops_per_sec, s.p50_ms, s.p99_ms, s.p999_ms, s.errors
                    ));
                    ops.push(s.ops_per_sec);
                }
                None => line.push_str(&format!(
                    " | {:>10} {:>8} {:>8} {:>8} {:>5}",
                    "-", "-", "-", "-", "-"
                )),
            }
        }
        if both && ops.len() == 2 && ops[1] > 0.0 {
            line.push_str(&format!(" | {:>6.2}x", ops[0] / ops[1]));
        }
        println!("{line}");
    }
}

async fn preload(t: Target, addr: SocketAddr, keys: usize, value: &[u8]) -> Result<()> {
    let ch = connect(addr).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let mut kv = Kv::new(t, ch.clone());
        let next = next.clone();
        let value = value.to_vec();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    return Ok::<(), anyhow::Error>(());
                }
                let mut tries = 0;
                loop {
                    tries += 1;
                    match kv.put(key_name(i), value.clone()).await {
                        Ok(_) => break,
                        Err(e) if tries < 20 => {
                            eprintln!("preload put {i} failed ({e}); retrying");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => bail!("preloading key {i} into {t}: {e}"),
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.context("preload task panicked")??;
    }
    Ok(())
}

struct MeasureSpec {
    target: Target,
    addr: SocketAddr,
    workload: Workload,
    connections: usize,
    warmup: Duration,
    duration: Duration,
    keys: usize,
    value: Vec<u8>,
}

struct TaskStats {
    lat: Latencies,
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    max_rev: u64,
}

/// Runs one workload against `spec.addr`; returns the result and the highest
/// revision written (0 for reads).
async fn measure(spec: &MeasureSpec, run: usize) -> Result<(RunResult, u64)> {
    let mut channels = Vec::with_capacity(spec.connections);
    for _ in 0..spec.connections {
        channels.push(connect(spec.addr).await?);
    }
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let mut tasks = Vec::with_capacity(spec.workload.concurrency);
    for i in 0..spec.workload.concurrency {
        let mut kv = Kv::new(spec.target, channels[i % channels.len()].clone());
        let value = spec.value.clone();
        let keys = spec.keys;
        let op = spec.workload.op;
        tasks.push(tokio::spawn(async move {
            let mut st = TaskStats {
                lat: Latencies::new(),
                ops: 0,
                errors: 0,
                first_error: None,
                max_rev: 0,
            };
            // Spread tasks over the key space; stride by a prime.
            let mut k = i.wrapping_mul(7919);
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                k = (k + 1) % keys;
                let key = key_name(k);
                let res = match op {
                    Op::Put => kv.put(key, value.clone()).await,
                    Op::Get => kv.get(key).await.map(|()| 0),
                };
                let counted = t0 >= measure_from;
                match res {
                    Ok(rev) => {
                        st.max_rev = st.max_rev.max(rev);
                        if counted {
                            st.lat.record(t0.elapsed());
                            st.ops += 1;
                        }
                    }
                    Err(e) => {
                        if counted {
                            st.errors += 1;
                            if st.first_error.is_none() {
                                st.first_error = Some(format!("{}: {}", e.code(), e.message()));
                            }
                        }
                        // Do not spin on a persistent failure.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            st
        }));
    }
    let mut lat = Latencies::new();
    let (mut ops, mut errors, mut max_rev, mut first_error) = (0u64, 0u64, 0u64, None);
    for t in tasks {
        let st = t.await.context("load task panicked")?;
        lat.merge(st.lat);
        ops += st.ops;
        errors += st.errors;
        max_rev = max_rev.max(st.max_rev);
        if first_error.is_none() {
            first_error = st.first_error;
        }
    }
    let seconds = spec.duration.as_secs_f64();
    Ok((
        RunResult {
            target: spec.target,
            workload: spec.workload,
            run,
            connections: spec.connections,
            ops,
            errors,
            seconds,
            ops_per_sec: ops as f64 / seconds,
            p50_ms: ms(lat.percentile(50.0)),
            p99_ms: ms(lat.percentile(99.0)),
            p999_ms: ms(lat.percentile(99.9)),
            first_error,
        },
        max_rev,
    ))
}

// ---------------------------------------------------------------------------
// failover
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize)]
struct FailoverRun {
    target: Target,
    run: usize,
    killed: u64,
    new_leader: u64,
    failover_ms: f64,
    writes_ok: usize,
    write_errors: u64,
}

#[derive(Serialize)]
struct FailoverReport<'a> {
    runs: &'a [FailoverRun],
    median_ms: BTreeMap<String, f64>,
}

/// Shared state of the background writer.
struct Writer {
    stop: AtomicBool,
    preferred: AtomicUsize,
    /// (issued, acknowledged) of every successful put.
    acks: Mutex<Vec<(Instant, Instant)>>,
    errors: AtomicU64,
}

impl Writer {
    fn acks_len(&self) -> usize {
        self.acks.lock().map_or(0, |a| a.len())
    }

    /// The first acknowledgement of a put *issued* after `t` (a put sent
    /// before the kill may still be answered after it: it says nothing
    /// about the new leader).
    fn first_ack_after(&self, t: Instant) -> Option<Instant> {
        self.acks
            .lock()
            .ok()?
            .iter()
            .filter(|(issued, _)| *issued > t)
            .map(|(_, acked)| *acked)
            .min()
    }
}

async fn failover_bench(a: FailoverArgs) -> Result<()> {
    if a.runs == 0 {
        bail!("--runs must be positive");
    }
    let targets = a.target.targets();
    let mut env = Env::start(&targets).await?;
    let value = random_value(a.value_size);
    let mut runs = Vec::new();
    for run in 1..=a.runs {
        let mut order = targets.clone();
        if run % 2 == 0 {
            order.reverse();
        }
        for &t in &order {
            let r = failover_once(&mut env, t, run, &a, &value)
                .await
                .with_context(|| format!("{t} failover run {run}"))?;
            println!(
                "[run {run}/{}] {t:<7} killed leader {} -> new leader {}: next put acknowledged after {:.1} ms \
                 ({} writes ok, {} errors)",
                a.runs, r.killed, r.new_leader, r.failover_ms, r.writes_ok, r.write_errors
            );
            runs.push(r);
        }
    }
    println!();
    let mut medians = BTreeMap::new();
    for &t in &targets {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r.target == t)
            .map(|r| r.failover_ms)
            .collect();
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if let Some(m) = median(&v) {
            println!(
                "{t:<7} failover (kill -9 leader -> next acknowledged put): median {m:.1} ms, \
                 min {min:.1} ms, max {max:.1} ms over {} runs",
                v.len()
            );
            medians.insert(t.to_string(), m);
        }
    }
    if let Some(path) = &a.json {
        write_json(
            path,
            &FailoverReport {
                runs: &runs,
                median_ms: medians,
            },
        )?;
    }
    Ok(())
}

async fn failover_once(
    env: &mut Env,
    t: Target,
    run: usize,
    a: &FailoverArgs,
    value: &[u8],
) -> Result<FailoverRun> {
    let leader = env.leader(t).await?;
    // Leader first, then the others.
    let mut ids = env.ids(t)?;
    ids.retain(|&i| i != leader);
    ids.insert(0, leader);
    let mut clients = Vec::new();
    for &id in &ids {
        clients.push(Kv::new(t, lazy_channel(env.addr(t, id)?)?));
    }
    let clients = Arc::new(clients);
    let w = Arc::new(Writer {
        stop: AtomicBool::new(false),
        preferred: AtomicUsize::new(0),
        acks: Mutex::new(Vec::new()),
        errors: AtomicU64::new(0),
    });
    const MAX_IN_FLIGHT: u32 = 256;
    let sem = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT as usize));
    let writer = {
        let (w, clients, sem) = (w.clone(), clients.clone(), sem.clone());
        let (interval, timeout) = (a.interval, a.request_timeout);
        let value = value.to_vec();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            while !w.stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let Ok(permit) = sem.clone().try_acquire_owned() else {
                    continue;
                };
                n += 1;
                let idx = w.preferred.load(Ordering::Relaxed) % clients.len();
                let mut kv = clients[idx].clone();
                let (w, value, len) = (w.clone(), value.clone(), clients.len());
                tokio::spawn(async move {
                    let _permit = permit;
                    let key = format!("failover/{run}/{}", n % 1000);
                    let issued = Instant::now();
                    match tokio::time::timeout(timeout, kv.put(key, value)).await {
                        Ok(Ok(_)) => {
                            if let Ok(mut acks) = w.acks.lock() {
                                acks.push((issued, Instant::now()));
                            }
                        }
                        _ => {
                            w.errors.fetch_add(1, Ordering::Relaxed);
                            let _ = w.preferred.compare_exchange(
                                idx,
                                (idx + 1) % len,
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                            );
                        }
                    }
                });
            }
        })
    };

    // Let the writer reach a steady state.
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.acks_len() < 50 {
        if Instant::now() > deadline {
            bail!(
                "background writer got only {} acks in 10 s ({} errors) before the kill",
                w.acks_len(),
                w.errors.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let killed_at = Instant::now();
    env.kill(t, leader).await?;
    let deadline = killed_at + Duration::from_secs(60);
    let first = loop {
        if let Some(a) = w.first_ack_after(killed_at) {
            break a;
        }
        if Instant::now() > deadline {
            bail!("no put acknowledged within 60 s of killing the {t} leader");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    w.stop.store(true, Ordering::Relaxed);
    let _ = writer.await;
    // Wait for in-flight puts to finish (each is bounded by the timeout).
    let _ = tokio::time::timeout(a.request_timeout * 2, sem.acquire_many(MAX_IN_FLIGHT)).await;

    let new_leader = env.leader(t).await?;
    let result = FailoverRun {
        target: t,
        run,
        killed: leader,
        new_leader,
        failover_ms: (first - killed_at).as_secs_f64() * 1e3,
        writes_ok: w.acks_len(),
        write_errors: w.errors.load(Ordering::Relaxed),
    };
    eprintln!("{t}: restarting member {leader} and waiting for it to catch up ...");
    env.restart_and_rejoin(t, leader).await?;
    Ok(result)
}

// ---------------------------------------------------------------------------
// soak
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize)]
struct LeaderChange {
    at_s: f64,
    node: u64,
    from_term: u64,
    to_term: u64,
    from_leader: u64,
    to_leader: u64,
}

#[derive(Serialize)]
struct SoakReport {
    duration_s: f64,
    puts: u64,
    errors: u64,
    puts_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    leader_changes: Vec<LeaderChange>,
    status_poll_failures: u64,
}

async fn soak(a: SoakArgs) -> Result<()> {
    if a.concurrency == 0 || a.rate == 0 || a.keys == 0 {
        bail!("--concurrency, --rate and --keys must be positive");
    }
    let mut env = Env::start(&[Target::Trellis]).await?;
    let c = env.trellis()?;
    let leader = c.leader().await?;
    let ids = c.ids();
    let mut order = ids.clone();
    order.retain(|&i| i != leader);
    order.insert(0, leader);
    let mut clients = Vec::new();
    for &id in &order {
        clients.push(Kv::new(Target::Trellis, lazy_channel(c.admin_addr(id))?));
    }
    let clients = Arc::new(clients);
    let value = random_value(a.value_size);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let end = start + a.duration;
    let total_ops = Arc::new(AtomicU64::new(0));
    let total_errors = Arc::new(AtomicU64::new(0));
    let preferred = Arc::new(AtomicUsize::new(0));

    let period = Duration::from_secs_f64(a.concurrency as f64 / a.rate as f64);
    let mut tasks = Vec::new();
    for i in 0..a.concurrency {
        let (clients, value, stop) = (clients.clone(), value.clone(), stop.clone());
        let (ops, errs, preferred) = (total_ops.clone(), total_errors.clone(), preferred.clone());
        let keys = a.keys;
        tasks.push(tokio::spawn(async move {
            let mut lat = Latencies::new();
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut k = i.wrapping_mul(7919);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                tick.tick().await;
                k = (k + 1) % keys;
                let idx = preferred.load(Ordering::Relaxed) % clients.len();
                let mut kv = clients[idx].clone();
                let t0 = Instant::now();
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    kv.put(key_name(k), value.clone()),
                )
                .await
                {
                    Ok(Ok(_)) => {
                        lat.record(t0.elapsed());
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        errs.fetch_add(1, Ordering::Relaxed);
                        let _ = preferred.compare_exchange(
                            idx,
                            (idx + 1) % clients.len(),
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                }
            }
            lat
        }));
    }

    // Poll every node's Status once a second.
    let mut last: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut changes: Vec<LeaderChange> = Vec::new();
    let mut poll_failures = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_progress = Instant::now();
    while Instant::now() < end {
        tick.tick().await;
        for &id in &ids {
            match c.status(id).await {
                Ok(s) => {
                    let now = (s.term, s.leader_id);
                    if let Some(&prev) = last.get(&id) {
                        if prev != now {
                            let ch = LeaderChange {
                                at_s: start.elapsed().as_secs_f64(),
                                node: id,
                                from_term: prev.0,
                                to_term: now.0,
                                from_leader: prev.1,
                                to_leader: now.1,
                            };
                            eprintln!(
                                "!! node {id} at {:.1}s: term {} -> {}, leader {} -> {}",
                                ch.at_s, ch.from_term, ch.to_term, ch.from_leader, ch.to_leader
                            );
                            changes.push(ch);
                        }
                    }
                    last.insert(id, now);
                }
                Err(e) => {
                    poll_failures += 1;
                    eprintln!("status of node {id} failed: {e:#}");
                }
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            let el = start.elapsed().as_secs_f64();
            eprintln!(
                "soak {el:.0}/{:.0}s: {} puts ({:.0}/s), {} errors, {} leader/term changes",
                a.duration.as_secs_f64(),
                total_ops.load(Ordering::Relaxed),
                total_ops.load(Ordering::Relaxed) as f64 / el,
                total_errors.load(Ordering::Relaxed),
                changes.len()
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut lat = Latencies::new();
    for t in tasks {
        lat.merge(t.await.context("soak writer panicked")?);
    }
    let secs = start.elapsed().as_secs_f64();
    let puts = total_ops.load(Ordering::Relaxed);
    let report = SoakReport {
        duration_s: secs,
        puts,
        errors: total_errors.load(Ordering::Relaxed),
        puts_per_sec: puts as f64 / secs,
        p50_ms: ms(lat.percentile(50.0)),
        p99_ms: ms(lat.percentile(99.0)),
        p999_ms: ms(lat.percentile(99.9)),
        max_ms: ms(lat.percentile(100.0)),
        leader_changes: changes,
        status_poll_failures: poll_failures,
    };
    println!(
        "soak {:.0}s, {} writers at {} puts/s total: {} puts ({:.0}/s), {} errors, \
         p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms, {} status poll failures",
        report.duration_s,
        a.concurrency,
        a.rate,
        report.puts,
        report.puts_per_sec,
        report.errors,
        report.p50_ms,
        report.p99_ms,
        report.p999_ms,
        report.max_ms,
        report.status_poll_failures
    );
    println!(
        "leader/term changes observed: {} (target: 0)",
        report.leader_changes.len()
    );
    for ch in &report.leader_changes {
        println!(
            "  {:.1}s node {}: term {} -> {}, leader {} -> {}",
            ch.at_s, ch.node, ch.from_term, ch.to_term, ch.from_leader, ch.to_leader
        );
    }
    if let Some(path) = &a.json {
        write_json(path, &report)?;
    }
    if !report.leader_changes.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rr(ops: f64, p50: f64, errors: u64) -> RunResult {
        RunResult {
            target: Target::Etcd,
            workload: Workload {
                op: Op::Put,
                concurrency: 1,
            },
            run: 1,
            connections: 1,
            ops: 0,
            errors,
            seconds: 1.0,
            ops_per_sec: ops,
            p50_ms: p50,
            p99_ms: p50,
            p999_ms: p50,
            first_error: None,
        }
    }

    #[test]
    fn summary_takes_medians_and_sums_errors() {
        let runs = [rr(100.0, 3.0, 1), rr(300.0, 1.0, 0), rr(200.0, 2.0, 2)];
        let refs: Vec<&RunResult> = runs.iter().collect();
        let s = Summary::of(&refs);
        assert!(s.is_some());
        if let Some(s) = s {
            assert_eq!(s.ops_per_sec, 200.0);
            assert_eq!(s.p50_ms, 2.0);
            assert_eq!(s.errors, 3);
            assert_eq!(s.runs, 3);
        }
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from([
            "trellis-bench",
            "kv",
            "--target",
            "etcd",
            "--duration",
            "3s",
            "--concurrency",
            "1,16,64",
        ]);
        assert!(cli.is_ok());
        if let Ok(Cli { cmd: Cmd::Kv(a) }) = cli {
            assert_eq!(a.target, TargetSel::Etcd);
            assert_eq!(a.duration, Duration::from_secs(3));
            assert_eq!(a.concurrency, vec![1, 16, 64]);
            assert_eq!(a.connections, 8);
        }
        assert!(Cli::try_parse_from(["trellis-bench", "failover", "--runs", "2"]).is_ok());
        assert!(Cli::try_parse_from(["trellis-bench", "soak", "--duration", "10m"]).is_ok());
        assert!(Cli::try_parse_from(["trellis-bench", "kv", "--duration", "ten"]).is_err());
    }

    #[test]
    fn workload_names() {
        let w = Workload {
            op: Op::Get,
            concurrency: 64,
        };
        assert_eq!(w.to_string(), "get c=64");
        assert_eq!(key_name(7), "bench/key-000007");
    }
}
