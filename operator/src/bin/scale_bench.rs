//! `make bench`, scaling and recovery part: the time from editing `replicas` to every voter
//! healthy in the status, for 3 -> 5 and 5 -> 3 on the local platform, without and with a
//! write load; and the time from a quorum loss (members killed, their data wiped) to the
//! first acknowledged write and to every voter healthy again, recovered from the survivor
//! and from a backup, beside `spec.recovery.quorumLossTimeout`. Runs the real
//! `consensus-operator local` (next to this binary) on fresh clusters in temporary
//! directories and prints small tables.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use consensus_crds::{ConsensusClusterStatus, MemberRole};

const SAMPLE: &str = include_str!("../../../manifests/samples/three-members.yaml");
/// Fresh runs per cell; the median is printed, with the spread.
const RUNS: usize = 3;
const DEADLINE: Duration = Duration::from_secs(120);
/// The recovering cluster: backed up on demand of the bench (suspended until it resumes
/// the schedule), recovered automatically after `QUORUM_LOSS_TIMEOUT`.
const RECOVERING: &str = "apiVersion: consensus.dev/v1alpha1
kind: ConsensusCluster
metadata:
  name: demo
spec:
  replicas: 3
  backup:
    schedule: \"* * * * *\"
    suspend: true
    destination:
      volume:
        claimName: keep
  recovery:
    autoRestore: true
    quorumLossTimeout: 5s
";
const QUORUM_LOSS_TIMEOUT: Duration = Duration::from_secs(5);

struct Cluster {
    dir: PathBuf,
    operator: Child,
}

