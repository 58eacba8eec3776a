//! Userspace TCP fault proxies.
//!
//! Every link the harness wants to break runs through a [`Proxy`]: a
//! listener on `127.0.0.1` that forwards each accepted connection to its
//! current target. Which faults apply to the bytes is decided per *pipe*:
//! the directed flow of bytes from one [`Endpoint`] to another. A proxied
//! connection from `src` to `dst` moves its request bytes through pipe
//! `src → dst` and its response bytes through pipe `dst → src`, so cutting
//! "node 1 → node 2" in the [`FaultMap`] cuts node 1's requests to node 2
//! *and* node 1's answers to node 2's requests, whichever side dialed.
//!
//! The fault of a pipe ([`Fault`]):
//!
//! - `Pass`: bytes are forwarded as they arrive.
//! - `Blackhole`: bytes are read and silently dropped. Connections stay
//!   open and new ones are still accepted: to the endpoints this looks like
//!   a network partition (requests time out), never like a dead process (no
//!   RST, no refused connect — a refused connect would make trellisd's
//!   crash detector conclude that the peer's process is gone). A connection
//!   that lost bytes is *tainted*: its byte stream has a hole, so it drops
//!   everything from then on, and it is closed as soon as neither of its
//!   pipes is blackholed any more (the heal), so gRPC reconnects at once
//!   instead of waiting for its own timeouts.
//! - `Delay(d)`: every chunk is delivered `d` after it was read, in order.
//! - `Loss(p)`: TCP has no packets to lose, so loss is emulated by its
//!   effect on a TCP stream: a fraction `p` of the chunks is held back for
//!   [`LOSS_RETRANSMIT_DELAY`] (a retransmission timeout), and because the
//!   stream stays in order, everything behind such a chunk waits too
//!   (head-of-line blocking, as after a real lost segment).
//!
//! A proxy also emulates its target's process being gone: [`Proxy::set_up`]
//! with `false` closes the listener (connects are refused, as they are at a
//! dead process's port) and every open connection; `true` binds the same
//! port again. A proxy without a target accepts and closes at once.
//!
//! The source of a connection is fixed per proxy ([`Source::Fixed`]) or found
//! per connection ([`Source::Resolve`]: trellisd forwards client requests to
//! the leader's advertised admin address, one address for all senders, so
//! the harness finds which node process owns the connecting socket; see
//! [`socket_owner`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long a "lost" chunk is held back under [`Fault::Loss`]: Linux's
/// minimum retransmission timeout is 200 ms.
pub const LOSS_RETRANSMIT_DELAY: Duration = Duration::from_millis(200);
/// How long the proxy waits to connect to its target before giving up on
/// an accepted connection (closing it).
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long re-binding a proxy's port may take after it was down.
const REBIND_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer per direction.
const CHUNK: usize = 64 * 1024;
/// Chunks queued per direction (delay/loss) before reading pauses.
const QUEUE: usize = 1024;

/// One end of a proxied link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    /// The control node in a slot (0, 1, 2); see `cluster`.
    Node(usize),
    /// The clients (register workers, watcher) attached to a slot's node.
    Client(usize),
    /// A connection whose source could not be identified: never faulted.
    Unknown,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Node(s) => write!(f, "node-slot-{s}"),
            Endpoint::Client(s) => write!(f, "clients-of-slot-{s}"),
            Endpoint::Unknown => write!(f, "unknown"),
        }
    }
}

/// What happens to the bytes of a pipe.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    Pass,
    Blackhole,
    Delay(Duration),
    Loss(f64),
}

/// The fault of every directed pipe `(from, to)`; pipes not listed pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultMap(BTreeMap<(Endpoint, Endpoint), Fault>);

impl FaultMap {
    /// The fault of the pipe carrying bytes from `from` to `to`.
    pub fn get(&self, from: Endpoint, to: Endpoint) -> Fault {
        self.0.get(&(from, to)).copied().unwrap_or(Fault::Pass)
    }

    /// Set the fault of the pipe from `from` to `to`.
    pub fn set(&mut self, from: Endpoint, to: Endpoint, fault: Fault) {
        if fault == Fault::Pass {
            self.0.remove(&(from, to));
        } else {
            self.0.insert((from, to), fault);
        }
    }

