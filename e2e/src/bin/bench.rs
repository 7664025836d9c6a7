//! `make bench`: a 3-member cluster of ours and one of each etcd given (`--etcd PATH`, one per
//! version) on this machine, driven by the same etcd v3 client, each workload run on every
//! system in turn. Prints ops/s, latency percentiles and CPU time per operation (summed over
//! the members) for each, the ratios ours/etcd, leader failover time, the peak RSS of a member
//! of each, watch fan-out (events delivered and their delay), lease keep-alive throughput,
//! instructions per put (`bench/instructions.rs`) and backups (`bench/backup.rs`).
//!
//! A benchmark, not a test: nothing here asserts a time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use consensus_e2e::free_port;
use consensus_node::kv::prefix_end;
use consensus_node::proto::etcdserverpb::kv_client::KvClient;
use consensus_node::proto::etcdserverpb::lease_client::LeaseClient;
use consensus_node::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use consensus_node::proto::etcdserverpb::watch_client::WatchClient;
use consensus_node::proto::etcdserverpb::watch_request::RequestUnion;
use consensus_node::proto::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseLeasesRequest, PutRequest, RangeRequest, StatusRequest,
    WatchCreateRequest, WatchRequest, WatchResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

const VALUE_BYTES: usize = 256;
const RUN_FOR: Duration = Duration::from_secs(4);
const CHANNELS: usize = 16;
/// Watch and keep-alive streams share a few connections, two per member, as real clients'
/// streams do.
const STREAM_CHANNELS: usize = 6;
const WATCHERS: usize = 100;
const WATCH_PREFIX: &[u8] = b"bench/watch/";
/// How long watchers may still take, once the writer stops, to receive what it wrote.
const WATCH_DRAIN: Duration = Duration::from_secs(10);
const LEASES: usize = 1000;
const LEASE_TTL_SECS: i64 = 3;
/// Two TTLs: a lease the keep-alives left alone for a whole TTL expires within the run.
const KEEP_ALIVE_RUN_FOR: Duration = Duration::from_secs(6);

#[derive(Clone, PartialEq)]
enum System {
    Ours,
    /// An etcd server binary and the version it reports.
    Etcd {
        program: PathBuf,
        version: String,
    },
}

impl System {
    fn name(&self) -> String {
        match self {
            System::Ours => "consensus-node".to_owned(),
            System::Etcd { version, .. } => format!("etcd {version}"),
        }
    }

    /// The etcd at `program`, asked for its version.
    fn etcd(program: PathBuf) -> anyhow::Result<Self> {
        let output = Command::new(&program)
            .arg("--version")
            .output()
            .with_context(|| format!("running {} --version", program.display()))?;
        let text = String::from_utf8_lossy(&output.stdout);
        let version = text
            .lines()
            .find_map(|l| l.strip_prefix("etcd Version:"))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("{} --version said {text:?}", program.display()))?;
        Ok(System::Etcd { program, version })
    }
}

#[derive(Parser)]
struct Args {
    /// An etcd server to compare with, one per version (`etcd` from PATH is Debian's 3.4);
    /// the first also serves the backup comparison.
    #[arg(long = "etcd", required = true)]
    etcds: Vec<PathBuf>,
    /// Run only these parts of the benchmark (all of them when none is given), for example
    /// `--only failover` while working on elections.
    #[arg(long = "only", value_enum)]
    only: Vec<Part>,
}

/// The parts of `make bench`, in the order they run.
#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Part {
    /// Puts and gets from 1, 16 and 256 clients, and the peak RSS they left.
    Workloads,
    Failover,
    Watch,
    Lease,
    Instructions,
    Backup,
}

impl Part {
    /// Whether `--only` (`only`, empty for every part) asks for this part.
    fn chosen(self, only: &[Part]) -> bool {
        only.is_empty() || only.contains(&self)
    }
}

struct Member {
    client_url: String,
    peer_url: String,
    name: String,
    data_dir: PathBuf,
    /// Its standard error, kept for when it fails to serve.
    log: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    program: PathBuf,
}

