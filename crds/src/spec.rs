use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ConsensusClusterStatus;

/// Default container image of a member: the one `make images` builds from this version
/// (tagged with the workspace version, as the images are), found in the node's local image
/// store (kind load docker-image, podman) since no registry publishes it.
pub const DEFAULT_IMAGE: &str = concat!("consensus-node:", env!("CARGO_PKG_VERSION"));
/// Default topology label that members are spread over.
pub const DEFAULT_ZONE_TOPOLOGY_KEY: &str = "topology.kubernetes.io/zone";
/// The CEL rule that keeps member counts odd and small. An even count adds a member
/// without adding fault tolerance, and more than nine makes every write wait on a
/// larger quorum for no gain in safety.
pub const REPLICAS_RULE: &str = "self >= 1 && self <= 9 && self % 2 == 1";
pub const REPLICAS_RULE_MESSAGE: &str = "replicas must be an odd number between 1 and 9 \
     (1, 3, 5, 7 or 9): an even count tolerates no more failures than the odd count below it";
/// A Kubernetes quantity in the forms storage sizes are written in.
pub const QUANTITY_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";
/// Five-field cron (minute hour day-of-month month day-of-week) or a `@` shorthand.
/// The operator parses the schedule fully and reports what is wrong; the schema only
/// stops obvious garbage at admission.
pub const CRON_PATTERN: &str = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$";

/// A strongly consistent key-value store (Raft, etcd v3 API) run as a StatefulSet.
// clippy reads two printer columns of the same type as a repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "consensus.dev",
    version = "v1alpha1",
    kind = "ConsensusCluster",
    plural = "consensusclusters",
    shortname = "cc",
    category = "all",
    namespaced,
    status = "ConsensusClusterStatus",
    derive = "PartialEq",
    doc = "A Raft consensus cluster speaking the etcd v3 API, kept in shape by the consensus operator.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Leader", type_ = "string", json_path = ".status.leader"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.version"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ConsensusClusterSpec {
    /// Number of voting members. Odd, from 1 to 9; 3 tolerates one failure, 5 two.
    #[serde(default = "default_replicas")]
    #[x_kube(validation = kube::core::Rule::new(REPLICAS_RULE).message(REPLICAS_RULE_MESSAGE))]
    pub replicas: i32,

    /// Container image of the members.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1))]
    pub image: String,

    /// Version of consensus-node the image carries, shown in status and used to order upgrades.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,

    /// Persistent storage of each member (its write-ahead log and key-value store).
    #[serde(default)]
    pub storage: StorageSpec,

    /// CPU and memory of each member container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Where members may run and how they are spread over failure domains.
    #[serde(default)]
    pub placement: PlacementSpec,

    /// Scheduled snapshots shipped to object storage or a volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,

    /// What the operator does when the cluster has lost quorum.
    #[serde(default)]
    pub recovery: RecoverySpec,

    /// How the cluster starts the first time: empty, or from a backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapSpec>,

    /// Labels, annotations and priority class added to every member pod.
    #[serde(default)]
    pub pod_template: PodTemplateOverrides,
}

fn default_replicas() -> i32 {
    3
}

fn default_image() -> String {
    DEFAULT_IMAGE.to_owned()
}

/// Per-member persistent volume.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each member's volume, as a Kubernetes quantity (for example `10Gi`).
    #[serde(default = "default_storage_size")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub size: String,

    /// StorageClass of the volumes; the cluster's default class when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,

    /// What happens to member volumes when the ConsensusCluster is deleted.
    #[serde(default)]
    pub reclaim_policy: VolumeReclaimPolicy,

    /// What a new cluster does with member volumes an earlier cluster of the same name left
    /// behind (kept by `reclaimPolicy: Retain`).
    #[serde(default)]
    pub existing_volumes: ExistingVolumePolicy,
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
            reclaim_policy: VolumeReclaimPolicy::default(),
            existing_volumes: ExistingVolumePolicy::default(),
        }
    }
}

fn default_storage_size() -> String {
    "1Gi".to_owned()
}

/// Keeping volumes is the default: deleting a resource should not silently delete data.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VolumeReclaimPolicy {
    #[default]
    Retain,
    Delete,
}

/// Volumes older than the resource hold another cluster's data: its members, its log and its
/// cluster id. Starting members on them resurrects that cluster, which is a decision about
/// data, so it is never taken silently.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExistingVolumePolicy {
    /// Create nothing while such volumes exist; the Degraded condition names them.
    #[default]
    Refuse,
    /// Start the members on them: the earlier cluster resumes with its data and cluster id.
    Adopt,
}

/// Scheduling of members.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    /// Node label whose values are the failure domains members are spread over.
    #[serde(default = "default_zone_topology_key")]
    #[schemars(length(min = 1))]
    pub zone_topology_key: String,

    /// `Required` refuses to schedule a member that would unbalance zones (maxSkew 1);
    /// `Preferred` schedules it anyway and reports the cluster as not zone fault tolerant.
    #[serde(default)]
    pub zone_spread: ZoneSpread,

    /// Only nodes with all of these labels run members.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations added to member pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Extra affinity merged into the member pods' own spreading rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
}

impl Default for PlacementSpec {
    fn default() -> Self {
        Self {
            zone_topology_key: default_zone_topology_key(),
            zone_spread: ZoneSpread::default(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
        }
    }
}

fn default_zone_topology_key() -> String {
    DEFAULT_ZONE_TOPOLOGY_KEY.to_owned()
}

/// How strictly members are spread across zones.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZoneSpread {
    /// Members stay Pending rather than crowd into one zone (`DoNotSchedule`).
    #[default]
    Required,
    /// Members are spread when possible and scheduled regardless (`ScheduleAnyway`).
    Preferred,
}

