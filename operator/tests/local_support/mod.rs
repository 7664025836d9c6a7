//! Driving `consensus-operator local` from a test: the operator process (restartable, with
//! a fault point), its status and events, a writer that records every acknowledged put,
//! and a sampler that polls MemberList every 20 ms. Everything is killed by PID on drop.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use consensus_crds::ConsensusClusterStatus;
use etcd_client::{Client, ConnectOptions, GetOptions};

pub const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/samples/three-members.yaml");
/// Generous: debug binaries on two shared cores; a scale normally takes a few seconds.
pub const DEADLINE: Duration = Duration::from_secs(180);
pub const FAULT_EXIT: i32 = 86;

/// The node binary next to the operator's, built first: `cargo test -p consensus-operator`
/// builds only this package's binaries. Cargo makes this a no-op when it is fresh.
pub fn node_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CONSENSUS_NODE_BIN") {
        return PathBuf::from(path);
    }
    let operator = Path::new(env!("CARGO_BIN_EXE_consensus-operator"));
    let node = operator.with_file_name("consensus-node");
    let target_dir = operator.parent().and_then(Path::parent).expect("target directory");
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "-p", "consensus-node", "--bin", "consensus-node"])
        .env("CARGO_TARGET_DIR", target_dir)
        .status()
        .expect("running cargo build for consensus-node");
    assert!(status.success() || node.is_file(), "building consensus-node failed");
    node
}

pub fn kill(pid: u32, signal: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Polls `check` until it returns `Some`, failing with `what` and `context()` at the deadline.
pub fn wait_until<T>(what: &str, context: impl Fn() -> String, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", context());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One local cluster: its directory, and the operator process running it (if any).
pub struct Local {
    pub dir: tempfile::TempDir,
    pub node_bin: PathBuf,
    pub operator: Option<Child>,
}

impl Local {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::copy(SAMPLE, dir.path().join("cluster.yaml")).expect("copying the sample");
        Self { dir, node_bin: node_binary(), operator: None }
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts the operator, with `CONSENSUS_OPERATOR_FAULT_AFTER=fault` when given.
    pub fn start(&mut self, fault: Option<&str>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("operator.log"))
            .expect("operator log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_consensus-operator"));
        command
            .arg("local")
            .arg("-f")
            .arg(self.dir.path().join("cluster.yaml"))
            .arg("--state-dir")
            .arg(self.state())
            .arg("--node-bin")
            .arg(&self.node_bin)
            .env_remove("CONSENSUS_OPERATOR_FAULT_AFTER")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(fault) = fault {
            command.env("CONSENSUS_OPERATOR_FAULT_AFTER", fault);
        }
        self.operator = Some(command.spawn().expect("starting consensus-operator"));
    }

    /// The operator's exit code once it exits, `None` while it runs.
    pub fn exited(&mut self) -> Option<Option<i32>> {
        let operator = self.operator.as_mut()?;
        let exit = operator.try_wait().expect("operator status")?;
        self.operator = None;
        Some(exit.code())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("operator.log")).unwrap_or_default()
    }

    pub fn events(&self) -> Vec<String> {
        std::fs::read_to_string(self.state().join("demo.events"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn status(&self) -> Option<ConsensusClusterStatus> {
        serde_yaml::from_str(&std::fs::read_to_string(self.state().join("demo.status.yaml")).ok()?).ok()
    }

    pub fn set_replicas(&self, replicas: i32) {
        let file = self.dir.path().join("cluster.yaml");
        let text = std::fs::read_to_string(&file).expect("read the file");
        let edited: String = text
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("replicas:") {
                    let indent = &l[..l.len() - l.trim_start().len()];
                    format!("{indent}replicas: {replicas}")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&file, edited + "\n").expect("edit the file");
    }

    /// Members recorded by the operator: name -> (client URL, PID file).
    pub fn recorded(&self) -> BTreeMap<String, String> {
        let text =
            std::fs::read_to_string(self.state().join("demo").join("members.yaml")).unwrap_or_default();
        let value: serde_yaml::Value = serde_yaml::from_str(&text).unwrap_or(serde_yaml::Value::Null);
        let mut out = BTreeMap::new();
        for m in value.get("members").and_then(|m| m.as_sequence()).into_iter().flatten() {
            if let (Some(name), Some(port)) =
                (m.get("name").and_then(|n| n.as_str()), m.get("clientPort").and_then(|p| p.as_u64()))
            {
                out.insert(name.to_owned(), format!("http://127.0.0.1:{port}"));
            }
        }
        out
    }

    pub fn member_pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.state().join("demo").join(format!("{name}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Waits for a status with `replicas` healthy voters, no learner, a leader and Steady.
    pub fn wait_for_voters(&self, replicas: usize) -> ConsensusClusterStatus {
        wait_until(
            &format!("{replicas} healthy voters"),
            || {
                format!(
                    "status: {:#?}\nevents:\n{}\nlog:\n{}",
                    self.status(),
                    self.events().join("\n"),
                    self.log()
                )
            },
            || {
                let s = self.status()?;
                let voters =
                    s.members.iter().filter(|m| m.role != consensus_crds::MemberRole::Learner).count();
                let reconciled =
                    s.conditions.iter().any(|c| c.type_ == "Progressing" && c.reason == "Reconciled");
                (voters == replicas
                    && s.members.len() == replicas
                    && s.members.iter().all(|m| m.healthy)
                    && s.leader.is_some()
                    && reconciled)
                    .then_some(s)
            },
        )
    }

    /// Kills the operator as a crash would (SIGKILL); the members keep running.
    pub fn kill_operator_only(&mut self) {
        if let Some(mut operator) = self.operator.take() {
            let _ = operator.kill();
            let _ = operator.wait();
        }
    }

    /// Kills the operator and every member process by PID.
    pub fn kill_all(&mut self) {
        if let Some(mut operator) = self.operator.take() {
            let _ = operator.kill();
            let _ = operator.wait();
        }
        let Ok(entries) = std::fs::read_dir(self.state().join("demo")) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "pid")
                && let Some(pid) = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse().ok())
            {
                kill(pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.kill_all();
    }
}

async fn connect(endpoints: &[String]) -> Option<Client> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(2));
    Client::connect(endpoints, Some(options)).await.ok()
}

/// Puts `load/<n>` continuously and records each put the cluster acknowledged.
pub struct Writer {
    stop: Arc<AtomicBool>,
    pub acknowledged: Arc<Mutex<Vec<String>>>,
    pub failed: Arc<Mutex<u64>>,
}

impl Writer {
    pub fn start(runtime: &tokio::runtime::Runtime, endpoints: Vec<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(0));
        let (s, a, f) = (stop.clone(), acknowledged.clone(), failed.clone());
        runtime.spawn(async move {
            let mut n = 0u64;
            let mut client = None;
            while !s.load(Ordering::Relaxed) {
                if client.is_none() {
                    client = connect(&endpoints).await;
                }
                let Some(c) = client.as_mut() else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let key = format!("load/{n:08}");
                match c.put(key.clone(), n.to_string(), None).await {
                    Ok(_) => a.lock().expect("lock").push(key),
                    Err(_) => {
                        *f.lock().expect("lock") += 1;
                        client = None;
                    }
                }
                n += 1;
            }
        });
        Self { stop, acknowledged, failed }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Every acknowledged key that a linearizable read does not return.
    pub fn missing(&self, runtime: &tokio::runtime::Runtime, endpoints: Vec<String>) -> (usize, Vec<String>) {
        let acknowledged = self.acknowledged.lock().expect("lock").clone();
        let present = runtime.block_on(async {
            let mut client = connect(&endpoints).await.expect("connect for the read-back");
            let got = client.get("load/", Some(GetOptions::new().with_prefix().with_keys_only())).await;
            let got = got.expect("read back the load");
            got.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect::<Vec<_>>()
        });
        let present: std::collections::BTreeSet<String> = present.into_iter().collect();
        let missing = acknowledged.iter().filter(|k| !present.contains(*k)).cloned().collect();
        (acknowledged.len(), missing)
    }
}

/// What the sampler saw.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    pub taken: u64,
    pub max_voters: usize,
    pub min_voters: usize,
    /// Voter counts that were even, with the member ids then.
    pub even: Vec<(usize, Vec<u64>)>,
    /// Members that left the list while they were the leader last seen.
    pub leader_removed: Vec<u64>,
    pub removals_seen: u64,
    pub cluster_ids: std::collections::BTreeSet<u64>,
}

/// Polls MemberList (and Status for the leader) every 20 ms.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    pub samples: Arc<Mutex<Samples>>,
}