impl Member {
    fn start(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)
                    .with_context(|| format!("opening {}", self.log.display()))?,
            )
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn pid(&self) -> Option<u32> {
        Some(self.child.as_ref()?.id())
    }

    /// Peak resident set size in KiB (VmHWM), while the process runs.
    fn peak_rss_kib(&self) -> Option<u64> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status.lines().find_map(|l| l.strip_prefix("VmHWM:")?.trim().strip_suffix("kB")?.trim().parse().ok())
    }

    /// User and system CPU time the process has used so far, in clock ticks.
    fn cpu_ticks(&self) -> Option<u64> {
        let pid = self.pid()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The fields after the command name, which is in parentheses and may hold spaces:
        // utime and stime are the 14th and 15th of the line, the 12th and 13th after it.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Cluster {
    system: System,
    members: Vec<Member>,
}

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Each member's part of this machine's CPUs, as `consensus-operator local` gives its
/// members: our `--worker-threads`, etcd's `GOMAXPROCS`. With a thread per CPU in each of
/// three members on two CPUs, ours made about a tenth fewer puts at 16 and 256 clients, and
/// etcd 3.4 the same puts and about a sixth fewer serializable gets (README, "Performance").
fn threads_per_member() -> usize {
    (std::thread::available_parallelism().map_or(1, |n| n.get()) / 3).max(1)
}

fn our_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("binary directory")?.join("consensus-node");
    if !path.exists() {
        bail!("{} not found: build it first (make bench does)", path.display());
    }
    Ok(path)
}

impl Cluster {
    fn start(system: System, dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(system, dir, &[])
    }

    /// `start`, each member also given `extra` flags (both systems take etcd's).
    fn start_with(system: System, dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_under(system, dir, extra, &[])
    }

    /// `start_with`, each member run by `wrapper` (a program and its arguments, before the
    /// member's program and arguments) when that is not empty.
    fn start_under(system: System, dir: &Path, extra: &[&str], wrapper: &[String]) -> anyhow::Result<Self> {
        let mut members = Vec::new();
        let mut peers = Vec::new();
        std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
        for i in 0..3 {
            let (client, peer) = (free_port()?, free_port()?);
            let name = format!("{}{i}", if system == System::Ours { "c" } else { "e" });
            peers.push(format!("{name}=http://127.0.0.1:{peer}"));
            members.push(Member {
                client_url: format!("http://127.0.0.1:{client}"),
                peer_url: format!("http://127.0.0.1:{peer}"),
                data_dir: dir.join(&name),
                log: dir.join(format!("{name}.log")),
                name,
                child: None,
                args: Vec::new(),
                env: Vec::new(),
                program: PathBuf::new(),
            });
        }
        let initial_cluster = peers.join(",");
        for m in &mut members {
            let mut args = Vec::new();
            match &system {
                System::Ours => {
                    args.extend(["--worker-threads".to_owned(), threads_per_member().to_string()]);
                    args.push("run".to_owned());
                    let metrics = free_port()?;
                    args.extend(["--listen-metrics-urls".to_owned(), format!("http://127.0.0.1:{metrics}")]);
                    m.program = our_binary()?;
                }
                System::Etcd { program, .. } => {
                    m.env.push(("GOMAXPROCS", threads_per_member().to_string()));
                    m.program = program.clone();
                }
            }
            args.extend([
                "--name".to_owned(),
                m.name.clone(),
                "--data-dir".to_owned(),
                m.data_dir.display().to_string(),
                "--listen-client-urls".to_owned(),
                m.client_url.clone(),
                "--advertise-client-urls".to_owned(),
                m.client_url.clone(),
                "--listen-peer-urls".to_owned(),
                m.peer_url.clone(),
                "--initial-advertise-peer-urls".to_owned(),
                m.peer_url.clone(),
                "--initial-cluster".to_owned(),
                initial_cluster.clone(),
                "--initial-cluster-state".to_owned(),
                "new".to_owned(),
            ]);
            args.extend(extra.iter().map(|a| (*a).to_owned()));
            if let Some((wrapping, wrapper_args)) = wrapper.split_first() {
                let program = std::mem::replace(&mut m.program, PathBuf::from(wrapping));
                args =
                    wrapper_args.iter().cloned().chain([program.display().to_string()]).chain(args).collect();
            }
            m.args = args;
        }
        for m in &mut members {
            m.start()?;
        }
        Ok(Self { system, members })
    }

    /// CPU ticks its members have used so far, summed.
    fn cpu_ticks(&self) -> u64 {
        self.members.iter().filter_map(Member::cpu_ticks).sum()
    }

    /// `CHANNELS` connections spread over the members, the first to `first`.
    async fn channels(&self, first: Role) -> anyhow::Result<Vec<Channel>> {
        self.channels_over(first, CHANNELS, Some(Duration::from_secs(5))).await
    }

