//! `consensus-operator local` end to end: the real operator binary runs a 3-member cluster
//! of real `consensus-node` processes from the sample file, and Debian's `etcdctl` talks to it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use consensus_crds::{ConsensusClusterStatus, condition};

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/samples/three-members.yaml");

/// The node binary next to the operator's, built first: `cargo test -p consensus-operator`
/// builds only this package's binaries. Cargo makes this a no-op when it is fresh.
fn node_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CONSENSUS_NODE_BIN") {
        return PathBuf::from(path);
    }
    let operator = Path::new(env!("CARGO_BIN_EXE_consensus-operator"));
    let node = operator.with_file_name("consensus-node");
    let profile_dir = operator.parent().expect("binary directory");
    let target_dir = profile_dir.parent().expect("target directory");
    let mut build = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    build
        .args(["build", "-p", "consensus-node", "--bin", "consensus-node"])
        .env("CARGO_TARGET_DIR", target_dir);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some(profile) => {
            build.args(["--profile", if profile == "release" { "release" } else { profile }]);
        }
    }
    let status = build.status().expect("running cargo build for consensus-node");
    assert!(status.success() || node.is_file(), "building consensus-node failed");
    assert!(node.is_file(), "{} missing after the build", node.display());
    node
}

/// PIDs of live processes whose command line mentions `needle` (our temp directory): every
/// member we started, whoever started it.
fn processes_mentioning(needle: &Path) -> Vec<u32> {
    let needle = needle.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
                .unwrap_or(true);
            !zombie && cmdline.windows(needle.len()).any(|w| w == needle)
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}

fn kill(pid: u32, signal: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// The operator and its state; kills everything it started, by PID, when dropped.
struct Local {
    dir: tempfile::TempDir,
    operator: Child,
    stdout: mpsc::Receiver<String>,
}

impl Local {
    fn start() -> Self {
        let node = node_binary();
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::copy(SAMPLE, dir.path().join("cluster.yaml")).expect("copying the sample");
        let log = std::fs::File::create(dir.path().join("operator.log")).expect("operator log");
        let mut operator = Command::new(env!("CARGO_BIN_EXE_consensus-operator"))
            .arg("local")
            .arg("-f")
            .arg(dir.path().join("cluster.yaml"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--node-bin")
            .arg(&node)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("starting consensus-operator");
        let (send, stdout) = mpsc::channel();
        let pipe = operator.stdout.take().expect("stdout piped");
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = send.send(line);
            }
        });
        Self { dir, operator, stdout }
    }

    fn status_path(&self) -> PathBuf {
        self.dir.path().join("state").join("demo.status.yaml")
    }

    /// The status, with the time it was written.
    fn status(&self) -> Option<(ConsensusClusterStatus, SystemTime)> {
        let written = std::fs::metadata(self.status_path()).ok()?.modified().ok()?;
        Some((serde_yaml::from_str(&std::fs::read_to_string(self.status_path()).ok()?).ok()?, written))
    }

    fn operator_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("operator.log")).unwrap_or_default()
    }

    /// Polls the status file until `done` holds, failing with the last status seen.
    fn wait_for_status(
        &self,
        what: &str,
        done: impl Fn(&ConsensusClusterStatus) -> bool,
    ) -> ConsensusClusterStatus {
        self.wait_for_status_since(SystemTime::UNIX_EPOCH, what, done)
    }

    /// As `wait_for_status`, for a status written after `since` (so not one written before
    /// the change being waited on was seen).
    fn wait_for_status_since(
        &self,
        since: SystemTime,
        what: &str,
        done: impl Fn(&ConsensusClusterStatus) -> bool,
    ) -> ConsensusClusterStatus {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let status = self.status();
            if let Some((status, _)) = status.as_ref().filter(|(s, written)| *written > since && done(s)) {
                return status.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no status with {what}; last: {status:#?}\noperator log:\n{}",
                self.operator_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The next stdout line starting with `prefix`, without it.
    fn printed(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_owned();
                    }
                }
                Err(_) => panic!("the operator never printed {prefix:?}; log:\n{}", self.operator_log()),
            }
        }
    }

    /// Member processes: everything naming the state directory but the operator itself.
    fn members(&self) -> Vec<u32> {
        let operator = self.operator.id();
        processes_mentioning(&self.dir.path().join("state"))
            .into_iter()
            .filter(|pid| *pid != operator)
            .collect()
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = self.operator.kill();
        let _ = self.operator.wait();
        for pid in self.members() {
            kill(pid, libc::SIGKILL);
        }
    }
}

