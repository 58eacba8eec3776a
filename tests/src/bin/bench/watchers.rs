//! `trellis-bench watchers`: one process opens N QUIC watch sessions (one
//! connection each, as N sidecars would) spread over the three control
//! nodes, then
//!
//! 1. fan-out: makes `--puts` puts one after another and, for each, times
//!    how long until *every* session has received it (from just before the
//!    put is sent, so commit time is included); reports p50/p99/max of that
//!    over the puts, the distribution of single deliveries, and each
//!    control node's CPU and RSS during the phase;
//! 2. reconnect storm: kills one follower with SIGKILL, puts once, and
//!    times until every session — including the ~N/3 that were attached to
//!    the dead node and must notice it (QUIC idle timeout), reconnect to
//!    another node and resume from their last revision — has that put.
//!
//! Sessions check the watch contract as they go: revisions strictly
//! increase and no put index arrives twice or out of order.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use tokio::sync::mpsc;
use trellis_proto::admin::{CreateTokenRequest, PutRequest};
use trellis_proto::sidecar as sc;
use trellis_tests::quic::{self, client_endpoint, client_endpoint_with, connect, issued, join};
use trellis_tests::{Cluster, ClusterOptions, Latencies};

/// QUIC liveness of the bench's sessions, as a sidecar would set it: a
/// killed node is noticed after the idle timeout.
const IDLE_TIMEOUT: Duration = Duration::from_millis(1_000);
const KEEP_ALIVE: Duration = Duration::from_millis(250);
/// A connection attempt to a dead node gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1_000);
/// Sessions connect this many at a time (handshakes are CPU-heavy; 1,000
/// at once only queue behind each other on 2 cores).
const CONNECT_PARALLELISM: usize = 64;
const KEY: &str = "/bench/watch";
/// Sessions per client UDP socket: quinn reads each socket in one task, so
/// one socket for 1,000 connections would serialize all receiving on one
/// core; several spread it over the runtime's workers, as 1,000 sidecars
/// on their own machines would.
const SESSIONS_PER_ENDPOINT: usize = 50;

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct WatchersArgs {
    /// Watch sessions (one QUIC connection each), round-robin over nodes.
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// Puts timed in the fan-out phase.
    #[arg(long, default_value_t = 100)]
    pub puts: usize,
    /// Deadline for all sessions to receive one put.
    #[arg(long, default_value = "10s", value_parser = trellis_tests::parse_duration)]
    pub put_timeout: Duration,
    /// Skip the reconnect storm.
    #[arg(long)]
    pub no_storm: bool,
    /// Print the results as JSON too.
    #[arg(long)]
    pub json: bool,
}

/// What sessions report to the collector.
enum Report {
    /// Snapshot received: the session is watching.
    Ready,
    /// Put number `index` arrived.
    Got { index: u64, at: Instant },
    /// Re-attached to another node after losing one.
    Reattached { at: Instant },
    /// The watch contract was broken.
    Violation(String),
}

#[derive(Serialize)]
struct NodeUsage {
    node: u64,
    cpu_cores: f64,
    rss_mib: f64,
}

#[derive(Serialize)]
struct Results {
    sessions: usize,
    puts: usize,
    setup_ms: u128,
    all_p50_ms: f64,
    all_p99_ms: f64,
    all_max_ms: f64,
    delivery_p50_ms: f64,
    delivery_p99_ms: f64,
    nodes: Vec<NodeUsage>,
    storm: Option<Storm>,
}

#[derive(Serialize)]
struct Storm {
    killed_node: u64,
    sessions_on_it: usize,
    reattached: usize,
    all_reattached_ms: f64,
    all_caught_up_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (utime + stime) clock ticks and RSS in KiB of a process.
fn proc_usage(pid: u32) -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is [0]; utime is field 14 overall = [11].
    let ticks =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse::<u64>()?;
    Ok((ticks, rss))
}

/// Linux's USER_HZ, the unit of /proc/<pid>/stat times.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