    /// `count` connections spread over the members in turn, the first to `first`, so that
    /// one client talks to a member of the same role on every system (a write sent to a
    /// follower takes one more hop). Long-lived streams get no request timeout: it would end
    /// them mid-run.
    async fn channels_over(
        &self,
        first: Role,
        count: usize,
        request_timeout: Option<Duration>,
    ) -> anyhow::Result<Vec<Channel>> {
        let leader = self.leader(Duration::from_secs(30)).await?;
        let start = match first {
            Role::Leader => leader,
            Role::Follower => leader + 1,
        };
        Ok((start..start + count)
            .map(|i| {
                let url = self.members[i % self.members.len()].client_url.clone();
                let endpoint = Endpoint::from_shared(url)
                    .expect("valid url")
                    .connect_timeout(Duration::from_millis(500));
                match request_timeout {
                    Some(timeout) => endpoint.timeout(timeout),
                    None => endpoint,
                }
                .connect_lazy()
            })
            .collect())
    }

    /// Index of the leader, once the running members agree on one.
    async fn leader(&self, deadline: Duration) -> anyhow::Result<usize> {
        self.leader_answering_within(deadline, Duration::from_secs(1)).await
    }

    /// `leader`, each member given `answer` to answer a status request.
    async fn leader_answering_within(&self, deadline: Duration, answer: Duration) -> anyhow::Result<usize> {
        let until = Instant::now() + deadline;
        loop {
            let mut ids = Vec::new();
            for m in self.members.iter().filter(|m| m.child.is_some()) {
                let mut client = MaintenanceClient::new(
                    Endpoint::from_shared(m.client_url.clone())?.timeout(answer).connect_lazy(),
                );
                match client.status(StatusRequest {}).await {
                    Ok(s) => {
                        let s = s.into_inner();
                        ids.push((s.leader, s.header.map_or(0, |h| h.member_id)));
                    }
                    Err(_) => ids.push((0, 0)),
                }
            }
            let leader = ids.first().map(|(l, _)| *l).unwrap_or(0);
            if leader != 0
                && ids.iter().all(|(l, _)| *l == leader)
                && let Some(i) = ids.iter().position(|(_, me)| *me == leader)
            {
                let running: Vec<usize> = self
                    .members
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| m.child.is_some())
                    .map(|(i, _)| i)
                    .collect();
                return Ok(running[i]);
            }
            if Instant::now() > until {
                let silent =
                    self.members.iter().filter(|m| m.child.is_some()).zip(&ids).filter(|(_, id)| id.0 == 0);
                let tails: Vec<String> =
                    silent.map(|(m, _)| format!("{}: {}", m.name, log_tail(&m.log))).collect();
                bail!(
                    "{}: no leader within {deadline:?}; members without one:\n{}",
                    self.system.name(),
                    tails.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The last lines of a member's log, to say why it did not serve.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| format!("(no log: {e})"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

struct Measured {
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU time of the members per operation, where it was measured.
    cpu_ms_per_op: Option<f64>,
}

impl Measured {
    /// One operation per latency, over `elapsed`; `None` when nothing succeeded.
    fn from_latencies(mut latencies: Vec<Duration>, elapsed: Duration) -> Option<Self> {
        if latencies.is_empty() {
            return None;
        }
        latencies.sort();
        let at = |q: f64| {
            latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)].as_secs_f64() * 1000.0
        };
        Some(Measured {
            ops_per_sec: latencies.len() as f64 / elapsed.as_secs_f64(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            cpu_ms_per_op: None,
        })
    }
}

/// Which member a workload's first connection goes to.
#[derive(Clone, Copy)]
enum Role {
    Leader,
    Follower,
}

#[derive(Clone, Copy)]
enum Workload {
    Put,
    LinearizableGet,
    SerializableGet,
}

async fn drive(
    cluster: &Cluster,
    workload: Workload,
    clients: usize,
    first: Role,
) -> anyhow::Result<Measured> {
    drive_while(cluster, workload, clients, first, tokio::time::sleep(RUN_FOR)).await
}

/// `drive`, for as long as `run` takes.
async fn drive_while(
    cluster: &Cluster,
    workload: Workload,
    clients: usize,
    first: Role,
    run: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Measured> {
    let channels = cluster.channels(first).await?;
    let value = vec![b'v'; VALUE_BYTES];
    if matches!(workload, Workload::LinearizableGet | Workload::SerializableGet) {
        let mut kv = KvClient::new(channels[0].clone());
        kv.put(PutRequest { key: b"bench/get".to_vec(), value: value.clone(), ..PutRequest::default() })
            .await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let cpu_before = cluster.cpu_ticks();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut kv = KvClient::new(channels[c % channels.len()].clone());
        let (stop, value) = (stop.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            let mut first_error: Option<String> = None;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let result = match workload {
                    Workload::Put => kv
                        .put(PutRequest {
                            key: format!("bench/{c}/{n}").into_bytes(),
                            value: value.clone(),
                            ..PutRequest::default()
                        })
                        .await
                        .map(|_| ()),
                    Workload::LinearizableGet | Workload::SerializableGet => kv
                        .range(RangeRequest {
                            key: b"bench/get".to_vec(),
                            serializable: matches!(workload, Workload::SerializableGet),
                            ..RangeRequest::default()
                        })
                        .await
                        .map(|_| ()),
                };
                match result {
                    Ok(()) => latencies.push(t.elapsed()),
                    Err(status) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| status.message().to_owned());
                    }
                }
                n += 1;
            }
            (latencies, errors, first_error)
        }));
    }
    run.await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        let (l, e, first) = task.await?;
        latencies.extend(l);
        errors += e;
        first_error = first_error.or(first);
    }
    let cpu_seconds = cluster.cpu_ticks().saturating_sub(cpu_before) as f64 / clock_ticks_per_second();
    let operations = latencies.len();
    let measured = Measured::from_latencies(latencies, started.elapsed()).with_context(|| {
        format!(
            "{}: no request succeeded ({errors} errors, the first: {})",
            cluster.system.name(),
            first_error.as_deref().unwrap_or("none")
        )
    })?;
    Ok(Measured { cpu_ms_per_op: Some(cpu_seconds * 1000.0 / operations as f64), ..measured })
}

