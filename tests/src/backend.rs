//! A backend that misbehaves on command, for the resilience tests: a real
//! HTTP server (HTTP/1.1 and HTTP/2 prior knowledge) on an ephemeral
//! loopback port whose answers a test switches at run time.
//!
//! [`Backend::start`] binds `127.0.0.1:0` and answers every request with
//! `200`, the backend's name as the body and `x-backend: <name>`.
//! [`Backend::set`] changes how it answers ([`Mode`]: fail with a status,
//! stall, delay, or delay only a share of requests — a slow tail);
//! [`Backend::set_health`] flips `GET /health` between 200 and 503 on its
//! own; [`Backend::kill`] makes it die (the listener closes and every open
//! connection is dropped) and [`Backend::revive`] brings it back on the same
//! port. [`Backend::hits`] counts requests other than `/health`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// The path whose answer [`Backend::set_health`] controls.
pub const HEALTH_PATH: &str = "/health";

/// How the backend answers requests (other than [`HEALTH_PATH`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 200 with the name.
    Ok,
    /// This status, with the name as the body.
    Status(u16),
    /// Never answers (until killed or switched back).
    Stall,
    /// Answers 200 after this long.
    Delay(Duration),
    /// Every `every`-th request (1-based count of this backend's requests)
    /// answers after `delay`, the others at once: a slow tail.
    SlowTail { every: u64, delay: Duration },
}

struct Inner {
    name: String,
    mode: Mutex<Mode>,
    healthy: AtomicBool,
    hits: AtomicU64,
    health_hits: AtomicU64,
}

/// A running (or killed) controllable backend.
pub struct Backend {
    /// Where it listens (kept across [`Backend::kill`] / [`Backend::revive`]).
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl Backend {
    /// Starts a healthy backend answering [`Mode::Ok`].
    pub async fn start(name: &str) -> Result<Backend> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let b = Backend {
            addr,
            inner: Arc::new(Inner {
                name: name.to_string(),
                mode: Mutex::new(Mode::Ok),
                healthy: AtomicBool::new(true),
                hits: AtomicU64::new(0),
                health_hits: AtomicU64::new(0),
            }),
            server: Mutex::new(None),
        };
        b.run(listener);
        Ok(b)
    }

    /// The name it answers with.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Changes how the next requests are answered (requests already
    /// waiting keep their mode).
    pub fn set(&self, mode: Mode) {
        *self.inner.mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
    }

    /// `GET /health` answers 200 when `healthy`, else 503.
    pub fn set_health(&self, healthy: bool) {
        self.inner.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Requests received, not counting [`HEALTH_PATH`].
    pub fn hits(&self) -> u64 {
        self.inner.hits.load(Ordering::SeqCst)
    }

    /// Health checks received.
    pub fn health_hits(&self) -> u64 {
        self.inner.health_hits.load(Ordering::SeqCst)
    }

    /// Dies: stops listening and drops every open connection (requests in
    /// progress see a reset). Returns once the port is closed.
    pub async fn kill(&self) {
        let task = self.server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = task {
            t.abort();
            // Aborted: the listener and the connection set are dropped.
            let _ = t.await;
        }
    }

    /// Listens again on the same port after [`Backend::kill`].
    pub async fn revive(&self) -> Result<()> {
        let listener = TcpListener::bind(self.addr)
            .await
            .with_context(|| format!("re-binding backend {} on {}", self.name(), self.addr))?;
        self.run(listener);
        Ok(())
    }

    fn run(&self, listener: TcpListener) {
        let inner = Arc::clone(&self.inner);
        let task = tokio::spawn(async move {
            // Owned by this task: aborting it drops every connection.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    a = listener.accept() => {
                        let Ok((s, _)) = a else { continue };
                        let _ = s.set_nodelay(true);
                        let inner = Arc::clone(&inner);
                        conns.spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                let inner = Arc::clone(&inner);
                                async move { Ok::<_, Infallible>(answer(&inner, req).await) }
                            });
                            let _ = auto::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(s), svc)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        *self.server.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(t) = self.server.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
    }
}

async fn answer<B>(inner: &Inner, req: Request<B>) -> Response<Full<Bytes>> {
    let name = inner.name.clone();
    let reply = |status: StatusCode| {
        let mut r = Response::new(Full::new(Bytes::from(name.clone())));
        *r.status_mut() = status;
        if let Ok(v) = name.parse() {
            r.headers_mut().insert("x-backend", v);
        }
        r
    };
    if req.uri().path() == HEALTH_PATH {
        inner.health_hits.fetch_add(1, Ordering::SeqCst);
        return reply(if inner.healthy.load(Ordering::SeqCst) {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        });
    }
    let n = inner.hits.fetch_add(1, Ordering::SeqCst) + 1;
    let mode = *inner.mode.lock().unwrap_or_else(|e| e.into_inner());
    match mode {
        Mode::Ok => reply(StatusCode::OK),
        Mode::Status(s) => {
            reply(StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        }
        Mode::Stall => std::future::pending().await,
        Mode::Delay(d) => {
            tokio::time::sleep(d).await;
            reply(StatusCode::OK)
        }
        Mode::SlowTail { every, delay } => {
            if every > 0 && n.is_multiple_of(every) {
                tokio::time::sleep(delay).await;
            }
            reply(StatusCode::OK)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::http1;

    #[tokio::test]
    async fn answers_as_told_and_dies_and_revives() {
        let b = Backend::start("a").await.unwrap();
        let (head, body) = http1(b.addr, "a", "/x").await.unwrap();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, "a");
        b.set(Mode::Status(503));
        let (head, _) = http1(b.addr, "a", "/x").await.unwrap();
        assert!(head.starts_with("http/1.1 503"), "{head}");
        b.set_health(false);
        let (head, _) = http1(b.addr, "a", HEALTH_PATH).await.unwrap();
        assert!(head.starts_with("http/1.1 503"), "{head}");
        assert_eq!((b.hits(), b.health_hits()), (2, 1));
        b.kill().await;
        assert!(tokio::net::TcpStream::connect(b.addr).await.is_err());
        b.revive().await.unwrap();
        b.set(Mode::Ok);
        let (head, _) = http1(b.addr, "a", "/x").await.unwrap();
        assert!(head.starts_with("http/1.1 200"), "{head}");
    }
}