async fn session(
    id: usize,
    endpoint: quinn::Endpoint,
    seeds: Vec<SocketAddr>,
    tx: mpsc::UnboundedSender<Report>,
) {
    let mut seed = id % seeds.len();
    let mut after: Option<u64> = None;
    let mut last_index: Option<u64> = None;
    let mut attached_before = false;
    loop {
        let addr = seeds[seed];
        let attempt = async {
            let conn = tokio::time::timeout(CONNECT_TIMEOUT, connect(&endpoint, addr))
                .await
                .context("connect timeout")??;
            let (_send, mut recv) = quic::watch(&conn, "/bench/", after).await?;
            if attached_before {
                let _ = tx.send(Report::Reattached { at: Instant::now() });
            }
            loop {
                let Some(msg) = quic::next::<sc::WatchMessage>(&mut recv).await? else {
                    bail!("watch ended");
                };
                match msg.kind {
                    Some(sc::watch_message::Kind::Snapshot(s)) if !s.more => {
                        after = Some(s.revision);
                        if !attached_before {
                            attached_before = true;
                            let _ = tx.send(Report::Ready);
                        }
                    }
                    Some(sc::watch_message::Kind::Delta(d)) => {
                        if after.is_some_and(|a| d.revision <= a) {
                            let _ = tx.send(Report::Violation(format!(
                                "session {id}: revision {} after {after:?}",
                                d.revision
                            )));
                        }
                        after = Some(d.revision);
                        for e in d.events {
                            let Some(kv) = e.kv else { continue };
                            let index = std::str::from_utf8(&kv.value)
                                .ok()
                                .and_then(|v| v.parse::<u64>().ok());
                            if let Some(index) = index {
                                if last_index.is_some_and(|l| index <= l) {
                                    let _ = tx.send(Report::Violation(format!(
                                        "session {id}: put {index} after put {last_index:?}"
                                    )));
                                }
                                last_index = Some(index);
                                let _ = tx.send(Report::Got {
                                    index,
                                    at: Instant::now(),
                                });
                            }
                        }
                    }
                    Some(sc::watch_message::Kind::Progress(p)) => {
                        after = Some(after.map_or(p.revision, |a| a.max(p.revision)));
                    }
                    Some(sc::watch_message::Kind::Compacted(_))
                    | Some(sc::watch_message::Kind::Snapshot(_)) => {}
                    Some(sc::watch_message::Kind::Error(e)) => bail!("watch error: {}", e.message),
                    None => {}
                }
            }
        };
        let r: Result<()> = attempt.await;
        if tx.is_closed() {
            return;
        }
        if let Err(e) = r {
            tracing_free_log(id, addr, &e);
        }
        seed = (seed + 1) % seeds.len();
    }
}

fn tracing_free_log(id: usize, addr: SocketAddr, e: &anyhow::Error) {
    if std::env::var("TRELLIS_BENCH_VERBOSE").is_ok() {
        eprintln!("session {id} @ {addr}: {e:#}");
    }
}