/// kill -9 of the leader until the first acknowledged put; the killed member is restarted.
async fn failover(cluster: &mut Cluster) -> anyhow::Result<Duration> {
    let leader = cluster.leader(Duration::from_secs(30)).await?;
    let survivors: Vec<String> = cluster
        .members
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, m)| m.client_url.clone())
        .collect();
    let killed = Instant::now();
    cluster.members[leader].kill9();
    // A put sent while there is no leader waits for one, or fails; a new one goes out every
    // `PUT_EVERY` to the survivors in turn, so the first acknowledgement comes within that of
    // the new leader taking writes, whichever survivor leads and however each system answers
    // meanwhile.
    const PUT_EVERY: Duration = Duration::from_millis(20);
    let mut puts = tokio::task::JoinSet::new();
    let mut next_put = tokio::time::interval(PUT_EVERY);
    let deadline = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(deadline);
    let mut sent = 0usize;
    let took = loop {
        tokio::select! {
            _ = next_put.tick() => {
                let mut kv = KvClient::new(
                    Endpoint::from_shared(survivors[sent % survivors.len()].clone())?
                        .timeout(Duration::from_secs(2))
                        .connect_lazy(),
                );
                sent += 1;
                puts.spawn(async move {
                    let request = PutRequest {
                        key: b"bench/failover".to_vec(),
                        value: vec![b'f'; VALUE_BYTES],
                        ..PutRequest::default()
                    };
                    kv.put(request).await.is_ok()
                });
            }
            Some(Ok(true)) = puts.join_next(), if !puts.is_empty() => break killed.elapsed(),
            _ = &mut deadline => {
                bail!("{}: no write accepted within 60 s of killing the leader", cluster.system.name())
            }
        }
    };
    puts.abort_all();
    cluster.members[leader].start()?;
    cluster.leader(Duration::from_secs(30)).await?;
    Ok(took)
}

/// A single failover is one draw of the followers' election timeouts (etcd's from `[E, 2E)`),
/// so one sample says little; each system is failed over this many times, in turns.
const FAILOVER_ROUNDS: usize = 11;

/// The median, mean and range of `FAILOVER_ROUNDS` failovers of each system, in milliseconds, the
/// systems taking turns so that a slow spell of the machine falls on all of them.
async fn failovers(
    ours: &mut Cluster,
    etcds: &mut [Cluster],
) -> anyhow::Result<(Spread, Vec<(String, Spread)>)> {
    let mut mine = Vec::new();
    let mut theirs: Vec<(String, Vec<f64>)> = etcds.iter().map(|e| (e.system.name(), Vec::new())).collect();
    for _ in 0..FAILOVER_ROUNDS {
        let (a, bs) = on_each(ours, etcds, async |c| Ok(failover(c).await?.as_secs_f64() * 1000.0)).await?;
        mine.push(a);
        for ((_, samples), (_, b)) in theirs.iter_mut().zip(bs) {
            samples.push(b);
        }
    }
    Ok((Spread::of(mine), theirs.into_iter().map(|(name, samples)| (name, Spread::of(samples))).collect()))
}

