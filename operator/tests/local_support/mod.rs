//! Driving `consensus-operator local` from a test: the operator process (restartable, with
//! a fault point), its status and events, a writer that records every acknowledged put,
//! and a sampler that polls MemberList every 20 ms. Everything is killed by PID on drop.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use consensus_crds::ConsensusClusterStatus;

pub const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/samples/three-members.yaml");
/// Generous: debug binaries on two shared cores; a scale normally takes a few seconds.
pub const DEADLINE: Duration = Duration::from_secs(180);

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
    /// Set in the operator's environment (and so its backup runs').
    pub env: Vec<(String, String)>,
}

impl Local {
    pub fn new() -> Self {
        Self::declaring(&std::fs::read_to_string(SAMPLE).expect("the sample"))
    }

    /// A cluster the test declares itself; it must be named `demo`.
    pub fn declaring(cluster: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("cluster.yaml"), cluster).expect("writing the cluster file");
        Self { dir, node_bin: node_binary(), operator: None, env: Vec::new() }
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
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
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
        self.edit(|line| {
            line.trim_start().starts_with("replicas:").then(|| {
                let indent = &line[..line.len() - line.trim_start().len()];
                format!("{indent}replicas: {replicas}")
            })
        });
    }

    /// Rewrites the cluster file, each line as `change` says (`None` keeps it).
    pub fn edit(&self, change: impl Fn(&str) -> Option<String>) {
        let file = self.dir.path().join("cluster.yaml");
        let text = std::fs::read_to_string(&file).expect("read the file");
        let edited: String =
            text.lines().map(|l| change(l).unwrap_or_else(|| l.to_owned())).collect::<Vec<_>>().join("\n");
        // Written aside and renamed over the file, as an editor saves: an operator starting
        // at this moment must read the old file or the new one, never the empty file an
        // in-place write leaves for an instant (it refuses to start on that, rightly).
        let staged = self.dir.path().join(".cluster.yaml.edit");
        std::fs::write(&staged, edited + "\n").expect("edit the file");
        std::fs::rename(&staged, &file).expect("save the edit");
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

    /// Kills the operator, every member process and every backup run by PID.
    pub fn kill_all(&mut self) {
        if let Some(mut operator) = self.operator.take() {
            let _ = operator.kill();
            let _ = operator.wait();
        }
        let members = std::fs::read_dir(self.state().join("demo")).into_iter().flatten().flatten();
        for path in members.map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "pid")) {
            if let Some(pid) = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse().ok()) {
                kill(pid, libc::SIGKILL);
            }
        }
        let runs = std::fs::read_dir(self.state().join("demo.backups")).into_iter().flatten().flatten();
        for path in runs.map(|e| e.path()).filter(|p| p.to_string_lossy().ends_with(".run.json")) {
            let record: Option<serde_json::Value> =
                std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok());
            if let Some(pid) = record.and_then(|r| r.get("pid")?.as_u64()).and_then(|p| i32::try_from(p).ok())
            {
                // The run's whole process group (it leads one): the scratch member its
                // verification starts goes with it.
                // SAFETY: kill(2) takes plain integers and touches no memory of ours.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.kill_all();
    }
}
