//! The `trellisctl` runner shared by the CLI end-to-end tests (`cli.rs`,
//! `cli_mesh.rs`): run the real binary against a cluster's endpoints and
//! check exit code, stdout and stderr; stream a long-running command
//! (watch, keepalive) line by line; small JSON accessors.

// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::time::Instant;
use trellis_tests::{bin_path, Cluster};

/// Upper bound for one `trellisctl` run (it is killed after that).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Running trellisctl
// ---------------------------------------------------------------------------

/// The outcome of one `trellisctl` run.
pub struct Run {
    pub args: Vec<String>,
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Fails (with the whole run in the message) unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> Result<&Self> {
        ensure!(self.code == Some(code), "expected exit {code}, got: {self}");
        Ok(self)
    }

    pub fn expect_ok(&self) -> Result<&Self> {
        self.expect_code(0)
    }

    /// Fails unless stderr contains `needle` (case-insensitive).
    pub fn expect_stderr(&self, needle: &str) -> Result<&Self> {
        ensure!(
            self.stderr.to_lowercase().contains(&needle.to_lowercase()),
            "expected stderr to contain {needle:?}; {self}"
        );
        Ok(self)
    }

    /// stdout parsed as one JSON document.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.stdout)
            .with_context(|| format!("stdout is not one JSON document; {self}"))
    }

    /// The data rows of a table on stdout (header checked, then split on
    /// whitespace).
    pub fn table_rows(&self, first_header: &str) -> Result<Vec<Vec<String>>> {
        let text = self.stdout();
        let mut lines = text.lines();
        let header = lines
            .next()
            .with_context(|| format!("no table on stdout; {self}"))?;
        ensure!(
            header.split_whitespace().next() == Some(first_header),
            "table header {header:?} does not start with {first_header:?}; {self}"
        );
        Ok(lines
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect())
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let args: Vec<String> = self.args.iter().map(|a| shorten(a)).collect();
        let code = self
            .code
            .map_or_else(|| "a signal".to_string(), |c| c.to_string());
        write!(
            f,
            "`trellisctl {}` exited with {code}\n--- stdout ---\n{}--- stderr ---\n{}",
            args.join(" "),
            shorten(&self.stdout()),
            shorten(&self.stderr)
        )
    }
}

/// Long arguments/outputs (1 KiB keys) cut for error messages.
pub fn shorten(s: &str) -> String {
    const MAX: usize = 300;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head}...({} chars)", s.chars().count())
    }
}

/// `trellisctl` with fixed `--endpoints`.
pub struct Ctl {
    pub bin: PathBuf,
    pub endpoints: String,
}

impl Ctl {
    pub fn new(endpoints: impl Into<String>) -> Result<Self> {
        Ok(Self {
            bin: bin_path("trellisctl")?,
            endpoints: endpoints.into(),
        })
    }

    /// For every endpoint of `cluster`.
    pub fn for_cluster(cluster: &Cluster) -> Result<Self> {
        Self::new(cluster.endpoints())
    }

    pub fn command(&self, args: &[&str]) -> (Command, Vec<String>) {
        let mut all: Vec<String> = vec!["--endpoints".into(), self.endpoints.clone()];
        all.extend(args.iter().map(|a| (*a).to_string()));
        let mut cmd = Command::new(&self.bin);
        cmd.args(&all)
            .env_remove("TRELLIS_ENDPOINTS")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        (cmd, all)
    }

    /// Runs `trellisctl --endpoints <e> <args...>` with stdin closed.
    pub async fn run(&self, args: &[&str]) -> Result<Run> {
        let (mut cmd, all) = self.command(args);
        cmd.stdin(Stdio::null());
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        finish(child, all).await
    }

