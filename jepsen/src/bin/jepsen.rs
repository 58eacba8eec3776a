//! `jepsen`: run Trellis under faults and check what it did.
//!
//! ```text
//! jepsen run [--time-limit 60s] [--nemesis all|none|partition,kill,pause,delay,loss,blackhole,bridge,membership]
//!            [--seeds N] [--seed S] [--rate 200] [--concurrency 6] [--out-dir DIR]
//!            [--trellisd PATH] [--extra-trellisd-arg ARG ...]
//! jepsen check HISTORY [--deadline 60s]
//! ```
//!
//! Exit codes: 0 the checkers say valid; 1 a checker found a violation (or
//! could not decide on the history of a sound run); 2 a harness error (or
//! a usage error) and no violation found.
//!
//! `run` writes into the output directory (default: a new directory under
//! `target/jepsen/`): `history.jsonl`, `summary.txt` (run facts and the
//! checkers' report, also printed), `latency.svg`, and `nodes/` (each
//! node's log and data). With `--seeds N` it runs seeds S, S+1, ... one
//! after another, each in `<out-dir>/seed-<S>/`, and stops at the first
//! run that is not valid.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use trellis_jepsen::nemesis::Kind;
use trellis_jepsen::run::{parse_duration, run, RunOptions, RunReport};
use trellis_jepsen_checker::history;
use trellis_jepsen_checker::report::{check, CheckOptions, Verdict};

#[derive(Parser, Debug)]
#[command(
    name = "jepsen",
    version,
    about = "Jepsen-style fault injection for Trellis: run a cluster under faults, record a history, check it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a fresh 3-node cluster behind fault proxies, run the workloads
    /// under the nemesis, then check the history.
    Run(RunArgs),
    /// Check a saved history.
    Check(CheckArgs),
}

#[derive(Clone, Debug)]
struct NemesisList(Vec<Kind>);

#[derive(Args, Debug)]
struct RunArgs {
    /// How long the workload runs under faults (e.g. 60s, 2m).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    time_limit: Duration,
    /// Faults to inject: all, none, or a comma-separated list of
    /// partition,kill,pause,delay,loss,blackhole,bridge,membership.
    #[arg(long, default_value = "all", value_parser = parse_nemeses)]
    nemesis: NemesisList,
    /// Run this many seeds one after another (seed, seed+1, ...).
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Seed of the schedule, keys, operations and fault choices (default:
    /// random, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Client operations per second, over all workers.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Register workers.
    #[arg(long, default_value_t = 6)]
    concurrency: usize,
    /// Output directory (default: a new directory under target/jepsen/).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// The trellisd binary (default: trellisd next to this binary).
    #[arg(long)]
    trellisd: Option<PathBuf>,
    /// An extra argument for every trellisd (repeatable), e.g.
    /// --extra-trellisd-arg=--durability --extra-trellisd-arg=kill-safe.
    #[arg(long = "extra-trellisd-arg", allow_hyphen_values = true)]
    extra_trellisd_arg: Vec<String>,
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// The history (JSON lines) to check.
    history: PathBuf,
    /// Time budget of the linearizability search.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    deadline: Duration,
}

fn parse_nemeses(s: &str) -> Result<NemesisList, String> {
    Kind::parse_list(s).map(NemesisList)
}

/// Time budget of the linearizability search after a run.
const RUN_CHECK_DEADLINE: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: log files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Check(args) => check_command(&args),
        Command::Run(args) => run_command(args),
    }
}