/// The median, the mean and the range of a few samples.
struct Spread {
    median: f64,
    mean: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        Spread {
            median: samples[samples.len() / 2],
            mean: samples.iter().sum::<f64>() / samples.len() as f64,
            min: samples[0],
            max: samples[samples.len() - 1],
        }
    }
}

/// A request stream with `first` already queued: etcd sends a stream's response headers
/// only with its first response, so the call would not return before a request is sent.
fn request_queue<T>(first: T) -> (mpsc::Sender<T>, ReceiverStream<T>) {
    let (requests, queue) = mpsc::channel(1);
    requests.try_send(first).expect("an empty queue has room");
    (requests, ReceiverStream::new(queue))
}

/// A watched put's value: its sequence number and when it was sent, as an offset from the
/// run's origin (an `Instant` has no wire form), padded to the benchmark's value size.
fn stamped_value(seq: u64, sent: Duration) -> Vec<u8> {
    let mut value = Vec::with_capacity(VALUE_BYTES);
    value.extend_from_slice(&seq.to_le_bytes());
    value.extend_from_slice(&(sent.as_nanos() as u64).to_le_bytes());
    value.resize(VALUE_BYTES, b'v');
    value
}

fn read_stamp(value: &[u8]) -> Option<(u64, Duration)> {
    let seq = u64::from_le_bytes(value.get(..8)?.try_into().ok()?);
    let sent = u64::from_le_bytes(value.get(8..16)?.try_into().ok()?);
    Some((seq, Duration::from_nanos(sent)))
}

/// What one watcher received, checked against the writer's sequence.
#[derive(Default)]
struct WatchTally {
    /// The sequence number expected next: every earlier one was received or counted missed.
    next: u64,
    missed: u64,
    /// Repeated, reordered or unreadable events.
    unexpected: u64,
    delays: Vec<Duration>,
    last_event_at: Option<Instant>,
    ended_early: bool,
}

impl WatchTally {
    fn record(&mut self, response: &WatchResponse, origin: Instant) {
        let now = Instant::now();
        for event in &response.events {
            let Some((seq, sent)) = event.kv.as_ref().and_then(|kv| read_stamp(&kv.value)) else {
                self.unexpected += 1;
                continue;
            };
            self.delays.push(now.saturating_duration_since(origin + sent));
            self.last_event_at = Some(now);
            if seq < self.next {
                self.unexpected += 1;
            } else {
                self.missed += seq - self.next;
                self.next = seq + 1;
            }
        }
    }
}

/// Reads one watch stream until it has seen all `written` puts, or until `give_up`.
async fn receive(
    mut responses: Streaming<WatchResponse>,
    mut written: watch::Receiver<Option<u64>>,
    origin: Instant,
    give_up: tokio::time::Instant,
) -> WatchTally {
    let mut tally = WatchTally::default();
    loop {
        if written.borrow().is_some_and(|total| tally.next >= total) {
            break;
        }
        tokio::select! {
            response = responses.message() => match response {
                Ok(Some(response)) if !response.canceled => tally.record(&response, origin),
                _ => {
                    tally.ended_early = true;
                    break;
                }
            },
            Ok(()) = written.changed() => {}
            () = tokio::time::sleep_until(give_up) => break,
        }
    }
    if let Some(total) = *written.borrow() {
        tally.missed += total.saturating_sub(tally.next);
    }
    tally
}

