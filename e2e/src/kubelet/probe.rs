//! Startup, liveness and readiness probes: the threshold state machine and the three probe
//! kinds (httpGet and tcpSocket from the host to the pod IP, exec through podman).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Startup,
    Liveness,
    Readiness,
}

/// One probe of one running container.
#[derive(Debug, Clone)]
pub struct Tracker {
    pub kind: Kind,
    initial_delay: Duration,
    period: Duration,
    pub timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
    successes: u32,
    failures: u32,
    /// The current verdict: what the kubelet acts on.
    pub ok: bool,
    next: Option<Instant>,
}

impl Tracker {
    pub fn new(kind: Kind, probe: &Probe, container_started: Instant) -> Tracker {
        let secs = |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
        // Liveness and startup must not fail a container before their first failure count;
        // readiness starts out not ready.
        let ok = kind == Kind::Liveness;
        let initial_delay = secs(probe.initial_delay_seconds, 0);
        Tracker {
            kind,
            initial_delay,
            period: secs(probe.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
            // Liveness and startup require exactly one success (API validation).
            success_threshold: if kind == Kind::Readiness {
                probe.success_threshold.unwrap_or(1).max(1) as u32
            } else {
                1
            },
            failure_threshold: probe.failure_threshold.unwrap_or(3).max(1) as u32,
            successes: 0,
            failures: 0,
            ok,
            next: Some(container_started + initial_delay),
        }
    }

    /// Takes over a verdict known from before (an adopted container keeps its readiness
    /// until a probe says otherwise).
    pub fn assume(&mut self, ok: bool) {
        self.ok = ok;
    }

    /// Whether a probe is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.next.is_some_and(|t| now >= t)
    }

    /// Records one probe outcome at `now`; returns true when the verdict changed.
    pub fn observe(&mut self, success: bool, now: Instant) -> bool {
        self.next = Some(now + self.period);
        if success {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.ok && self.successes >= self.success_threshold {
                self.ok = true;
                return true;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.ok && self.failures >= self.failure_threshold {
                self.ok = false;
                return true;
            }
            // A startup probe that never succeeded fails the container at the threshold.
            if !self.ok && self.kind == Kind::Startup && self.failures >= self.failure_threshold {
                self.failures = 0;
                return true;
            }
        }
        false
    }

    /// A startup probe that has exhausted its failures reports it once through `observe`;
    /// this says whether that last change means "kill the container".
    pub fn failed_hard(&self) -> bool {
        self.kind == Kind::Startup && !self.ok
    }

    pub fn initial_delay(&self) -> Duration {
        self.initial_delay
    }
}

/// The numeric port a probe names (`IntOrString` against the container's named ports).
pub fn resolve_port(port: &IntOrString, container: &Container) -> Result<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).context("probe port out of range"),
        IntOrString::String(name) => {
            if let Ok(n) = name.parse::<u16>() {
                return Ok(n);
            }
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port as u16)
                .with_context(|| format!("no container port named {name}"))
        }
    }
}

/// What a probe needs besides its spec.
pub struct Target<'a> {
    pub pod_ip: &'a str,
    pub container: &'a Container,
    pub container_id: &'a str,
}

