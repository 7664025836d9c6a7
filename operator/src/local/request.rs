//! `consensus-operator backup`: a backup now of a cluster `consensus-operator local` runs,
//! the local counterpart of creating a ConsensusBackup. It writes a request file for the
//! running operator to carry out (the same planner steps as a scheduled backup), then
//! follows the request's status until it has ended.

use std::path::{Path, PathBuf};
use std::time::Duration;

use consensus_crds::{
    BackupDestination, BackupPhase, ConsensusBackupStatus, VolumeDestination, parse_duration,
};
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

use super::LocalError;
use super::atomic::write_atomically;
use super::backups::{RequestFile, requests_dir};
use super::status_file;

const POLL: Duration = Duration::from_millis(200);

#[derive(clap::Args, Debug)]
pub struct BackupArgs {
    /// The cluster, its `metadata.name`.
    #[arg(long)]
    pub cluster: String,
    /// The state directory `consensus-operator local` runs the cluster in.
    #[arg(long, default_value = ".state/local")]
    pub state_dir: PathBuf,
    /// The request's name (lowercase letters, digits and '-'); `backup-<time>` by default.
    #[arg(long)]
    pub name: Option<String>,
    /// Store it in the directory `STATE_DIR/volumes/CLAIM/` instead of the cluster's
    /// `spec.backup.destination`.
    #[arg(long)]
    pub claim: Option<String>,
    /// How long to follow it before giving up waiting (the request stays queued).
    #[arg(long, default_value = "30m", value_parser = |s: &str| parse_duration(s).map_err(|e| e.to_string()))]
    pub timeout: Duration,
}

/// Asks for the backup and follows it; the final status, or an error when it failed or
/// nothing answered in time.
pub async fn run(args: BackupArgs) -> Result<ConsensusBackupStatus, LocalError> {
    let now = Timestamp::now();
    let name = args.name.clone().unwrap_or_else(|| format!("backup-{}", now.strftime("%Y%m%d%H%M%S")));
    check_name(&name)?;
    if !status_file::path(&args.state_dir, &args.cluster).exists() {
        return Err(LocalError::Request(format!(
            "no cluster {} in {}: start it with consensus-operator local -f FILE --state-dir {}",
            args.cluster,
            args.state_dir.display(),
            args.state_dir.display()
        )));
    }
    let dir = requests_dir(&args.state_dir, &args.cluster);
    let state = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| LocalError::State { action, path, source }
    };
    std::fs::create_dir_all(&dir).map_err(state("creating", &dir))?;
    let request_path = dir.join(format!("{name}.json"));
    if request_path.exists() {
        return Err(LocalError::Request(format!(
            "a request named {name} exists already ({}); pick another --name",
            request_path.display()
        )));
    }
    // The status an earlier request of this name left (its request file removed): not this
    // request's.
    let status_path = dir.join(format!("{name}.status.json"));
    match std::fs::remove_file(&status_path) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(LocalError::State { action: "removing", path: status_path, source }),
    }
    let destination = args.claim.map(|claim_name| BackupDestination {
        s3: None,
        volume: Some(VolumeDestination { claim_name, path: "/".to_owned() }),
    });
    let request = RequestFile { created: now, destination };
    let json = serde_json::to_vec_pretty(&request)
        .map_err(|err| LocalError::DamagedState { path: request_path.clone(), reason: err.to_string() })?;
    write_atomically(&request_path, &json).map_err(state("writing", &request_path))?;
    eprintln!("asked for backup {name} of {} ({})", args.cluster, request_path.display());

    let deadline = Instant::now() + args.timeout;
    let mut said = None;
    loop {
        let status: Option<ConsensusBackupStatus> =
            std::fs::read_to_string(&status_path).ok().and_then(|text| serde_json::from_str(&text).ok());
        if let Some(status) = status {
            let now_saying = (status.phase, status.message.clone());
            if said.as_ref() != Some(&now_saying) {
                eprintln!(
                    "{}: {}",
                    status.phase.map_or_else(|| "-".to_owned(), |p| format!("{p:?}")),
                    status.message.as_deref().unwrap_or("")
                );
                said = Some(now_saying);
            }
            match status.phase {
                Some(BackupPhase::Succeeded) => return Ok(status),
                Some(BackupPhase::Failed) => {
                    return Err(LocalError::Request(format!(
                        "backup {name} failed: {}",
                        status.message.unwrap_or_default()
                    )));
                }
                _ => {}
            }
        }
        if Instant::now() >= deadline {
            let why = if said.is_none() {
                format!(
                    "no operator took it up: is consensus-operator local running with --state-dir {}?",
                    args.state_dir.display()
                )
            } else {
                "it has not ended".to_owned()
            };
            return Err(LocalError::Request(format!(
                "backup {name}: {why} (after {} s); the request stays queued, remove {} to cancel it",
                args.timeout.as_secs(),
                request_path.display()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A name fit for a file, a Job name's part and an object store key: the rules of a
/// Kubernetes object name, kept short.
fn check_name(name: &str) -> Result<(), LocalError> {
    let fits = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if fits {
        Ok(())
    } else {
        Err(LocalError::Request(format!(
            "{name:?} is not a request name: lowercase letters, digits and '-', at most 63, not starting or \
             ending with '-'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_names_are_kubernetes_object_names() {
        for good in ["before-upgrade", "b1", "backup-20261201220000"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Before", "a/b", "-a", "a-", "../x", &"a".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