fn check_command(args: &CheckArgs) -> ExitCode {
    let path = args.history.display().to_string();
    let records = match history::read(&path) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("jepsen check: {e}");
            return ExitCode::from(2);
        }
    };
    let report = check(
        &records,
        CheckOptions {
            deadline: args.deadline,
        },
    );
    print!("{report}");
    if report.valid() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn run_command(args: RunArgs) -> ExitCode {
    let trellisd = match args.trellisd.clone().map_or_else(default_trellisd, Ok) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("jepsen run: {e}");
            return ExitCode::from(2);
        }
    };
    if args.seeds == 0 {
        eprintln!("jepsen run: --seeds must be at least 1");
        return ExitCode::from(2);
    }
    let base_seed = args
        .seed
        .unwrap_or_else(|| u64::from(rand::random::<u32>()));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("jepsen run: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let stamp = utc_stamp();
    let mut codes = Vec::new();
    for i in 0..args.seeds {
        let seed = base_seed.wrapping_add(i);
        let out_dir = match (&args.out_dir, args.seeds) {
            (Some(d), 1) => d.clone(),
            (Some(d), _) => d.join(format!("seed-{seed}")),
            (None, 1) => unique_dir(&target_dir().join(format!("{stamp}-seed-{seed}"))),
            (None, _) => target_dir()
                .join(format!("{stamp}-seeds-{base_seed}"))
                .join(format!("seed-{seed}")),
        };
        let opts = RunOptions {
            time_limit: args.time_limit,
            nemeses: args.nemesis.0.clone(),
            seed,
            rate: args.rate,
            concurrency: args.concurrency,
            out_dir,
            trellisd: trellisd.clone(),
            extra_args: args.extra_trellisd_arg.clone(),
        };
        println!("seed {seed}");
        println!("repro: {}", opts.repro());
        println!("out dir: {}", opts.out_dir.display());
        let report = runtime.block_on(run(&opts));
        let code = judge(&report);
        println!("exit code for seed {seed}: {code}");
        codes.push((seed, code));
        if code != 0 {
            break;
        }
    }
    if args.seeds > 1 {
        let line: Vec<String> = codes
            .iter()
            .map(|(s, c)| format!("seed {s}: {}", verdict_word(*c)))
            .collect();
        println!(
            "{} of {} runs done: {}",
            codes.len(),
            args.seeds,
            line.join(", ")
        );
    }
    // A violation outranks a harness error.
    let worst = if codes.iter().any(|(_, c)| *c == 1) {
        1
    } else {
        codes.iter().map(|(_, c)| *c).max().unwrap_or(0)
    };
    ExitCode::from(worst)
}

fn verdict_word(code: u8) -> &'static str {
    match code {
        0 => "valid",
        1 => "INVALID",
        _ => "harness error",
    }
}

/// Check a run's history, write `latency.svg` and `summary.txt`, print the
/// summary; returns the exit code of this run.
fn judge(report: &RunReport) -> u8 {
    let mut text = report.to_string();
    let mut code = if report.errors.is_empty() { 0 } else { 2 };
    let path = report.history.display().to_string();
    match history::read(&path) {
        Ok(records) => {
            let verdict = check(
                &records,
                CheckOptions {
                    deadline: RUN_CHECK_DEADLINE,
                },
            );
            let svg_path = report.out_dir.join("latency.svg");
            if let Err(e) = std::fs::write(
                &svg_path,
                trellis_jepsen_checker::plot::latency_svg(&records),
            ) {
                text.push_str(&format!("  cannot write {}: {e}\n", svg_path.display()));
                code = code.max(2);
            }
            text.push_str("\nChecker\n");
            text.push_str(&verdict.to_string());
            // An anomaly is a violation whatever else happened; a checker
            // that could not decide is one only if the run itself was
            // sound (after a harness error the history may be cut short).
            let anomaly = verdict
                .checkers
                .iter()
                .any(|c| matches!(c.verdict, Verdict::Fail(_)));
            if anomaly || (code == 0 && !verdict.valid()) {
                code = 1;
            }
        }
        Err(e) => {
            text.push_str(&format!("\nChecker: cannot read the history: {e}\n"));
            code = code.max(2);
        }
    }
    text.push_str(&format!("\nresult: {} (exit {code})\n", verdict_word(code)));
    let summary = report.out_dir.join("summary.txt");
    if let Err(e) = std::fs::write(&summary, &text) {
        eprintln!("cannot write {}: {e}", summary.display());
        code = code.max(2);
    }
    print!("{text}");
    code
}

/// `trellisd` next to this executable.
fn default_trellisd() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate this executable: {e}"))?;
    let dir = exe
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", exe.display()))?;
    Ok(dir.join("trellisd"))
}

/// `target/jepsen` of the workspace this binary was built in (or of the
/// current directory).
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .find(|a| a.file_name().is_some_and(|n| n == "target"))
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("jepsen")
}

/// `path`, or `path-2`, `path-3`, ... if it exists.
fn unique_dir(path: &Path) -> PathBuf {
    if !path.exists() {
        return path.to_path_buf();
    }
    (2..)
        .map(|i| PathBuf::from(format!("{}-{i}", path.display())))
        .find(|p| !p.exists())
        .unwrap_or_else(|| path.to_path_buf())
}

/// The current UTC time as `20250102T030405Z`.
fn utc_stamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
