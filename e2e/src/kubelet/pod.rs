//! One pod's worker: sandbox, volumes, init then app containers, restarts with back-off,
//! probes, status patches, graceful termination and the final delete.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Container, ContainerStatus, Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use tokio::sync::watch;

use super::Kubelet;
use super::env::{self, PodFacts};
use super::podman::{self, Mount, NODE_LABEL, POD_UID_LABEL, parse_run_name};
use super::probe::{self, Kind, Tracker};
use super::restart::{self, Policy};
use super::sandbox;
use super::status::{self, Record, Run, Terminated};
use super::volumes::{self, PodVolumes};

const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
const MAX_MESSAGE_BYTES: usize = 4096;
const FALLBACK_LOG_LINES: usize = 80;
const FALLBACK_LOG_BYTES: usize = 2048;

/// One container as the worker runs it.
struct Ctr {
    spec: Container,
    record: Record,
    /// The podman id of the current run.
    id: Option<String>,
    started: Option<Instant>,
    /// Runs started so far (the next run's number); restartCount is runs - 1.
    runs: i32,
    crashes: u32,
    next_start: Option<Instant>,
    probes: Vec<(Tracker, k8s_openapi::api::core::v1::Probe)>,
    log: Option<PathBuf>,
    /// Events already sent for the current attempt (no repeats every second).
    said: HashSet<String>,
    done: bool,
    /// The kubelet itself stopped the current run (a failed probe): its SIGKILL is no OOM.
    stopped_by_us: bool,
    /// The current run's first process (pid, start time), watched through /proc.
    process: Option<(i64, u64)>,
}

impl Ctr {
    fn new(spec: &Container, previous: Option<&ContainerStatus>) -> Ctr {
        let image = spec.image.clone().unwrap_or_default();
        let mut record = Record::new(&spec.name, &image);
        let mut runs = 0;
        // A pod this node ran before its kubelet restarted: its containers were removed, so
        // the next run is a restart, and what was known of the last run stays lastState.
        if let Some(p) = previous {
            let state = p.state.as_ref();
            let last = state
                .and_then(|s| s.terminated.as_ref())
                .or(p.last_state.as_ref().and_then(|s| s.terminated.as_ref()));
            let ran = state.is_some_and(|s| s.running.is_some() || s.terminated.is_some()) || last.is_some();
            if ran {
                runs = p.restart_count + 1;
                record.restart_count = p.restart_count;
                record.last = last.map(|t| Terminated {
                    container_id: t
                        .container_id
                        .clone()
                        .unwrap_or_default()
                        .trim_start_matches("podman://")
                        .to_owned(),
                    exit_code: t.exit_code,
                    reason: t.reason.clone().unwrap_or_default(),
                    message: t.message.clone(),
                    started_at: t.started_at.as_ref().map(|t| t.0),
                    finished_at: t.finished_at.as_ref().map(|t| t.0),
                });
            }
        }
        Ctr {
            spec: spec.clone(),
            record,
            id: None,
            started: None,
            runs,
            crashes: 0,
            next_start: None,
            probes: Vec::new(),
            log: None,
            said: HashSet::new(),
            done: false,
            stopped_by_us: false,
            process: None,
        }
    }
}

struct Worker {
    k: Arc<Kubelet>,
    uid: String,
    ns: String,
    name: String,
    pod_dir: PathBuf,
    logs_dir: PathBuf,
    ip: Option<Ipv4Addr>,
    sandbox_ready: bool,
    volumes: Option<PodVolumes>,
    init: Vec<Ctr>,
    containers: Vec<Ctr>,
    init_done: bool,
    policy: Policy,
    start_time: Timestamp,
    last_status: Option<serde_json::Value>,
    /// The pod reached Succeeded or Failed: nothing runs any more.
    finished: bool,
    said: HashSet<String>,
}