/// One writer putting back to back (each put waits for the previous acknowledgement) under
/// a prefix that `WATCHERS` streams watch; the delay of an event is from just before its
/// put was sent to its receipt.
async fn watch_fan_out(cluster: &Cluster) -> anyhow::Result<(Measured, String)> {
    let name = cluster.system.name();
    let stream_channels = cluster.channels_over(Role::Leader, STREAM_CHANNELS, None).await?;
    let mut streams = Vec::new();
    for w in 0..WATCHERS {
        let create = WatchCreateRequest {
            key: WATCH_PREFIX.to_vec(),
            range_end: prefix_end(WATCH_PREFIX),
            ..WatchCreateRequest::default()
        };
        let (requests, queue) =
            request_queue(WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) });
        let mut client = WatchClient::new(stream_channels[w % stream_channels.len()].clone());
        let mut responses = client.watch(queue).await?.into_inner();
        // Every watcher is in place before the first put, so each must see all of them.
        match responses.message().await? {
            Some(created) if created.created && !created.canceled => {}
            other => bail!("{name}: watch not created: {other:?}"),
        }
        streams.push((requests, responses));
    }
    let (announce, written) = watch::channel(None);
    let origin = Instant::now();
    let give_up = tokio::time::Instant::from_std(origin + RUN_FOR + WATCH_DRAIN);
    let receivers: Vec<_> = streams
        .into_iter()
        .map(|(requests, responses)| {
            let written = written.clone();
            tokio::spawn(async move {
                let tally = receive(responses, written, origin, give_up).await;
                // The stream lasts as long as its request side is open.
                drop(requests);
                tally
            })
        })
        .collect();
    let mut kv =
        KvClient::new(cluster.channels_over(Role::Leader, 1, Some(Duration::from_secs(5))).await?.remove(0));
    let (mut puts, mut failed) = (0u64, 0u64);
    while origin.elapsed() < RUN_FOR {
        let request = PutRequest {
            key: [WATCH_PREFIX, format!("{puts:010}").as_bytes()].concat(),
            value: stamped_value(puts, origin.elapsed()),
            ..PutRequest::default()
        };
        if kv.put(request).await.is_err() {
            failed += 1;
        }
        puts += 1;
    }
    announce.send_replace(Some(puts));
    let (mut delays, mut missed, mut unexpected, mut ended_early) = (Vec::new(), 0, 0, 0);
    let mut last_event_at = origin;
    for receiver in receivers {
        let tally = receiver.await?;
        delays.extend(tally.delays);
        missed += tally.missed;
        unexpected += tally.unexpected;
        ended_early += usize::from(tally.ended_early);
        last_event_at = last_event_at.max(tally.last_event_at.unwrap_or(origin));
    }
    let received = delays.len();
    let measured = Measured::from_latencies(delays, last_event_at - origin)
        .with_context(|| format!("{name}: no watcher received an event ({puts} puts, {failed} failed)"))?;
    let report = format!(
        "watch, {name}: {puts} puts ({failed} failed) to {WATCHERS} watchers: {received} of {} events received, \
         {missed} missed, {unexpected} repeated or out of order, {ended_early} streams ended early",
        puts * WATCHERS as u64
    );
    Ok((measured, report))
}

/// `LEASES` leases kept alive over `STREAM_CHANNELS` streams, each sending its next
/// keep-alive as soon as the previous one is answered, cycling through its leases.
async fn lease_keep_alive(cluster: &Cluster) -> anyhow::Result<(Measured, String)> {
    let name = cluster.system.name();
    let channels = cluster.channels(Role::Leader).await?;
    // Concurrently: granted one by one, the first leases would near their TTL before the last.
    let grants: Vec<_> = (0..CHANNELS)
        .map(|c| {
            let mut lease = LeaseClient::new(channels[c].clone());
            tokio::spawn(async move {
                let mut granted = Vec::new();
                for _ in (c..LEASES).step_by(CHANNELS) {
                    let request = LeaseGrantRequest { ttl: LEASE_TTL_SECS, id: 0 };
                    granted.push(lease.lease_grant(request).await?.into_inner());
                }
                anyhow::Ok(granted)
            })
        })
        .collect();
    let mut ids = Vec::new();
    let mut ttl = i64::MAX;
    for grant in grants {
        for granted in grant.await?? {
            ids.push(granted.id);
            ttl = ttl.min(granted.ttl);
        }
    }
    let stream_channels = cluster.channels_over(Role::Leader, STREAM_CHANNELS, None).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let streams: Vec<_> = ids
        .chunks(ids.len().div_ceil(STREAM_CHANNELS))
        .zip(&stream_channels)
        .map(|(leases, channel)| {
            let leases = leases.to_vec();
            let mut client = LeaseClient::new(channel.clone());
            let stop = stop.clone();
            tokio::spawn(async move {
                let (requests, queue) = request_queue(LeaseKeepAliveRequest { id: leases[0] });
                let mut sent = Instant::now();
                let mut responses = client.lease_keep_alive(queue).await?.into_inner();
                let (mut latencies, mut expired) = (Vec::new(), 0u64);
                for next in (1..).map(|i| leases[i % leases.len()]) {
                    let answer = responses.message().await?.context("keep-alive stream ended")?;
                    latencies.push(sent.elapsed());
                    // etcd's answer for a lease that no longer exists.
                    if answer.ttl <= 0 {
                        expired += 1;
                    }
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    sent = Instant::now();
                    requests.send(LeaseKeepAliveRequest { id: next }).await?;
                }
                anyhow::Ok((latencies, expired))
            })
        })
        .collect();
    tokio::time::sleep(KEEP_ALIVE_RUN_FOR).await;
    stop.store(true, Ordering::Relaxed);
    let (mut latencies, mut expired) = (Vec::new(), 0);
    for stream in streams {
        let (l, e) = stream.await??;
        latencies.extend(l);
        expired += e;
    }
    let elapsed = started.elapsed();
    let mut lease = LeaseClient::new(channels[0].clone());
    let left = lease.lease_leases(LeaseLeasesRequest {}).await?.into_inner().leases;
    let left: std::collections::HashSet<i64> = left.into_iter().map(|l| l.id).collect();
    let gone = ids.iter().filter(|id| !left.contains(id)).count();
    let measured = Measured::from_latencies(latencies, elapsed)
        .with_context(|| format!("{name}: no keep-alive answered"))?;
    let report = format!(
        "lease keep-alive, {name}: {} leases of TTL {ttl} s over {STREAM_CHANNELS} streams for {} s: {expired} keep-alives \
         found their lease gone, {gone} leases gone at the end",
        ids.len(),
        KEEP_ALIVE_RUN_FOR.as_secs()
    );
    Ok((measured, report))
}

