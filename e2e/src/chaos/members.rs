//! The members of a chaos run: real `consensus-node` processes on loopback, their peer URLs
//! behind the fault proxies, killed, paused and restarted by PID. Every process is killed
//! when the cluster is dropped, also when the run fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use super::proxy::Network;
use crate::free_port;

pub struct Member {
    pub name: String,
    pub client_port: u16,
    /// Where the member listens for peers.
    pub peer_port: u16,
    /// What it advertises: the proxy in front of `peer_port`.
    pub proxy_port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    paused: bool,
    /// Started on a failing disk: it is meant to exit by itself.
    may_exit: bool,
    /// `--initial-cluster-state` and `--initial-cluster` for the next start.
    state: &'static str,
    initial_cluster: String,
}

impl Member {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn advertised_peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.proxy_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

pub struct Cluster {
    pub members: Vec<Member>,
    pub network: Network,
    node: PathBuf,
    /// What the harness did, when (`harness.log` in the run's directory): the members' logs
    /// say what they did, this says which process was which.
    journal: std::fs::File,
    /// Members whose process ended without the harness ending it, and not on a failing disk
    /// (a panic, an exit on an error, a refusal to start): each is reported as a violation.
    pub crashes: Vec<String>,
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a PID this harness started and has not yet waited for.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

impl Cluster {
    /// `size` members of a new cluster in `dir`, their proxies served on the current runtime.
    pub async fn start(
        node: &Path,
        dir: &Path,
        size: usize,
        token: &str,
        failpoints: &[&str],
    ) -> anyhow::Result<Self> {
        let network = Network::new(size);
        let mut members = Vec::new();
        for i in 0..size {
            let name = format!("m{i}");
            let proxy = tokio::net::TcpListener::bind(("127.0.0.1", free_port()?)).await?;
            let member = Member {
                client_port: free_port()?,
                peer_port: free_port()?,
                proxy_port: proxy.local_addr()?.port(),
                data_dir: dir.join(&name),
                log: dir.join(format!("{name}.log")),
                name,
                child: None,
                paused: false,
                may_exit: false,
                state: "new",
                initial_cluster: String::new(),
            };
            network.serve(proxy, i, member.peer_port);
            members.push(member);
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.advertised_peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.initial_cluster = initial_cluster.clone();
        }
        let journal = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("harness.log"))?;
        let mut cluster = Self { members, network, node: node.to_owned(), journal, crashes: Vec::new() };
        for i in 0..size {
            cluster.spawn(i, failpoints, token)?;
        }
        Ok(cluster)
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// Starts member `i` with failpoints `failpoints` (`name=action` pairs).
    pub fn spawn(&mut self, i: usize, failpoints: &[&str], token: &str) -> anyhow::Result<()> {
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&m.log)?;
        let peer_url = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new(&self.node)
            .args(["run", "--name", &m.name, "--data-dir"])
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.endpoint(), "--advertise-client-urls", &m.endpoint()])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &m.advertised_peer_url(),
            ])
            .args(["--initial-cluster", &m.initial_cluster, "--initial-cluster-state", m.state])
            .args(["--initial-cluster-token", token])
            .args(["--listen-metrics-urls", &format!("http://127.0.0.1:{}", free_port()?)])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            // Snapshots every few seconds of load and little of the log held in memory, so
            // that snapshots, catching up through them, and entries read back from the WAL
            // all happen under the faults.
            .args(["--snapshot-count", "2000", "--snapshot-catchup-entries", "500"])
            .args(["--wal-held-bytes", "262144"])
            .env("RUST_LOG", "info,openraft=warn")
            .env(consensus_node::failpoint::FAILPOINTS_ENV, failpoints.join(","))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.node.display()))?;
        self.network.set_pid(i, Some(child.id()));
        let note = format!("started {} (pid {}, {}, failpoints {failpoints:?})", m.name, child.id(), m.state);
        m.child = Some(child);
        m.paused = false;
        m.may_exit = failpoints.contains(&"wal-fsync=error");
        self.note(&note);
        Ok(())
    }

    /// kill -9: no chance to flush or hand anything over.
    pub fn kill(&mut self, i: usize) {
        self.exited(i);
        let m = &mut self.members[i];
        if let Some(mut child) = m.child.take() {
            let _ = child.kill();
            let status = child.wait();
            let note = format!("killed {} (pid {}): {status:?}", m.name, child.id());
            self.note(&note);
        }
        self.members[i].paused = false;
        self.network.set_pid(i, None);
    }

    /// A line in the harness's journal, with the time as the members' logs write it.
    pub fn note(&mut self, what: &str) {
        use std::io::Write;
        let _ = writeln!(self.journal, "{} {what}", jiff::Timestamp::now());
    }

    pub fn pause(&mut self, i: usize) {
        if let Some(pid) = self.members[i].pid() {
            signal(pid, libc::SIGSTOP);
            self.members[i].paused = true;
            self.note(&format!("paused m{i} (pid {pid})"));
        }
    }

    pub fn resume(&mut self, i: usize) {
        if let Some(pid) = self.members[i].pid() {
            signal(pid, libc::SIGCONT);
            self.note(&format!("resumed m{i} (pid {pid})"));
        }
        self.members[i].paused = false;
    }

    /// Whether member `i`'s process ended on its own (a failing disk stops it); reaps it, and
    /// counts it as a crash unless its disk was failing.
    pub fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let m = &mut self.members[i];
        let child = m.child.as_mut()?;
        let (pid, status) = (child.id(), child.try_wait().ok()??);
        m.child = None;
        let may_exit = m.may_exit;
        self.network.set_pid(i, None);
        self.note(&format!("m{i} (pid {pid}) had exited: {status}"));
        if !may_exit {
            self.crashes.push(format!("member {i} (pid {pid}) ended by itself: {status}; see m{i}.log"));
        }
        Some(status)
    }

    /// The next start of member `i` joins the running cluster with an empty data directory.
    pub fn rejoin_empty(&mut self, i: usize) -> anyhow::Result<()> {
        let m = &mut self.members[i];
        if m.data_dir.exists() {
            std::fs::remove_dir_all(&m.data_dir)?;
        }
        m.state = "existing";
        self.note(&format!("deleted the data of m{i}"));
        Ok(())
    }

    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.resume(i);
            self.kill(i);
        }
    }
}