pub async fn watchers_bench(a: WatchersArgs) -> Result<()> {
    eprintln!("starting a 3-node Trellis cluster with mutual TLS ...");
    let mut c = Cluster::start_with(ClusterOptions {
        tls: true,
        ..ClusterOptions::default()
    })
    .await?;
    let ca = std::fs::read_to_string(&c.pki().context("pki")?.ca_file)?;
    let token = c
        .identity_client(1)
        .create_token(CreateTokenRequest {
            namespace: "bench".into(),
            service: "watcher".into(),
            ttl_ms: 0,
            description: "trellis-bench watchers".into(),
        })
        .await?
        .into_inner()
        .token;
    let anon = client_endpoint(&ca, None)?;
    let (resp, key) = join(&connect(&anon, c.quic_addr(1)).await?, &token, "", "").await?;
    let cert = issued(resp)?;
    let endpoints = (0..a.sessions.div_ceil(SESSIONS_PER_ENDPOINT))
        .map(|_| {
            client_endpoint_with(
                &ca,
                Some((&cert.cert_pem, &key)),
                Some((IDLE_TIMEOUT, KEEP_ALIVE)),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let ids = c.ids();
    let seeds: Vec<SocketAddr> = ids.iter().map(|&id| c.quic_addr(id)).collect();
    let leader = c.leader().await?;
    let mut kv = c.kv(leader);
    kv.put(PutRequest {
        key: KEY.into(),
        value: b"start".to_vec(),
        ..Default::default()
    })
    .await?;

    eprintln!("opening {} watch sessions ...", a.sessions);
    let setup = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let gate = Arc::new(tokio::sync::Semaphore::new(CONNECT_PARALLELISM));
    for i in 0..a.sessions {
        let (endpoint, seeds, tx, gate) = (
            endpoints[i / SESSIONS_PER_ENDPOINT].clone(),
            seeds.clone(),
            tx.clone(),
            gate.clone(),
        );
        tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
            let fwd = tokio::spawn(async move {
                let mut permit = permit.ok();
                while let Some(r) = ready_rx.recv().await {
                    if matches!(r, Report::Ready) {
                        permit.take();
                    }
                    if tx.send(r).is_err() {
                        return;
                    }
                }
            });
            session(i, endpoint, seeds, ready_tx).await;
            let _ = fwd.await;
        });
    }
    drop(tx);
    let mut ready = 0;
    let mut violations = Vec::new();
    while ready < a.sessions {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(Report::Ready)) => ready += 1,
            Ok(Some(Report::Violation(v))) => violations.push(v),
            Ok(Some(_)) => {}
            Ok(None) => bail!("sessions ended"),
            Err(_) => bail!(
                "only {ready} of {} sessions attached within 60 s",
                a.sessions
            ),
        }
    }
    let setup_ms = setup.elapsed().as_millis();
    eprintln!("{} sessions watching after {setup_ms} ms", a.sessions);
    let per_node: BTreeMap<u64, usize> = {
        let mut m = BTreeMap::new();
        for id in &ids {
            let st = c
                .cluster_client(*id)
                .proxy_status(trellis_proto::admin::ProxyStatusRequest {})
                .await;
            if let Ok(st) = st {
                for s in st.into_inner().sidecars {
                    *m.entry(s.node_id).or_insert(0) += 1;
                }
                break;
            }
        }
        m
    };
    eprintln!("sessions per node (proxy-status): {per_node:?}");

    // Fan-out.
    let pids: Vec<(u64, u32)> = ids
        .iter()
        .filter_map(|&id| c.node_proc(id).pid().map(|p| (id, p)))
        .collect();
    let before: Vec<(u64, u64)> = pids
        .iter()
        .map(|&(_, p)| proc_usage(p))
        .collect::<Result<_>>()?;
    let phase = Instant::now();
    let mut all = Latencies::new();
    let mut single = Latencies::new();
    for index in 0..a.puts as u64 {
        let t0 = Instant::now();
        kv.put(PutRequest {
            key: KEY.into(),
            value: index.to_string().into_bytes(),
            ..Default::default()
        })
        .await?;
        let mut got = 0;
        let mut last = t0;
        while got < a.sessions {
            match tokio::time::timeout(a.put_timeout, rx.recv()).await {
                Ok(Some(Report::Got { index: i, at })) if i == index => {
                    got += 1;
                    single.record(at - t0);
                    last = last.max(at);
                }
                Ok(Some(Report::Violation(v))) => violations.push(v),
                Ok(Some(_)) => {}
                Ok(None) => bail!("sessions ended"),
                Err(_) => bail!(
                    "put {index}: only {got} of {} sessions got it within {:?}",
                    a.sessions,
                    a.put_timeout
                ),
            }
        }
        all.record(last - t0);
    }
    let wall = phase.elapsed().as_secs_f64();
    let mut nodes = Vec::new();
    for (&(id, pid), (t0, _)) in pids.iter().zip(&before) {
        let (t1, rss) = proc_usage(pid)?;
        nodes.push(NodeUsage {
            node: id,
            cpu_cores: (t1 - t0) as f64 / CLOCK_TICKS_PER_SEC / wall,
            rss_mib: rss as f64 / 1024.0,
        });
    }

    // Reconnect storm: kill a follower.
    let storm = if a.no_storm {
        None
    } else {
        let victim = *ids
            .iter()
            .find(|&&id| id != leader)
            .context("no follower")?;
        let on_it = per_node.get(&victim).copied().unwrap_or(0);
        eprintln!("killing node {victim} ({on_it} sessions attached) ...");
        let storm_index = a.puts as u64 + 1;
        let t_kill = Instant::now();
        c.kill(victim).await?;
        kv.put(PutRequest {
            key: KEY.into(),
            value: storm_index.to_string().into_bytes(),
            ..Default::default()
        })
        .await?;
        let mut reattached = 0;
        let mut last_reattach = t_kill;
        let mut got = 0;
        let mut last_got = t_kill;
        while got < a.sessions {
            match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
                Ok(Some(Report::Got { index, at })) if index == storm_index => {
                    got += 1;
                    last_got = last_got.max(at);
                }
                Ok(Some(Report::Reattached { at })) => {
                    reattached += 1;
                    last_reattach = last_reattach.max(at);
                }
                Ok(Some(Report::Violation(v))) => violations.push(v),
                Ok(Some(_)) => {}
                Ok(None) => bail!("sessions ended"),
                Err(_) => bail!("storm: only {got} of {} sessions caught up within 30 s ({reattached} re-attached)", a.sessions),
            }
        }
        Some(Storm {
            killed_node: victim,
            sessions_on_it: on_it,
            reattached,
            all_reattached_ms: ms(last_reattach - t_kill),
            all_caught_up_ms: ms(last_got - t_kill),
        })
    };
    ensure!(
        violations.is_empty(),
        "watch contract violations: {violations:?}"
    );

    let pct = |l: &mut Latencies, p| l.percentile(p).map_or(f64::NAN, ms);
    let r = Results {
        sessions: a.sessions,
        puts: a.puts,
        setup_ms,
        all_p50_ms: pct(&mut all, 50.0),
        all_p99_ms: pct(&mut all, 99.0),
        all_max_ms: pct(&mut all, 100.0),
        delivery_p50_ms: pct(&mut single, 50.0),
        delivery_p99_ms: pct(&mut single, 99.0),
        nodes,
        storm,
    };
    println!(
        "watchers: {} sessions over {} nodes, {} puts",
        r.sessions,
        ids.len(),
        r.puts
    );
    println!(
        "  put -> all {} sessions: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms   (single deliveries p50 {:.1} ms, p99 {:.1} ms)",
        r.sessions, r.all_p50_ms, r.all_p99_ms, r.all_max_ms, r.delivery_p50_ms, r.delivery_p99_ms
    );
    for n in &r.nodes {
        println!(
            "  node {}: {:.2} cores, RSS {:.1} MiB during fan-out",
            n.node, n.cpu_cores, n.rss_mib
        );
    }
    if let Some(s) = &r.storm {
        println!(
            "  storm: killed node {} ({} sessions): all {} re-attached after {:.0} ms, all {} sessions caught up after {:.0} ms",
            s.killed_node, s.sessions_on_it, s.reattached, s.all_reattached_ms, r.sessions, s.all_caught_up_ms
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    }
    Ok(())
}