impl Cluster {
    fn start(operator_bin: &Path, dir: PathBuf, declared: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("cluster.yaml"), declared)?;
        let log = std::fs::File::create(dir.join("operator.log"))?;
        let operator = Command::new(operator_bin)
            .arg("local")
            .arg("-f")
            .arg(dir.join("cluster.yaml"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting consensus-operator")?;
        Ok(Self { dir, operator })
    }

    fn status(&self) -> Option<ConsensusClusterStatus> {
        serde_yaml::from_str(&std::fs::read_to_string(self.dir.join("state").join("demo.status.yaml")).ok()?)
            .ok()
    }

    fn set_replicas(&self, replicas: i32) -> anyhow::Result<()> {
        self.edit("replicas:", &format!("replicas: {replicas}"))
    }

    /// Replaces the line that starts with `field` (after its indentation) with `line`.
    fn edit(&self, field: &str, line: &str) -> anyhow::Result<()> {
        let file = self.dir.join("cluster.yaml");
        let text = std::fs::read_to_string(&file)?;
        let edited: Vec<String> = text
            .lines()
            .map(|l| match l.trim_start().strip_prefix(field) {
                Some(_) => format!("{}{line}", &l[..l.len() - l.trim_start().len()]),
                None => l.to_owned(),
            })
            .collect();
        std::fs::write(&file, edited.join("\n") + "\n")?;
        Ok(())
    }

    /// Kills member `name` (SIGKILL) and deletes its data directory, as a lost disk would.
    fn lose(&self, name: &str) -> anyhow::Result<()> {
        let members = self.dir.join("state").join("demo");
        let pid: libc::pid_t =
            std::fs::read_to_string(members.join(format!("{name}.pid")))?.trim().parse()?;
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        std::fs::remove_dir_all(members.join(name))?;
        Ok(())
    }

    /// Waits until `check` holds for the status.
    fn wait_for(&self, what: &str, check: impl Fn(&ConsensusClusterStatus) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + DEADLINE;
        while !self.status().is_some_and(|s| check(&s)) {
            if Instant::now() > deadline {
                bail!("no {what} within {DEADLINE:?}; see {}", self.dir.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits for `voters` healthy voters, no learner, and the change finished.
    fn wait_for_voters(&self, voters: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let done = self.status().is_some_and(|s| {
                s.members.len() == voters
                    && s.members.iter().all(|m| m.healthy && m.role != MemberRole::Learner)
                    && s.conditions.iter().any(|c| c.type_ == "Progressing" && c.reason == "Reconciled")
            });
            if done {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no {voters} healthy voters within {DEADLINE:?}; see {}", self.dir.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn endpoints(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.dir.join("state").join("demo").join("members.yaml"))
            .unwrap_or_default();
        let value: serde_yaml::Value = serde_yaml::from_str(&text).unwrap_or(serde_yaml::Value::Null);
        value
            .get("members")
            .and_then(|m| m.as_sequence())
            .into_iter()
            .flatten()
            .filter_map(|m| m.get("clientPort").and_then(|p| p.as_u64()))
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGTERM: the operator stops its members before it exits.
        if let Ok(pid) = libc::pid_t::try_from(self.operator.id()) {
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let _ = self.operator.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Puts keys as fast as one client in a loop can until stopped; counts acknowledged puts.
fn start_load(
    runtime: &tokio::runtime::Runtime,
    endpoints: Vec<String>,
) -> (Arc<AtomicBool>, Arc<AtomicU64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let (s, a) = (stop.clone(), acked.clone());
    runtime.spawn(async move {
        let options = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(2));
        let mut n = 0u64;
        while !s.load(Ordering::Relaxed) {
            let Ok(mut client) = etcd_client::Client::connect(&endpoints, Some(options.clone())).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            while !s.load(Ordering::Relaxed) {
                n += 1;
                if client.put(format!("bench/{n}"), "x", None).await.is_err() {
                    break;
                }
                a.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    (stop, acked)
}

struct Cell {
    up: Vec<Duration>,
    down: Vec<Duration>,
    writes_per_second: f64,
}

fn run(
    operator_bin: &Path,
    runtime: &tokio::runtime::Runtime,
    load: bool,
    run: usize,
) -> anyhow::Result<Cell> {
    let dir = std::env::temp_dir().join(format!("scale-bench-{}-{load}-{run}", std::process::id()));
    let cluster = Cluster::start(operator_bin, dir, SAMPLE)?;
    cluster.wait_for_voters(3)?;
    let load = load.then(|| start_load(runtime, cluster.endpoints()));
    let began = Instant::now();
    let mut cell = Cell { up: Vec::new(), down: Vec::new(), writes_per_second: 0.0 };
    let timed = |replicas: i32| -> anyhow::Result<Duration> {
        let start = Instant::now();
        cluster.set_replicas(replicas)?;
        cluster.wait_for_voters(usize::try_from(replicas).unwrap_or(0))?;
        Ok(start.elapsed())
    };
    cell.up.push(timed(5)?);
    cell.down.push(timed(3)?);
    if let Some((stop, acked)) = load {
        stop.store(true, Ordering::Relaxed);
        cell.writes_per_second = acked.load(Ordering::Relaxed) as f64 / began.elapsed().as_secs_f64();
    }
    Ok(cell)
}

/// Until one put is acknowledged by any of the members the status file names now.
fn first_write(runtime: &tokio::runtime::Runtime, cluster: &Cluster) -> anyhow::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    let options = etcd_client::ConnectOptions::new().with_timeout(Duration::from_millis(500));
    loop {
        let endpoints = cluster.endpoints();
        let put = runtime.block_on(async {
            let mut client = etcd_client::Client::connect(&endpoints, Some(options.clone())).await?;
            client.put("bench/recovered", "x", None).await
        });
        if put.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no write acknowledged within {DEADLINE:?}; see {}", cluster.dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One recovery on a fresh cluster: from the survivor (two of three lost) or from a backup
/// (all three lost); the time from the loss to the first acknowledged write, and to every
/// voter healthy again.
fn recover(
    operator_bin: &Path,
    runtime: &tokio::runtime::Runtime,
    from_backup: bool,
    run: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let dir = std::env::temp_dir().join(format!("recovery-bench-{}-{from_backup}-{run}", std::process::id()));
    let cluster = Cluster::start(operator_bin, dir, RECOVERING)?;
    cluster.wait_for_voters(3)?;
    let lost: &[&str] = if from_backup {
        cluster.edit("suspend:", "suspend: false")?;
        cluster.wait_for("a backup", |s| s.last_backup.is_some())?;
        cluster.edit("suspend:", "suspend: true")?;
        &["demo-0", "demo-1", "demo-2"]
    } else {
        &["demo-1", "demo-2"]
    };
    let began = Instant::now();
    for name in lost {
        cluster.lose(name)?;
    }
    first_write(runtime, &cluster)?;
    let writable = began.elapsed();
    cluster.wait_for("a finished recovery", |s| s.last_recovery.is_some())?;
    cluster.wait_for_voters(3)?;
    Ok((writable, began.elapsed()))
}

fn median(mut values: Vec<Duration>) -> (Duration, Duration, Duration) {
    values.sort();
    let min = values.first().copied().unwrap_or_default();
    let max = values.last().copied().unwrap_or_default();
    (values.get(values.len() / 2).copied().unwrap_or_default(), min, max)
}

fn main() -> anyhow::Result<()> {
    let operator_bin = match std::env::args().nth(1) {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()?.with_file_name("consensus-operator"),
    };
    if !operator_bin.is_file() {
        bail!("{} not found: build consensus-operator first", operator_bin.display());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    println!();
    println!("Scaling on the local platform (consensus-operator local), edit of replicas -> every voter");
    println!("healthy in the status; median of {RUNS} fresh clusters (min-max):");
    println!();
    println!("| load | 3 -> 5 | 5 -> 3 | writes/s during |");
    println!("|---|---|---|---|");
    for load in [false, true] {
        let mut cells = Vec::new();
        for i in 0..RUNS {
            cells.push(run(&operator_bin, &runtime, load, i)?);
        }
        let fmt = |d: (Duration, Duration, Duration)| {
            format!("{:.2} s ({:.2}-{:.2})", d.0.as_secs_f64(), d.1.as_secs_f64(), d.2.as_secs_f64())
        };
        let up = median(cells.iter().flat_map(|c| c.up.clone()).collect());
        let down = median(cells.iter().flat_map(|c| c.down.clone()).collect());
        let wps = cells.iter().map(|c| c.writes_per_second).sum::<f64>() / cells.len() as f64;
        let label = if load { "one client putting in a loop" } else { "none" };
        let wps = if load { format!("{wps:.0}") } else { "-".to_owned() };
        println!("| {label} | {} | {} | {wps} |", fmt(up), fmt(down));
    }
    println!();
    println!(
        "Recovery from quorum loss on the local platform (autoRestore, quorumLossTimeout {} s): members",
        QUORUM_LOSS_TIMEOUT.as_secs()
    );
    println!("killed and their data wiped -> the first acknowledged put, and -> three healthy voters;");
    println!("median of {RUNS} fresh clusters (min-max):");
    println!();
    println!("| source | lost | to a write | to three voters | of which the timeout |");
    println!("|---|---|---|---|---|");
    for from_backup in [false, true] {
        let mut writable = Vec::new();
        let mut whole = Vec::new();
        for i in 0..RUNS {
            let (w, all) = recover(&operator_bin, &runtime, from_backup, i)?;
            writable.push(w);
            whole.push(all);
        }
        let fmt = |d: (Duration, Duration, Duration)| {
            format!("{:.2} s ({:.2}-{:.2})", d.0.as_secs_f64(), d.1.as_secs_f64(), d.2.as_secs_f64())
        };
        let (source, lost) = if from_backup { ("newest backup", "3 of 3") } else { ("survivor", "2 of 3") };
        println!(
            "| {source} | {lost} | {} | {} | {} s |",
            fmt(median(writable)),
            fmt(median(whole)),
            QUORUM_LOSS_TIMEOUT.as_secs()
        );
    }
    Ok(())
}
