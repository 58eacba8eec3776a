//! Transparent interception: the NAT rules behind `trellis-sidecar
//! iptables`, modelled on Istio's `istio-iptables`. The app keeps dialling
//! `<service address>:<port>`; the kernel hands its TCP connections to the
//! sidecar's outbound listener, which reads where they were going with
//! [`crate::proxy::orig_dst::original_dst`].
//!
//! ```text
//!  nat OUTPUT ──-p tcp──► TRELLIS_OUTPUT
//!      1. -m owner --uid-owner <proxy uid>  RETURN   the sidecar's own traffic, always first
//!      2. -m owner --gid-owner <proxy gid>  RETURN   (with --proxy-gid)
//!      3. --dport <excluded port>           RETURN   (--exclude-outbound-ports)
//!      4. -d <excluded cidr>                RETURN   (--exclude-outbound-cidrs)
//!      5. -d <included cidr>  TRELLIS_REDIRECT       (--include-outbound-cidrs; then nothing else)
//!         or everything else  TRELLIS_REDIRECT       (no include list)
//!  TRELLIS_REDIRECT:    REDIRECT --to-ports <outbound port>   (15001)
//!
//!  nat PREROUTING ──-p tcp──► TRELLIS_INBOUND
//!      --inbound-ports 9080,9443: --dport 9080 / 9443     TRELLIS_IN_REDIRECT
//!      --inbound-ports '*':       --dport <excluded> RETURN, then all TRELLIS_IN_REDIRECT
//!      (none, the default):       nothing
//!  TRELLIS_IN_REDIRECT: REDIRECT --to-ports <inbound port>    (15006)
//! ```
//!
//! Choices, with reasons:
//!
//! * `--proxy-uid` is **required** (no default to the current uid): the
//!   command runs as root, the sidecar usually does not, and a wrong uid
//!   sends the sidecar's own upstream connections back into itself (a
//!   loop that takes the workload down). The operator must say it.
//! * Inbound capture is **off** unless `--inbound-ports` says which ports:
//!   peer sidecars dial the inbound port directly (instances register it),
//!   so inbound interception only serves to force callers of the app's
//!   own port through mutual TLS; and `'*'` on a VM would also capture
//!   sshd (add `--exclude-inbound-ports 22`).
//! * Loopback destinations are captured too (the app may dial a Service
//!   at `127.0.0.1:<port>`); `--exclude-outbound-cidrs 127.0.0.0/8` keeps
//!   them local.
//! * Only TCP is redirected; UDP (DNS) is untouched.
//!
//! [`apply`] is idempotent: it first removes whatever an earlier run
//! installed ([`cleanup`]: the jumps into our chains, then the chains),
//! then creates the chains and their rules, and the jumps from `OUTPUT` /
//! `PREROUTING` last, so no packet sees a half-built chain. If a command
//! fails it removes what it had installed and returns that command's
//! error. Every command runs with `-w` (wait for the xtables lock).
//! [`rules`] returns the commands without running them (for review and
//! tests).

use std::fmt;
use std::net::IpAddr;
use std::process::Command;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The sidecar's outbound listener port (`config::DEFAULT_OUTBOUND_ADDR`).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// The sidecar's inbound listener port (`config::DEFAULT_INBOUND_ADDR`).
pub const DEFAULT_INBOUND_PORT: u16 = 15006;

/// Entry from nat `OUTPUT`: decides what of the local processes' TCP is
/// redirected.
pub const CHAIN_OUTPUT: &str = "TRELLIS_OUTPUT";
/// `REDIRECT` to the outbound port.
pub const CHAIN_REDIRECT: &str = "TRELLIS_REDIRECT";
/// Entry from nat `PREROUTING`: decides which incoming TCP is redirected.
pub const CHAIN_INBOUND: &str = "TRELLIS_INBOUND";
/// `REDIRECT` to the inbound port.
pub const CHAIN_IN_REDIRECT: &str = "TRELLIS_IN_REDIRECT";
/// Every chain this module creates (and [`cleanup`] removes).
pub const CHAINS: [&str; 4] = [
    CHAIN_OUTPUT,
    CHAIN_REDIRECT,
    CHAIN_INBOUND,
    CHAIN_IN_REDIRECT,
];