fn ratio(ours: f64, etcd: f64) -> String {
    if etcd > 0.0 { format!("{:.2}", ours / etcd) } else { "-".to_owned() }
}

fn cpu_column(m: &Measured) -> String {
    m.cpu_ms_per_op.map_or_else(|| "-".to_owned(), |c| format!("{c:.3}"))
}

/// Ours on the first line, then each etcd with the ratios ours/etcd.
fn print_rows(name: &str, ours: &Measured, etcds: &[(String, Measured)]) {
    let line = |label: &str, system: &str, m: &Measured, ratios: String| {
        println!(
            "{label:<26} {system:<16} {:>10.0} {:>8.2} {:>8.2} {:>10} | {ratios}",
            m.ops_per_sec,
            m.p50_ms,
            m.p99_ms,
            cpu_column(m)
        );
    };
    line(name, "consensus-node", ours, String::new());
    for (system, etcd) in etcds {
        let cpu = match (ours.cpu_ms_per_op, etcd.cpu_ms_per_op) {
            (Some(a), Some(b)) => ratio(a, b),
            _ => "-".to_owned(),
        };
        let ratios = format!(
            "{:>9} {:>9} {:>9}",
            ratio(ours.ops_per_sec, etcd.ops_per_sec),
            ratio(ours.p99_ms, etcd.p99_ms),
            cpu
        );
        line("", system, etcd, ratios);
    }
}

/// A workload's figures and its report of what it checked.
type Reported = (Measured, String);

/// `print_rows` for workloads that also report what they checked, kept in `reports`.
fn print_reported(name: &str, (ours, etcds): (Reported, Vec<(String, Reported)>), reports: &mut Vec<String>) {
    reports.push(ours.1);
    let mut measured = Vec::new();
    for (system, (m, report)) in etcds {
        reports.push(report);
        measured.push((system, m));
    }
    print_rows(name, &ours.0, &measured);
}

/// A figure with one value per system (lower is better for both of these).
fn print_figure(name: &str, ours: f64, etcds: &[(String, f64)]) {
    println!("{name:<26} {:<16} {ours:>10.1}", "consensus-node");
    for (system, etcd) in etcds {
        println!("{:<26} {system:<16} {etcd:>10.1} {:>28} | {:>9}", "", "", ratio(ours, *etcd));
    }
}