/// Scheduled snapshots.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// Cron schedule in UTC, five fields (`0 */6 * * *`) or a shorthand (`@daily`).
    #[schemars(regex(pattern = CRON_PATTERN))]
    pub schedule: String,

    /// Where snapshots are written.
    pub destination: BackupDestination,

    /// Which snapshots are kept.
    #[serde(default)]
    pub retention: RetentionSpec,

    /// No scheduled backup is started while true; backups already taken are kept.
    #[serde(default)]
    pub suspend: bool,
}

/// Exactly one destination is set.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.s3) != has(self.volume)").message("set exactly one backup destination: s3 or volume"))]
pub struct BackupDestination {
    /// An S3-compatible bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Destination>,
    /// A PersistentVolumeClaim in the cluster's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeDestination>,
}

/// An S3-compatible object store location.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3Destination {
    /// Bucket name.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Key prefix under which snapshots are written; `<namespace>/<name>/` when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Endpoint URL for S3-compatible stores other than AWS (MinIO, Ceph, R2...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub endpoint: Option<String>,
    /// Region of the bucket.
    #[serde(default = "default_region")]
    pub region: String,
    /// Use path-style addressing (`endpoint/bucket/key`), which most self-hosted stores need.
    #[serde(default)]
    pub force_path_style: bool,
    /// Secret in the cluster's namespace holding the access key pair.
    pub credentials_secret: S3CredentialsSecretRef,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

/// Reference to a Secret holding S3 credentials.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3CredentialsSecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key of the access key id in the Secret.
    #[serde(default = "default_access_key_id_key")]
    pub access_key_id_key: String,
    /// Key of the secret access key in the Secret.
    #[serde(default = "default_secret_access_key_key")]
    pub secret_access_key_key: String,
}

fn default_access_key_id_key() -> String {
    "AWS_ACCESS_KEY_ID".to_owned()
}

fn default_secret_access_key_key() -> String {
    "AWS_SECRET_ACCESS_KEY".to_owned()
}

/// A directory on a PersistentVolumeClaim.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeDestination {
    /// Name of the PersistentVolumeClaim.
    #[schemars(length(min = 1))]
    pub claim_name: String,
    /// Directory inside the volume.
    #[serde(default = "default_volume_path")]
    pub path: String,
}

fn default_volume_path() -> String {
    "/".to_owned()
}

/// Snapshots beyond the limits are deleted after each successful backup; the newest
/// verified snapshot (the newest of all while none is verified) is never deleted.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetentionSpec {
    /// Keep at most this many snapshots.
    #[serde(default = "default_retention_count")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_count: u32,
    /// Delete snapshots older than this (for example `168h` or `30d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = crate::duration::DURATION_PATTERN))]
    pub max_age: Option<String>,
    /// Keep only the newest snapshot of each hour for a day, of each day for a week and of
    /// each week for a month (maxCount and maxAge still apply).
    #[serde(default)]
    pub tiered: bool,
}

impl Default for RetentionSpec {
    fn default() -> Self {
        Self { max_count: default_retention_count(), max_age: None, tiered: false }
    }
}

fn default_retention_count() -> u32 {
    7
}

/// Disaster recovery after quorum loss.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecoverySpec {
    /// Make the cluster again, under a new cluster id, when its quorum has been lost for
    /// `quorumLossTimeout`: from the member that answers with the most applied, else from
    /// the newest verified backup; then grow it back. Off by default: a recovery loses what
    /// the members that are gone had not passed on (everything after the backup, from a
    /// backup), so turning it on is a decision about your data, not ours. The
    /// `consensus.dev/recover` annotation asks for one by hand.
    #[serde(default)]
    pub auto_restore: bool,
    /// How long the cluster must be without quorum before an automatic restore.
    #[serde(default = "default_quorum_loss_timeout")]
    #[schemars(regex(pattern = crate::duration::DURATION_PATTERN))]
    pub quorum_loss_timeout: String,
}

impl Default for RecoverySpec {
    fn default() -> Self {
        Self { auto_restore: false, quorum_loss_timeout: default_quorum_loss_timeout() }
    }
}

fn default_quorum_loss_timeout() -> String {
    "10m".to_owned()
}

/// How a new cluster starts. Read only until the cluster has first had a leader: a cluster
/// that ran is never made again from it.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapSpec {
    /// Start from a backup in `spec.backup.destination` (reached with its settings and
    /// credentials) instead of empty: every key and revision of the backup, under a new
    /// cluster id, the first member restored from it and the others added as in a scale-up.
    /// Also under the name of a deleted cluster, whose backups its destination holds; volumes
    /// such a cluster left are never adopted (`storage.existingVolumes` cannot be `Adopt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_backup: Option<FromBackupSpec>,
}

#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FromBackupSpec {
    /// The backup, as `status.lastBackup.location` and a backup's manifest give it
    /// (`s3://BUCKET/PREFIX/NAME.snapshot`, `file:///DIR/NAME.snapshot`); it must be in
    /// `spec.backup.destination`. Unset: the newest verified backup there, of whichever
    /// cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub location: Option<String>,
}

/// Additions to every member pod.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateOverrides {
    /// Extra pod labels (the operator's own selector labels always win).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra pod annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// PriorityClass of member pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}
