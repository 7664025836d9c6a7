//! Real `consensus-node` processes on loopback for integration tests: free ports, data in
//! a temporary directory, every process killed by PID when the cluster is dropped, and
//! waits that poll with a deadline.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use consensus_node::proto::etcdserverpb::cluster_client::ClusterClient;
use consensus_node::proto::etcdserverpb::kv_client::KvClient;
use consensus_node::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use consensus_node::proto::etcdserverpb::{
    MemberListRequest, PutRequest, RangeRequest, StatusRequest, StatusResponse,
};
use tonic::transport::Channel;

pub const DEADLINE: Duration = Duration::from_secs(60);

/// Ports below the kernel's ephemeral range (32768 and up on Linux), so no outgoing
/// connection of another test can take a port between our choosing it and a member binding
/// it. Each test process walks the range from its own offset; a port is used only if it
/// can be bound now.
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_000;

pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let span = PORT_RANGE.end - PORT_RANGE.start;
    let offset = (std::process::id() % u32::from(span)) as u16;
    for _ in 0..span {
        let step = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = PORT_RANGE.start + (offset.wrapping_add(step) % span);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {PORT_RANGE:?}");
}

/// Polls `probe` until it returns `Some`, failing the test with `what` at the deadline.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub snapshot_count: u64,
    pub snapshot_catchup_entries: u64,
    pub snapshot_bytes: u64,
    /// `--quota-backend-bytes`; 0 for the default.
    pub quota_backend_bytes: u64,
    pub wal_held_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            snapshot_count: 10_000,
            snapshot_catchup_entries: 5_000,
            snapshot_bytes: 64 << 20,
            quota_backend_bytes: 0,
            wal_held_bytes: 64 << 20,
        }
    }
}

pub struct TestMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub metrics_port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
    /// Extra environment for the next start (failpoints).
    pub env: Vec<(String, String)>,
}

impl TestMember {
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.metrics_port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("member log file");
        let child = Command::new(env!("CARGO_BIN_EXE_consensus-node"))
            .args(&self.args)
            .env("RUST_LOG", "info,openraft=warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("consensus-node starts");
        self.child = Some(child);
    }

    /// SIGKILL: no chance to flush or hand anything over.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("member is running");
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("member {} did not stop after SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to the running member, with kill(1).
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("member is running");
        let status =
            Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().expect("kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running member");
        self.spawn();
    }

    /// Sets `--initial-cluster-state` for the next start, as an operator restarting a member
    /// whose data directory is gone would.
    pub fn set_cluster_state(&mut self, state: &str) {
        let flag = self.args.iter().position(|a| a == "--initial-cluster-state").expect("state flag");
        self.args[flag + 1] = state.to_owned();
    }

    /// Waits for the process to exit on its own (a member that refuses to start).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("member is running");
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "member {} did not exit", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn kv(&self) -> KvClient<Channel> {
        KvClient::new(channel(&self.client_url()))
    }

    pub async fn status(&self) -> Option<StatusResponse> {
        let mut client = MaintenanceClient::new(channel(&self.client_url()));
        let request = tonic::Request::new(StatusRequest {});
        tokio::time::timeout(Duration::from_secs(2), client.status(request))
            .await
            .ok()?
            .ok()
            .map(|r| r.into_inner())
    }
}

fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("valid url")
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

impl Drop for TestMember {
    fn drop(&mut self) {
        self.kill9();
        // A failing test shows what each member said.
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.name, self.log_text());
        }
    }
}

/// Fields drop in order: members (killed, logs shown on failure) before their directory.
pub struct TestCluster {
    pub members: Vec<TestMember>,
    pub dir: tempfile::TempDir,
}

fn member_args(m: &TestMember, initial_cluster: &str, state: &str, options: &Options) -> Vec<String> {
    vec![
        "run".into(),
        "--name".into(),
        m.name.clone(),
        "--data-dir".into(),
        m.data_dir.display().to_string(),
        "--listen-client-urls".into(),
        m.client_url(),
        "--advertise-client-urls".into(),
        m.client_url(),
        "--listen-peer-urls".into(),
        m.peer_url(),
        "--initial-advertise-peer-urls".into(),
        m.peer_url(),
        "--listen-metrics-urls".into(),
        m.metrics_url(),
        "--initial-cluster".into(),
        initial_cluster.to_owned(),
        "--initial-cluster-state".into(),
        state.to_owned(),
        "--heartbeat-interval".into(),
        "50".into(),
        "--election-timeout".into(),
        "500".into(),
        "--snapshot-count".into(),
        options.snapshot_count.to_string(),
        "--snapshot-catchup-entries".into(),
        options.snapshot_catchup_entries.to_string(),
        "--snapshot-bytes".into(),
        options.snapshot_bytes.to_string(),
        "--quota-backend-bytes".into(),
        options.quota_backend_bytes.to_string(),
        "--wal-held-bytes".into(),
        options.wal_held_bytes.to_string(),
    ]
}

fn new_member(dir: &Path, name: &str) -> TestMember {
    TestMember {
        name: name.to_owned(),
        client_port: free_port(),
        peer_port: free_port(),
        metrics_port: free_port(),
        data_dir: dir.join(name),
        log: dir.join(format!("{name}.log")),
        child: None,
        args: Vec::new(),
        env: Vec::new(),
    }
}

impl TestCluster {
    pub fn start(size: usize) -> Self {
        Self::start_with(size, Options::default())
    }

    pub fn start_with(size: usize, options: Options) -> Self {
        let mut cluster = Self::prepare(size, &options);
        for m in &mut cluster.members {
            m.spawn();
        }
        cluster
    }