/// Runs one probe; Ok(true) on success, Ok(false) on a failure the probe reports (a refused
/// connection, a bad status), Err for a probe that cannot be run at all (also a failure).
pub async fn run(probe: &Probe, target: &Target<'_>, timeout: Duration) -> Result<bool> {
    let fut = async {
        if let Some(http) = &probe.http_get {
            let port = resolve_port(&http.port, target.container)?;
            if http.scheme.as_deref().is_some_and(|s| !s.eq_ignore_ascii_case("HTTP")) {
                bail!("only scheme HTTP is supported");
            }
            let host = http.host.clone().unwrap_or_else(|| target.pod_ip.to_owned());
            let path = http.path.clone().unwrap_or_else(|| "/".to_owned());
            let headers: Vec<(String, String)> =
                http.http_headers.iter().flatten().map(|h| (h.name.clone(), h.value.clone())).collect();
            http_get(&host, port, &path, &headers).await
        } else if let Some(tcp) = &probe.tcp_socket {
            let port = resolve_port(&tcp.port, target.container)?;
            let host = tcp.host.clone().unwrap_or_else(|| target.pod_ip.to_owned());
            Ok(TcpStream::connect((host.as_str(), port)).await.is_ok())
        } else if let Some(exec) = &probe.exec {
            let cmd = exec.command.clone().unwrap_or_default();
            let status = super::podman::podman()
                .arg("exec")
                .arg(target.container_id)
                .args(&cmd)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await?;
            Ok(status.success())
        } else {
            bail!("probe has no handler")
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Ok(false),
    }
}

/// A bare HTTP/1.1 GET; success is a status in 200..400 (as the kubelet's prober).
async fn http_get(host: &str, port: u16, path: &str, headers: &[(String, String)]) -> Result<bool> {
    let Ok(mut stream) = TcpStream::connect((host, port)).await else {
        return Ok(false);
    };
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.34\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    if stream.write_all(req.as_bytes()).await.is_err() {
        return Ok(false);
    }
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    // The status line is all that matters.
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 4096 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Ok(parse_status(&buf).is_some_and(|code| (200..400).contains(&code)))
}

fn parse_status(response: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(response).ok()?.lines().next()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, HTTPGetAction};

    fn probe(success: i32, failure: i32) -> Probe {
        Probe {
            success_threshold: Some(success),
            failure_threshold: Some(failure),
            period_seconds: Some(5),
            initial_delay_seconds: Some(2),
            ..Probe::default()
        }
    }

    #[test]
    fn readiness_needs_consecutive_successes_and_failures() {
        let t0 = Instant::now();
        let mut t = Tracker::new(Kind::Readiness, &probe(2, 3), t0);
        assert!(!t.ok);
        assert!(!t.due(t0));
        assert!(t.due(t0 + Duration::from_secs(2)));
        assert!(!t.observe(true, t0));
        assert!(!t.due(t0 + Duration::from_secs(4)));
        assert!(t.observe(true, t0), "second success flips to ready");
        assert!(t.ok);
        assert!(!t.observe(false, t0));
        assert!(!t.observe(false, t0));
        assert!(!t.observe(true, t0), "a success resets the failure count");
        assert!(!t.observe(false, t0));
        assert!(!t.observe(false, t0));
        assert!(t.observe(false, t0), "third consecutive failure flips to not ready");
        assert!(!t.ok);
    }

    #[test]
    fn liveness_starts_alive_and_dies_at_the_threshold() {
        let t0 = Instant::now();
        let mut t = Tracker::new(Kind::Liveness, &probe(1, 2), t0);
        assert!(t.ok);
        assert!(!t.observe(false, t0));
        assert!(t.observe(false, t0));
        assert!(!t.ok);
    }

    #[test]
    fn startup_succeeds_once_or_fails_hard() {
        let t0 = Instant::now();
        let mut t = Tracker::new(Kind::Startup, &probe(1, 2), t0);
        assert!(!t.ok);
        assert!(!t.observe(false, t0));
        assert!(t.observe(false, t0));
        assert!(t.failed_hard());
        let mut t = Tracker::new(Kind::Startup, &probe(1, 2), t0);
        assert!(t.observe(true, t0));
        assert!(t.ok && !t.failed_hard());
    }

    #[test]
    fn named_and_numeric_ports() {
        let c = Container {
            name: "c".into(),
            ports: Some(vec![ContainerPort {
                name: Some("metrics".into()),
                container_port: 2381,
                ..ContainerPort::default()
            }]),
            ..Container::default()
        };
        assert_eq!(resolve_port(&IntOrString::String("metrics".into()), &c).unwrap(), 2381);
        assert_eq!(resolve_port(&IntOrString::Int(80), &c).unwrap(), 80);
        assert_eq!(resolve_port(&IntOrString::String("8080".into()), &c).unwrap(), 8080);
        assert!(resolve_port(&IntOrString::String("nope".into()), &c).is_err());
    }

    #[test]
    fn status_line_parsing() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 503 Service Unavailable\r\n"), Some(503));
        assert_eq!(parse_status(b"garbage"), None);
    }

    #[tokio::test]
    async fn http_probe_against_a_local_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            for code in ["200 OK", "500 Internal Server Error"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                assert!(std::str::from_utf8(&buf[..n]).unwrap().starts_with("GET /readyz HTTP/1.1"));
                s.write_all(format!("HTTP/1.1 {code}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
            }
        });
        let c = Container { name: "c".into(), ..Container::default() };
        let p = Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/readyz".into()),
                port: IntOrString::Int(port as i32),
                ..HTTPGetAction::default()
            }),
            ..Probe::default()
        };
        let target = Target { pod_ip: "127.0.0.1", container: &c, container_id: "" };
        assert!(run(&p, &target, Duration::from_secs(5)).await.unwrap());
        assert!(!run(&p, &target, Duration::from_secs(5)).await.unwrap());
        server.await.unwrap();
    }
}
