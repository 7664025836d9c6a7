//! `DIR/<name>.status.yaml`: the resource's status as the Kubernetes platform would write
//! it, for people and tests to read while local mode runs.

use std::path::{Path, PathBuf};

use consensus_crds::ConsensusClusterStatus;

use super::LocalError;
use super::atomic::write_atomically;

pub fn path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join(format!("{name}.status.yaml"))
}

/// The status an earlier run wrote, so transition times and the cluster's history (has it
/// ever had a leader?) survive a restart of the operator. Unreadable means none.
pub fn read(path: &Path) -> Option<ConsensusClusterStatus> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_yaml::from_str(&text)
        .inspect_err(|err| tracing::warn!("ignoring unreadable {}: {err}", path.display()))
        .ok()
}

pub fn write(path: &Path, status: &ConsensusClusterStatus) -> Result<(), LocalError> {
    let yaml = serde_yaml::to_string(status).map_err(LocalError::SerializeStatus)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| LocalError::State {
            action: "creating",
            path: dir.to_owned(),
            source,
        })?;
    }
    write_atomically(path, yaml.as_bytes()).map_err(|source| LocalError::State {
        action: "writing",
        path: path.to_owned(),
        source,
    })
}
