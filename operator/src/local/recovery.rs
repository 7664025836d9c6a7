//! Recovery from quorum loss on this machine (`plan::recovery` decides it): the source's
//! snapshot in `DIR/<cluster>.recovery/<token>.snapshot` (a survivor's taken with
//! `consensus-node backup` from the member itself, which answers without a quorum; a
//! backup's is the stored object), then the workload made again from it. Each part is
//! skipped when already done, so an operator that stops half-way finishes it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use consensus_crds::{RecoveryRecord, RecoverySource};

use super::LocalError;
use super::act::die_at;
use super::workload::Workload;

/// A survivor's snapshot of a store our size takes seconds; past this it is not coming.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(120);

pub struct Recovery {
    dir: PathBuf,
    node_bin: PathBuf,
    /// `CONSENSUS_OPERATOR_FAULT_AFTER`: the part of a recovery after which this run dies,
    /// for tests (`RecoverSnapshot`, `RecoverReplace`, `RecoverRestore`).
    fault_after: Option<String>,
}

impl Recovery {
    pub fn new(state_dir: &Path, cluster: &str, node_bin: &Path, fault_after: Option<String>) -> Self {
        Self {
            dir: state_dir.join(format!("{cluster}.recovery")),
            node_bin: node_bin.to_owned(),
            fault_after,
        }
    }

    fn fault_point(&self, point: &str) {
        if self.fault_after.as_deref() == Some(point) {
            die_at(point);
        }
    }

    /// Carries out `record` on `workload`; nothing when the workload runs under its token
    /// already (restored, the new cluster starting).
    pub async fn recover(&self, workload: &mut Workload, record: &RecoveryRecord) -> Result<(), LocalError> {
        if workload.cluster_token() == Some(record.cluster_token.as_str()) {
            return Ok(());
        }
        let snapshot = match record.source {
            RecoverySource::Survivor => self.survivor_snapshot(workload, record).await?,
            RecoverySource::Backup => match record.from.strip_prefix("file://") {
                Some(path) => PathBuf::from(path),
                None => {
                    return Err(LocalError::Recovery(format!(
                        "restoring the backup {} is not built yet for this platform (only file:// \
                         backups are); restore it by hand with consensus-node restore",
                        record.from
                    )));
                }
            },
        };
        self.fault_point("RecoverSnapshot");
        let keep = self.dir.join(&record.cluster_token).join("replaced");
        workload.recreate_from(&snapshot, &record.cluster_token, &keep, |point| self.fault_point(point)).await
    }

    /// The survivor's applied state as a snapshot file, taken once.
    async fn survivor_snapshot(
        &self,
        workload: &Workload,
        record: &RecoveryRecord,
    ) -> Result<PathBuf, LocalError> {
        let snapshot = self.dir.join(format!("{}.snapshot", record.cluster_token));
        if self.dir.join(format!("{}.json", record.cluster_token)).exists() {
            // The manifest is written after the snapshot: both are there.
            return Ok(snapshot);
        }
        let member = workload.members().iter().find(|m| m.name == record.from).ok_or_else(|| {
            LocalError::Recovery(format!("the survivor {} is not among the members", record.from))
        })?;
        std::fs::create_dir_all(&self.dir).map_err(|source| LocalError::State {
            action: "creating",
            path: self.dir.clone(),
            source,
        })?;
        let to = format!("file://{}", self.dir.display());
        let run = tokio::process::Command::new(&self.node_bin)
            .args([
                "backup",
                "--endpoint",
                &member.client_url(),
                "--to",
                &to,
                "--name",
                &record.cluster_token,
            ])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(SNAPSHOT_DEADLINE, run)
            .await
            .map_err(|_| {
                LocalError::Recovery(format!(
                    "no snapshot from {} within {} s",
                    record.from,
                    SNAPSHOT_DEADLINE.as_secs()
                ))
            })?
            .map_err(|source| LocalError::SpawnBackup { backup: record.cluster_token.clone(), source })?;
        if !output.status.success() {
            return Err(LocalError::Recovery(format!(
                "taking a snapshot of {}: {}",
                record.from,
                String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or("no error given")
            )));
        }
        Ok(snapshot)
    }
}
