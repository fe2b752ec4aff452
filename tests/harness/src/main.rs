//! `flotilla-harness`: runs failover scenarios against a local or docker-compose cluster and checks what it
//! saw.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use flotilla_harness::nemesis::FaultKind;
use flotilla_harness::run::{RunConfig, TargetKind, run};
use flotilla_harness::{report, scenario, selftest};

#[derive(Parser)]
#[command(name = "flotilla-harness", version, about = "Failover test harness for Flotilla")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Feeds the checker synthetic histories with each anomaly and proves each is flagged.
    Selftest,
    /// Lists the scenarios.
    Scenarios,
    /// Runs a scenario: workload + faults, then final reads, the checker and the gates.
    Run(Box<RunArgs>),
    /// Prints a Markdown table of runs from their JSON reports (`run --report`), e.g. a sweep's.
    Table {
        /// report.json files.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// S1-S9, S14, S16-S20 (`flotilla-harness scenarios` lists them).
    #[arg(long)]
    scenario: String,
    /// Where the cluster runs: `local` (broker processes on 127.0.0.x) or `compose` (the `flotilla` image
    /// under docker-compose on a private network; build it first with
    /// `FLOTILLA_IMAGE_PROFILE=dev deploy/build-image.sh`).
    #[arg(long, default_value = "local")]
    target: String,
    /// Length of the main phase, e.g. 300s, 5m or 300.
    #[arg(long, default_value = "300s")]
    duration: String,
    /// Seed of the fault schedule and the workload's choices (random if not given; always printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Replace the scenario's faults: e.g. kill,pause,partition.
    #[arg(long, value_delimiter = ',')]
    faults: Option<Vec<String>>,
    #[arg(long, default_value_t = 5)]
    nodes: u64,
    #[arg(long, default_value_t = 3)]
    topics: u32,
    /// Partitions per topic (the scenario's default if not given).
    #[arg(long)]
    partitions: Option<u32>,
    #[arg(long, default_value_t = 3)]
    replication_factor: u32,
    /// Sends per second, all writers together.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    #[arg(long, default_value_t = 5)]
    writers: u64,
    #[arg(long, default_value_t = 2)]
    consumers: u64,
    /// Mean quiet gap between faults, seconds.
    #[arg(long, default_value_t = 15.0)]
    interval: f64,
    /// New topics after this many sends per key.
    #[arg(long, default_value_t = 1024)]
    rotate_after: u64,
    /// Where nodes keep data and logs, and the report goes (a fresh directory under the system's temp
    /// directory if not given). Kept after a failed run; removed after a passed one unless --keep.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    #[arg(long)]
    keep: bool,
    /// Also write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// The flotilla-broker binary (default: beside this one, then PATH).
    #[arg(long)]
    broker: Option<PathBuf>,
}

fn parse_duration(s: &str) -> anyhow::Result<f64> {
    let (number, unit) = match s.strip_suffix('s') {
        Some(n) => (n, 1.0),
        None => match s.strip_suffix('m') {
            Some(n) => (n, 60.0),
            None => (s, 1.0),
        },
    };
    let v: f64 = number.parse().with_context(|| format!("--duration {s:?}: expected e.g. 300s, 5m or 300"))?;
    if !(v > 0.0 && v.is_finite()) {
        bail!("--duration must be positive");
    }
    Ok(v * unit)
}

fn find_broker(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(p) => Ok(p),
        None => flotilla_cli::broker_binary().context("give --broker"),
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("flotilla-harness: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<bool> {
    match Cli::parse().command {
        Command::Selftest => {
            let cases = selftest::run();
            for c in &cases {
                println!("{} {}", if c.passed { "ok  " } else { "FAIL" }, c.name);
            }
            let failed = cases.iter().filter(|c| !c.passed).count();
            println!("checker self-test: {} cases, {failed} failed", cases.len());
            Ok(failed == 0)
        }
        Command::Scenarios => {
            for s in scenario::all() {
                let faults: Vec<&str> = s.faults.iter().map(|k| k.name()).collect();
                println!("{:<4} {} [{}]", s.name, s.title, faults.join(", "));
            }
            for (name, why) in scenario::not_yet() {
                println!("{name:<4} not yet: {why}");
            }
            Ok(true)
        }
        Command::Table { reports } => {
            let mut rows = Vec::with_capacity(reports.len());
            for path in &reports {
                let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
                rows.push(
                    serde_json::from_str(&text).with_context(|| format!("{} is not a JSON report", path.display()))?,
                );
            }
            print!("{}", report::table(&rows));
            Ok(rows.iter().all(|r| r["passed"].as_bool() == Some(true)))
        }
        Command::Run(args) => {
            let args = *args;
            let target = match args.target.as_str() {
                "local" => TargetKind::Local,
                "compose" => TargetKind::Compose,
                other => bail!("unknown target {other:?}; use local or compose"),
            };
            let scenario = scenario::find(&args.scenario)?;
            let faults: Vec<FaultKind> = match &args.faults {
                Some(names) => names.iter().map(|n| n.parse()).collect::<anyhow::Result<_>>()?,
                None => scenario.faults.to_vec(),
            };
            if !(args.rate > 0.0 && args.rate.is_finite())
                || args.writers == 0
                || args.topics == 0
                || args.rotate_after == 0
            {
                bail!("--rate, --writers, --topics and --rotate-after must be positive");
            }
            if !(args.interval >= 1.0 && args.interval.is_finite()) {
                bail!("--interval must be at least 1 second");
            }
            if args.replication_factor == 0 || u64::from(args.replication_factor) > args.nodes {
                bail!("--replication-factor must be between 1 and --nodes ({})", args.nodes);
            }
            let partitions = args.partitions.unwrap_or(scenario.partitions);
            if partitions == 0 {
                bail!("--partitions must be positive");
            }
            let seed = args
                .seed
                .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64));
            let work_dir = args.work_dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("flotilla-harness-{seed}-{}", std::process::id()))
            });
            println!("scenario {} ({}), seed {seed}, work dir {}", scenario.name, scenario.title, work_dir.display());
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let config = RunConfig {
                scenario,
                target,
                faults,
                seed,
                duration: parse_duration(&args.duration)?,
                nodes: args.nodes,
                topics: args.topics,
                partitions,
                replication_factor: args.replication_factor,
                rate: args.rate,
                writers: args.writers,
                consumers: args.consumers,
                interval: args.interval,
                rotate_after: args.rotate_after,
                work_dir: work_dir.clone(),
                broker: find_broker(args.broker)?,
            };
            let result = runtime.block_on(run(config))?;
            print!("{}", report::summary(&result));
            let json = serde_json::to_string_pretty(&result)?;
            std::fs::write(work_dir.join("report.json"), &json)?;
            std::fs::write(work_dir.join("history.json"), serde_json::to_string(&result.history)?)?;
            if let Some(path) = args.report {
                std::fs::write(&path, &json).with_context(|| format!("cannot write {}", path.display()))?;
                println!("report: {}", path.display());
            }
            if result.passed && !args.keep {
                std::fs::remove_dir_all(&work_dir)?;
            } else {
                println!("data, node logs, report.json and history.json: {}", work_dir.display());
            }
            Ok(result.passed)
        }
    }
}
