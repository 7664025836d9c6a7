//! Helpers for scenario tests that drive a real Kubernetes cluster through `kubectl`.
//! The tests are `#[ignore]`d so that `make test` (no cluster here) skips them;
//! `make e2e` runs them against whatever KUBECONFIG points at (a kind cluster works).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

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