    /// Members of a new cluster, on new ports, with their flags ready but not started.
    fn prepare(size: usize, options: &Options) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let members = (0..size).map(|i| new_member(dir.path(), &format!("m{i}"))).collect();
        let mut cluster = Self { dir, members };
        let initial_cluster = cluster.initial_cluster();
        for m in &mut cluster.members {
            m.args = member_args(m, &initial_cluster, "new", options);
        }
        cluster
    }

    /// A member that joins with `--initial-cluster-state existing` (after `member add`).
    pub fn prepare_joiner(&mut self, name: &str) -> usize {
        let mut m = new_member(self.dir.path(), name);
        let initial_cluster = format!("{},{}={}", self.initial_cluster(), m.name, m.peer_url());
        m.args = member_args(&m, &initial_cluster, "existing", &Options::default());
        self.members.push(m);
        self.members.len() - 1
    }

    /// Members of a new cluster with `token`, on new ports, with their flags ready but not
    /// started: the test prepares their data directories first (`consensus-node restore`).
    pub fn prepare_with_token(size: usize, token: &str) -> Self {
        let mut cluster = Self::prepare(size, &Options::default());
        for m in &mut cluster.members {
            m.args.extend(["--initial-cluster-token".to_owned(), token.to_owned()]);
        }
        cluster
    }

    /// `--initial-cluster` for this cluster's members.
    pub fn initial_cluster(&self) -> String {
        self.members.iter().map(|m| format!("{}={}", m.name, m.peer_url())).collect::<Vec<_>>().join(",")
    }

    pub fn start_member(&mut self, index: usize) {
        self.members[index].spawn();
    }

    pub fn endpoints(&self) -> String {
        self.members.iter().filter(|m| m.is_running()).map(TestMember::endpoint).collect::<Vec<_>>().join(",")
    }

    /// Index of the member every running member agrees leads, once they do.
    pub async fn leader(&self) -> usize {
        eventually("a leader all running members agree on", || async {
            let mut leader = None;
            for m in self.members.iter().filter(|m| m.is_running()) {
                let status = m.status().await?;
                if status.leader == 0 || leader.is_some_and(|l| l != status.leader) {
                    return None;
                }
                leader = Some(status.leader);
            }
            let leader = leader?;
            for (i, m) in self.members.iter().enumerate() {
                if m.is_running() && m.status().await?.header?.member_id == leader {
                    return Some(i);
                }
            }
            None
        })
        .await
    }

    /// Waits until `member` knows every running member's client URLs. Each member publishes
    /// its own through the log once a leader is known, so after this the log holds only what
    /// the test writes.
    pub async fn published(&self, member: &TestMember) {
        let running = self.members.iter().filter(|m| m.is_running()).count();
        eventually("every member's client URLs published", || async {
            let list = ClusterClient::new(channel(&member.client_url()))
                .member_list(MemberListRequest { linearizable: false })
                .await
                .ok()?
                .into_inner();
            let published = list.members.iter().filter(|m| !m.client_ur_ls.is_empty()).count();
            (published >= running).then_some(())
        })
        .await
    }

    pub fn etcdctl(&self, endpoints: &str, args: &[&str]) -> Output {
        etcdctl(endpoints, args, None)
    }
}

/// Runs the `consensus-node` binary with `args` to completion (e.g. `restore`).
pub fn consensus_node(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_consensus-node"))
        .args(args)
        .env("RUST_LOG", "info,openraft=warn")
        .stdin(Stdio::null())
        .output()
        .expect("consensus-node runs")
}

/// Runs Debian's etcdctl (API v3) against `endpoints`.
pub fn etcdctl(endpoints: &str, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .arg("--command-timeout=10s")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("etcdctl is installed (Debian package etcd-client; make test installs it)");
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).expect("etcdctl stdin");
    }
    child.wait_with_output().expect("etcdctl runs")
}

/// A command's output (etcdctl, consensus-node), after checking that it succeeded.
pub fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "command failed: {}{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout(&output)
}

/// etcdctl's error output, after checking that it failed.
pub fn failed(output: Output) -> String {
    assert!(!output.status.success(), "etcdctl should have failed: {}", stdout(&output));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub async fn put(member: &TestMember, key: &str, value: &str) -> Result<i64, tonic::Status> {
    let request = PutRequest { key: key.into(), value: value.into(), ..PutRequest::default() };
    let response = member.kv().await.put(request).await?.into_inner();
    Ok(response.header.map_or(0, |h| h.revision))
}

/// The value of `key` on `member`; `serializable` reads the member's local state.
pub async fn get(
    member: &TestMember,
    key: &str,
    serializable: bool,
) -> Result<Option<Vec<u8>>, tonic::Status> {
    let request = RangeRequest { key: key.into(), serializable, ..RangeRequest::default() };
    let response = member.kv().await.range(request).await?.into_inner();
    Ok(response.kvs.into_iter().next().map(|kv| kv.value))
}

/// Every key with `prefix` as `member` has it locally.
pub async fn keys_with_prefix(member: &TestMember, prefix: &str) -> Result<Vec<String>, tonic::Status> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let request = RangeRequest {
        key: prefix.into(),
        range_end: end,
        serializable: true,
        keys_only: true,
        ..RangeRequest::default()
    };
    let response = member.kv().await.range(request).await?.into_inner();
    Ok(response.kvs.into_iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()).collect())
}

pub async fn metrics_text(member: &TestMember) -> Option<String> {
    let url = format!("{}/metrics", member.metrics_url());
    http_get(&url).await
}

/// A minimal HTTP/1.1 GET over a TCP stream (the body of a 200 answer).
pub async fn http_get(url: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}")))?;
    let mut stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(host))
        .await
        .ok()?
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}
