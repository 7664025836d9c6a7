//! Backup runs as processes: `consensus-node backup`, one at a time, each with a record, a
//! log and the report it writes in `DIR/<cluster>.backups/`, so a run outlives an operator
//! that stops and the next one still sees how it ended. A volume destination (claim `C`) is
//! the directory `DIR/volumes/C/`; an S3 one takes its credentials from the operator's own
//! environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), there being no Secrets here.
//!
//! A backup asked for now is a request file, `DIR/<cluster>.backups/requests/<name>.json`
//! (what `consensus-operator backup` writes), its status beside it in `<name>.status.json`:
//! the local ConsensusBackup.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use consensus_crds::{BackupDestination, ConsensusBackupStatus};
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use super::LocalError;
use super::atomic::write_atomically;
use super::process::{runs_with_arg, signal_group};
use crate::plan::backup::{BackupRequest, BackupRun, RUN_DEADLINE, RunOutcome};
use crate::resources::backup::{BackupJob, command, destination_url, outcome};

/// A backup asked for now, as `consensus-operator backup` writes it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RequestFile {
    pub created: Timestamp,
    /// Its own destination; the cluster's when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<BackupDestination>,
}

/// Where the requests of `cluster` are.
pub fn requests_dir(state_dir: &Path, cluster: &str) -> PathBuf {
    state_dir.join(format!("{cluster}.backups")).join("requests")
}

/// What is known of a run before it ends.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
struct RunRecord {
    backup: String,
    slot: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request: Option<String>,
    attempt: u32,
    member: String,
    started: Timestamp,
    /// Written once the process runs: a record without one is a run the operator stopped
    /// while starting it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
}

impl RunRecord {
    fn id(&self) -> String {
        run_id(&self.backup, self.attempt)
    }
}

fn run_id(backup: &str, attempt: u32) -> String {
    format!("{backup}-{attempt}")
}

pub struct Backups {
    dir: PathBuf,
    requests: PathBuf,
    volumes: PathBuf,
    node_bin: PathBuf,
    /// Runs this operator started, reaped when they exit.
    children: BTreeMap<String, Child>,
}

impl Backups {
    /// Where `destination` keeps the backups of `cluster` here: a claim `C` is the directory
    /// `<state-dir>/volumes/C/`.
    pub fn destination_url(&self, destination: &BackupDestination, cluster: &str) -> String {
        match &destination.volume {
            Some(volume) => {
                destination_url(destination, "default", cluster, &self.volumes.join(&volume.claim_name))
            }
            None => destination_url(destination, "default", cluster, &self.volumes),
        }
    }

    pub fn new(state_dir: &Path, cluster: &str, node_bin: &Path) -> Self {
        Self {
            dir: state_dir.join(format!("{cluster}.backups")),
            requests: requests_dir(state_dir, cluster),
            volumes: state_dir.join("volumes"),
            node_bin: node_bin.to_owned(),
            children: BTreeMap::new(),
        }
    }

    fn file(&self, id: &str, kind: &str) -> PathBuf {
        self.dir.join(format!("{id}.{kind}"))
    }

