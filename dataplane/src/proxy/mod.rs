//! The request path: listeners, routing, balancing and mutual TLS between
//! sidecars. This is the one place that writes down its ORDER.
//!
//! ```text
//! app ──HTTP/1.1 or h2c──► outbound listener (outbound.rs, hyper-util auto)
//!   1. host        authority or Host, port stripped; `svc` or `svc.ns`
//!   2. snapshot    one Arc<MeshConfig> from the watch receiver per request
//!   3. route       Route rules in order: path/method/headers/sourceLabels
//!                  → weighted destination (route.rs); no Route: the
//!                  Service's instances; degrade answers locally
//!   4. endpoints   healthy instances matching the subset's labels
//!                  (DestinationPolicy) (balance.rs)
//!   5. balance     P2C least-request over in-flight counts (balance.rs)
//!   6. rewrite     absolute URI (authority = host), HTTP/2, hop-by-hop
//!                  headers out, rule's request header ops (headers.rs)
//!   7. upstream    pooled HTTP/2 over mTLS to the instance's sidecar; its
//!                  SPIFFE ID must be ns/<ns>/svc/<service> (upstream.rs,
//!                  tls.rs); the route timeout bounds 7 (with 7a and its
//!                  body buffering) until headers arrive
//!   7a. retry      only with the rule's `retries` (retry.rs): before 7 a
//!                  replayable body (empty, or known length <= 64 KiB) is
//!                  buffered, others stream once and are never retried;
//!                  every request counts toward the destination service's
//!                  retry budget; a try failing on `retryOn` goes again
//!                  (within `perTryTimeout` and what is left of the route
//!                  timeout) to a fresh P2C pick avoiding the endpoints
//!                  that failed, while `attempts` and the budget allow;
//!                  otherwise the last failure stands (x-trellis-retries: N)
//!   8. response    rule's response header ops; endpoint busy until the
//!                  body ends
//! peer sidecar ──HTTP/2 over mTLS──► inbound listener (inbound.rs)
//!   9. handshake   client certificate required, chained to the cluster CA
//!  10. forward     HTTP/1.1 to app_addr (pooled), Host = the caller's
//!                  authority, x-trellis-source = the caller's SPIFFE ID
//! ```
//!
//! Any step's failure is a [`ProxyError`]; [`error`] turns it into the
//! response (404 / 503 / 504 / 502 with `x-trellis-error`, `grpc-status`
//! for gRPC callers) — nowhere else makes synthetic responses.
//!
//! | module | holds |
//! |---|---|
//! | [`outbound`] | the outbound listener and steps 1-8 |
//! | [`route`] | step 3: host parsing, rule matching, weighted pick |
//! | [`balance`] | steps 4-5: endpoints of a subset, P2C with in-flight counts |
//! | [`headers`] | hop-by-hop stripping, Route header ops |
//! | [`upstream`] | step 7: the HTTP/2 mTLS connection pool |
//! | [`retry`] | step 7a: retry conditions, replayable bodies, budgets |
//! | [`tls`] | rustls configs from the current identity (rotation-safe) |
//! | [`inbound`] | the inbound listener, steps 9-10 |
//! | [`metrics`] | request counters for the admin `/metrics` |
//! | [`error`] | [`ProxyError`] → response |
//! | [`body`] | [`body::ProxyBody`], the one body type |

pub mod balance;
pub mod body;
pub mod error;
pub mod headers;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod retry;
pub mod route;
pub mod tls;
pub mod upstream;

pub use error::ProxyError;
pub use inbound::Inbound;
pub use metrics::Metrics;
pub use outbound::Outbound;
pub use tls::TlsSource;
