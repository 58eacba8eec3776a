//! `trellisctl`: the operator CLI of Trellis.
//!
//! Talks to the `trellisd` admin gRPC API (`trellis.admin.v1`): mesh
//! resources (`apply`, `diff`, `get KIND`, `delete KIND`, `watch KIND`),
//! leases (`lease`), the revisioned key-value store (`put`, `get`, `list`,
//! `delete`, `compact`, `watch`, and the same under `kv`), cluster
//! operations (`cluster`, `member`, `leader`, `proxy-status`) and identity
//! (`ca`, `cert`, `token`; `ca create` and `cert create` work offline on
//! files). With `--ca-file` it speaks TLS (mutual with `--cert-file` and
//! `--key-file`). Exit codes follow the table in `docs/CONTRACTS.md`.
//!
//! This file only parses the command line, runs the command on a
//! single-threaded Tokio runtime and turns the outcome into an exit code; the
//! work happens in the modules under `src/bin/trellisctl/`.

#[path = "trellisctl/args.rs"]
mod args;
#[path = "trellisctl/client.rs"]
mod client;
#[path = "trellisctl/cluster.rs"]
mod cluster;
#[path = "trellisctl/commands.rs"]
mod commands;
#[path = "trellisctl/diff.rs"]
mod diff;
#[path = "trellisctl/error.rs"]
mod error;
#[path = "trellisctl/files.rs"]
mod files;
#[path = "trellisctl/identity.rs"]
mod identity;
#[path = "trellisctl/kv.rs"]
mod kv;
#[path = "trellisctl/lease.rs"]
mod lease;
#[path = "trellisctl/output.rs"]
mod output;
#[path = "trellisctl/proxy_status.rs"]
mod proxy_status;
#[path = "trellisctl/resources.rs"]
mod resources;
#[path = "trellisctl/tls.rs"]
mod tls;
#[path = "trellisctl/watch.rs"]
mod watch;

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    // Usage errors exit 2 here (clap), `--help`/`--version` exit 0.
    let cli = args::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "trellisctl: cannot start the runtime: {e}"
            );
            return ExitCode::from(error::exit::OTHER);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(message) = &e.message {
                let _ = writeln!(std::io::stderr(), "trellisctl: {message}");
            }
            ExitCode::from(e.code)
        }
    }
}
