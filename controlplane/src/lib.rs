//! `trellis-controlplane`: a Trellis control node (`trellisd`) and the
//! operator CLI (`trellisctl`).
//!
//! A control node ([`node::RunningNode`]) is one member of a Raft cluster
//! (openraft) whose state machine is the revisioned store of
//! `trellis-raft-store`. Requests enter through two gRPC listeners:
//!
//! - the admin API ([`api`]: `KV` and `Cluster`), on `admin_addr`, from
//!   operators, `trellisctl`, tests — writes and linearizable reads are
//!   routed to the leader by [`node::Node::route`]; on the leader, writes
//!   are batched into Raft entries by [`proposer`];
//! - Raft peer RPC ([`peer`] serves, [`network`] dials), on `raft_addr`,
//!   from the other control nodes; followers also watch the leader's
//!   process there ([`crash_detector`]) to fail over without waiting out
//!   the election timeout. Every gRPC channel a node dials gathers a
//!   call's frames into one socket write ([`coalesce`]).
//!
//! - the sidecars' QUIC endpoint ([`quic`]), on `quic_addr`: join with a
//!   token and a CSR ([`ca`]), watch config by revision, register the
//!   instance under a lease and report the applied revision.
//!
//! Every listener requires mutual TLS with the cluster CA (unless started
//! with `--insecure-dev`); [`auth`] decides which identities may call
//! what. The control plane's own records (CA, tokens, certificates) live
//! under a reserved key prefix ([`system`]).
//!
//! Data leaves through API responses and watch streams, which read the
//! store's change feed ([`api::watch`]). Configuration is [`config`];
//! errors become gRPC statuses in one place, [`error`].

pub mod api;
pub mod auth;
pub mod bugs;
pub mod ca;
pub mod coalesce;
pub mod config;
pub mod crash_detector;
pub mod error;
pub mod leases;
pub mod network;
pub mod node;
pub mod peer;
pub mod proposer;
pub mod quic;
pub mod system;