/// What to intercept. Defaults: outbound port 15001, inbound port 15006,
/// no inbound capture, IPv4 only; `proxy_uid` must be set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IptablesOptions {
    /// The uid the sidecar runs as: its traffic is never redirected.
    pub proxy_uid: Option<u32>,
    /// Also never redirect traffic of processes with this gid.
    pub proxy_gid: Option<u32>,
    /// Where the app's outbound TCP goes.
    pub outbound_port: u16,
    /// Where captured inbound TCP goes.
    pub inbound_port: u16,
    /// Which inbound ports to capture.
    pub inbound_ports: InboundPorts,
    /// With `inbound_ports = '*'`: ports left alone.
    pub exclude_inbound_ports: Vec<u16>,
    /// Destination ports the app reaches directly.
    pub exclude_outbound_ports: Vec<u16>,
    /// Destination networks the app reaches directly.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// If not empty: only these destination networks are redirected.
    pub include_outbound_cidrs: Vec<Cidr>,
    /// Program ip6tables too (IPv6 CIDRs need it).
    pub ipv6: bool,
}

impl Default for IptablesOptions {
    fn default() -> Self {
        Self {
            proxy_uid: None,
            proxy_gid: None,
            outbound_port: DEFAULT_OUTBOUND_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
            inbound_ports: InboundPorts::None,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            include_outbound_cidrs: Vec::new(),
            ipv6: false,
        }
    }
}

/// `--inbound-ports`: none (empty), `*` (all but the excluded), or a list.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum InboundPorts {
    #[default]
    None,
    All,
    List(Vec<u16>),
}

impl FromStr for InboundPorts {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" => Ok(Self::None),
            "*" => Ok(Self::All),
            list => Ok(Self::List(parse_ports(list)?)),
        }
    }
}

impl TryFrom<String> for InboundPorts {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<InboundPorts> for String {
    fn from(p: InboundPorts) -> String {
        p.to_string()
    }
}

impl fmt::Display for InboundPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => Ok(()),
            Self::All => f.write_str("*"),
            Self::List(ports) => f.write_str(&join(ports)),
        }
    }
}

/// A comma-separated port list (`"80,443"`; empty: none). Each port is
/// 1-65535; `*` is only for `--inbound-ports`.
pub fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|p| match p.trim().parse::<u16>() {
            Ok(n) if n != 0 => Ok(n),
            _ => Err(format!("{:?} is not a port (1-65535)", p.trim())),
        })
        .collect()
}

/// A comma-separated CIDR list (`"10.0.0.0/8,fd00::/8"`; empty: none).
pub fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',').map(|c| c.trim().parse()).collect()
}

/// An IPv4 or IPv6 network; a bare address is a /32 or /128. Host bits are
/// cleared (`10.1.2.3/8` is `10.0.0.0/8`), as iptables would.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IP network (a.b.c.d/n or x::y/n)");
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(format!("{s:?}: prefix /{prefix} is longer than /{max}"));
        }
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Ok(Self { addr, prefix })
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why the rules could not be made or installed.
#[derive(Debug, Error)]
pub enum IptablesError {
    /// An option is wrong; `flag` names it.
    #[error("{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
    /// The program could not be started (not installed?).
    #[error("`{command}` could not run: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// The program ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

impl IptablesError {
    /// `trellis-sidecar iptables` exit code: 2 for bad options, 1 when
    /// iptables fails.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Invalid { .. } => 2,
            Self::Spawn { .. } | Self::Failed { .. } => 1,
        }
    }
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> IptablesError {
    IptablesError::Invalid {
        flag,
        reason: reason.into(),
    }
}