    /// Whether every pipe passes.
    pub fn is_healed(&self) -> bool {
        self.0.is_empty()
    }
}

/// The shared, mutable fault state all proxies read.
#[derive(Clone)]
pub struct Faults {
    tx: Arc<watch::Sender<FaultMap>>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            tx: Arc::new(watch::channel(FaultMap::default()).0),
        }
    }
}

impl Faults {
    /// Replace the whole map (connections see it on their next chunk).
    pub fn set_map(&self, map: FaultMap) {
        self.tx.send_replace(map);
    }

    /// Change some pipes.
    pub fn update(&self, f: impl FnOnce(&mut FaultMap)) {
        self.tx.send_modify(f);
    }

    /// Every pipe passes again; tainted connections are closed.
    pub fn heal(&self) {
        self.set_map(FaultMap::default());
    }

    /// The current map.
    pub fn current(&self) -> FaultMap {
        self.tx.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<FaultMap> {
        self.tx.subscribe()
    }
}

/// Finds the source endpoint of an accepted connection from its
/// (peer, local) addresses. Runs on a blocking thread.
pub type Resolver = Arc<dyn Fn(SocketAddr, SocketAddr) -> Option<Endpoint> + Send + Sync>;

/// Where a proxy's connections come from.
#[derive(Clone)]
pub enum Source {
    Fixed(Endpoint),
    Resolve(Resolver),
}

/// Counters of one proxy.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    /// Chunks dropped by a blackhole.
    pub dropped_chunks: AtomicU64,
    /// Chunks held back by delay or loss.
    pub delayed_chunks: AtomicU64,
    /// Connections closed by the proxy at a heal, reset or down.
    pub resets: AtomicU64,
    /// Connections whose source could not be resolved.
    pub unresolved: AtomicU64,
}

struct Control {
    name: String,
    dst: Endpoint,
    source: Source,
    faults: Faults,
    target: watch::Sender<Option<SocketAddr>>,
    up: watch::Sender<bool>,
    /// Bumped to close every open connection.
    epoch: watch::Sender<u64>,
    stats: Stats,
    seed: u64,
    conn_counter: AtomicU64,
    bind_failed: AtomicBool,
}

/// One proxy: a listener on 127.0.0.1 forwarding to a target.
pub struct Proxy {
    addr: SocketAddr,
    ctl: Arc<Control>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.ctl.epoch.send_modify(|e| *e += 1);
    }
}

impl Proxy {
    /// Bind `127.0.0.1:0` and start serving; no target yet. `seed` drives
    /// the loss emulation.
    pub async fn start(
        name: impl Into<String>,
        dst: Endpoint,
        source: Source,
        faults: &Faults,
        seed: u64,
    ) -> Result<Proxy> {
        let name = name.into();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .with_context(|| format!("binding proxy {name} on 127.0.0.1:0"))?;
        let addr = listener
            .local_addr()
            .with_context(|| format!("local address of proxy {name}"))?;
        let ctl = Arc::new(Control {
            name,
            dst,
            source,
            faults: faults.clone(),
            target: watch::channel(None).0,
            up: watch::channel(true).0,
            epoch: watch::channel(0).0,
            stats: Stats::default(),
            seed,
            conn_counter: AtomicU64::new(0),
            bind_failed: AtomicBool::new(false),
        });
        let task = tokio::spawn(serve(ctl.clone(), addr, listener));
        Ok(Proxy { addr, ctl, task })
    }

    /// The address clients dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's name (for logs).
    pub fn name(&self) -> &str {
        &self.ctl.name
    }

    /// Forward new connections to `target` (`None`: close them).
    pub fn set_target(&self, target: Option<SocketAddr>) {
        self.ctl.target.send_replace(target);
    }

    /// The current target.
    pub fn target(&self) -> Option<SocketAddr> {
        *self.ctl.target.borrow()
    }

    /// `false`: close the listener and every connection (the target's
    /// process is gone); `true`: listen on the same port again.
    pub fn set_up(&self, up: bool) {
        if !up {
            self.reset();
        }
        self.ctl.up.send_replace(up);
    }

