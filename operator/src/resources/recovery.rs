//! The two Jobs that make a cluster again on Kubernetes after it lost its quorum
//! (`plan::recovery` decides, `k8s::recovery` carries it out). Both mount the volume of the
//! first member, which the new cluster starts from, as locally, and everything of one
//! recovery stays on that volume in `replaced/<token>/`: the source's snapshot, then the
//! member's old data, moved aside:
//! - `snapshot`: a survivor's snapshot, streamed from it while it still runs (it answers
//!   without a quorum, and what it serves is what it applied), or the newest verified backup
//!   fetched from the destination, its sha256 checked against its manifest;
//! - `restore`: once every member is stopped, that member's data replaced by a one-member
//!   cluster restored from the snapshot under the recovery's token (`consensus-node restore
//!   --replace-into`, which a retried pod may run again).

use std::collections::BTreeMap;
use std::path::Path;

use consensus_crds::{ConsensusCluster, RecoveryRecord, RecoverySource};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Container, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::backup::{VOLUME_MOUNT, destination_access, destination_url, fetch_source, s3_flags};
use super::statefulset::{
    DATA_MOUNT, DATA_VOLUME, container_security_context, pod_security_context, volume_claim_name,
};
use super::{BuildError, Cluster, labels, member_client_url, peer_url};

/// The recovery a Job is part of: Jobs of another (an earlier one's) are deleted first.
pub const TOKEN_ANNOTATION: &str = "consensus.dev/recovery-token";
/// `app.kubernetes.io/name` of the recovery Jobs' pods: never the members'.
pub const APP_NAME: &str = "consensus-recovery";
/// A part is retried this often (a pod lost with its node, a survivor slow to answer)
/// before the recovery says it failed; both parts may run again.
const BACKOFF_LIMIT: i32 = 2;
/// A snapshot of a store our size takes seconds; past this it is not coming.
const DEADLINE_SECONDS: i64 = 600;

/// The two parts of a recovery that run in a Job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Snapshot,
    Restore,
}

impl Part {
    fn as_str(self) -> &'static str {
        match self {
            Self::Snapshot => "snapshot",
            Self::Restore => "restore",
        }
    }

    /// `<cluster>-recovery-<part>`, within the 63 characters a Job's name may have.
    pub fn job_name(self, cluster: &str) -> String {
        super::job_name(cluster, &format!("-recovery-{}", self.as_str()))
    }
}

pub fn run_labels(cluster: &str) -> BTreeMap<String, String> {
    labels::run(APP_NAME, "recovery", cluster)
}

pub fn run_selector(cluster: &str) -> String {
    labels::as_selector(&run_labels(cluster))
}

/// The member the new cluster starts from, whatever the source: the first, so that it runs
/// alone and the others are added, as in a scale-up. Started together, members whose
/// volumes are new could be placed first and leave the zone of its volume no room under
/// the spread constraints.
pub fn first_member(cluster: &str) -> String {
    format!("{cluster}-0")
}

/// Where one recovery keeps what it uses and what it replaces, on the first member's volume.
fn recovery_dir(record: &RecoveryRecord) -> String {
    format!("{DATA_MOUNT}/replaced/{}", record.cluster_token)
}

fn snapshot_file(record: &RecoveryRecord) -> String {
    format!("{}/source.snapshot", recovery_dir(record))
}

/// The `snapshot` Job. It runs on the first member's node (`node`, where its pod runs, if
/// it does), as its volume can be mounted only there while the pod has it.
pub fn snapshot_job(
    cc: &ConsensusCluster,
    record: &RecoveryRecord,
    node: Option<&str>,
) -> Result<Job, BuildError> {
    let cluster = Cluster::new(cc)?;
    let first = first_member(cluster.name);
    let (args, access) = match record.source {
        RecoverySource::Survivor => {
            let endpoint = member_client_url(cluster.name, cluster.namespace, &record.from);
            let to = format!("file://{}", recovery_dir(record));
            let args = ["backup", "--endpoint", &endpoint, "--to", &to, "--name", "source"];
            (args.map(str::to_owned).to_vec(), None)
        }
        RecoverySource::Backup => {
            let unusable = |why: &str| BuildError::BackupSource(format!("the backup {}: {why}", record.from));
            let (mut args, from) = fetch_source(&record.from);
            // Reached as the cluster's own backups are: its destination says how.
            let destination =
                cc.spec.backup.as_ref().map(|b| &b.destination).ok_or_else(|| {
                    unusable("spec.backup names no destination, so how to reach it is unknown")
                })?;
            let ours = destination_url(destination, cluster.namespace, cluster.name, Path::new(VOLUME_MOUNT));
            if from != ours {
                return Err(unusable(&format!(
                    "it is not in spec.backup.destination ({ours}), so how to reach it is unknown"
                )));
            }
            args.splice(0..0, ["fetch".to_owned()]);
            args.extend(["--to".to_owned(), snapshot_file(record)]);
            args.extend(destination.s3.as_ref().map(s3_flags).unwrap_or_default());
            (args, Some(destination_access(Some(destination))))
        }
    };
    let access = access.unwrap_or_else(|| destination_access(None));
    let mut job = job(&cluster, record, Part::Snapshot, &first, args, access);
    if let (Some(node), Some(pod)) = (node, job.spec.as_mut().and_then(|s| s.template.spec.as_mut())) {
        pod.affinity = Some(on_node(node));
    }
    Ok(job)
}

