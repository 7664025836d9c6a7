//! The local counterpart of the StatefulSet: a record of the members (names, ports, the
//! cluster token) kept in the state directory, and a supervisor that keeps one
//! `consensus-node` process running per member, restarting a dead one on its own data
//! directory and ports, as the kubelet restarts a pod on its volume.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::Command;
use tokio::time::Instant;

use super::LocalError;
use super::atomic::write_atomically;
use super::process::{Process, runs_with_arg};

/// How long members get to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a member that has left the cluster gets to stop: it has nothing to hand over
/// and its data is deleted next, so waiting on a clean shutdown buys nothing.
const LEAVER_STOP_GRACE: Duration = Duration::from_secs(1);
/// Longest pause between restarts of a member that keeps dying.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MemberRecord {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub metrics_port: u16,
    /// Joins the running cluster (`--initial-cluster-state existing`) instead of
    /// bootstrapping with the others: members added by scaling or replacing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub join_existing: bool,
}

impl MemberRecord {
    pub fn client_url(&self) -> String {
        loopback_url(self.client_port)
    }

    pub fn peer_url(&self) -> String {
        loopback_url(self.peer_port)
    }
}

fn loopback_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// The request threads each of `members` members gets when they share `cpus` CPUs: its
/// part of them, at least one. A member takes one thread per CPU by default, and three
/// members so on two CPUs made about a tenth fewer puts at 16 and 256 clients than with
/// one thread each (README, "Performance"). A member keeps the share it started with when
/// the cluster is scaled.
fn worker_threads(cpus: usize, members: usize) -> usize {
    (cpus / members.max(1)).max(1)
}

/// Written before any member starts: the ports are part of each member's identity in the
/// Raft membership, so they must survive restarts of members and of the operator.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
struct Record {
    initial_cluster_token: String,
    members: Vec<MemberRecord>,
    /// Ports of members added as learners (MemberAdd needs their peer URL) that do not run
    /// yet: the workload grows into them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    reserved: Vec<MemberRecord>,
}

struct Restarts {
    count: u32,
    not_before: Instant,
}

pub struct Workload {
    dir: PathBuf,
    node_bin: PathBuf,
    record: Option<Record>,
    processes: BTreeMap<String, Process>,
    restarts: BTreeMap<String, Restarts>,
}

impl Workload {
    /// The workload of cluster `name` under `state_dir`, adopting members that an earlier
    /// run of the operator left running.
    pub fn open(state_dir: &Path, name: &str, node_bin: &Path) -> Result<Self, LocalError> {
        let dir = state_dir.join(name);
        let record_path = dir.join("members.yaml");
        let record = match std::fs::read_to_string(&record_path) {
            Ok(text) => Some(serde_yaml::from_str::<Record>(&text).map_err(|err| {
                LocalError::DamagedState { path: record_path.clone(), reason: err.to_string() }
            })?),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(LocalError::State { action: "reading", path: record_path, source }),
        };
        let mut workload = Self {
            dir,
            node_bin: node_bin.to_owned(),
            record,
            processes: BTreeMap::new(),
            restarts: BTreeMap::new(),
        };
        workload.adopt();
        Ok(workload)
    }

    fn adopt(&mut self) {
        let Some(record) = &self.record else { return };
        for member in &record.members {
            let data_dir = self.data_dir(&member.name);
            let pid = std::fs::read_to_string(self.pid_file(&member.name))
                .ok()
                .and_then(|text| text.trim().parse::<u32>().ok());
            if let Some(pid) = pid.filter(|pid| runs_with_arg(*pid, &data_dir)) {
                tracing::info!(member = %member.name, pid, "adopting a member left running by an earlier run");
                let data_dir = data_dir.to_string_lossy().into_owned();
                self.processes.insert(member.name.clone(), Process::Adopted { pid, data_dir });
            }
        }
    }

    /// Member processes the workload runs, `None` before it is created.
    pub fn replicas(&self) -> Option<i32> {
        self.record.as_ref().map(|r| i32::try_from(r.members.len()).unwrap_or(i32::MAX))
    }

