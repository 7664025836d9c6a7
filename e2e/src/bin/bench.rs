//! `make bench`: a 3-member cluster of ours and a 3-member etcd on this machine, driven by
//! the same etcd v3 client, side by side. Prints ops/s and latency percentiles for each,
//! the ratio ours/etcd, leader failover time, and the peak RSS of a member of each.
//!
//! A benchmark, not a test: nothing here asserts a time.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use consensus_node::proto::etcdserverpb::kv_client::KvClient;
use consensus_node::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use consensus_node::proto::etcdserverpb::{PutRequest, RangeRequest, StatusRequest};
use tonic::transport::{Channel, Endpoint};

const VALUE_BYTES: usize = 256;
const RUN_FOR: Duration = Duration::from_secs(4);
const CHANNELS: usize = 16;

#[derive(Clone, Copy, PartialEq)]
enum System {
    Ours,
    Etcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Ours => "consensus-node",
            System::Etcd => "etcd",
        }
    }
}

struct Member {
    client_url: String,
    peer_url: String,
    name: String,
    data_dir: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
    program: PathBuf,
}

impl Member {
    fn start(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
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

    /// Peak resident set size in KiB (VmHWM), while the process runs.
    fn peak_rss_kib(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status.lines().find_map(|l| l.strip_prefix("VmHWM:")?.trim().strip_suffix("kB")?.trim().parse().ok())
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Cluster {
    system: System,
    members: Vec<Member>,
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
        let mut members = Vec::new();
        let mut peers = Vec::new();
        for i in 0..3 {
            let (client, peer) = (free_port()?, free_port()?);
            let name = format!("{}{i}", if system == System::Ours { "c" } else { "e" });
            peers.push(format!("{name}=http://127.0.0.1:{peer}"));
            members.push(Member {
                client_url: format!("http://127.0.0.1:{client}"),
                peer_url: format!("http://127.0.0.1:{peer}"),
                data_dir: dir.join(&name),
                name,
                child: None,
                args: Vec::new(),
                program: PathBuf::new(),
            });
        }
        let initial_cluster = peers.join(",");
        for m in &mut members {
            let mut args = Vec::new();
            if system == System::Ours {
                args.push("run".to_owned());
                let metrics = free_port()?;
                args.extend(["--listen-metrics-urls".to_owned(), format!("http://127.0.0.1:{metrics}")]);
                m.program = our_binary()?;
            } else {
                m.program = PathBuf::from("etcd");
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
            m.args = args;
            m.start()?;
        }
        Ok(Self { system, members })
    }

    fn channels(&self) -> Vec<Channel> {
        (0..CHANNELS)
            .map(|i| {
                let url = self.members[i % self.members.len()].client_url.clone();
                Endpoint::from_shared(url)
                    .expect("valid url")
                    .connect_timeout(Duration::from_millis(500))
                    .timeout(Duration::from_secs(5))
                    .connect_lazy()
            })
            .collect()
    }

    /// Index of the leader, once the running members agree on one.
    async fn leader(&self, deadline: Duration) -> anyhow::Result<usize> {
        let until = Instant::now() + deadline;
        loop {
            let mut ids = Vec::new();
            for m in self.members.iter().filter(|m| m.child.is_some()) {
                let mut client = MaintenanceClient::new(
                    Endpoint::from_shared(m.client_url.clone())?
                        .timeout(Duration::from_secs(1))
                        .connect_lazy(),
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
                bail!("{}: no leader within {deadline:?}", self.system.name());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

struct Measured {
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Clone, Copy)]
enum Workload {
    Put,
    LinearizableGet,
}

async fn drive(cluster: &Cluster, workload: Workload, clients: usize) -> anyhow::Result<Measured> {
    let channels = cluster.channels();
    let value = vec![b'v'; VALUE_BYTES];
    if matches!(workload, Workload::LinearizableGet) {
        let mut kv = KvClient::new(channels[0].clone());
        kv.put(PutRequest { key: b"bench/get".to_vec(), value: value.clone(), ..PutRequest::default() })
            .await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut kv = KvClient::new(channels[c % channels.len()].clone());
        let (stop, value) = (stop.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
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
                    Workload::LinearizableGet => kv
                        .range(RangeRequest { key: b"bench/get".to_vec(), ..RangeRequest::default() })
                        .await
                        .map(|_| ()),
                };
                match result {
                    Ok(()) => latencies.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
                n += 1;
            }
            (latencies, errors)
        }));
    }
    tokio::time::sleep(RUN_FOR).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    if latencies.is_empty() {
        bail!("{}: no request succeeded ({errors} errors)", cluster.system.name());
    }
    latencies.sort();
    let at = |q: f64| {
        latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)].as_secs_f64() * 1000.0
    };
    Ok(Measured {
        ops_per_sec: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
    })
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
    let mut attempt = 0usize;
    let took = loop {
        let url = &survivors[attempt % survivors.len()];
        let mut kv = KvClient::new(
            Endpoint::from_shared(url.clone())?.timeout(Duration::from_millis(300)).connect_lazy(),
        );
        let request = PutRequest {
            key: b"bench/failover".to_vec(),
            value: vec![b'f'; VALUE_BYTES],
            ..PutRequest::default()
        };
        if kv.put(request).await.is_ok() {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("{}: no write accepted within 60 s of killing the leader", cluster.system.name());
        }
        attempt += 1;
    };
    cluster.members[leader].start()?;
    cluster.leader(Duration::from_secs(30)).await?;
    Ok(took)
}

fn ratio(ours: f64, etcd: f64) -> String {
    if etcd > 0.0 { format!("{:.2}", ours / etcd) } else { "-".to_owned() }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut ours = Cluster::start(System::Ours, &dir.path().join("ours"))?;
    let mut etcd = Cluster::start(System::Etcd, &dir.path().join("etcd"))?;
    ours.leader(Duration::from_secs(30)).await?;
    etcd.leader(Duration::from_secs(30)).await?;

    println!(
        "3-member clusters on this machine ({} cores); 256-byte values; {}s per workload",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        RUN_FOR.as_secs()
    );
    println!();
    println!(
        "{:<26} {:>12} {:>9} {:>9} | {:>12} {:>9} {:>9} | {:>11}",
        "workload", "ours ops/s", "p50 ms", "p99 ms", "etcd ops/s", "p50 ms", "p99 ms", "ours/etcd"
    );
    let workloads = [
        ("put, 1 client", Workload::Put, 1),
        ("put, 16 clients", Workload::Put, 16),
        ("put, 256 clients", Workload::Put, 256),
        ("linearizable get, 16", Workload::LinearizableGet, 16),
    ];
    for (name, workload, clients) in workloads {
        let a = drive(&ours, workload, clients).await?;
        let b = drive(&etcd, workload, clients).await?;
        println!(
            "{:<26} {:>12.0} {:>9.2} {:>9.2} | {:>12.0} {:>9.2} {:>9.2} | {:>11}",
            name,
            a.ops_per_sec,
            a.p50_ms,
            a.p99_ms,
            b.ops_per_sec,
            b.p50_ms,
            b.p99_ms,
            ratio(a.ops_per_sec, b.ops_per_sec)
        );
    }
    let ours_rss = ours.members.iter().filter_map(Member::peak_rss_kib).max().unwrap_or(0);
    let etcd_rss = etcd.members.iter().filter_map(Member::peak_rss_kib).max().unwrap_or(0);
    let a = failover(&mut ours).await?;
    let b = failover(&mut etcd).await?;
    println!(
        "{:<26} {:>12} {:>9.0} {:>9} | {:>12} {:>9.0} {:>9} | {:>11}",
        "leader failover (ms)",
        "",
        a.as_secs_f64() * 1000.0,
        "",
        "",
        b.as_secs_f64() * 1000.0,
        "",
        ratio(a.as_secs_f64(), b.as_secs_f64())
    );
    println!(
        "{:<26} {:>12} {:>9.1} {:>9} | {:>12} {:>9.1} {:>9} | {:>11}",
        "peak RSS of a member (MiB)",
        "",
        ours_rss as f64 / 1024.0,
        "",
        "",
        etcd_rss as f64 / 1024.0,
        "",
        ratio(ours_rss as f64, etcd_rss as f64)
    );
    println!();
    println!(
        "ratios above 1 mean more throughput for ops/s, and slower failover or more memory for the last two rows"
    );
    Ok(())
}
