//! `make chaos`: runs of a consensus-node cluster under a recorded load and seeded faults,
//! every history checked. Ends with one line:
//! `chaos: N runs, F faults, V violations (linearizability a, lost writes b, watch c, locks d)`.
//! A failing run prints its seed and the command that replays it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use consensus_e2e::chaos::plan::{ALL_CLASSES, FaultClass};
use consensus_e2e::chaos::{self, RunConfig, RunReport};

#[derive(Parser)]
struct Args {
    /// How many runs, seeds SEED, SEED+1, ...
    #[arg(long, default_value_t = 1)]
    runs: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fault classes, comma-separated (kill, pause, partition, delay, fsync, membership); all
    /// by default.
    #[arg(long, value_delimiter = ',')]
    classes: Vec<String>,
    /// Members per cluster (3 or 5).
    #[arg(long, default_value_t = 3)]
    size: usize,
    /// Seconds of load and faults per run.
    #[arg(long, default_value_t = 20)]
    length: u64,
    /// The consensus-node binary.
    #[arg(long)]
    node: PathBuf,
    /// The linearizability checker (e2e/chaos-checker, built by make chaos).
    #[arg(long)]
    checker: PathBuf,
    /// Where runs keep their data, logs and histories (a failing run's is kept).
    #[arg(long, default_value = "target/chaos")]
    dir: PathBuf,
    /// The checker's own test: every member serves linearizable reads from local state (a
    /// planted bug); passes only when every run is reported not linearizable.
    #[arg(long)]
    plant_stale_reads: bool,
}

fn replay(args: &Args, seed: u64) -> String {
    let classes =
        if args.classes.is_empty() { String::new() } else { format!(" CLASSES={}", args.classes.join(",")) };
    format!("make chaos RUNS=1 SEED={seed} SIZE={} LENGTH={}{classes}", args.size, args.length)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let classes = if args.classes.is_empty() {
        ALL_CLASSES.to_vec()
    } else {
        args.classes
            .iter()
            .map(|c| FaultClass::parse(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?
    };
    if args.size % 2 == 0 || args.size < 3 {
        bail!("--size must be odd and at least 3, not {}", args.size);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let started = Instant::now();
    let mut reports: Vec<RunReport> = Vec::new();
    let mut failed_runs = 0;
    let mut unfinished = 0;
    for seed in args.seed..args.seed + args.runs {
        let dir = args.dir.join(format!("seed-{seed}"));
        let _ = std::fs::remove_dir_all(&dir);
        let config = RunConfig {
            node: args.node.clone(),
            checker: args.checker.clone(),
            seed,
            classes: classes.clone(),
            size: args.size,
            length: Duration::from_secs(args.length),
            dir: dir.clone(),
            failpoints: if args.plant_stale_reads { vec!["read-index=error".to_owned()] } else { Vec::new() },
        };
        let run_started = Instant::now();
        let report = match runtime.block_on(until_stopped(chaos::run(&config))) {
            Ok(report) => report,
            // Not a history to check, but not a pass either: a cluster that never served
            // again is a finding too.
            Err(e) => {
                println!("seed {seed}: the run could not finish: {e:#}");
                println!("  kept in {}; replay: {}", dir.display(), replay(&args, seed));
                unfinished += 1;
                continue;
            }
        };
        let faults: Vec<String> =
            report.faults.iter().map(|(c, t)| format!("{}({t:?})", c.name()).to_lowercase()).collect();
        println!(
            "seed {seed}: {} operations, faults [{}], {} violations, {:.1} s",
            report.operations,
            faults.join(" "),
            report.violations(),
            run_started.elapsed().as_secs_f64()
        );
        if report.violations() > 0 {
            failed_runs += 1;
            for v in report
                .linearizability
                .iter()
                .chain(&report.lost_writes)
                .chain(&report.watch)
                .chain(&report.locks)
                .chain(&report.divergence)
                .chain(&report.crashes)
            {
                println!("  {v}");
            }
            println!("  kept in {}; replay: {}", dir.display(), replay(&args, seed));
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
        reports.push(report);
    }
    let sum = |f: fn(&RunReport) -> usize| reports.iter().map(f).sum::<usize>();
    let by_class: Vec<String> =
        chaos::faults_by_class(&reports).into_iter().map(|(c, n)| format!("{c} {n}")).collect();
    println!("chaos: faults by class: {}; {:.0} s", by_class.join(", "), started.elapsed().as_secs_f64());
    println!(
        "chaos: {} runs, {} faults, {} violations (linearizability {}, lost writes {}, watch {}, locks {}, \
         members {}, crashes {})",
        reports.len() + unfinished,
        sum(|r| r.faults.len()),
        sum(RunReport::violations),
        sum(|r| r.linearizability.len()),
        sum(|r| r.lost_writes.len()),
        sum(|r| r.watch.len()),
        sum(|r| r.locks.len()),
        sum(|r| r.divergence.len()),
        sum(|r| r.crashes.len()),
    );
    if args.plant_stale_reads {
        let caught = reports.iter().filter(|r| !r.linearizability.is_empty()).count();
        println!("chaos: the planted stale reads were caught in {caught} of {} runs", reports.len());
        // Every run asked for must have finished and been caught: a run that could not be
        // checked proves nothing about the checker.
        if caught < args.runs as usize {
            bail!("the checker missed the planted bug");
        }
        return Ok(());
    }
    if unfinished > 0 {
        println!("chaos: {unfinished} runs could not finish");
    }
    if failed_runs + unfinished > 0 {
        bail!("{failed_runs} runs had violations, {unfinished} could not finish");
    }
    Ok(())
}

/// Runs `run` unless SIGINT or SIGTERM comes first; then drops it, which kills the members
/// it started (a run killed otherwise would leave them running), and exits.
async fn until_stopped(
    run: impl std::future::Future<Output = anyhow::Result<RunReport>>,
) -> anyhow::Result<RunReport> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // The run is dropped when `select!` ends, before the exit.
    let code = tokio::select! {
        report = run => return report,
        _ = tokio::signal::ctrl_c() => 130,
        _ = terminate.recv() => 143,
    };
    println!("chaos: stopped by a signal; the members of the run are killed");
    std::process::exit(code)
}
