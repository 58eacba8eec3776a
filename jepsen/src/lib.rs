//! `trellis-jepsen`: the fault-injection harness (not built yet).
//!
//! Planned (its own issue): a `jepsen` binary that starts a 3-node
//! `trellisd` cluster on loopback behind userspace fault proxies (trellisd's
//! `--peer-dial ID=ADDR` already lets each link be routed through one),
//! runs register and watch workloads under partitions, kills, pauses and
//! membership changes, records a JSON-lines history, and checks it for
//! linearizability and the watch contract.