/// Mean, median and range per system, and the ratio of means.
fn print_spread(name: &str, ours: &Spread, etcds: &[(String, Spread)]) {
    let line = |label: &str, system: &str, s: &Spread, ratio: String| {
        println!(
            "{label:<26} {system:<16} {:>10.1} median {:.1}, {:.1}-{:.1} | {ratio:>9}",
            s.mean, s.median, s.min, s.max
        );
    };
    line(name, "consensus-node", ours, String::new());
    for (system, etcd) in etcds {
        line("", system, etcd, ratio(ours.mean, etcd.mean));
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let systems = args.etcds.into_iter().map(System::etcd).collect::<anyhow::Result<Vec<_>>>()?;
    let dir = tempfile::tempdir()?;
    let mut ours = Cluster::start(System::Ours, &dir.path().join("ours"))?;
    let mut etcds = Vec::new();
    for (i, system) in systems.iter().enumerate() {
        etcds.push(Cluster::start(system.clone(), &dir.path().join(format!("etcd-{i}")))?);
    }
    // Returning drops every cluster, which kills their members: on Ctrl-C too.
    tokio::select! {
        result = measure(&mut ours, &mut etcds, &args.only) => result?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; members stopped"),
    }
    drop(etcds);
    drop(ours);
    if Part::Instructions.chosen(&args.only) {
        instructions::measure(&systems, &dir.path().join("instructions")).await?;
    }
    if Part::Backup.chosen(&args.only) {
        backup::measure(&systems[0]).await?;
    }
    Ok(())
}

/// Runs `what` on ours, then on each etcd; returns ours and the etcds' results by name.
async fn on_each<T, F>(
    ours: &mut Cluster,
    etcds: &mut [Cluster],
    mut what: F,
) -> anyhow::Result<(T, Vec<(String, T)>)>
where
    F: AsyncFnMut(&mut Cluster) -> anyhow::Result<T>,
{
    let mine = what(ours).await?;
    let mut theirs = Vec::new();
    for etcd in etcds {
        theirs.push((etcd.system.name(), what(etcd).await?));
    }
    Ok((mine, theirs))
}

async fn measure(ours: &mut Cluster, etcds: &mut [Cluster], only: &[Part]) -> anyhow::Result<()> {
    ours.leader(Duration::from_secs(30)).await?;
    for etcd in etcds.iter() {
        etcd.leader(Duration::from_secs(30)).await?;
    }
    println!(
        "3-member clusters on this machine ({} cores, {} thread(s) per member: --worker-threads, GOMAXPROCS); \
         256-byte values; {}s per workload, each run on every system in turn",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        threads_per_member(),
        RUN_FOR.as_secs()
    );
    println!();
    println!(
        "{:<26} {:<16} {:>10} {:>8} {:>8} {:>10} | {:>9} {:>9} {:>9}",
        "workload", "system", "ops/s", "p50 ms", "p99 ms", "cpu ms/op", "ours/etcd", "p99 o/e", "cpu o/e"
    );
    let workloads = [
        ("put, 1 client", Workload::Put, 1, Role::Leader),
        ("put, 1 client (follower)", Workload::Put, 1, Role::Follower),
        ("put, 16 clients", Workload::Put, 16, Role::Leader),
        ("put, 256 clients", Workload::Put, 256, Role::Leader),
        ("linearizable get, 16", Workload::LinearizableGet, 16, Role::Leader),
        ("serializable get, 16", Workload::SerializableGet, 16, Role::Leader),
    ];
    if Part::Workloads.chosen(only) {
        for (name, workload, clients, first) in workloads {
            let (a, bs) = on_each(ours, etcds, async |c| drive(c, workload, clients, first).await).await?;
            print_rows(name, &a, &bs);
        }
        let peak_rss_mib = |c: &Cluster| {
            c.members.iter().filter_map(Member::peak_rss_kib).max().unwrap_or(0) as f64 / 1024.0
        };
        let etcd_rss: Vec<(String, f64)> = etcds.iter().map(|e| (e.system.name(), peak_rss_mib(e))).collect();
        print_figure("peak RSS of a member (MiB)", peak_rss_mib(ours), &etcd_rss);
    }
    if Part::Failover.chosen(only) {
        let (a, bs) = failovers(ours, etcds).await?;
        print_spread(&format!("leader failover (ms), {FAILOVER_ROUNDS}"), &a, &bs);
    }
    // After the rows above, so that their load leaves those unchanged.
    let mut reports = Vec::new();
    if Part::Watch.chosen(only) {
        let watched = on_each(ours, etcds, async |c| watch_fan_out(c).await).await?;
        print_reported(&format!("watch, {WATCHERS} watchers"), watched, &mut reports);
    }
    if Part::Lease.chosen(only) {
        let kept_alive = on_each(ours, etcds, async |c| lease_keep_alive(c).await).await?;
        print_reported(&format!("lease keep-alive, {LEASES}"), kept_alive, &mut reports);
    }
    println!();
    println!(
        "ratios above 1 mean more throughput for ops/s, and a slower p99, more CPU per operation, slower \
         failover or more memory elsewhere"
    );
    println!(
        "put, 1 client: to the leader; (follower): to a follower, which forwards it; more clients: spread over \
         the members in turn, the first to the leader"
    );
    println!(
        "failover: kill -9 of the leader to the first acknowledged put, {FAILOVER_ROUNDS} times per system; \
         the mean, median and range, and the ratio of means"
    );
    println!(
        "watch: 1 writer putting back to back for {}s; ops/s are events received by all watchers, \
         p50/p99 the delay from sending a put to receiving its event",
        RUN_FOR.as_secs()
    );
    println!("lease keep-alive: ops/s are keep-alives answered, p50/p99 their latency");
    println!();
    for report in reports {
        println!("{report}");
    }
    println!();
    Ok(())
}

#[path = "bench/backup.rs"]
mod backup;
#[path = "bench/instructions.rs"]
mod instructions;