/// How long the harness waits for a cluster to serve again after every fault is healed.
pub const SETTLE_DEADLINE: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::Cluster;

    /// Polls `exited` until member `i` has ended (a process that exits at once).
    async fn wait_exited(cluster: &mut Cluster, i: usize) {
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while cluster.exited(i).is_none() {
            assert!(tokio::time::Instant::now() < until, "member {i} did not end");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_member_ending_by_itself_is_a_crash_unless_its_disk_was_failing() {
        let dir = tempfile::tempdir().expect("tempdir");
        // `false` stands for a member that fails at once, whatever it is asked to do.
        let mut cluster = Cluster::start(Path::new("false"), dir.path(), 3, "t", &[]).await.expect("started");
        wait_exited(&mut cluster, 0).await;
        assert_eq!(cluster.crashes.len(), 1, "{:?}", cluster.crashes);
        assert!(cluster.crashes[0].starts_with("member 0 "), "{:?}", cluster.crashes);

        wait_exited(&mut cluster, 1).await;
        assert_eq!(cluster.crashes.len(), 2, "{:?}", cluster.crashes);

        cluster.spawn(1, &["wal-fsync=error"], "t").expect("started");
        wait_exited(&mut cluster, 1).await;
        assert_eq!(cluster.crashes.len(), 2, "a failing disk's exit is no crash: {:?}", cluster.crashes);

        // Back on a good disk, the same exit is one again; so is one found ended when killed.
        cluster.spawn(1, &[], "t").expect("started");
        wait_exited(&mut cluster, 1).await;
        assert_eq!(cluster.crashes.len(), 3, "{:?}", cluster.crashes);
        let pid = cluster.members[2].pid().expect("member 2 was started");
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        // Ended and not yet reaped: a zombie, until kill() looks.
        while !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z ")) {
            assert!(tokio::time::Instant::now() < until, "member 2 did not end");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cluster.kill(2);
        assert_eq!(cluster.crashes.len(), 4, "{:?}", cluster.crashes);
    }
}
