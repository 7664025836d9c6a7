//! Helpers for scenario tests that drive a real Kubernetes cluster through `kubectl`.
//! The tests are `#[ignore]`d so that `make test` (no cluster here) skips them;
//! `make e2e` runs them against whatever KUBECONFIG points at (a kind cluster works).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Repository root, for manifests.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The outcome of one kubectl call.
pub struct Kubectl {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs kubectl with `args`, feeding `stdin` when given.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Kubectl {
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("kubectl could not be started: {e}"));
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).unwrap_or_else(|e| panic!("writing kubectl stdin: {e}"));
    }
    let Output { status, stdout, stderr } =
        child.wait_with_output().unwrap_or_else(|e| panic!("waiting for kubectl: {e}"));
    Kubectl {
        ok: status.success(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Runs kubectl and panics with its output when it fails.
pub fn kubectl_ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl(args, stdin);
    assert!(out.ok, "kubectl {} failed:\n{}{}", args.join(" "), out.stdout, out.stderr);
    out.stdout
}

/// Runs kubectl with `-o json` and parses what it prints; panics when it fails.
pub fn kubectl_json(args: &[&str]) -> serde_json::Value {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    let out = kubectl_ok(&args, None);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("kubectl {} printed no JSON ({e}): {out}", args.join(" ")))
}

/// Runs etcd's own etcdctl (v3 API) against one endpoint; panics with its output when it fails.
pub fn etcdctl(endpoint: &str, args: &[&str]) -> String {
    etcdctl_try(endpoint, args).unwrap_or_else(|failure| panic!("{failure}"))
}

/// Runs etcdctl against one endpoint: what it printed, or what went wrong (for waits that
/// poll a cluster that is still forming).
pub fn etcdctl_try(endpoint: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "--dial-timeout=3s", "--command-timeout=10s"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("etcdctl could not be started (Debian etcd-client): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    Err(format!(
        "etcdctl --endpoints {endpoint} {} failed:\n{stdout}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// The image `make images` builds for `name`, tagged with the workspace version (what the
/// manifests and the CRD default name).
pub fn image(name: &str) -> String {
    format!("{name}:{}", env!("CARGO_PKG_VERSION"))
}

/// Polls `check` every half second until it returns something, or panics naming `what` once
/// `deadline` has passed.
pub fn wait_until<T>(deadline: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// On the local cluster (`make e2e-local` sets LOCAL_CLUSTER_STATE), checks that it keeps to
/// the machine while the caller's pods run; elsewhere (kind) there is nothing of ours to check.
pub fn check_local_containment() {
    let Ok(state) = std::env::var("LOCAL_CLUSTER_STATE") else { return };
    let out = Command::new(repo_root().join("hack/cluster-containment-check.sh"))
        .env("STATE", &state)
        .output()
        .unwrap_or_else(|e| panic!("the containment check could not be started: {e}"));
    assert!(
        out.status.success(),
        "the local cluster at {state} does not keep to the machine:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace that is deleted (without waiting) when the test ends, pass or fail.
pub struct TestNamespace(pub String);

impl TestNamespace {
    pub fn create(prefix: &str) -> Self {
        let name = format!("{prefix}-{}", std::process::id());
        kubectl_ok(&["create", "namespace", &name], None);
        TestNamespace(name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        kubectl(&["delete", "namespace", &self.0, "--wait=false"], None);
    }
}

/// A loopback port free now, below the kernel's ephemeral range; each call starts where the
/// last one stopped, so a process is not handed a port twice before it went through them all.
/// A load opens thousands of client connections, and a port the kernel handed out as free
/// (port 0) is soon some connection's source port, so a member started on it a moment later
/// could not listen (chaos seed 1008; `make bench` starting etcd 3.6).
pub fn free_port() -> anyhow::Result<u16> {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    const LOW: u16 = 20_000;
    const HIGH: u16 = 32_000;
    let seed = (std::process::id() % u32::from(HIGH - LOW)) as u16;
    for _ in LOW..HIGH {
        let offset =
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed).wrapping_add(seed) % (HIGH - LOW);
        let port = LOW + offset;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port in {LOW}..{HIGH}")
}

pub mod chaos;
pub mod cluster_services;
pub mod kubelet;
pub mod load;
pub mod s3;
pub mod scenario;