    /// Like [`Ctl::run`], with `input` on stdin (then EOF).
    pub async fn run_with_stdin(&self, args: &[&str], input: &[u8]) -> Result<Run> {
        let (mut cmd, all) = self.command(args);
        cmd.stdin(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        let mut stdin = child.stdin.take().context("stdin was not captured")?;
        stdin
            .write_all(input)
            .await
            .context("writing trellisctl's stdin")?;
        drop(stdin);
        finish(child, all).await
    }

    /// Starts a long-running `trellisctl` (a watcher) with piped stdout.
    pub fn spawn(&self, args: &[&str]) -> Result<Watcher> {
        let (mut cmd, all) = self.command(args);
        cmd.stdin(Stdio::null());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        let stdout = child.stdout.take().context("stdout was not captured")?;
        let mut stderr = child.stderr.take().context("stderr was not captured")?;
        // Drain stderr so the child never blocks on it; kept for errors.
        let stderr_task = tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf).await;
            String::from_utf8_lossy(&buf).into_owned()
        });
        Ok(Watcher {
            args: all,
            child,
            lines: BufReader::new(stdout),
            stderr_task: Some(stderr_task),
            seen: Vec::new(),
        })
    }
}

pub async fn finish(child: Child, args: Vec<String>) -> Result<Run> {
    let shown = args
        .iter()
        .map(|a| shorten(a))
        .collect::<Vec<_>>()
        .join(" ");
    let out = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("`trellisctl {shown}` did not exit within {RUN_TIMEOUT:?}"))?
        .with_context(|| format!("waiting for `trellisctl {shown}`"))?;
    Ok(Run {
        args,
        code: out.status.code(),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// A running `trellisctl watch`.
pub struct Watcher {
    pub args: Vec<String>,
    pub child: Child,
    pub lines: BufReader<ChildStdout>,
    pub stderr_task: Option<tokio::task::JoinHandle<String>>,
    pub seen: Vec<String>,
}

impl Watcher {
    /// The next stdout line, waiting until `deadline`.
    pub async fn next_line(&mut self, deadline: Instant) -> Result<String> {
        let mut line = String::new();
        let read = tokio::time::timeout_at(deadline, self.lines.read_line(&mut line)).await;
        match read {
            Ok(Ok(0)) => {
                let why = self.stop().await;
                bail!(
                    "`trellisctl {}` closed stdout after {} lines {:?}; {why}",
                    self.args.join(" "),
                    self.seen.len(),
                    self.seen
                )
            }
            Ok(Ok(_)) => {
                let line = line.trim_end_matches('\n').to_string();
                self.seen.push(line.clone());
                Ok(line)
            }
            Ok(Err(e)) => Err(e).context("reading the watcher's stdout"),
            Err(_) => {
                let why = self.stop().await;
                bail!(
                    "`trellisctl {}` printed only {} lines {:?} before the deadline; {why}",
                    self.args.join(" "),
                    self.seen.len(),
                    self.seen
                )
            }
        }
    }

    /// Kills the watcher; describes how it ended and what it said on stderr.
    pub async fn stop(&mut self) -> String {
        let _ = self.child.start_kill();
        let status = match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(Ok(s)) => s.to_string(),
            Ok(Err(e)) => format!("wait failed: {e}"),
            Err(_) => "did not exit within 10s of SIGKILL".to_string(),
        };
        let stderr = match self.stderr_task.take() {
            Some(t) => match tokio::time::timeout(Duration::from_secs(5), t).await {
                Ok(Ok(s)) => s,
                _ => "(stderr unavailable)".to_string(),
            },
            None => "(stderr already collected)".to_string(),
        };
        format!("watcher ended: {status}; stderr:\n{stderr}")
    }

    /// Whether the watcher is still running (it must not exit by itself).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

// ---------------------------------------------------------------------------
// JSON helpers
// ---------------------------------------------------------------------------

pub fn field<'a>(v: &'a Value, name: &str) -> Result<&'a Value> {
    v.get(name)
        .with_context(|| format!("no field {name:?} in {v}"))
}

pub fn u64_field(v: &Value, name: &str) -> Result<u64> {
    field(v, name)?
        .as_u64()
        .with_context(|| format!("field {name:?} is not an unsigned integer in {v}"))
}

pub fn str_field<'a>(v: &'a Value, name: &str) -> Result<&'a str> {
    field(v, name)?
        .as_str()
        .with_context(|| format!("field {name:?} is not a string in {v}"))
}

pub fn bool_field(v: &Value, name: &str) -> Result<bool> {
    field(v, name)?
        .as_bool()
        .with_context(|| format!("field {name:?} is not a boolean in {v}"))
}

pub fn array_field<'a>(v: &'a Value, name: &str) -> Result<&'a Vec<Value>> {
    field(v, name)?
        .as_array()
        .with_context(|| format!("field {name:?} is not an array in {v}"))
}
