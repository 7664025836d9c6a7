//! The `ConsensusBackup` API: one backup of a ConsensusCluster, taken now, its outcome in
//! its own status. The cluster's operator takes it like a scheduled one (a healthy,
//! caught-up member; never while the membership changes; verified by a restore), so a
//! backup on demand is as good as a scheduled one.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{BackupDestination, BackupRecord};

/// A request is a one-off: what it asked for is what its status reports on.
pub const IMMUTABLE_RULE: &str = "self == oldSelf";
pub const IMMUTABLE_RULE_MESSAGE: &str =
    "a ConsensusBackup's spec cannot change: create another ConsensusBackup for another backup";

/// One backup of a ConsensusCluster, taken as soon as the cluster is healthy and its
/// membership not changing.
// clippy reads two printer columns of the same type as a repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "consensus.dev",
    version = "v1alpha1",
    kind = "ConsensusBackup",
    plural = "consensusbackups",
    shortname = "cb",
    namespaced,
    status = "ConsensusBackupStatus",
    derive = "PartialEq",
    doc = "A backup of a ConsensusCluster taken on demand, its outcome in status.",
    printcolumn(name = "Cluster", type_ = "string", json_path = ".spec.clusterName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Revision", type_ = "integer", json_path = ".status.backup.revision"),
    printcolumn(name = "Location", type_ = "string", json_path = ".status.backup.location"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(IMMUTABLE_RULE).message(IMMUTABLE_RULE_MESSAGE))]
pub struct ConsensusBackupSpec {
    /// The ConsensusCluster in this namespace to back up.
    #[schemars(length(min = 1, max = 63))]
    pub cluster_name: String,

    /// Where to store it; the cluster's `spec.backup.destination` when unset. Backups in the
    /// cluster's destination count towards its `spec.backup.retention`; one kept elsewhere
    /// (another bucket, prefix or path) is never deleted by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<BackupDestination>,
}

/// What became of the request, written only by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConsensusBackupStatus {
    /// One-word summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BackupPhase>,
    /// What is happening or happened, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Tries started so far.
    #[serde(default)]
    pub attempts: u32,
    /// The member the latest try takes its snapshot from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// When the first try started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it succeeded or was given up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    /// The backup taken, once it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupRecord>,
}

impl ConsensusBackupStatus {
    /// Succeeded or Failed: nothing more is done for it.
    pub fn ended(&self) -> bool {
        matches!(self.phase, Some(BackupPhase::Succeeded | BackupPhase::Failed))
    }
}

/// Where a ConsensusBackup is, shown by `kubectl get cb`.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupPhase {
    /// Not started: waiting for the cluster (healthy, a member to take it from, no
    /// membership change or other backup under way).
    Pending,
    /// Being taken.
    Running,
    /// A try failed; another follows after a back-off.
    Retrying,
    /// Taken and verified: `status.backup`.
    Succeeded,
    /// Given up: `status.message` says why.
    Failed,
}