/// The `restore` Job, run once every member has stopped.
pub fn restore_job(cc: &ConsensusCluster, record: &RecoveryRecord) -> Result<Job, BuildError> {
    let cluster = Cluster::new(cc)?;
    let first = first_member(cluster.name);
    let peer = peer_url(cluster.name, cluster.namespace, &first);
    let data_dir = format!("{DATA_MOUNT}/data");
    let initial_cluster = format!("{first}={peer}");
    let args = [
        "restore",
        "--snapshot",
        &snapshot_file(record),
        "--data-dir",
        &data_dir,
        "--name",
        &first,
        "--initial-cluster",
        &initial_cluster,
        "--initial-cluster-token",
        &record.cluster_token,
        "--initial-advertise-peer-urls",
        &peer,
        "--replace-into",
        &recovery_dir(record),
    ];
    let access = destination_access(None);
    Ok(job(&cluster, record, Part::Restore, &first, args.map(str::to_owned).to_vec(), access))
}

fn job(
    cluster: &Cluster<'_>,
    record: &RecoveryRecord,
    part: Part,
    member: &str,
    args: Vec<String>,
    (env, mut volumes, mut mounts): (Vec<k8s_openapi::api::core::v1::EnvVar>, Vec<Volume>, Vec<VolumeMount>),
) -> Job {
    volumes.push(Volume {
        name: DATA_VOLUME.to_owned(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: volume_claim_name(member),
            read_only: Some(false),
        }),
        ..Volume::default()
    });
    mounts.push(VolumeMount {
        name: DATA_VOLUME.to_owned(),
        mount_path: DATA_MOUNT.to_owned(),
        ..VolumeMount::default()
    });
    let placement = &cluster.spec.placement;
    let labels = run_labels(cluster.name);
    let mut metadata = cluster.metadata(part.job_name(cluster.name));
    metadata.labels = Some(labels.clone());
    metadata.annotations =
        Some(BTreeMap::from([(TOKEN_ANNOTATION.to_owned(), record.cluster_token.clone())]));
    Job {
        metadata,
        spec: Some(JobSpec {
            backoff_limit: Some(BACKOFF_LIMIT),
            active_deadline_seconds: Some(DEADLINE_SECONDS),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..ObjectMeta::default() }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_owned()),
                    enable_service_links: Some(false),
                    security_context: Some(pod_security_context()),
                    // Where the members may run, so may what mounts their volumes.
                    tolerations: (!placement.tolerations.is_empty()).then(|| placement.tolerations.clone()),
                    node_selector: (!placement.node_selector.is_empty())
                        .then(|| placement.node_selector.clone()),
                    priority_class_name: cluster.spec.pod_template.priority_class_name.clone(),
                    containers: vec![Container {
                        name: part.as_str().to_owned(),
                        image: Some(cluster.spec.image.clone()),
                        image_pull_policy: Some("IfNotPresent".to_owned()),
                        command: Some(vec!["consensus-node".to_owned()]),
                        args: Some(args),
                        env: (!env.is_empty()).then_some(env),
                        security_context: Some(container_security_context()),
                        volume_mounts: Some(mounts),
                        // The node's error, should it fail, is the pod's termination message.
                        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
                        ..Container::default()
                    }],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

fn on_node(node: &str) -> Affinity {
    Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: None,
                    match_fields: Some(vec![NodeSelectorRequirement {
                        key: "metadata.name".to_owned(),
                        operator: "In".to_owned(),
                        values: Some(vec![node.to_owned()]),
                    }]),
                }],
            }),
            preferred_during_scheduling_ignored_during_execution: None,
        }),
        ..Affinity::default()
    }
}