impl Sampler {
    pub fn start(runtime: &tokio::runtime::Runtime, endpoints: Vec<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Samples { min_voters: usize::MAX, ..Samples::default() }));
        let (s, out) = (stop.clone(), samples.clone());
        runtime.spawn(async move {
            let mut client = None;
            let mut previous: Option<(Vec<u64>, u64)> = None;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while !s.load(Ordering::Relaxed) {
                tick.tick().await;
                if client.is_none() {
                    client = connect(&endpoints).await;
                }
                let Some(c) = client.as_mut() else { continue };
                let (Ok(list), Ok(status)) = (c.member_list().await, c.status().await) else {
                    client = None;
                    continue;
                };
                let ids: Vec<u64> = list.members().iter().map(|m| m.id()).collect();
                let voters = list.members().iter().filter(|m| !m.is_learner()).count();
                let mut out = out.lock().expect("lock");
                out.taken += 1;
                out.max_voters = out.max_voters.max(voters);
                out.min_voters = out.min_voters.min(voters);
                if let Some(header) = list.header() {
                    out.cluster_ids.insert(header.cluster_id());
                }
                if voters % 2 == 0 {
                    out.even.push((voters, ids.clone()));
                }
                if let Some((before, leader_then)) = &previous {
                    for gone in before.iter().filter(|id| !ids.contains(id)) {
                        out.removals_seen += 1;
                        if gone == leader_then || *gone == status.leader() {
                            out.leader_removed.push(*gone);
                        }
                    }
                }
                previous = Some((ids, status.leader()));
            }
        });
        Self { stop, samples }
    }

    pub fn stop(&self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.samples.lock().expect("lock").clone()
    }
}