    fn records(&self) -> Vec<RunRecord> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut records: Vec<RunRecord> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".run.json"))
            .filter_map(|e| read_json(&e.path()))
            .collect();
        records.sort_by_key(|r| (r.slot, r.attempt));
        records
    }

    /// Whether the run's process still runs: a child of ours, or one an earlier operator
    /// started (its command line names the run's report file).
    fn running(&mut self, record: &RunRecord) -> bool {
        let id = record.id();
        if let Some(child) = self.children.get_mut(&id) {
            if matches!(child.try_wait(), Ok(None)) {
                return true;
            }
            self.children.remove(&id);
            return false;
        }
        record.pid.is_some_and(|pid| runs_with_arg(pid, &self.file(&id, "report.json")))
    }

    /// Every run there is, with how it ended. A run past `RUN_DEADLINE` is killed here and
    /// reported as such.
    pub fn observe(&mut self, now: Timestamp) -> Vec<BackupRun> {
        let mut runs = Vec::new();
        for record in self.records() {
            let id = record.id();
            let report_path = self.file(&id, "report.json");
            let outcome = if self.running(&record) {
                let overdue =
                    now.duration_since(record.started).as_secs() > RUN_DEADLINE.as_secs_f64() as i64;
                if overdue && let Some(pid) = record.pid {
                    // The whole group: the run and the scratch member its verification started.
                    signal_group(pid, libc::SIGKILL);
                    let reason = format!("still running after {} s; stopped", RUN_DEADLINE.as_secs());
                    let report = serde_json::json!({ "failed": { "error": reason } }).to_string();
                    if let Err(err) = std::fs::write(&report_path, report) {
                        tracing::warn!("writing {}: {err}", report_path.display());
                    }
                    RunOutcome::Failed { at: now, reason }
                } else {
                    RunOutcome::Running
                }
            } else {
                // A run that left no trace of its end failed when it started: a time that
                // stays put, for the back-off to count from.
                let finished = modified(&report_path)
                    .or_else(|| modified(&self.file(&id, "log")))
                    .unwrap_or(record.started);
                match std::fs::read_to_string(&report_path) {
                    Ok(report) => outcome(&report, finished),
                    Err(_) => RunOutcome::Failed {
                        at: finished,
                        reason: match record.pid {
                            None => "the operator stopped while starting it".to_owned(),
                            Some(_) => {
                                format!("exited without a report: {}", last_line(&self.file(&id, "log")))
                            }
                        },
                    },
                }
            };
            runs.push(BackupRun {
                backup: record.backup,
                slot: record.slot,
                request: record.request,
                attempt: record.attempt,
                member: record.member,
                started: record.started,
                outcome,
            });
        }
        runs
    }

    /// The requests there are, with the status written for each; an unreadable one is
    /// skipped with a warning.
    pub fn requests(&self) -> Vec<BackupRequest> {
        let Ok(entries) = std::fs::read_dir(&self.requests) else { return Vec::new() };
        entries
            .flatten()
            .filter_map(|e| {
                let file = e.file_name().to_string_lossy().into_owned();
                let name = file.strip_suffix(".json").filter(|n| !n.ends_with(".status"))?.to_owned();
                let request: RequestFile = read_json(&e.path())?;
                let status =
                    read_json(&self.requests.join(format!("{name}.status.json"))).unwrap_or_default();
                Some(BackupRequest {
                    name,
                    created: request.created,
                    destination: request.destination,
                    status,
                })
            })
            .collect()
    }

    pub fn write_request_status(&self, name: &str, status: &ConsensusBackupStatus) -> Result<(), LocalError> {
        let path = self.requests.join(format!("{name}.status.json"));
        let json = serde_json::to_vec_pretty(status)
            .map_err(|err| LocalError::DamagedState { path: path.clone(), reason: err.to_string() })?;
        write_atomically(&path, &json).map_err(|source| LocalError::State { action: "writing", path, source })
    }

    /// Starts the run: its record first (so a run is never started unrecorded), the
    /// process, then the record with its PID. The runs `ended` (by backup name and attempt)
    /// are deleted then, as on Kubernetes: status keeps what they said, and the new run is
    /// now the latest try.
    pub fn start(
        &mut self,
        cluster: &str,
        run: &BackupJob<'_>,
        endpoint: &str,
        now: Timestamp,
        ended: &[(String, u32)],
    ) -> Result<(), LocalError> {
        let state = |action: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| LocalError::State { action, path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(state("creating", &self.dir))?;
        let mut record = RunRecord {
            backup: run.backup.to_owned(),
            slot: run.slot,
            request: run.request.map(str::to_owned),
            attempt: run.attempt,
            member: run.member.to_owned(),
            started: now,
            pid: None,
        };
        let id = record.id();
        self.write(&record)?;
        if let Some(volume) = &run.destination.volume {
            let root = self.volumes.join(&volume.claim_name);
            std::fs::create_dir_all(&root).map_err(state("creating", &root))?;
        }
        let to = self.destination_url(run.destination, cluster);
        let report = self.file(&id, "report.json");
        let log_path = self.file(&id, "log");
        let log = std::fs::File::create(&log_path).map_err(state("creating", &log_path))?;
        let stderr = log.try_clone().map_err(state("opening", &log_path))?;
        let args = command(run, endpoint, &to, &report.to_string_lossy());
        let child = Command::new(&self.node_bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            // Its own process group: a Ctrl-C meant for the operator does not cut it off.
            .process_group(0)
            .spawn()
            .map_err(|source| LocalError::SpawnBackup { backup: run.backup.to_owned(), source })?;
        record.pid = child.id();
        self.children.insert(id, child);
        self.write(&record)?;
        // Only once the new run is under way: a run that cannot start leaves the failed try
        // before it in place, to count and back off from.
        for (backup, attempt) in ended {
            let old = run_id(backup, *attempt);
            for kind in ["run.json", "report.json", "log"] {
                let _ = std::fs::remove_file(self.file(&old, kind));
            }
        }
        Ok(())
    }

    fn write(&self, record: &RunRecord) -> Result<(), LocalError> {
        let path = self.file(&record.id(), "run.json");
        let json = serde_json::to_vec_pretty(record)
            .map_err(|err| LocalError::DamagedState { path: path.clone(), reason: err.to_string() })?;
        write_atomically(&path, &json).map_err(|source| LocalError::State { action: "writing", path, source })
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text)
        .inspect_err(|err| tracing::warn!("ignoring unreadable {}: {err}", path.display()))
        .ok()
}

fn modified(path: &Path) -> Option<Timestamp> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    Timestamp::try_from(modified).ok()
}

/// The last line a run logged: its error, when it failed.
fn last_line(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("nothing logged").to_owned()
}
