//! `trellis-sidecar`, the data-plane proxy: its control-plane side
//! (identity, config) and the request path ([`proxy`]: outbound and
//! inbound listeners, routing, balancing, mutual TLS between sidecars),
//! which reads [`MeshConfig`] from the watch channel this crate publishes.
//! Resilience (retries, outlier ejection) and policy come in their own
//! issues.
//!
//! # Where data enters and leaves
//!
//! ```text
//!   sidecar.toml / flags ─► config ─► sidecar::Sidecar::start
//!                                        │
//!   <data_dir>/config.json ─► disk::load ─┤                 ┌─► disk::spawn_writer ─► config.json
//!                                        ▼                 │
//!   control node (QUIC) ─► watch::WatchSession ─► cache::ConfigCache ─► watch<Arc<MeshConfig>> ─► request path (proxy),
//!        ▲  │                 (snapshot/delta/progress)   │                                 admin /config_dump
//!        │  └─ session::SessionStream ◄─ acked revision ──┘
//!        │        (registration, keepalive, acks, goodbye)
//!        └─ identity (join / renew) ─► <data_dir>/identity/{cert,key,ca}.pem
//! ```
//!
//! # Map
//!
//! | module | holds |
//! |---|---|
//! | [`config`] | [`SidecarConfig`]: TOML + flags, defaults with reasons, `validate()` naming the field |
//! | [`sidecar`] | [`Sidecar`] handle, [`run`], [`SidecarError`] (exit codes): start-up order and shutdown |
//! | [`identity`] | certificate lifecycle: reuse from disk, join with a token, renew, persist |
//! | [`control`] | the connection manager: seeds, backoff, watch + session per connection, [`ControlStatus`] |
//! | [`watch`] | [`WatchSession`]: one watch stream, snapshot chunks joined (also the benchmark API) |
//! | [`session`] | one session stream: registration, keepalives, acks, goodbye |
//! | [`transport`] | QUIC/TLS plumbing: [`client_endpoint`], connect, open a stream, server `Error`s |
//! | [`cache`] | [`ConfigCache`]: raw state + revision; refuses stale deltas; publishes [`MeshConfig`] |
//! | [`mesh`] | [`MeshConfig`]: typed resources indexed for lookups; bad values skipped and counted |
//! | [`updates`] | ring buffer of applied updates (`/debug/updates`) |
//! | [`disk`] | `<data_dir>/config.json`: atomic, coalesced writes; load at start |
//! | [`proxy`] | the request path; its `mod.rs` writes the order of the steps |
//! | [`admin`] | HTTP: `/live`, `/ready`, `/config_dump`, `/debug/updates` |
//! | [`backoff`] | full-jitter exponential backoff |
//! | [`shutdown`] | the shutdown signal every task watches |
//!
//! Nothing here panics on input from the network, files or flags; errors
//! are typed where they are handled and say whether a retry is safe.

pub mod admin;
pub mod backoff;
pub mod cache;
pub mod config;
pub mod control;
pub mod disk;
pub mod identity;
pub mod iptables;
pub mod mesh;
pub mod proxy;
pub mod session;
pub mod shutdown;
pub mod sidecar;
pub mod transport;
pub mod updates;
pub mod watch;

pub use cache::{ApplyError, ConfigCache};
pub use config::{ConfigError, InstanceConfig, SidecarConfig};
pub use control::ControlStatus;
pub use identity::CurrentIdentity;
pub use mesh::{ConfigSource, MeshConfig};
pub use sidecar::{run, Sidecar, SidecarError};
pub use transport::{client_endpoint, client_endpoint_for, client_endpoint_on, quic_client_config};
pub use watch::{WatchError, WatchEvent, WatchSession, WatchUpdate};