fn etcdctl(endpoints: &str, args: &[&str]) -> String {
    let output = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .args(args)
        .output()
        .expect("running etcdctl (Debian package etcd-client; `make deps` installs it)");
    assert!(output.status.success(), "etcdctl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn condition_is(status: &ConsensusClusterStatus, type_: &str, value: &str, reason: &str) -> bool {
    status.conditions.iter().any(|c| c.type_ == type_ && c.status == value && c.reason == reason)
}

fn healthy_with_leader(status: &ConsensusClusterStatus) -> bool {
    status.members.len() == 3
        && status.members.iter().all(|m| m.healthy)
        && status.leader.is_some()
        && status.ready_replicas == 3
}

#[test]
fn runs_a_sample_cluster_refuses_an_even_size_and_stops_its_members() {
    let local = Local::start();

    let status = local.wait_for_status("3 healthy members and a leader", |s| {
        healthy_with_leader(s) && condition_is(s, condition::AVAILABLE, "True", "QuorumHealthy")
    });
    assert_eq!(status.replicas, 3);
    assert!(status.cluster_id.is_some());

    let endpoints = local.printed("endpoints:");
    assert_eq!(endpoints.split(',').count(), 3, "{endpoints}");
    let suggested = local.printed("try:");
    assert!(suggested.contains(&format!("--endpoints={endpoints}")), "{suggested}");
    assert!(etcdctl(&endpoints, &["endpoint", "status", "-w", "table"]).contains("127.0.0.1"));

    assert_eq!(etcdctl(&endpoints, &["put", "greeting", "hello"]).trim(), "OK");
    assert_eq!(etcdctl(&endpoints, &["get", "greeting", "--print-value-only"]).trim(), "hello");

    // A member that dies is started again on its data directory, and the data is still there.
    let first = local.members();
    assert_eq!(first.len(), 3, "member processes: {first:?}");
    kill(first[0], libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(60);
    let members = loop {
        let now = local.members();
        if now.len() == 3 && !now.contains(&first[0]) {
            break now;
        }
        assert!(Instant::now() < deadline, "the killed member was not restarted:\n{}", local.operator_log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(local.operator_log().contains("restarting it"), "{}", local.operator_log());
    local.wait_for_status_since(SystemTime::now(), "3 healthy members again", healthy_with_leader);
    assert_eq!(etcdctl(&endpoints, &["get", "greeting", "--print-value-only"]).trim(), "hello");

    // Someone edits the file to an even size: refused, reported, and nothing changes.
    let file = local.dir.path().join("cluster.yaml");
    let edited = std::fs::read_to_string(&file).expect("read sample").replace("replicas: 3", "replicas: 4");
    std::fs::write(&file, edited).expect("edit the file");
    let refused = local.wait_for_status("Degraded/InvalidSpec", |s| {
        condition_is(s, condition::DEGRADED, "True", "InvalidSpec")
    });
    assert!(healthy_with_leader(&refused), "{refused:#?}");
    assert_eq!(refused.replicas, 3);
    assert!(local.operator_log().contains("refusing the spec"), "{}", local.operator_log());
    assert_eq!(etcdctl(&endpoints, &["get", "greeting", "--print-value-only"]).trim(), "hello");
    assert_eq!(etcdctl(&endpoints, &["put", "after-refusal", "still-serving"]).trim(), "OK");
    let mut after = local.members();
    after.sort_unstable();
    let mut before = members.clone();
    before.sort_unstable();
    assert_eq!(after, before, "no member was started or stopped");

    // Ctrl-C: the operator stops every member and exits.
    kill(local.operator.id(), libc::SIGINT);
    let mut local = local;
    let deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(exit) = local.operator.try_wait().expect("operator status") {
            break exit;
        }
        assert!(Instant::now() < deadline, "operator did not exit after SIGINT:\n{}", local.operator_log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "operator exit {exit:?}:\n{}", local.operator_log());
    let still_running: Vec<u32> = members.iter().copied().filter(|pid| alive(*pid)).collect();
    assert!(still_running.is_empty(), "members still running after the operator exited: {still_running:?}");
    assert!(local.members().is_empty());
}