    pub fn members(&self) -> &[MemberRecord] {
        self.record.as_ref().map_or(&[], |r| r.members.as_slice())
    }

    pub fn pids(&self) -> Vec<(String, u32)> {
        self.processes.iter().filter_map(|(name, p)| Some((name.clone(), p.pid()?))).collect()
    }

    fn data_dir(&self, member: &str) -> PathBuf {
        self.dir.join(member)
    }

    fn pid_file(&self, member: &str) -> PathBuf {
        self.dir.join(format!("{member}.pid"))
    }

    /// Records `replicas` members of cluster `name` on free loopback ports, then starts them
    /// all with the same initial cluster, so they bootstrap together.
    /// `bootstrap`: the members found a new cluster; without, they rejoin the one their
    /// data directories hold (`--initial-cluster-state existing`).
    pub fn create(&mut self, name: &str, replicas: i32, bootstrap: bool) -> Result<(), LocalError> {
        let count = usize::try_from(replicas).unwrap_or(0);
        let ports = free_ports(count * 3).map_err(LocalError::Ports)?;
        let members: Vec<MemberRecord> = ports
            .chunks_exact(3)
            .enumerate()
            .map(|(i, p)| MemberRecord {
                name: format!("{name}-{i}"),
                client_port: p[0],
                peer_port: p[1],
                metrics_port: p[2],
                join_existing: !bootstrap,
            })
            .collect();
        // Unique per creation: member and cluster ids derive from it, so a cluster created
        // again in the same place is never mistaken for the old one.
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let record =
            Record { initial_cluster_token: format!("{name}-{nanos:x}"), members, reserved: Vec::new() };
        for member in &record.members {
            self.create_data_dir(&member.name)?;
        }
        self.save(record)?;
        self.supervise()
    }

    /// The data directory exists before a member first starts, so its absence later means
    /// the member lost its data (not that it has not written any yet).
    fn create_data_dir(&self, member: &str) -> Result<(), LocalError> {
        let path = self.data_dir(member);
        std::fs::create_dir_all(&path).map_err(|source| LocalError::State {
            action: "creating",
            path,
            source,
        })
    }

