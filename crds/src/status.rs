use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition types, per the Kubernetes API conventions (positive polarity except the
/// two that name a problem, which are what alerts key on).
pub mod condition {
    /// A leader is known and a quorum of voters is healthy: reads and writes are served.
    pub const AVAILABLE: &str = "Available";
    /// The operator is moving the cluster towards its spec (creating, scaling, restoring).
    pub const PROGRESSING: &str = "Progressing";
    /// Something is wrong but the cluster serves (a member down, an invalid spec refused).
    pub const DEGRADED: &str = "Degraded";
    /// Fewer than a quorum of voters are healthy: writes are not possible.
    pub const QUORUM_LOST: &str = "QuorumLost";
    /// Losing any single zone leaves a quorum of voters.
    pub const ZONE_FAULT_TOLERANT: &str = "ZoneFaultTolerant";
    /// The last scheduled backup succeeded.
    pub const BACKUP_SUCCEEDED: &str = "BackupSucceeded";

    pub const ALL: [&str; 6] =
        [AVAILABLE, PROGRESSING, DEGRADED, QUORUM_LOST, ZONE_FAULT_TOLERANT, BACKUP_SUCCEEDED];
}

/// Observed state, written only by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConsensusClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// One-word summary of the cluster's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Members that exist (pods), for the scale subresource.
    #[serde(default)]
    pub replicas: i32,
    /// Members that are ready and part of the Raft configuration.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of member pods, for the scale subresource (`kubectl scale`, HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Raft members as the leader reports them, joined with what their pods say.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
    /// Name of the current leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Raft cluster id (hex), stable for the cluster's lifetime; changes only on restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// `spec.version` once every member runs the template that carries it: during a rolling
    /// update, the version the update started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Available, Progressing, Degraded, QuorumLost, ZoneFaultTolerant, BackupSucceeded.
    // A map keyed by type under server-side apply: each writer (the planner, backups) owns
    // the conditions it writes, instead of the whole list going to whoever applied last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The newest successful backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<BackupRecord>,
    /// When the next scheduled backup is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_backup: Option<Time>,
    /// The schedule's slot the last scheduled backup was started for: each slot is started
    /// once, also across operator restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scheduled_backup: Option<Time>,
    /// A recovery from quorum loss (or a bootstrap from a backup) under way: where it comes
    /// from, kept here so an operator that stops half-way resumes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoveryRecord>,
    /// The last recovery from quorum loss that finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recovery: Option<RecoveryRecord>,
}

/// A recovery from quorum loss: the cluster made again, under a new cluster id, from one
/// member's data or a backup, then grown back to its declared size; or a new cluster's
/// first start from a backup (`spec.bootstrap.fromBackup`), the same way.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryRecord {
    /// Survivor (a member's own data) or Backup.
    pub source: RecoverySource,
    /// The member whose data it came from, or the backup's location.
    pub from: String,
    /// For a survivor, its applied Raft index when it was chosen (the highest of the
    /// members that answered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_index: Option<i64>,
    /// The cluster id it replaced (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_cluster_id: Option<String>,
    /// The `--initial-cluster-token` of the new cluster, from which its id follows.
    pub cluster_token: String,
    /// When the quorum was lost; absent for a cluster made from a backup when it first
    /// started (`spec.bootstrap.fromBackup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum_lost: Option<Time>,
    /// When the recovery started.
    pub started: Time,
    /// When the cluster was back at its declared size with a quorum; absent while under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<Time>,
    /// What may be lost: writes a survivor had not applied when the quorum went, or
    /// everything after the backup.
    pub lost_writes: String,
    /// The `consensus.dev/recover` request it was started by; absent when
    /// `spec.recovery.autoRestore` started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<Time>,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoverySource {
    Survivor,
    Backup,
}

/// Summary of the cluster's state, shown by `kubectl get cc`.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Resources created, members not yet up.
    Pending,
    /// Members up, first leader not yet elected.
    Bootstrapping,
    /// At the declared size with a leader.
    Running,
    /// A membership change is in flight.
    Scaling,
    /// Members are restarted one at a time onto a changed template (version, image,
    /// resources), followers first, each once the one before has caught up.
    Updating,
    /// Serving, but below the declared health (a member down, an invalid spec refused).
    Degraded,
    /// No quorum: writes impossible.
    QuorumLost,
    /// Being rebuilt from a backup.
    Restoring,
}

/// One Raft member.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Member name (the pod name on Kubernetes).
    pub name: String,
    /// Raft member id in hex, as etcdctl prints it.
    pub id: String,
    /// Leader, Follower or Learner.
    pub role: MemberRole,
    /// Zone of the member's node, from the zone topology label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The member answers, its pod is ready and it knows the leader.
    pub healthy: bool,
    /// It has applied the leader's log to within 100 entries, the margin learners are
    /// promoted within; absent when it or the leader reported no index.
    // Not the index itself: it moves with every write, and a status that changes with
    // every write is written, and wakes its watchers, with every write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caught_up: Option<bool>,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberRole {
    Leader,
    Follower,
    Learner,
}

/// A snapshot that was written, its checksum checked.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupRecord {
    /// The backup's name: the object `<name>.snapshot` beside its manifest `<name>.json`.
    pub name: String,
    /// When the snapshot was taken.
    pub time: Time,
    /// Where it was written (`s3://bucket/key`, or `file:///path` on a volume).
    pub location: String,
    /// Key-value store revision the snapshot holds.
    pub revision: i64,
    /// Size in bytes.
    pub size_bytes: i64,
    /// SHA-256 of the snapshot file, hex.
    pub sha256: String,
    /// Read back from where it is stored, restored into a scratch member and found to hash
    /// (HashKV at its revision) as the cluster did when it was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
}