/// Runs the pod whose latest version `rx` carries (None: it is gone from the API).
pub async fn run(k: Arc<Kubelet>, mut rx: watch::Receiver<Option<Pod>>) {
    let Some(pod) = rx.borrow().clone() else { return };
    let mut w = Worker::new(k, &pod);
    if let Err(e) = w.adopt(&pod).await {
        tracing::warn!(pod = %w.name, ns = %w.ns, error = %format!("{e:#}"), "adopting containers failed");
        // A run of a previous kubelet left beside a new one would share the pod's volumes
        // (two members on one data directory): nothing starts until they are all gone.
        let mut delay = Duration::from_millis(500);
        while let Err(e) = podman::remove_labelled(POD_UID_LABEL, &w.uid).await {
            tracing::warn!(pod = %w.name, ns = %w.ns, error = %format!("{e:#}"), "removing previous runs");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }
    loop {
        let pod = rx.borrow_and_update().clone();
        let Some(pod) = pod else {
            tracing::info!(pod = %w.name, ns = %w.ns, "pod gone from the API: tearing down");
            w.terminate(Duration::ZERO).await;
            w.teardown(true).await;
            return;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            let grace = pod
                .metadata
                .deletion_grace_period_seconds
                .or(pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
                .unwrap_or(30)
                .max(0) as u64;
            tracing::info!(pod = %w.name, ns = %w.ns, grace, "pod deleted: stopping its containers");
            w.terminate(Duration::from_secs(grace)).await;
            w.teardown(true).await;
            w.finalize(&pod).await;
            return;
        }
        if let Err(e) = w.sync(&pod).await {
            tracing::warn!(pod = %w.name, ns = %w.ns, error = %format!("{e:#}"), "pod sync");
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() {
                // The manager dropped us: the kubelet is exiting; containers stay (or are
                // removed by the manager when asked to).
                return;
            },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

impl Worker {
    fn new(k: Arc<Kubelet>, pod: &Pod) -> Worker {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let pod_dir = k.node_dir.join("pods").join(&uid);
        let logs_dir = k.node_dir.join("logs").join(format!("{ns}_{name}_{uid}"));
        let spec = pod.spec.clone().unwrap_or_default();
        let st = pod.status.as_ref();
        let prev = |list: Option<&Vec<ContainerStatus>>, n: &str| {
            list.and_then(|l| l.iter().find(|s| s.name == n)).cloned()
        };
        let init = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| Ctr::new(c, prev(st.and_then(|s| s.init_container_statuses.as_ref()), &c.name).as_ref()))
            .collect::<Vec<_>>();
        let containers = spec
            .containers
            .iter()
            .map(|c| Ctr::new(c, prev(st.and_then(|s| s.container_statuses.as_ref()), &c.name).as_ref()))
            .collect();
        let initialized = st
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Initialized" && c.status == "True"));
        let terminal = st.and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed");
        k.logs.register(&ns, &name, &logs_dir);
        Worker {
            k,
            uid,
            ns,
            name,
            pod_dir,
            logs_dir,
            ip: None,
            sandbox_ready: false,
            volumes: None,
            init_done: init.is_empty() || initialized,
            init,
            containers,
            policy: Policy::parse(spec.restart_policy.as_deref()),
            start_time: st.and_then(|s| s.start_time.as_ref()).map(|t| t.0).unwrap_or_else(Timestamp::now),
            last_status: None,
            finished: terminal,
            said: HashSet::new(),
        }
    }

    /// Takes over the containers a previous kubelet run left for this pod (same sandbox, same
    /// runs), so a kubelet restart does not restart them. Anything that does not fit (no
    /// sandbox, init containers unfinished, a volume that cannot be prepared) is removed and
    /// the pod starts afresh.
    async fn adopt(&mut self, pod: &Pod) -> Result<()> {
        let ids = podman::list_labelled(POD_UID_LABEL, &self.uid).await?;
        if ids.is_empty() {
            return Ok(());
        }
        let address = self.k.store.snapshot().addresses.get(&self.uid).copied();
        let fits = !self.finished && self.init_done && address.is_some() && sandbox::exists(&self.uid);
        let volumes =
            if fits { volumes::prepare(&self.k.client, pod, &self.pod_dir).await.ok() } else { None };
        let Some(volumes) = volumes else {
            tracing::info!(pod = %self.name, ns = %self.ns, "removing containers a previous kubelet left");
            podman::remove_labelled(POD_UID_LABEL, &self.uid).await?;
            return Ok(());
        };
        let mut found = Vec::new();
        for id in ids {
            if let Some(f) = podman::inspect_found(&id).await? {
                found.push(f);
            }
        }
        let previous = pod.status.as_ref().and_then(|s| s.container_statuses.clone()).unwrap_or_default();
        let mut keep = HashSet::new();
        for c in self.containers.iter_mut() {
            let Some(newest) = found
                .iter()
                .filter_map(|f| {
                    parse_run_name(&f.name).filter(|(n, _)| *n == c.spec.name).map(|(_, run)| (run, f))
                })
                .max_by_key(|(run, _)| *run)
            else {
                continue;
            };
            let (run, f) = newest;
            keep.insert(f.id.clone());
            let prev = previous.iter().find(|p| p.name == c.spec.name);
            c.id = Some(f.id.clone());
            c.runs = run + 1;
            c.record.restart_count = run;
            c.record.image = podman::qualify_image(c.spec.image.as_deref().unwrap_or_default());
            c.record.image_id = prev.map(|p| p.image_id.clone()).unwrap_or_default();
            let started_at = f.state.started_at.parse::<Timestamp>().unwrap_or_else(|_| Timestamp::now());
            c.record.state = Run::Running { container_id: f.id.clone(), started_at };
            let now = Instant::now();
            c.started = Some(now);
            c.process = podman::process_start_time(f.state.pid).map(|t| (f.state.pid, t));
            let log = super::logs::log_file(&self.logs_dir, &c.spec.name, run);
            self.k.logs.set_live(&log, true);
            c.log = Some(log);
            let was_ready = prev.is_some_and(|p| p.ready);
            let was_started = prev.and_then(|p| p.started).unwrap_or(false);
            c.record.ready = c.spec.readiness_probe.is_none() || was_ready;
            c.record.started = c.spec.startup_probe.is_none() || was_started;
            c.probes.clear();
            let kinds = [
                (Kind::Startup, &c.spec.startup_probe),
                (Kind::Liveness, &c.spec.liveness_probe),
                (Kind::Readiness, &c.spec.readiness_probe),
            ];
            for (kind, spec) in kinds {
                if let Some(p) = spec {
                    let mut t = Tracker::new(kind, p, now);
                    match kind {
                        Kind::Startup => t.assume(was_started),
                        Kind::Readiness => t.assume(was_ready),
                        Kind::Liveness => {}
                    }
                    c.probes.push((t, p.clone()));
                }
            }
            // An adopted container that exited meanwhile goes through the usual exit path.
        }
        for f in &found {
            if !keep.contains(&f.id) {
                let _ = podman::remove(&f.id).await;
            }
        }
        self.ip = address;
        self.volumes = Some(volumes);
        self.sandbox_ready = true;
        tracing::info!(pod = %self.name, ns = %self.ns, containers = keep.len(), "adopted the containers a previous kubelet left");
        Ok(())
    }

    async fn sync(&mut self, pod: &Pod) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        if !self.sandbox_ready
            && let Err(e) = self.make_sandbox(pod).await
        {
            let msg = format!("{e:#}");
            self.event(pod, None, "Warning", "FailedCreatePodSandBox", &msg).await;
            self.push_status(pod).await?;
            // Volumes not ready yet (claim binding) are retried every second.
            return Err(e);
        }
        if let Some(v) = self.volumes.as_mut()
            && v.refresh_at.is_some_and(|t| Instant::now() >= t)
            && let Err(e) = volumes::refresh(&self.k.client, pod, v).await
        {
            tracing::warn!(pod = %self.name, error = %format!("{e:#}"), "refreshing volumes");
        }
        if !self.init_done {
            self.sync_init(pod).await;
        }
        if self.init_done {
            for i in 0..self.containers.len() {
                self.sync_container(pod, i, false).await;
            }
            self.run_probes(pod).await;
        }
        self.push_status(pod).await?;
        let phase =
            status::phase(self.policy, self.init_done, &records(&self.init), &records(&self.containers));
        if phase == "Succeeded" || phase == "Failed" {
            tracing::info!(pod = %self.name, ns = %self.ns, phase, "pod finished");
            self.finished = true;
            self.teardown(false).await;
        }
        Ok(())
    }

    async fn make_sandbox(&mut self, pod: &Pod) -> Result<()> {
        let ip = match self.ip {
            Some(ip) => ip,
            None => {
                let n = self.k.node_number;
                let uid = self.uid.clone();
                let ip = self.k.store.update(|s| {
                    if let Some(ip) = s.addresses.get(&uid) {
                        return Some(*ip);
                    }
                    let ip = sandbox::allocate(n, &s.addresses, s.cursor)?;
                    s.addresses.insert(uid.clone(), ip);
                    let last = ip.octets()[3];
                    s.cursor = if last >= 254 { 2 } else { last + 1 };
                    Some(ip)
                })?;
                let ip = ip.context("no free pod address on this node")?;
                self.ip = Some(ip);
                ip
            }
        };
        std::fs::create_dir_all(&self.pod_dir)?;
        std::fs::create_dir_all(&self.logs_dir)?;
        let spec = pod.spec.as_ref().context("pod without spec")?;
        let hostname: String =
            spec.hostname.clone().unwrap_or_else(|| self.name.clone()).chars().take(63).collect();
        let domain = &self.k.args.cluster_domain;
        let aliases: Vec<(String, Vec<String>)> = spec
            .host_aliases
            .iter()
            .flatten()
            .map(|a| (a.ip.clone(), a.hostnames.clone().unwrap_or_default()))
            .collect();
        std::fs::write(
            self.pod_dir.join("hosts"),
            sandbox::hosts_file(
                &ip.to_string(),
                &hostname,
                spec.subdomain.as_deref(),
                &self.ns,
                domain,
                &aliases,
            ),
        )?;
        let dns = spec.dns_config.as_ref();
        let searches: Vec<String> = dns.and_then(|d| d.searches.clone()).unwrap_or_default();
        let options: Vec<String> = dns
            .and_then(|d| d.options.clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|o| o.name.map(|n| o.value.map_or(n.clone(), |v| format!("{n}:{v}"))))
            .collect();
        let nameserver = match (
            spec.dns_policy.as_deref(),
            dns.and_then(|d| d.nameservers.as_ref()).and_then(|n| n.first()),
        ) {
            (Some("None"), Some(ns)) => ns.clone(),
            _ => self.k.args.cluster_dns.clone(),
        };
        std::fs::write(
            self.pod_dir.join("resolv.conf"),
            sandbox::resolv_conf(&nameserver, &self.ns, domain, &searches, &options),
        )?;
        let vols = volumes::prepare(&self.k.client, pod, &self.pod_dir).await.context("mounting volumes")?;
        self.volumes = Some(vols);
        sandbox::create(&self.uid, ip, &self.k.args.bridge).await.context("network namespace")?;
        self.sandbox_ready = true;
        tracing::info!(pod = %self.name, ns = %self.ns, %ip, "sandbox ready");
        Ok(())
    }

    /// Init containers one at a time; a failure restarts it (or fails the pod with Never).
    async fn sync_init(&mut self, pod: &Pod) {
        let Some(i) = self.init.iter().position(|c| !c.done) else {
            self.init_done = true;
            return;
        };
        self.sync_container(pod, i, true).await;
        if let Run::Terminated(t) = &self.init[i].record.state
            && t.exit_code == 0
        {
            self.init[i].done = true;
            if self.init.iter().all(|c| c.done) {
                self.init_done = true;
            }
        }
    }

    fn ctr(&mut self, i: usize, init: bool) -> &mut Ctr {
        if init { &mut self.init[i] } else { &mut self.containers[i] }
    }

    /// Starts, watches and restarts one container.
    async fn sync_container(&mut self, pod: &Pod, i: usize, init: bool) {
        let policy = if init && self.policy != Policy::Never { Policy::OnFailure } else { self.policy };
        let now = Instant::now();
        let id = self.ctr(i, init).id.clone();
        match id {
            None => {
                let c = self.ctr(i, init);
                if c.done || matches!(c.record.state, Run::Terminated(_)) {
                    return;
                }
                if c.next_start.is_some_and(|t| now < t) {
                    return;
                }
                if let Err(e) = self.start(pod, i, init).await {
                    let container = self.ctr(i, init).spec.name.clone();
                    tracing::warn!(pod = %self.name, %container, error = %format!("{e:#}"), "starting container");
                }
            }
            Some(id) => {
                if let Some((pid, start)) = self.ctr(i, init).process
                    && podman::process_start_time(pid) == Some(start)
                {
                    return;
                }
                let inspected = podman::inspect(&id).await;
                let state = match inspected {
                    Ok(Some((_, s))) => s,
                    Ok(None) => {
                        // Removed behind our back: count it as a crash.
                        podman::State {
                            status: "exited".into(),
                            running: false,
                            oom_killed: false,
                            exit_code: 137,
                            started_at: String::new(),
                            finished_at: String::new(),
                            error: "container vanished".into(),
                            pid: 0,
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "podman inspect");
                        return;
                    }
                };
                if state.running
                    || state.status == "running"
                    || state.status == "created"
                    || state.status == "configured"
                {
                    let c = self.ctr(i, init);
                    c.process = podman::process_start_time(state.pid).map(|t| (state.pid, t));
                    return;
                }
                self.exited(pod, i, init, &id, state, policy).await;
            }
        }
    }

    async fn exited(
        &mut self,
        pod: &Pod,
        i: usize,
        init: bool,
        id: &str,
        state: podman::State,
        policy: Policy,
    ) {
        let k = self.k.clone();
        let pod_dir = self.pod_dir.clone();
        let who = format!("{}_{}({})", self.name, self.ns, self.uid);
        let c = self.ctr(i, init);
        let run = c.runs - 1;
        let term_file = term_path(&pod_dir, &c.spec.name, run);
        let mut message = read_limited(&term_file, MAX_MESSAGE_BYTES);
        if message.is_empty()
            && state.exit_code != 0
            && c.spec.termination_message_policy.as_deref() == Some("FallbackToLogsOnError")
            && let Some(log) = &c.log
        {
            message = log_tail(log, FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES);
        }
        // Under gVisor podman does not learn of OOM kills: a SIGKILL (137) the kubelet did not
        // send, to a container with a memory limit, is taken for one.
        let limited = c
            .spec
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .is_some_and(|l| l.contains_key("memory"));
        let oom = state.oom_killed || (state.exit_code == 137 && limited && !c.stopped_by_us);
        c.stopped_by_us = false;
        let parse = |s: &str| s.parse::<Timestamp>().ok();
        let started_at = parse(&state.started_at).or(match &c.record.state {
            Run::Running { started_at, .. } => Some(*started_at),
            _ => None,
        });
        let finished_at = parse(&state.finished_at)
            .filter(|f| started_at.is_none_or(|s| *f >= s))
            .or(Some(Timestamp::now()));
        let term = Terminated {
            container_id: id.to_owned(),
            exit_code: state.exit_code,
            reason: status::exit_reason(state.exit_code, oom).to_owned(),
            message: (!message.is_empty()).then_some(message),
            started_at,
            finished_at,
        };
        if let Some(log) = &c.log {
            k.logs.set_live(log, false);
        }
        let ran = c.started.map(|s| s.elapsed()).unwrap_or_default();
        c.id = None;
        c.process = None;
        c.started = None;
        c.probes.clear();
        c.said.clear();
        tracing::info!(pod = %who, container = %c.spec.name, exit = state.exit_code, "container exited");
        if let Err(e) = podman::remove(id).await {
            tracing::warn!(error = %format!("{e:#}"), "removing exited container");
        }
        let c = self.ctr(i, init);
        if restart::should_restart(policy, term.exit_code) {
            c.crashes = restart::next_crash_count(c.crashes, ran);
            let delay = restart::backoff(c.crashes);
            c.record.last = Some(term);
            c.next_start = Some(Instant::now() + delay);
            if delay.is_zero() {
                c.record.state = Run::Waiting { reason: "ContainerCreating".into(), message: None };
            } else {
                let msg = format!(
                    "back-off {}s restarting failed container={} pod={who}",
                    delay.as_secs(),
                    c.spec.name
                );
                c.record.state = Run::Waiting { reason: "CrashLoopBackOff".into(), message: Some(msg) };
                let name = c.spec.name.clone();
                self.event(pod, Some(&name), "Warning", "BackOff", "Back-off restarting failed container")
                    .await;
            }
        } else {
            if init && term.exit_code == 0 {
                c.done = true;
            }
            c.record.state = Run::Terminated(term);
        }
    }

    /// Starts the next run of a container (checks, env, mounts, podman run).
    async fn start(&mut self, pod: &Pod, i: usize, init: bool) -> Result<()> {
        let k = self.k.clone();
        let spec = self.ctr(i, init).spec.clone();
        let image = podman::qualify_image(spec.image.as_deref().unwrap_or_default());
        let retry = Duration::from_secs(10);
        if !podman::image_exists(&image).await? {
            let msg = format!(
                "Container image \"{}\" is not present with pull policy of Never",
                spec.image.as_deref().unwrap_or_default()
            );
            return self.refuse(pod, i, init, "ErrImageNeverPull", &msg, retry).await;
        }
        let (image_id, image_user) = podman::image_info(&image).await?;
        let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
        let id = podman::identity(pod_sc, spec.security_context.as_ref());
        if id.run_as_non_root {
            let refusal = match id.uid {
                Some(0) => Some("container's runAsUser breaks non-root policy".to_owned()),
                Some(_) => None,
                None => match podman::image_user_is_root(&image_user) {
                    Ok(true) => Some("container has runAsNonRoot and image will run as root".to_owned()),
                    Ok(false) => None,
                    Err(e) => Some(e.to_string()),
                },
            };
            if let Some(r) = refusal {
                let msg = format!(
                    "{r} (pod: \"{}_{}({})\", container: {})",
                    self.name, self.ns, self.uid, spec.name
                );
                return self.refuse(pod, i, init, "CreateContainerConfigError", &msg, retry).await;
            }
        }
        let ip = self.ip.map(|i| i.to_string()).unwrap_or_default();
        let facts = PodFacts {
            pod,
            pod_ip: &ip,
            host_ip: &k.args.gateway,
            api_host: &k.args.api_server_host,
            api_port: k.args.api_server_port,
        };
        let resolved = match volumes::fetch_sources(&k.client, pod)
            .await
            .and_then(|s| env::resolve(&spec, &facts, &s))
        {
            Ok(e) => e,
            Err(e) => {
                return self
                    .refuse(pod, i, init, "CreateContainerConfigError", &format!("{e:#}"), retry)
                    .await;
            }
        };
        let command = spec.command.as_ref().map(|c| env::expand_all(c, &resolved));
        let args = spec.args.as_ref().map(|a| env::expand_all(a, &resolved));
        let mut mounts = match self.volumes.as_ref().map(|v| volumes::mounts(pod, &spec, v)).transpose() {
            Ok(m) => m.unwrap_or_default(),
            Err(e) => {
                return self
                    .refuse(pod, i, init, "CreateContainerConfigError", &format!("{e:#}"), retry)
                    .await;
            }
        };
        mounts.push(Mount {
            host: self.pod_dir.join("hosts"),
            container: "/etc/hosts".into(),
            read_only: false,
        });
        mounts.push(Mount {
            host: self.pod_dir.join("resolv.conf"),
            container: "/etc/resolv.conf".into(),
            read_only: false,
        });
        let c = self.ctr(i, init);
        let run = c.runs;
        let term = term_path(&self.pod_dir, &spec.name, run);
        std::fs::create_dir_all(term.parent().expect("has parent"))?;
        std::fs::write(&term, b"")?;
        {
            use std::os::unix::fs::PermissionsExt;
            // Any container user may write its termination message.
            std::fs::set_permissions(&term, std::fs::Permissions::from_mode(0o666))?;
        }
        let term_target =
            spec.termination_message_path.clone().unwrap_or_else(|| DEFAULT_TERMINATION_MESSAGE_PATH.into());
        mounts.push(Mount { host: term, container: term_target, read_only: false });
        let log = super::logs::log_file(&self.logs_dir, &spec.name, run);
        std::fs::create_dir_all(log.parent().expect("has parent"))?;
        let _ = std::fs::remove_file(&log);
        let short_uid: String = self.uid.chars().take(8).collect();
        let name = format!("k8s_{}_{}_{}_{}_{}", spec.name, self.name, self.ns, short_uid, run);
        // A leftover with this name (a crash between run and record) would block the run.
        let _ = podman::remove(&name).await;
        let netns = sandbox::netns_path(&self.uid);
        let hostname: String = pod
            .spec
            .as_ref()
            .and_then(|s| s.hostname.clone())
            .unwrap_or_else(|| self.name.clone())
            .chars()
            .take(63)
            .collect();
        let input = podman::RunInput {
            name: &name,
            image: &image,
            netns: &netns,
            hostname: &hostname,
            labels: vec![
                (NODE_LABEL.into(), k.args.name.clone()),
                (POD_UID_LABEL.into(), self.uid.clone()),
                ("io.kubernetes.pod.name".into(), self.name.clone()),
                ("io.kubernetes.pod.namespace".into(), self.ns.clone()),
                ("io.kubernetes.container.name".into(), spec.name.clone()),
            ],
            env: &resolved,
            command,
            args,
            mounts: &mounts,
            pod_security: pod_sc,
            log_path: &log.to_string_lossy(),
            ulimit_nofile: k.nofile,
            ulimit_nproc: k.nproc,
        };
        let argv = podman::run_args(&spec, &input);
        let c = self.ctr(i, init);
        c.runs += 1;
        c.record.restart_count = (c.runs - 1).max(0);
        c.record.image = image.clone();
        c.record.image_id = image_id;
        match podman::run(&argv).await {
            Ok(id) => {
                let c = self.ctr(i, init);
                let now = Instant::now();
                c.id = Some(id.clone());
                c.started = Some(now);
                c.next_start = None;
                c.record.state = Run::Running { container_id: id, started_at: Timestamp::now() };
                c.record.ready = spec.readiness_probe.is_none();
                c.record.started = spec.startup_probe.is_none();
                c.probes.clear();
                if !init {
                    if let Some(p) = &spec.startup_probe {
                        c.probes.push((Tracker::new(Kind::Startup, p, now), p.clone()));
                    }
                    if let Some(p) = &spec.liveness_probe {
                        c.probes.push((Tracker::new(Kind::Liveness, p, now), p.clone()));
                    }
                    if let Some(p) = &spec.readiness_probe {
                        c.probes.push((Tracker::new(Kind::Readiness, p, now), p.clone()));
                    }
                }
                c.log = Some(log.clone());
                k.logs.set_live(&log, true);
                tracing::info!(pod = %self.name, ns = %self.ns, container = %spec.name, run, "container started");
                self.event(
                    pod,
                    Some(&spec.name),
                    "Normal",
                    "Pulled",
                    &format!("Container image \"{image}\" already present on machine"),
                )
                .await;
                self.event(
                    pod,
                    Some(&spec.name),
                    "Normal",
                    "Started",
                    &format!("Started container {}", spec.name),
                )
                .await;
                Ok(())
            }
            Err(e) => {
                let msg = format!("{e:#}");
                let c = self.ctr(i, init);
                c.crashes += 1;
                let delay = restart::backoff(c.crashes).max(Duration::from_secs(1));
                c.next_start = Some(Instant::now() + delay);
                c.record.state =
                    Run::Waiting { reason: "RunContainerError".into(), message: Some(msg.clone()) };
                self.event(pod, Some(&spec.name), "Warning", "Failed", &format!("Error: {msg}")).await;
                bail!(msg)
            }
        }
    }

    /// The container cannot be created now: Waiting with `reason`, a Warning event, retry.
    async fn refuse(
        &mut self,
        pod: &Pod,
        i: usize,
        init: bool,
        reason: &str,
        msg: &str,
        retry: Duration,
    ) -> Result<()> {
        let c = self.ctr(i, init);
        c.record.state = Run::Waiting { reason: reason.into(), message: Some(msg.into()) };
        c.next_start = Some(Instant::now() + retry);
        let name = c.spec.name.clone();
        self.event(pod, Some(&name), "Warning", "Failed", &format!("Error: {msg}")).await;
        if reason == "ErrImageNeverPull" {
            self.event(pod, Some(&name), "Warning", "ErrImageNeverPull", msg).await;
        }
        Ok(())
    }

    async fn run_probes(&mut self, pod: &Pod) {
        let ip = self.ip.map(|i| i.to_string()).unwrap_or_default();
        for i in 0..self.containers.len() {
            let now = Instant::now();
            let c = &mut self.containers[i];
            let Some(id) = c.id.clone() else { continue };
            let startup_ok = c.probes.iter().all(|(t, _)| t.kind != Kind::Startup || t.ok);
            let mut kill: Option<String> = None;
            let mut events: Vec<(String, String)> = Vec::new();
            for (tracker, spec) in c.probes.iter_mut() {
                // Startup gates the others.
                if tracker.kind != Kind::Startup && !startup_ok {
                    continue;
                }
                if tracker.kind == Kind::Startup && tracker.ok {
                    continue;
                }
                if !tracker.due(now) {
                    continue;
                }
                let target = probe::Target { pod_ip: &ip, container: &c.spec, container_id: &id };
                let ok = matches!(probe::run(spec, &target, tracker.timeout).await, Ok(true));
                let kind = tracker.kind;
                if !ok && kind != Kind::Startup {
                    events.push(("Unhealthy".into(), format!("{kind:?} probe failed")));
                }
                if tracker.observe(ok, Instant::now()) {
                    match kind {
                        Kind::Startup if tracker.failed_hard() => kill = Some("failed startup probe".into()),
                        Kind::Startup => c.record.started = true,
                        Kind::Liveness if !tracker.ok => kill = Some("failed liveness probe".into()),
                        Kind::Liveness => {}
                        Kind::Readiness => c.record.ready = tracker.ok,
                    }
                }
            }
            let name = c.spec.name.clone();
            for (reason, msg) in events {
                self.event(pod, Some(&name), "Warning", &reason, &msg).await;
            }
            if let Some(why) = kill {
                let grace =
                    pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(30).max(0)
                        as u64;
                self.event(
                    pod,
                    Some(&name),
                    "Normal",
                    "Killing",
                    &format!("Container {name} {why}, will be restarted"),
                )
                .await;
                self.containers[i].stopped_by_us = true;
                if let Err(e) = podman::stop(&id, Duration::from_secs(grace)).await {
                    tracing::warn!(error = %format!("{e:#}"), "stopping unhealthy container");
                }
                // The next sync sees it exited and applies the restart policy.
            }
        }
    }

    async fn push_status(&mut self, pod: &Pod) -> Result<()> {
        let ip = self.ip.map(|i| i.to_string());
        let st = status::pod_status(&status::Input {
            pod,
            policy: self.policy,
            pod_ip: ip.as_deref(),
            host_ip: &self.k.args.gateway,
            start_time: self.start_time,
            sandbox_ready: self.sandbox_ready,
            init_done: self.init_done,
            init: &records(&self.init),
            containers: &records(&self.containers),
            now: Timestamp::now(),
        });
        let value = serde_json::to_value(&st)?;
        if self.last_status.as_ref() == Some(&value) {
            return Ok(());
        }
        // The uid makes the patch fail on a successor pod of the same name.
        let patch = serde_json::json!({ "metadata": { "uid": self.uid }, "status": value });
        let api: Api<Pod> = Api::namespaced(self.k.client.clone(), &self.ns);
        api.patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .context("patching pod status")?;
        self.last_status = Some(value);
        Ok(())
    }

    /// SIGTERM to every container, SIGKILL after `grace`.
    async fn terminate(&mut self, grace: Duration) {
        let ids: Vec<String> =
            self.init.iter().chain(self.containers.iter()).filter_map(|c| c.id.clone()).collect();
        let stops = ids.iter().map(|id| podman::stop(id, grace));
        for r in futures::future::join_all(stops).await {
            if let Err(e) = r {
                tracing::warn!(error = %format!("{e:#}"), "stopping container");
            }
        }
        for c in self.init.iter_mut().chain(self.containers.iter_mut()) {
            if let Some(log) = &c.log {
                self.k.logs.set_live(log, false);
            }
            c.id = None;
        }
        // Whatever else carries this pod's uid (a run the worker lost track of).
        let _ = podman::remove_labelled(POD_UID_LABEL, &self.uid).await;
        for id in ids {
            let _ = podman::remove(&id).await;
        }
    }

    /// Network namespace, address and the pod's private dirs (never PVC data); `all` also
    /// drops the logs (the pod is gone).
    async fn teardown(&mut self, all: bool) {
        let _ = podman::remove_labelled(POD_UID_LABEL, &self.uid).await;
        sandbox::destroy(&self.uid).await;
        self.sandbox_ready = false;
        let uid = self.uid.clone();
        if let Err(e) = self.k.store.update(|s| s.addresses.remove(&uid)) {
            tracing::warn!(error = %format!("{e:#}"), "releasing pod address");
        }
        // emptyDir and written volumes live under the pod dir; claims point elsewhere.
        let _ = std::fs::remove_dir_all(&self.pod_dir);
        if all {
            self.k.logs.unregister(&self.ns, &self.name, &self.logs_dir);
            let _ = std::fs::remove_dir_all(&self.logs_dir);
        }
    }

    /// Deletes the pod for good (grace 0, only this uid), so its controller can replace it.
    async fn finalize(&mut self, pod: &Pod) {
        let api: Api<Pod> = Api::namespaced(self.k.client.clone(), &self.ns);
        let dp = DeleteParams::default()
            .grace_period(0)
            .preconditions(Preconditions { uid: pod.metadata.uid.clone(), resource_version: None });
        for attempt in 0..5 {
            match api.delete(&self.name, &dp).await {
                Ok(_) => {
                    tracing::info!(pod = %self.name, ns = %self.ns, "pod deleted");
                    return;
                }
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => return,
                Err(e) => {
                    tracing::warn!(pod = %self.name, attempt, error = %e, "deleting pod");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// A Kubernetes Event about the pod (or one of its containers); each one once per run.
    async fn event(&mut self, pod: &Pod, container: Option<&str>, type_: &str, reason: &str, message: &str) {
        let key = format!("{reason}|{message}");
        let said = match container
            .and_then(|n| self.init.iter_mut().chain(self.containers.iter_mut()).find(|c| c.spec.name == n))
        {
            Some(c) => &mut c.said,
            None => &mut self.said,
        };
        if !said.insert(key) {
            return;
        }
        let now = Timestamp::now();
        let field_path = container.map(|n| {
            let init =
                pod.spec.as_ref().is_some_and(|s| s.init_containers.iter().flatten().any(|c| c.name == n));
            if init { format!("spec.initContainers{{{n}}}") } else { format!("spec.containers{{{n}}}") }
        });
        let ev = Event {
            metadata: ObjectMeta {
                name: Some(format!("{}.{:x}", self.name, now.as_nanosecond() as u64)),
                namespace: Some(self.ns.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(self.name.clone()),
                namespace: Some(self.ns.clone()),
                uid: Some(self.uid.clone()),
                field_path,
                ..ObjectReference::default()
            },
            type_: Some(type_.into()),
            reason: Some(reason.into()),
            message: Some(message.into()),
            count: Some(1),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: None::<MicroTime>,
            reporting_component: Some("kubelet".into()),
            reporting_instance: Some(self.k.args.name.clone()),
            source: Some(EventSource {
                component: Some("kubelet".into()),
                host: Some(self.k.args.name.clone()),
            }),
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(self.k.client.clone(), &self.ns);
        if let Err(e) = api.create(&PostParams::default(), &ev).await {
            tracing::debug!(error = %e, "recording event");
        }
        if type_ == "Warning" {
            tracing::warn!(pod = %self.name, ns = %self.ns, reason, message, "event");
        }
    }
}

fn records(cs: &[Ctr]) -> Vec<Record> {
    cs.iter().map(|c| c.record.clone()).collect()
}

fn term_path(pod_dir: &std::path::Path, container: &str, run: i32) -> PathBuf {
    pod_dir.join("containers").join(container).join(format!("{run}.termination-log"))
}

fn read_limited(path: &std::path::Path, limit: usize) -> String {
    let mut data = std::fs::read(path).unwrap_or_default();
    data.truncate(limit);
    String::from_utf8_lossy(&data).into_owned()
}

/// The end of a container's log for FallbackToLogsOnError.
pub fn log_tail(log: &std::path::Path, lines: usize, bytes: usize) -> String {
    let data = std::fs::read(log).unwrap_or_default();
    let text =
        super::logs::tail(super::logs::decode(&String::from_utf8_lossy(&data), false), Some(lines)).concat();
    let start = text.len().saturating_sub(bytes);
    let start = (start..text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
    text[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateRunning, ContainerStateTerminated};

    #[test]
    fn a_container_the_previous_kubelet_ran_counts_as_restarted() {
        let spec = Container { name: "c".into(), image: Some("i:1".into()), ..Container::default() };
        assert_eq!(Ctr::new(&spec, None).runs, 0);
        let running = ContainerStatus {
            name: "c".into(),
            restart_count: 2,
            state: Some(ContainerState {
                running: Some(ContainerStateRunning { started_at: None }),
                ..ContainerState::default()
            }),
            last_state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: 78,
                    message: Some("lost".into()),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        };
        let c = Ctr::new(&spec, Some(&running));
        assert_eq!(c.runs, 3, "the next run is the fourth");
        assert_eq!(c.record.restart_count, 2);
        assert_eq!(
            c.record.last.as_ref().map(|t| (t.exit_code, t.message.clone())),
            Some((78, Some("lost".into())))
        );
        let never_ran = ContainerStatus { name: "c".into(), ..ContainerStatus::default() };
        assert_eq!(Ctr::new(&spec, Some(&never_ran)).runs, 0);
    }

    #[test]
    fn fallback_message_is_the_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("0.log");
        let body: String = (0..100).map(|i| format!("2026-12-01T00:00:00Z stderr F line {i}\n")).collect();
        std::fs::write(&f, body).unwrap();
        let t = log_tail(&f, 80, 2048);
        assert!(t.starts_with("line 20\n") && t.ends_with("line 99\n"));
        let t = log_tail(&f, 80, 14);
        assert_eq!(t, "ne 98\nline 99\n");
    }
}