impl IptablesOptions {
    /// Checks the options; the error names the flag at fault.
    pub fn validate(&self) -> Result<(), IptablesError> {
        if self.proxy_uid.is_none() {
            return Err(invalid(
                "--proxy-uid",
                "required: the uid the sidecar runs as (its own traffic must never be \
                 redirected, or it loops back into itself)",
            ));
        }
        for (flag, port) in [
            ("--outbound-port", self.outbound_port),
            ("--inbound-port", self.inbound_port),
        ] {
            if port == 0 {
                return Err(invalid(flag, "must be a port (1-65535)"));
            }
        }
        if self.outbound_port == self.inbound_port {
            return Err(invalid(
                "--inbound-port",
                format!(
                    "{} is also the outbound port; the two listeners differ",
                    self.inbound_port
                ),
            ));
        }
        let inbound: &[u16] = match &self.inbound_ports {
            InboundPorts::List(p) if p.is_empty() => {
                return Err(invalid(
                    "--inbound-ports",
                    "empty list; leave it out to capture no inbound port",
                ))
            }
            InboundPorts::List(p) => p,
            InboundPorts::None | InboundPorts::All => &[],
        };
        for (flag, ports) in [
            ("--inbound-ports", inbound),
            ("--exclude-inbound-ports", &self.exclude_inbound_ports),
            ("--exclude-outbound-ports", &self.exclude_outbound_ports),
        ] {
            if ports.contains(&0) {
                return Err(invalid(flag, "0 is not a port (1-65535)"));
            }
        }
        if !self.exclude_inbound_ports.is_empty() && self.inbound_ports != InboundPorts::All {
            return Err(invalid(
                "--exclude-inbound-ports",
                "only applies with --inbound-ports '*'",
            ));
        }
        if !self.ipv6 {
            for (flag, cidrs) in [
                ("--exclude-outbound-cidrs", &self.exclude_outbound_cidrs),
                ("--include-outbound-cidrs", &self.include_outbound_cidrs),
            ] {
                if let Some(c) = cidrs.iter().find(|c| c.is_ipv6()) {
                    return Err(invalid(
                        flag,
                        format!("{c} is IPv6; add --ipv6 to program ip6tables too"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The programs this module drives: iptables always, ip6tables with `--ipv6`.
const IPTABLES: &str = "iptables";
const IP6TABLES: &str = "ip6tables";

fn argv(program: &str, args: &[&str]) -> Vec<String> {
    std::iter::once(program)
        .chain(["-t", "nat"])
        .chain(args.iter().copied())
        .map(str::to_string)
        .collect()
}

fn join(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Every command [`apply`] runs after removing old rules, in order: argv
/// with the program first (`iptables` / `ip6tables`), without `-w`.
/// Expects [`IptablesOptions::validate`]d options (without a proxy uid it
/// would leave out the uid exclusion; [`apply`] refuses that).
pub fn rules(opts: &IptablesOptions) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let programs: &[&str] = if opts.ipv6 {
        &[IPTABLES, IP6TABLES]
    } else {
        &[IPTABLES]
    };
    let (outbound, inbound) = (opts.outbound_port, opts.inbound_port);
    let (out_chain, redirect, in_chain, in_redirect) = (
        CHAIN_OUTPUT,
        CHAIN_REDIRECT,
        CHAIN_INBOUND,
        CHAIN_IN_REDIRECT,
    );
    for &program in programs {
        let v6 = program == IP6TABLES;
        // Every word is a chain name, number or network: none has spaces.
        let mut add = |rule: String| {
            let words: Vec<&str> = rule.split_whitespace().collect();
            out.push(argv(program, &words));
        };
        for chain in CHAINS {
            add(format!("-N {chain}"));
        }
        add(format!(
            "-A {redirect} -p tcp -j REDIRECT --to-ports {outbound}"
        ));
        add(format!(
            "-A {in_redirect} -p tcp -j REDIRECT --to-ports {inbound}"
        ));

        // Outbound: the sidecar's own traffic first, then exclusions, then
        // the redirect.
        if let Some(uid) = opts.proxy_uid {
            add(format!(
                "-A {out_chain} -m owner --uid-owner {uid} -j RETURN"
            ));
        }
        if let Some(gid) = opts.proxy_gid {
            add(format!(
                "-A {out_chain} -m owner --gid-owner {gid} -j RETURN"
            ));
        }
        for port in &opts.exclude_outbound_ports {
            add(format!("-A {out_chain} -p tcp --dport {port} -j RETURN"));
        }
        for cidr in opts
            .exclude_outbound_cidrs
            .iter()
            .filter(|c| c.is_ipv6() == v6)
        {
            add(format!("-A {out_chain} -d {cidr} -j RETURN"));
        }
        if opts.include_outbound_cidrs.is_empty() {
            add(format!("-A {out_chain} -j {redirect}"));
        } else {
            // Only the listed networks; a family with none of them is not
            // redirected at all (the chain ends, i.e. RETURN).
            for cidr in opts
                .include_outbound_cidrs
                .iter()
                .filter(|c| c.is_ipv6() == v6)
            {
                add(format!("-A {out_chain} -d {cidr} -j {redirect}"));
            }
        }

        // Inbound.
        match &opts.inbound_ports {
            InboundPorts::None => {}
            InboundPorts::List(ports) => {
                for port in ports {
                    add(format!(
                        "-A {in_chain} -p tcp --dport {port} -j {in_redirect}"
                    ));
                }
            }
            InboundPorts::All => {
                for port in &opts.exclude_inbound_ports {
                    add(format!("-A {in_chain} -p tcp --dport {port} -j RETURN"));
                }
                add(format!("-A {in_chain} -p tcp -j {in_redirect}"));
            }
        }

        // The jumps last: traffic only enters complete chains.
        add(format!("-A PREROUTING -p tcp -j {in_chain}"));
        add(format!("-A OUTPUT -p tcp -j {out_chain}"));
    }
    out
}

/// One argv as a shell line (arguments with unusual characters quoted).
pub fn shell_line(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:,=@+".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs one argv (program first) with `-w` inserted after the program;
/// returns its stdout.
fn run(argv: &[String]) -> Result<String, IptablesError> {
    let Some((program, args)) = argv.split_first() else {
        return Ok(String::new());
    };
    let mut full = vec![program.clone(), "-w".to_string()];
    full.extend(args.iter().cloned());
    let command = shell_line(&full);
    tracing::debug!(%command, "iptables");
    let out = Command::new(program)
        .args(&full[1..])
        .output()
        .map_err(|source| IptablesError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(IptablesError::Failed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs the rules for `opts` (validated first), replacing any that an
/// earlier run installed. On failure, removes what it installed.
pub fn apply(opts: &IptablesOptions) -> Result<(), IptablesError> {
    opts.validate()?;
    apply_with(opts, &mut run)
}

fn apply_with(
    opts: &IptablesOptions,
    run: &mut impl FnMut(&[String]) -> Result<String, IptablesError>,
) -> Result<(), IptablesError> {
    cleanup_with(run)?;
    let rules = rules(opts);
    for argv in &rules {
        if let Err(e) = run(argv) {
            tracing::error!(error = %e, "installing the interception rules failed; removing them");
            if let Err(undo) = cleanup_with(run) {
                tracing::error!(error = %undo, "removing the partly installed rules failed");
            }
            return Err(e);
        }
    }
    tracing::info!(
        rules = rules.len(),
        proxy_uid = ?opts.proxy_uid,
        outbound_port = opts.outbound_port,
        inbound_port = opts.inbound_port,
        inbound_ports = %opts.inbound_ports,
        ipv6 = opts.ipv6,
        "interception rules installed"
    );
    Ok(())
}

/// Removes everything [`apply`] installs, in IPv4 and (if ip6tables and
/// its nat table exist) IPv6: every rule jumping into one of [`CHAINS`],
/// then those chains. Nothing installed: nothing to do, not an error.
pub fn cleanup() -> Result<(), IptablesError> {
    cleanup_with(&mut run)
}

fn cleanup_with(
    run: &mut impl FnMut(&[String]) -> Result<String, IptablesError>,
) -> Result<(), IptablesError> {
    let mut removed = 0;
    for program in [IPTABLES, IP6TABLES] {
        let listing = match run(&argv(program, &["-S"])) {
            Ok(l) => l,
            // Without ip6tables or its nat table, we cannot have installed
            // anything there.
            Err(e) if program == IP6TABLES => {
                tracing::debug!(error = %e, "no IPv6 nat table to clean");
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut ours = Vec::new();
        for line in listing.lines() {
            let words = split_words(line);
            match words.as_slice() {
                [n, chain] if n == "-N" && CHAINS.contains(&chain.as_str()) => {
                    ours.push(chain.clone())
                }
                [a, chain, rest @ ..]
                    if a == "-A"
                        && !CHAINS.contains(&chain.as_str())
                        && rest
                            .windows(2)
                            .any(|w| w[0] == "-j" && CHAINS.contains(&w[1].as_str())) =>
                {
                    let mut args = vec!["-D"];
                    args.push(chain);
                    args.extend(rest.iter().map(String::as_str));
                    run(&argv(program, &args))?;
                    removed += 1;
                }
                _ => {}
            }
        }
        // Flush all before deleting any: our chains jump to each other.
        for chain in &ours {
            run(&argv(program, &["-F", chain]))?;
        }
        for chain in &ours {
            run(&argv(program, &["-X", chain]))?;
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(removed, "old interception rules removed");
    }
    Ok(())
}

/// Splits an `iptables -S` line into words; double-quoted words (comments)
/// stay whole, with `\"` inside.
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    word.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> IptablesOptions {
        IptablesOptions {
            proxy_uid: Some(1337),
            ..IptablesOptions::default()
        }
    }

    fn lines(o: &IptablesOptions) -> Vec<String> {
        rules(o).iter().map(|a| shell_line(a)).collect()
    }

    fn pos(lines: &[String], want: &str) -> usize {
        lines
            .iter()
            .position(|l| l == want)
            .unwrap_or_else(|| panic!("no {want:?} in\n{}", lines.join("\n")))
    }

    #[test]
    fn defaults_redirect_outbound_except_the_proxy() {
        let o = opts();
        o.validate().expect("valid");
        assert_eq!(
            lines(&o),
            [
                "iptables -t nat -N TRELLIS_OUTPUT",
                "iptables -t nat -N TRELLIS_REDIRECT",
                "iptables -t nat -N TRELLIS_INBOUND",
                "iptables -t nat -N TRELLIS_IN_REDIRECT",
                "iptables -t nat -A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
                "iptables -t nat -A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
                "iptables -t nat -A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "iptables -t nat -A TRELLIS_OUTPUT -j TRELLIS_REDIRECT",
                "iptables -t nat -A PREROUTING -p tcp -j TRELLIS_INBOUND",
                "iptables -t nat -A OUTPUT -p tcp -j TRELLIS_OUTPUT",
            ]
        );
    }

    #[test]
    fn proxy_exclusions_come_before_any_redirect_and_jumps_come_last() {
        let o = IptablesOptions {
            proxy_gid: Some(1338),
            exclude_outbound_ports: vec![22, 5432],
            exclude_outbound_cidrs: parse_cidrs("169.254.169.254, 10.1.2.3/8").expect("cidrs"),
            ..opts()
        };
        o.validate().expect("valid");
        let l = lines(&o);
        let uid = pos(
            &l,
            "iptables -t nat -A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        );
        let gid = pos(
            &l,
            "iptables -t nat -A TRELLIS_OUTPUT -m owner --gid-owner 1338 -j RETURN",
        );
        let p22 = pos(
            &l,
            "iptables -t nat -A TRELLIS_OUTPUT -p tcp --dport 22 -j RETURN",
        );
        let p5432 = pos(
            &l,
            "iptables -t nat -A TRELLIS_OUTPUT -p tcp --dport 5432 -j RETURN",
        );
        let meta = pos(
            &l,
            "iptables -t nat -A TRELLIS_OUTPUT -d 169.254.169.254/32 -j RETURN",
        );
        let net = pos(
            &l,
            "iptables -t nat -A TRELLIS_OUTPUT -d 10.0.0.0/8 -j RETURN",
        );
        let redirect = pos(&l, "iptables -t nat -A TRELLIS_OUTPUT -j TRELLIS_REDIRECT");
        assert!(uid < gid && gid < p22 && p22 < p5432 && p5432 < meta && meta < net);
        assert!(net < redirect);
        let jump = pos(&l, "iptables -t nat -A OUTPUT -p tcp -j TRELLIS_OUTPUT");
        assert_eq!(jump, l.len() - 1, "the OUTPUT jump is installed last");
        // Every rule of TRELLIS_OUTPUT before the uid exclusion is a chain
        // creation, nothing that could redirect.
        assert!(l[..uid].iter().all(|x| !x.contains("-A TRELLIS_OUTPUT")));
    }

    #[test]
    fn include_cidrs_redirect_only_those_networks() {
        let o = IptablesOptions {
            include_outbound_cidrs: parse_cidrs("10.96.0.0/12,fd00::/8").expect("cidrs"),
            exclude_outbound_cidrs: parse_cidrs("10.96.0.10").expect("cidrs"),
            ipv6: true,
            ..opts()
        };
        o.validate().expect("valid");
        let l = lines(&o);
        let ex = pos(
            &l,
            "iptables -t nat -A TRELLIS_OUTPUT -d 10.96.0.10/32 -j RETURN",
        );
        let inc = pos(
            &l,
            "iptables -t nat -A TRELLIS_OUTPUT -d 10.96.0.0/12 -j TRELLIS_REDIRECT",
        );
        assert!(ex < inc);
        pos(
            &l,
            "ip6tables -t nat -A TRELLIS_OUTPUT -d fd00::/8 -j TRELLIS_REDIRECT",
        );
        pos(
            &l,
            "ip6tables -t nat -A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        );
        assert!(
            !l.iter()
                .any(|x| x.ends_with("TRELLIS_OUTPUT -j TRELLIS_REDIRECT")),
            "no catch-all redirect with an include list:\n{}",
            l.join("\n")
        );
        assert!(!l
            .iter()
            .any(|x| x.starts_with("iptables") && x.contains("fd00")));
        assert!(!l
            .iter()
            .any(|x| x.starts_with("ip6tables") && x.contains("10.96")));
    }

    #[test]
    fn inbound_port_list_versus_all() {
        let listed = IptablesOptions {
            inbound_ports: "9080, 9443".parse().expect("ports"),
            ..opts()
        };
        listed.validate().expect("valid");
        let l = lines(&listed);
        let inbound: Vec<_> = l
            .iter()
            .filter(|x| x.contains("-A TRELLIS_INBOUND"))
            .collect();
        assert_eq!(
            inbound,
            [
                "iptables -t nat -A TRELLIS_INBOUND -p tcp --dport 9080 -j TRELLIS_IN_REDIRECT",
                "iptables -t nat -A TRELLIS_INBOUND -p tcp --dport 9443 -j TRELLIS_IN_REDIRECT",
            ]
        );

        let all = IptablesOptions {
            inbound_ports: "*".parse().expect("ports"),
            exclude_inbound_ports: parse_ports("22,15000").expect("ports"),
            inbound_port: 16006,
            ..opts()
        };
        all.validate().expect("valid");
        let l = lines(&all);
        let inbound: Vec<_> = l
            .iter()
            .filter(|x| x.contains("-A TRELLIS_INBOUND"))
            .collect();
        assert_eq!(
            inbound,
            [
                "iptables -t nat -A TRELLIS_INBOUND -p tcp --dport 22 -j RETURN",
                "iptables -t nat -A TRELLIS_INBOUND -p tcp --dport 15000 -j RETURN",
                "iptables -t nat -A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT",
            ]
        );
        pos(
            &l,
            "iptables -t nat -A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006",
        );

        let none = lines(&opts());
        assert!(!none.iter().any(|x| x.contains("-A TRELLIS_INBOUND")));
    }

    #[test]
    fn validate_names_the_flag() {
        let err = |o: IptablesOptions| o.validate().expect_err("invalid").to_string();
        assert!(err(IptablesOptions::default()).starts_with("--proxy-uid: required"));
        assert!(err(IptablesOptions {
            inbound_port: 15001,
            ..opts()
        })
        .starts_with("--inbound-port: 15001 is also the outbound port"));
        assert!(err(IptablesOptions {
            outbound_port: 0,
            ..opts()
        })
        .starts_with("--outbound-port:"));
        assert!(err(IptablesOptions {
            exclude_outbound_cidrs: parse_cidrs("fd00::/8").expect("cidr"),
            ..opts()
        })
        .starts_with("--exclude-outbound-cidrs: fd00::/8 is IPv6; add --ipv6"));
        assert!(err(IptablesOptions {
            exclude_inbound_ports: vec![22],
            ..opts()
        })
        .starts_with("--exclude-inbound-ports: only applies with --inbound-ports '*'"));
        assert!(err(IptablesOptions {
            exclude_outbound_ports: vec![0],
            ..opts()
        })
        .starts_with("--exclude-outbound-ports: 0 is not a port"));
        assert_eq!(
            IptablesError::Invalid {
                flag: "--x",
                reason: String::new()
            }
            .exit_code(),
            2
        );
    }

    #[test]
    fn list_parsing() {
        assert_eq!(parse_ports("").expect("empty"), Vec::<u16>::new());
        assert_eq!(parse_ports("80, 443").expect("list"), [80, 443]);
        assert!(parse_ports("80,x")
            .expect_err("x")
            .contains("\"x\" is not a port"));
        assert!(parse_ports("0").is_err() && parse_ports("65536").is_err());
        assert_eq!("".parse::<InboundPorts>(), Ok(InboundPorts::None));
        assert_eq!(" * ".parse::<InboundPorts>(), Ok(InboundPorts::All));
        assert!("*,80".parse::<InboundPorts>().is_err());
        assert_eq!(
            parse_cidrs("10.1.2.3/8,::1").expect("cidrs"),
            [
                "10.0.0.0/8".parse::<Cidr>().expect("cidr"),
                "::1/128".parse::<Cidr>().expect("cidr")
            ]
        );
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().expect("any").to_string(),
            "0.0.0.0/0"
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0/8".parse::<Cidr>().is_err());
        let o: IptablesOptions = serde_json::from_str(
            r#"{"proxy_uid": 1337, "inbound_ports": "*", "exclude_outbound_cidrs": ["10.0.0.0/8"]}"#,
        )
        .expect("json");
        assert_eq!(o.inbound_ports, InboundPorts::All);
        assert_eq!(o.outbound_port, DEFAULT_OUTBOUND_PORT);
    }

    /// A fake iptables: answers `-S` with `listing` (IPv4) and records every
    /// other command.
    fn fake<'a>(
        listing: &'static str,
        log: &'a mut Vec<String>,
    ) -> impl FnMut(&[String]) -> Result<String, IptablesError> + 'a {
        move |argv: &[String]| {
            let line = shell_line(argv);
            if argv.last().is_some_and(|a| a == "-S") {
                return if argv[0] == IPTABLES {
                    Ok(listing.to_string())
                } else {
                    Err(IptablesError::Failed {
                        command: line,
                        status: "exit status: 3".into(),
                        stderr: "table `nat' does not exist".into(),
                    })
                };
            }
            log.push(line);
            Ok(String::new())
        }
    }

    #[test]
    fn cleanup_removes_jumps_then_flushes_then_deletes_our_chains() {
        let listing = "-P PREROUTING ACCEPT\n-P OUTPUT ACCEPT\n-N OTHER\n-N TRELLIS_OUTPUT\n\
             -N TRELLIS_REDIRECT\n-A PREROUTING -p tcp -j TRELLIS_INBOUND\n\
             -A OUTPUT -p tcp -j TRELLIS_OUTPUT\n-A OUTPUT -j OTHER\n\
             -A OUTPUT -m comment --comment \"old \\\"one\\\"\" -j TRELLIS_OUTPUT\n\
             -A TRELLIS_OUTPUT -j TRELLIS_REDIRECT\n";
        let mut log = Vec::new();
        cleanup_with(&mut fake(listing, &mut log)).expect("cleanup");
        assert_eq!(
            log,
            [
                "iptables -t nat -D PREROUTING -p tcp -j TRELLIS_INBOUND",
                "iptables -t nat -D OUTPUT -p tcp -j TRELLIS_OUTPUT",
                "iptables -t nat -D OUTPUT -m comment --comment 'old \"one\"' -j TRELLIS_OUTPUT",
                "iptables -t nat -F TRELLIS_OUTPUT",
                "iptables -t nat -F TRELLIS_REDIRECT",
                "iptables -t nat -X TRELLIS_OUTPUT",
                "iptables -t nat -X TRELLIS_REDIRECT",
            ]
        );
    }

    #[test]
    fn apply_cleans_first_and_undoes_a_failure() {
        let mut log = Vec::new();
        apply_with(&opts(), &mut fake("", &mut log)).expect("apply");
        assert_eq!(log, lines(&opts()), "nothing old: just the rules");

        let mut calls = 0;
        let mut failing = |argv: &[String]| {
            calls += 1;
            if argv.iter().any(|a| a == "REDIRECT") {
                return Err(IptablesError::Failed {
                    command: shell_line(argv),
                    status: "exit status: 1".into(),
                    stderr: "no REDIRECT target".into(),
                });
            }
            Ok(String::new())
        };
        let e = apply_with(&opts(), &mut failing).expect_err("fails");
        assert!(e.to_string().contains("REDIRECT --to-ports 15001"), "{e}");
        assert!(e.to_string().contains("no REDIRECT target"), "{e}");
        assert_eq!(e.exit_code(), 1);
        // cleanup (2 listings) + 4 chains + the failing one + cleanup again.
        assert_eq!(calls, 2 + 4 + 1 + 2);
    }
}
