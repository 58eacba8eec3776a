//! The request path: listeners, routing, balancing and mutual TLS between
//! sidecars. This is the one place that writes down its ORDER.
//!
//! ```text
//! app ──TCP──► outbound listener (outbound.rs)
//!   0. connection  intercepted? (SO_ORIGINAL_DST, orig_dst.rs) a port the
//!                  namespace's Service declares `tcp` → TCP (tcp.rs);
//!                  else detect HTTP/1.1, HTTP/2 or opaque (detect.rs);
//!                  opaque → TCP to the original destination's service,
//!                  or passed through; HTTP → hyper (auto h1/h2c), then
//!                  per request:
//!   1. host        authority or Host, port stripped; `svc` or `svc.ns`;
//!                  an unknown host on an intercepted connection falls
//!                  back to the original destination's service
//!   2. snapshot    one Arc<MeshConfig> from the watch receiver per request
//!   3. route       Route rules in order: path/method/headers/sourceLabels
//!                  → weighted destination (route.rs); no Route: the
//!                  Service's instances; degrade answers locally
//!   3b. fault      the rule's fault injection: delay a share, abort a
//!                  share with an HTTP or gRPC status (fault.rs)
//!   3c. circuit    the policy's maxConcurrentRequests, held until the
//!                  response body ends; full → 503 circuit open (circuit.rs)
//!   4. endpoints   instances matching the subset's labels, registered
//!                  healthy, passing active health checks
//!                  (health_check.rs), not ejected (outlier.rs), narrowed
//!                  to one zone by locality (locality.rs) (balance.rs)
//!   5. balance     the policy's balancer: least request (P2C, default),
//!                  round robin, random, weighted, consistent hash on a
//!                  header (balance.rs)
//!   6. rewrite     absolute URI (authority = host), HTTP/2,
//!                  x-trellis-orig-proto for HTTP/1.x, hop-by-hop headers
//!                  out, traceparent = this hop's span (trace.rs), the
//!                  rule's request header ops (headers.rs)
//!   7. upstream    pooled HTTP/2 over mTLS to the instance's sidecar; its
//!                  SPIFFE ID must be ns/<ns>/svc/<service> (upstream.rs,
//!                  tls.rs); a request waiting for that connection to be
//!                  made counts toward maxPendingRequests (circuit.rs); the
//!                  route timeout bounds 7 (with 7a and its body
//!                  buffering) until headers arrive; with the policy's
//!                  backupRequest, a bodyless GET/HEAD/OPTIONS still
//!                  unanswered at the destination's latency percentile
//!                  sends one copy to another endpoint within the budget
//!                  and takes the first good answer (backup.rs); each
//!                  try's result feeds outlier detection (outlier.rs)
//!   7a. retry      only with the rule's `retries` (retry.rs): before 7 a
//!                  replayable body (empty, or known length <= 64 KiB) is
//!                  buffered, others stream once and are never retried;
//!                  every request counts toward the destination service's
//!                  retry budget; a try failing on `retryOn` goes again
//!                  (within `perTryTimeout` and what is left of the route
//!                  timeout) to a fresh pick avoiding the endpoints that
//!                  failed, while `attempts` and the budget allow;
//!                  otherwise the last failure stands (x-trellis-retries: N)
//!   8. response    rule's response header ops; endpoint busy until the
//!                  body ends
//!   9. telemetry   metrics (metrics.rs) and an access-log line queued for
//!                  the background writer (access_log.rs)
//! peer sidecar ──HTTP/2 over mTLS──► inbound listener (inbound.rs)
//!  10. handshake   client certificate required, chained to the cluster CA
//!  11. forward     to app_addr (pooled, app_pool.rs): HTTP/1.1 if the
//!                  caller marked it x-trellis-orig-proto, else HTTP/2
//!                  (gRPC); authority
//!                  kept, x-trellis-source = the caller's SPIFFE ID,
//!                  traceparent = this hop's span; CONNECT = a TCP tunnel
//!                  to the app (tcp.rs); then telemetry as in 9
//! ```
//!
//! Any step's failure is a [`ProxyError`]; [`error`] turns it into the
//! response (404 / 503 / 504 / 502 with `x-trellis-error`, `grpc-status`
//! for gRPC callers) — nowhere else makes synthetic responses. At shutdown
//! the listeners stop accepting and open connections finish under the
//! drain deadline ([`drain`]).
//!
//! | module | holds |
//! |---|---|
//! | [`outbound`] | the outbound listener, step 0 and steps 1-9 |
//! | [`detect`] | protocol detection from the first bytes |
//! | [`orig_dst`] | the original destination of a redirected connection |
//! | [`route`] | step 3: host parsing, rule matching, weighted pick; TCP rules |
//! | [`fault`] | step 3b: fault injection draws |
//! | [`circuit`] | step 3c (and 7, TCP): circuit-breaker limits |
//! | [`balance`] | steps 4-5: endpoints of a subset, the balancers |
//! | [`locality`] | step 4: zone preference, failover order, zone shifts |
//! | [`outlier`] | step 4 and after 7: passive outlier detection |
//! | [`health_check`] | step 4: active health checks; the local app's health |
//! | [`backup`] | step 7: backup (hedged) requests |
//! | [`headers`] | hop-by-hop stripping, Route header ops |
//! | [`trace`] | W3C traceparent: a span per hop |
//! | [`upstream`] | step 7: the HTTP/2 mTLS connection pool, CONNECT tunnels |
//! | [`retry`] | step 7a: retry conditions, replayable bodies, budgets |
//! | [`tcp`] | opaque TCP both ways, passthrough |
//! | [`tls`] | rustls configs from the current identity (rotation-safe) |
//! | [`inbound`] | the inbound listener, steps 10-11 |
//! | [`app_pool`] | step 11: pooled HTTP/1.1 and HTTP/2 connections to the app |
//! | [`conn`] | connection limits: deadlines, idle timeouts, HTTP/2 pings, header sizes |
//! | [`metrics`] | Prometheus counters and histograms for `/metrics` |
//! | [`access_log`] | the JSON access log, written in batches off the request path |
//! | [`drain`] | graceful drain at shutdown |
//! | [`error`] | [`ProxyError`] → response |
//! | [`keyed`] | per-key shared state created on first use |
//! | [`body`] | [`body::ProxyBody`], the one body type |

pub mod access_log;
pub mod app_pool;
pub mod backup;
pub mod balance;
pub mod body;
pub mod circuit;
pub mod conn;
pub mod detect;
pub mod drain;
pub mod error;
pub mod fault;
pub mod headers;
pub mod health_check;
pub mod inbound;
pub mod keyed;
pub mod locality;
pub mod metrics;
pub mod orig_dst;
pub mod outbound;
pub mod outlier;
pub mod retry;
pub mod route;
pub mod tcp;
pub mod tls;
pub mod trace;
pub mod upstream;

pub use error::ProxyError;
pub use inbound::Inbound;
pub use metrics::Metrics;
pub use outbound::Outbound;
pub use tls::TlsSource;