    /// Whether the listener is bound (after `set_up(true)`, once re-bound).
    pub fn is_up(&self) -> bool {
        *self.ctl.up.borrow() && !self.ctl.bind_failed.load(Ordering::Relaxed)
    }

    /// Close every open connection now.
    pub fn reset(&self) {
        self.ctl.epoch.send_modify(|e| *e += 1);
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.ctl.stats
    }
}

/// The accept loop, across downs and ups.
async fn serve(ctl: Arc<Control>, addr: SocketAddr, first: TcpListener) {
    let mut up_rx = ctl.up.subscribe();
    let mut listener = Some(first);
    loop {
        let l = match listener.take() {
            Some(l) => l,
            None => {
                if up_rx.wait_for(|up| *up).await.is_err() {
                    return;
                }
                match rebind(addr).await {
                    Ok(l) => {
                        ctl.bind_failed.store(false, Ordering::Relaxed);
                        l
                    }
                    Err(e) => {
                        tracing::error!(proxy = %ctl.name, error = %e, "cannot re-bind the proxy port");
                        ctl.bind_failed.store(true, Ordering::Relaxed);
                        // Wait for the next up/down change and try again.
                        if up_rx.changed().await.is_err() {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        loop {
            tokio::select! {
                accepted = l.accept() => match accepted {
                    Ok((stream, peer)) => {
                        ctl.stats.accepted.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(handle(ctl.clone(), stream, peer, addr));
                    }
                    Err(e) => {
                        tracing::warn!(proxy = %ctl.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                changed = up_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if !*up_rx.borrow_and_update() {
                        break;
                    }
                }
            }
        }
        // Dropping `l` closes the port: connects are refused until up.
        drop(l);
    }
}

async fn rebind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let deadline = Instant::now() + REBIND_TIMEOUT;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// How one direction of a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PumpEnd {
    /// EOF or an error, passed on: the connection is over.
    Closed,
    /// The source ended while the pipe was blackholed (or the connection
    /// tainted): the end is not passed on, the connection waits for a heal.
    Swallowed,
}

/// One direction of one connection.
struct Pipe<'a> {
    from: Endpoint,
    to: Endpoint,
    faults: &'a Faults,
    stats: &'a Stats,
    tainted: &'a AtomicBool,
}

async fn handle(ctl: Arc<Control>, down: TcpStream, peer: SocketAddr, local: SocketAddr) {
    let mut epoch_rx = ctl.epoch.subscribe();
    let src = match &ctl.source {
        Source::Fixed(e) => *e,
        Source::Resolve(resolve) => {
            let resolve = resolve.clone();
            match tokio::task::spawn_blocking(move || resolve(peer, local)).await {
                Ok(Some(e)) => {
                    tracing::debug!(proxy = %ctl.name, %peer, source = %e, "forwarded connection resolved");
                    e
                }
                _ => {
                    ctl.stats.unresolved.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(proxy = %ctl.name, %peer, "cannot tell which node opened this connection; it is not faulted");
                    Endpoint::Unknown
                }
            }
        }
    };
    let Some(target) = *ctl.target.borrow() else {
        return;
    };
    let up = tokio::select! {
        r = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(target)) => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(proxy = %ctl.name, %target, error = %e, "target refused");
                return;
            }
            Err(_) => return,
        },
        _ = epoch_rx.changed() => return,
    };
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let conn_no = ctl.conn_counter.fetch_add(1, Ordering::Relaxed);
    let rng_seed = ctl
        .seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(conn_no);
    let (down_r, down_w) = down.into_split();
    let (up_r, up_w) = up.into_split();
    let tainted = AtomicBool::new(false);
    let fwd = Pipe {
        from: src,
        to: ctl.dst,
        faults: &ctl.faults,
        stats: &ctl.stats,
        tainted: &tainted,
    };
    let rev = Pipe {
        from: ctl.dst,
        to: src,
        faults: &ctl.faults,
        stats: &ctl.stats,
        tainted: &tainted,
    };
    let mut faults_rx = ctl.faults.subscribe();
    let fwd_pump = pump(&fwd, down_r, up_w, StdRng::seed_from_u64(rng_seed));
    let rev_pump = pump(&rev, up_r, down_w, StdRng::seed_from_u64(!rng_seed));
    tokio::pin!(fwd_pump, rev_pump);
    let (mut fwd_done, mut rev_done) = (false, false);
    loop {
        tokio::select! {
            end = &mut fwd_pump, if !fwd_done => {
                fwd_done = true;
                if end == PumpEnd::Closed { break; }
            }
            end = &mut rev_pump, if !rev_done => {
                rev_done = true;
                if end == PumpEnd::Closed { break; }
            }
            changed = faults_rx.changed() => {
                if changed.is_err() { break; }
                let map = faults_rx.borrow_and_update().clone();
                if tainted.load(Ordering::Relaxed)
                    && map.get(fwd.from, fwd.to) != Fault::Blackhole
                    && map.get(rev.from, rev.to) != Fault::Blackhole
                {
                    ctl.stats.resets.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            _ = epoch_rx.changed() => {
                ctl.stats.resets.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    // Dropping the pumps drops both sockets.
}

/// Move bytes from `r` to `w` through `pipe`'s faults until one side ends.
async fn pump(
    pipe: &Pipe<'_>,
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    rng: StdRng,
) -> PumpEnd {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
    let reader = async move {
        let mut rng = rng;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let blackholed =
                        pipe.faults.current().get(pipe.from, pipe.to) == Fault::Blackhole;
                    if blackholed || pipe.tainted.load(Ordering::Relaxed) {
                        pipe.tainted.store(true, Ordering::Relaxed);
                        return PumpEnd::Swallowed;
                    }
                    return PumpEnd::Closed;
                }
                Ok(n) => n,
            };
            let fault = pipe.faults.tx.borrow().get(pipe.from, pipe.to);
            if fault == Fault::Blackhole {
                pipe.tainted.store(true, Ordering::Relaxed);
            }
            if pipe.tainted.load(Ordering::Relaxed) {
                pipe.stats.dropped_chunks.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let now = Instant::now();
            let at = match fault {
                Fault::Pass | Fault::Blackhole => now,
                Fault::Delay(d) => {
                    pipe.stats.delayed_chunks.fetch_add(1, Ordering::Relaxed);
                    now + d
                }
                Fault::Loss(p) => {
                    if rng.random::<f64>() < p {
                        pipe.stats.delayed_chunks.fetch_add(1, Ordering::Relaxed);
                        now + LOSS_RETRANSMIT_DELAY
                    } else {
                        now
                    }
                }
            };
            if tx.send((at, buf[..n].to_vec())).await.is_err() {
                return PumpEnd::Closed;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::pin!(reader, writer);
    tokio::select! {
        end = &mut reader => match end {
            PumpEnd::Swallowed => PumpEnd::Swallowed,
            PumpEnd::Closed => {
                // Deliver what is queued, then pass the end on.
                writer.await;
                PumpEnd::Closed
            }
        },
        () = &mut writer => PumpEnd::Closed,
    }
}

/// Which of `pids` owns the TCP socket whose local address is `peer` and
/// whose remote address is `local` (a connection accepted on `local` from
/// `peer`, both on this machine). Reads `/proc/net/tcp` for the socket's
/// inode, then `/proc/PID/fd` of each candidate. Linux only; `None` when
/// it cannot tell.
pub fn socket_owner(peer: SocketAddr, local: SocketAddr, pids: &[u32]) -> Option<u32> {
    let table = if peer.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    let text = std::fs::read_to_string(table).ok()?;
    let inode = text.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (l, r, inode) = (cols.get(1)?, cols.get(2)?, cols.get(9)?);
        (hex_port(l)? == peer.port() && hex_port(r)? == local.port()).then_some(*inode)
    })?;
    let wanted = format!("socket:[{inode}]");
    pids.iter().copied().find(|pid| {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        dir.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == wanted.as_str()))
    })
}

/// The port of a `/proc/net/tcp` address column (`0100007F:1F90`).
fn hex_port(col: &str) -> Option<u16> {
    let (_, port) = col.rsplit_once(':')?;
    u16::from_str_radix(port, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const A: Endpoint = Endpoint::Client(0);
    const B: Endpoint = Endpoint::Node(0);

    /// A TCP echo server on 127.0.0.1:0.
    async fn echo_server() -> Result<(SocketAddr, JoinHandle<()>)> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Ok((addr, task))
    }

    async fn proxy_to_echo(faults: &Faults) -> Result<(Proxy, JoinHandle<()>)> {
        let (echo, task) = echo_server().await?;
        let p = Proxy::start("test", B, Source::Fixed(A), faults, 1).await?;
        p.set_target(Some(echo));
        Ok((p, task))
    }

    /// Send `msg` and read the echo, within `within`.
    async fn round_trip(s: &mut TcpStream, msg: &[u8], within: Duration) -> Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(within, s.read_exact(&mut buf))
            .await
            .context("echo timed out")??;
        Ok(buf)
    }

    #[tokio::test]
    async fn pass_forwards_both_ways() -> Result<()> {
        let faults = Faults::default();
        let (p, _echo) = proxy_to_echo(&faults).await?;
        let mut s = TcpStream::connect(p.addr()).await?;
        for i in 0..10u8 {
            let msg = vec![i; 1000];
            assert_eq!(round_trip(&mut s, &msg, Duration::from_secs(2)).await?, msg);
        }
        Ok(())
    }

    #[tokio::test]
    async fn blackhole_drops_bytes_without_closing_and_heal_restores() -> Result<()> {
        let faults = Faults::default();
        let (p, _echo) = proxy_to_echo(&faults).await?;
        let mut s = TcpStream::connect(p.addr()).await?;
        assert_eq!(
            round_trip(&mut s, b"hello", Duration::from_secs(2)).await?,
            b"hello"
        );

        faults.update(|m| m.set(A, B, Fault::Blackhole));
        s.write_all(b"lost").await?;
        let mut buf = [0u8; 16];
        // Nothing comes back, and the connection is neither closed nor reset.
        let r = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await;
        assert!(r.is_err(), "expected silence, got {r:?}");
        // New connections are still accepted (no refused connect).
        let mut s2 = TcpStream::connect(p.addr()).await?;
        s2.write_all(b"x").await?;
        let r = tokio::time::timeout(Duration::from_millis(300), s2.read(&mut buf)).await;
        assert!(
            r.is_err(),
            "expected silence on a new connection, got {r:?}"
        );
        assert!(p.stats().dropped_chunks.load(Ordering::Relaxed) >= 2);

        // Heal: the tainted connections are closed (the stream lost bytes),
        // new connections work.
        faults.heal();
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .context("tainted connection not closed at heal")?;
        assert!(matches!(n, Ok(0) | Err(_)), "expected EOF, got {n:?}");
        let mut s3 = TcpStream::connect(p.addr()).await?;
        assert_eq!(
            round_trip(&mut s3, b"again", Duration::from_secs(2)).await?,
            b"again"
        );
        Ok(())
    }

    #[tokio::test]
    async fn blackhole_of_the_reverse_pipe_only() -> Result<()> {
        let faults = Faults::default();
        let (p, _echo) = proxy_to_echo(&faults).await?;
        let mut s = TcpStream::connect(p.addr()).await?;
        faults.update(|m| m.set(B, A, Fault::Blackhole));
        s.write_all(b"req").await?;
        let mut buf = [0u8; 8];
        let r = tokio::time::timeout(Duration::from_millis(400), s.read(&mut buf)).await;
        assert!(r.is_err(), "the answer should be dropped, got {r:?}");
        Ok(())
    }

    #[tokio::test]
    async fn delay_adds_latency_and_heal_removes_it() -> Result<()> {
        let faults = Faults::default();
        let (p, _echo) = proxy_to_echo(&faults).await?;
        let mut s = TcpStream::connect(p.addr()).await?;
        let t = Instant::now();
        round_trip(&mut s, b"fast", Duration::from_secs(2)).await?;
        let base = t.elapsed();

        faults.update(|m| {
            m.set(A, B, Fault::Delay(Duration::from_millis(150)));
            m.set(B, A, Fault::Delay(Duration::from_millis(150)));
        });
        let t = Instant::now();
        assert_eq!(
            round_trip(&mut s, b"slow", Duration::from_secs(3)).await?,
            b"slow"
        );
        let slow = t.elapsed();
        assert!(
            slow >= Duration::from_millis(300),
            "round trip took {slow:?}"
        );

        faults.heal();
        let t = Instant::now();
        round_trip(&mut s, b"fast again", Duration::from_secs(2)).await?;
        let fast = t.elapsed();
        assert!(
            fast < Duration::from_millis(150) + base,
            "round trip after heal took {fast:?}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn loss_holds_back_some_chunks() -> Result<()> {
        let faults = Faults::default();
        let (p, _echo) = proxy_to_echo(&faults).await?;
        let mut s = TcpStream::connect(p.addr()).await?;
        faults.update(|m| m.set(A, B, Fault::Loss(1.0)));
        let t = Instant::now();
        round_trip(&mut s, b"lossy", Duration::from_secs(2)).await?;
        assert!(t.elapsed() >= LOSS_RETRANSMIT_DELAY);
        assert!(p.stats().delayed_chunks.load(Ordering::Relaxed) >= 1);
        Ok(())
    }

    #[tokio::test]
    async fn down_refuses_and_up_listens_again() -> Result<()> {
        let faults = Faults::default();
        let (p, _echo) = proxy_to_echo(&faults).await?;
        let mut s = TcpStream::connect(p.addr()).await?;
        round_trip(&mut s, b"hi", Duration::from_secs(2)).await?;
        p.set_up(false);
        // The open connection is closed, new ones are refused.
        let mut buf = [0u8; 4];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await?;
        assert!(matches!(n, Ok(0) | Err(_)), "expected EOF, got {n:?}");
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match TcpStream::connect(p.addr()).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                _ if Instant::now() > deadline => anyhow::bail!("proxy still accepting"),
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        p.set_up(true);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut s = loop {
            match TcpStream::connect(p.addr()).await {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => return Err(e).context("proxy did not listen again"),
            }
        };
        assert_eq!(
            round_trip(&mut s, b"back", Duration::from_secs(2)).await?,
            b"back"
        );
        Ok(())
    }

    #[tokio::test]
    async fn no_target_closes_connections() -> Result<()> {
        let faults = Faults::default();
        let p = Proxy::start("t", B, Source::Fixed(A), &faults, 1).await?;
        let mut s = TcpStream::connect(p.addr()).await?;
        let mut buf = [0u8; 4];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await?;
        assert!(matches!(n, Ok(0) | Err(_)), "expected EOF, got {n:?}");
        Ok(())
    }

    #[tokio::test]
    async fn resolver_picks_the_pipe() -> Result<()> {
        // The resolver says every connection comes from Node(2): cutting
        // Node(2) -> Node(0) silences it, cutting the client pipe does not.
        let faults = Faults::default();
        let (echo, _task) = echo_server().await?;
        let resolver: Resolver = Arc::new(|_, _| Some(Endpoint::Node(2)));
        let p = Proxy::start("fwd", B, Source::Resolve(resolver), &faults, 1).await?;
        p.set_target(Some(echo));
        faults.update(|m| m.set(A, B, Fault::Blackhole));
        let mut s = TcpStream::connect(p.addr()).await?;
        assert_eq!(
            round_trip(&mut s, b"ok", Duration::from_secs(2)).await?,
            b"ok"
        );
        faults.update(|m| m.set(Endpoint::Node(2), B, Fault::Blackhole));
        let mut s = TcpStream::connect(p.addr()).await?;
        s.write_all(b"cut").await?;
        let mut buf = [0u8; 4];
        let r = tokio::time::timeout(Duration::from_millis(400), s.read(&mut buf)).await;
        assert!(r.is_err(), "expected silence, got {r:?}");
        Ok(())
    }

    #[tokio::test]
    async fn socket_owner_finds_this_process() -> Result<()> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let local = l.local_addr()?;
        let _c = TcpStream::connect(local).await?;
        let (_s, peer) = l.accept().await?;
        let me = std::process::id();
        let found =
            tokio::task::spawn_blocking(move || socket_owner(peer, local, &[me + 1_000_000, me]))
                .await?;
        assert_eq!(found, Some(me));
        Ok(())
    }
}