    fn save(&mut self, record: Record) -> Result<(), LocalError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| LocalError::State {
            action: "creating",
            path: self.dir.clone(),
            source,
        })?;
        let path = self.dir.join("members.yaml");
        let yaml = serde_yaml::to_string(&record)
            .map_err(|err| LocalError::DamagedState { path: path.clone(), reason: err.to_string() })?;
        write_atomically(&path, yaml.as_bytes()).map_err(|source| LocalError::State {
            action: "writing",
            path,
            source,
        })?;
        self.record = Some(record);
        Ok(())
    }

    /// Every member the operator has ports for: running ones and reserved ones.
    pub fn known(&self) -> Vec<MemberRecord> {
        self.record.as_ref().map_or_else(Vec::new, |r| r.members.iter().chain(&r.reserved).cloned().collect())
    }

    fn recorded_ports(&self) -> Vec<u16> {
        self.known().iter().flat_map(|m| [m.client_port, m.peer_port, m.metrics_port]).collect()
    }

    /// The record of member `name`, reserving ports for it when it has none yet (a member
    /// about to be added as a learner).
    pub fn reserve(&mut self, name: &str) -> Result<MemberRecord, LocalError> {
        if let Some(known) = self.known().into_iter().find(|m| m.name == name) {
            return Ok(known);
        }
        let Some(mut record) = self.record.clone() else {
            return Err(LocalError::DamagedState {
                path: self.dir.join("members.yaml"),
                reason: "no members recorded yet".to_owned(),
            });
        };
        let ports = free_ports_except(3, &self.recorded_ports()).map_err(LocalError::Ports)?;
        let member = MemberRecord {
            name: name.to_owned(),
            client_port: ports[0],
            peer_port: ports[1],
            metrics_port: ports[2],
            join_existing: true,
        };
        record.reserved.push(member.clone());
        self.save(record)?;
        Ok(member)
    }

    /// After member `name` was added (again) to the cluster: a running-record member that
    /// lost its data gets a fresh data directory and joins as the new member the cluster
    /// now lists, rather than bootstrapping.
    pub fn added(&mut self, name: &str) -> Result<(), LocalError> {
        let Some(mut record) = self.record.clone() else { return Ok(()) };
        let Some(member) = record.members.iter_mut().find(|m| m.name == name) else { return Ok(()) };
        if !member.join_existing {
            member.join_existing = true;
            self.save(record)?;
        }
        if !self.data_dir(name).exists() {
            // A fresh start: the member's restart backoff belongs to its old identity.
            self.restarts.remove(name);
            self.create_data_dir(name)?;
        }
        Ok(())
    }

    /// Grows to `replicas` members (`cluster`-0 ...) that join the running cluster, or
    /// shrinks by stopping and forgetting the members beyond it.
    pub async fn resize(&mut self, cluster: &str, replicas: i32) -> Result<(), LocalError> {
        let Some(mut record) = self.record.clone() else { return Ok(()) };
        let count = usize::try_from(replicas).unwrap_or(0);
        if record.members.len() < count {
            for ordinal in record.members.len()..count {
                let name = format!("{cluster}-{ordinal}");
                let mut member = match record.reserved.iter().position(|m| m.name == name) {
                    Some(at) => record.reserved.remove(at),
                    None => {
                        let taken: Vec<u16> = record
                            .members
                            .iter()
                            .chain(&record.reserved)
                            .flat_map(|m| [m.client_port, m.peer_port, m.metrics_port])
                            .collect();
                        let ports = free_ports_except(3, &taken).map_err(LocalError::Ports)?;
                        MemberRecord {
                            name: name.clone(),
                            client_port: ports[0],
                            peer_port: ports[1],
                            metrics_port: ports[2],
                            join_existing: true,
                        }
                    }
                };
                member.join_existing = true;
                self.create_data_dir(&name)?;
                record.members.push(member);
            }
            self.save(record)?;
            return self.supervise();
        }
        let leaving: Vec<String> = record.members.iter().skip(count).map(|m| m.name.clone()).collect();
        let mut stopping: Vec<Process> = leaving.iter().filter_map(|n| self.processes.remove(n)).collect();
        let mut refs: Vec<&mut Process> = stopping.iter_mut().collect();
        Process::stop_all(&mut refs, LEAVER_STOP_GRACE).await;
        for name in &leaving {
            let _ = std::fs::remove_file(self.pid_file(name));
            self.restarts.remove(name);
        }
        record.members.truncate(count);
        record.reserved.retain(|m| !leaving.contains(&m.name));
        self.save(record)
    }

    /// Deletes the data directory of member `name`, which must no longer run.
    pub fn delete_volume(&mut self, name: &str) -> Result<(), LocalError> {
        if self.members().iter().any(|m| m.name == name) {
            return Err(LocalError::DamagedState {
                path: self.data_dir(name),
                reason: format!("{name} is still a member of the workload; its data is not deleted"),
            });
        }
        let path = self.data_dir(name);
        match std::fs::remove_dir_all(&path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(LocalError::State { action: "deleting", path, source }),
        }
    }

    /// Names of members whose data directory exists.
    pub fn volumes(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut names: Vec<String> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                e.file_type().ok()?.is_dir().then(|| e.file_name().to_string_lossy().into_owned())
            })
            .collect();
        names.sort();
        names
    }

    /// Members of the workload whose data directory is gone.
    pub fn lost_data(&self) -> Vec<String> {
        self.members().iter().filter(|m| !self.data_dir(&m.name).exists()).map(|m| m.name.clone()).collect()
    }

    /// Starts every recorded member that is not running, backing off from one that keeps
    /// dying so a member that cannot start does not spin.
    pub fn supervise(&mut self) -> Result<(), LocalError> {
        let Some(record) = self.record.clone() else { return Ok(()) };
        let now = Instant::now();
        for member in &record.members {
            let running = self.processes.get_mut(&member.name).is_some_and(Process::is_running);
            if running {
                continue;
            }
            // Started on an empty directory it would come back as a voter that has forgotten
            // what it acknowledged; it waits until the planner has replaced it.
            if !self.data_dir(&member.name).exists() {
                self.processes.remove(&member.name);
                continue;
            }
            if let Some(restarts) = self.restarts.get(&member.name)
                && restarts.not_before > now
            {
                continue;
            }
            if self.processes.remove(&member.name).is_some() {
                tracing::warn!(member = %member.name, "member process exited; restarting it on its data directory");
            }
            let process = self.spawn(&record, member)?;
            tracing::info!(member = %member.name, pid = process.pid(), url = %member.client_url(), "started member");
            self.processes.insert(member.name.clone(), process);
            let restarts =
                self.restarts.entry(member.name.clone()).or_insert(Restarts { count: 0, not_before: now });
            let backoff = Duration::from_secs(1 << restarts.count.min(5)).min(MAX_BACKOFF);
            restarts.count += 1;
            restarts.not_before = now + backoff;
        }
        // A member that has stayed up for a while starts its backoff afresh.
        self.restarts.retain(|_, r| now < r.not_before + MAX_BACKOFF);
        Ok(())
    }

    fn spawn(&self, record: &Record, member: &MemberRecord) -> Result<Process, LocalError> {
        let spawn_error = |source| LocalError::Spawn { member: member.name.clone(), source };
        std::fs::create_dir_all(&self.dir).map_err(spawn_error)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", member.name)))
            .map_err(spawn_error)?;
        let initial_cluster: Vec<String> =
            record.members.iter().map(|m| format!("{}={}", m.name, loopback_url(m.peer_port))).collect();
        let client = member.client_url();
        let peer = loopback_url(member.peer_port);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let child = Command::new(&self.node_bin)
            .args(["--worker-threads", &worker_threads(cpus, record.members.len()).to_string()])
            .arg("run")
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(self.data_dir(&member.name))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--listen-metrics-urls", &loopback_url(member.metrics_port)])
            .args(["--initial-cluster", &initial_cluster.join(",")])
            .args(["--initial-cluster-token", &record.initial_cluster_token])
            .args(["--initial-cluster-state", if member.join_existing { "existing" } else { "new" }])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(spawn_error)?)
            .stderr(log)
            // Its own process group: Ctrl-C in the terminal reaches the operator only, which
            // then stops the members in order instead of all at once.
            .process_group(0)
            .spawn()
            .map_err(spawn_error)?;
        let process = Process::Child(child);
        if let Some(pid) = process.pid() {
            let path = self.pid_file(&member.name);
            if let Err(err) = write_atomically(&path, format!("{pid}\n").as_bytes()) {
                tracing::warn!(
                    "writing {}: {err}; a crashed operator will not find this member",
                    path.display()
                );
            }
        }
        Ok(process)
    }

    /// The `--initial-cluster-token` the members were started with.
    pub fn cluster_token(&self) -> Option<&str> {
        self.record.as_ref().map(|r| r.initial_cluster_token.as_str())
    }

    /// Makes the cluster again from `snapshot` under `token` (a recovery from quorum loss, or
    /// a new cluster's start from a backup):
    /// every member stopped, their data directories moved into `keep` (the old cluster's
    /// data, for a person to look at; never started again), the first member restored from
    /// the snapshot on its own ports and started alone. The others join again as learners,
    /// by the usual steps. Done again from the start after a crash until the record names
    /// `token`: nothing has run under it before then, so nothing of the new cluster is lost.
    /// Each part is a fault point (`crate::fault`), for tests.
    pub async fn recreate_from(
        &mut self,
        snapshot: &Path,
        token: &str,
        keep: &Path,
    ) -> Result<(), LocalError> {
        let first = match self.members().first() {
            Some(first) => first.clone(),
            // A new cluster made from a backup: created without members, and its first is
            // made here.
            None if self.record.is_some() => {
                let cluster =
                    self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                self.reserve(&format!("{cluster}-0"))?
            }
            None => {
                return Err(LocalError::Recovery(
                    "a recovery needs the members' record, and there is none".to_owned(),
                ));
            }
        };
        // Killed, not stopped: their data is set aside and never started again, and a leader
        // without a quorum would spend its whole grace trying to hand over.
        self.stop_within(Duration::ZERO).await;
        std::fs::create_dir_all(keep).map_err(|source| LocalError::State {
            action: "creating",
            path: keep.to_owned(),
            source,
        })?;
        let known: Vec<String> = self.known().into_iter().map(|m| m.name).collect();
        for name in known {
            let data = self.data_dir(&name);
            if data.exists() {
                // A second try moves a first try's restore aside too, under another name.
                let mut moved = keep.join(&name);
                for n in 1.. {
                    if !moved.exists() {
                        break;
                    }
                    moved = keep.join(format!("{name}.{n}"));
                }
                std::fs::rename(&data, &moved).map_err(|source| LocalError::State {
                    action: "moving aside",
                    path: data,
                    source,
                })?;
            }
        }
        crate::fault::reached("RecoverReplace");
        // A restore interrupted before leaves its staging directory, which a new one refuses.
        let staging = self.dir.join(format!(".{}.restoring", first.name));
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(|source| LocalError::State {
                action: "removing",
                path: staging,
                source,
            })?;
        }
        let peer = format!("{}={}", first.name, first.peer_url());
        let output = tokio::process::Command::new(&self.node_bin)
            .arg("restore")
            .arg("--snapshot")
            .arg(snapshot)
            .arg("--data-dir")
            .arg(self.data_dir(&first.name))
            .args(["--name", &first.name, "--initial-cluster", &peer, "--initial-cluster-token", token])
            .args(["--initial-advertise-peer-urls", &first.peer_url()])
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|source| LocalError::Spawn { member: first.name.clone(), source })?;
        if !output.status.success() {
            return Err(LocalError::Recovery(format!(
                "restoring {} from {}: {}",
                first.name,
                snapshot.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        crate::fault::reached("RecoverRestore");
        let member = MemberRecord { join_existing: false, ..first };
        self.restarts.clear();
        self.save(Record {
            initial_cluster_token: token.to_owned(),
            members: vec![member],
            reserved: Vec::new(),
        })?;
        self.supervise()
    }

    /// Stops every member (SIGTERM, then SIGKILL after a grace period).
    pub async fn stop(&mut self) {
        self.stop_within(STOP_GRACE).await;
    }

    async fn stop_within(&mut self, grace: Duration) {
        let mut processes: Vec<&mut Process> = self.processes.values_mut().collect();
        Process::stop_all(&mut processes, grace).await;
        for name in self.processes.keys() {
            let _ = std::fs::remove_file(self.pid_file(name));
        }
        self.processes.clear();
    }
}

/// Distinct free loopback ports, all bound at once so none is handed out twice.
fn free_ports(count: usize) -> std::io::Result<Vec<u16>> {
    free_ports_except(count, &[])
}

/// As `free_ports`, none of them in `taken`: ports recorded for members that are not
/// listening yet (reserved, or stopped) look free to the system, which may hand them out
/// again.
fn free_ports_except(count: usize, taken: &[u16]) -> std::io::Result<Vec<u16>> {
    let mut listeners = Vec::new();
    let mut ports = Vec::new();
    // Each listener stays bound until the end, so the system never repeats a port here.
    while ports.len() < count {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        if !taken.contains(&port) {
            ports.push(port);
        }
        listeners.push(listener);
        if listeners.len() > count + taken.len() + 64 {
            return Err(std::io::Error::other("no free loopback ports outside the recorded ones"));
        }
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_sharing_the_machine_divide_its_cpus() {
        assert_eq!(worker_threads(2, 3), 1);
        assert_eq!(worker_threads(8, 3), 2);
        assert_eq!(worker_threads(16, 5), 3);
        assert_eq!(worker_threads(1, 5), 1, "every member gets a thread");
    }

    #[test]
    fn ports_recorded_for_members_not_listening_are_never_handed_out_again() {
        let taken = free_ports(30).expect("ports");
        for _ in 0..20 {
            let fresh = free_ports_except(3, &taken).expect("ports");
            assert_eq!(fresh.len(), 3);
            assert!(fresh.iter().all(|p| !taken.contains(p)), "{fresh:?} repeats one of {taken:?}");
        }
    }
}
