//! Recovery from quorum loss on this machine (`plan::recovery` decides it): the source's
//! snapshot in `DIR/<cluster>.recovery/<token>.snapshot` (a survivor's taken with
//! `consensus-node backup` from the member itself, which answers without a quorum; a
//! backup's fetched with `consensus-node fetch`, its sha256 checked against its manifest,
//! from a directory or from S3 with the operator's own credentials), then the workload made
//! again from it. Each part is skipped when already done, so an operator that stops
//! half-way finishes it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use consensus_crds::{ConsensusClusterSpec, RecoveryRecord, RecoverySource};

use super::LocalError;
use super::workload::Workload;
use crate::fault;
use crate::resources::backup::{fetch_source, s3_flags};

/// A survivor's snapshot of a store our size takes seconds; past this it is not coming.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(120);

pub struct Recovery {
    dir: PathBuf,
    node_bin: PathBuf,
}

impl Recovery {
    pub fn new(state_dir: &Path, cluster: &str, node_bin: &Path) -> Self {
        Self { dir: state_dir.join(format!("{cluster}.recovery")), node_bin: node_bin.to_owned() }
    }

    /// Carries out `record` on `workload`; nothing when the workload runs under its token
    /// already (restored, the new cluster starting).
    pub async fn recover(
        &self,
        workload: &mut Workload,
        record: &RecoveryRecord,
        spec: &ConsensusClusterSpec,
    ) -> Result<(), LocalError> {
        if workload.cluster_token() == Some(record.cluster_token.as_str()) {
            return Ok(());
        }
        let snapshot = match record.source {
            RecoverySource::Survivor => self.survivor_snapshot(workload, record).await?,
            RecoverySource::Backup => self.fetched_backup(record, spec).await?,
        };
        fault::reached("RecoverSnapshot");
        let keep = self.dir.join(&record.cluster_token).join("replaced");
        workload.recreate_from(&snapshot, &record.cluster_token, &keep).await
    }

    /// The backup the record names as a snapshot file, fetched once (`consensus-node fetch`
    /// renames it into place only whole and as its manifest says). An S3 backup is read
    /// with the cluster's `spec.backup.destination.s3` settings for its bucket.
    async fn fetched_backup(
        &self,
        record: &RecoveryRecord,
        spec: &ConsensusClusterSpec,
    ) -> Result<PathBuf, LocalError> {
        let snapshot = self.dir.join(format!("{}.snapshot", record.cluster_token));
        if snapshot.exists() {
            return Ok(snapshot);
        }
        let unusable = |why: &str| LocalError::Recovery(format!("the backup {}: {why}", record.from));
        let (source, from) = fetch_source(&record.from);
        let mut args = vec!["fetch".to_owned()];
        args.extend(source);
        if let Some(bucket) = from.strip_prefix("s3://").map(|rest| rest.split('/').next().unwrap_or(rest)) {
            let s3 =
                spec.backup.as_ref().and_then(|b| b.destination.s3.as_ref()).filter(|s3| s3.bucket == bucket);
            let s3 = s3.ok_or_else(|| {
                unusable("its bucket is not spec.backup.destination's, so how to reach it is unknown")
            })?;
            args.extend(s3_flags(s3));
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| LocalError::State {
            action: "creating",
            path: self.dir.clone(),
            source,
        })?;
        let run = tokio::process::Command::new(&self.node_bin)
            .args(&args)
            .arg("--to")
            .arg(&snapshot)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        self.finished(run, &format!("fetching {}", record.from)).await?;
        Ok(snapshot)
    }

    /// Waits for a `consensus-node` run of ours, at most `SNAPSHOT_DEADLINE`; its error, as
    /// it said it, when it failed.
    async fn finished(
        &self,
        run: impl std::future::Future<Output = std::io::Result<std::process::Output>>,
        what: &str,
    ) -> Result<(), LocalError> {
        let output = tokio::time::timeout(SNAPSHOT_DEADLINE, run)
            .await
            .map_err(|_| {
                LocalError::Recovery(format!("{what}: not done within {} s", SNAPSHOT_DEADLINE.as_secs()))
            })?
            .map_err(|source| {
                LocalError::Recovery(format!("{what}: consensus-node did not start: {source}"))
            })?;
        if output.status.success() {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&output.stderr);
        Err(LocalError::Recovery(format!("{what}: {}", said.lines().last().unwrap_or("no error given"))))
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
        self.finished(run, &format!("taking a snapshot of {}", record.from)).await?;
        Ok(snapshot)
    }
}
