use std::collections::BTreeMap;

use consensus_crds::{ConsensusCluster, VolumeReclaimPolicy, ZoneSpread};
use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapKeySelector, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecurityContext, TopologySpreadConstraint, Volume,
    VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    BuildError, CLIENT_PORT, Cluster, INITIAL_CLUSTER_KEY, INITIAL_CLUSTER_STATE_KEY, METRICS_PORT,
    PEER_PORT, labels,
};

const CONTAINER: &str = "consensus-node";
pub(super) const DATA_VOLUME: &str = "data";
pub(super) const DATA_MOUNT: &str = "/var/lib/consensus";
/// The image's non-root user; fsGroup makes the volume writable for it.
const USER_ID: i64 = 65532;
const HOSTNAME_KEY: &str = "kubernetes.io/hostname";

/// The claim the StatefulSet makes for `member` from its `data` template; it outlives the
/// member's pod, so a removed member's volume must be deleted by name.
pub fn volume_claim_name(member: &str) -> String {
    format!("{DATA_VOLUME}-{member}")
}

pub(super) fn stateful_set(cluster: &Cluster<'_>, replicas: i32) -> StatefulSet {
    let spec = cluster.spec;
    let selector = labels::selector(cluster.name);
    let metadata = cluster.metadata(cluster.name.to_owned());
    // Volumes follow the spec's reclaim policy when the cluster goes; a member removed by
    // a scale-down keeps its volume until the operator decides it holds nothing needed.
    let retention = StatefulSetPersistentVolumeClaimRetentionPolicy {
        when_deleted: Some(reclaim(spec.storage.reclaim_policy).to_owned()),
        when_scaled: Some("Retain".to_owned()),
    };
    StatefulSet {
        metadata,
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(cluster.peer_service_name()),
            selector: LabelSelector { match_labels: Some(selector), ..LabelSelector::default() },
            // The first members must run together to elect a leader, and a member is ready
            // only once there is one: ordered start-up would wait forever on member 0.
            pod_management_policy: Some("Parallel".to_owned()),
            // The operator rolls members itself (`Step::UpdateMember`): followers first and
            // the leader last, each once the one before has caught up. The controller's own
            // rolling update goes by ordinal and moves on as soon as a pod is Ready, which a
            // member is while it still replays its log.
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".to_owned()),
                rolling_update: None,
            }),
            persistent_volume_claim_retention_policy: Some(retention),
            template: pod_template(cluster),
            volume_claim_templates: Some(vec![volume_claim(cluster)]),
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

fn reclaim(policy: VolumeReclaimPolicy) -> &'static str {
    match policy {
        VolumeReclaimPolicy::Retain => "Retain",
        VolumeReclaimPolicy::Delete => "Delete",
    }
}

/// The claim of `member` as the StatefulSet would make it from its template, for a volume
/// needed before the member's pod is: the first member's, restored from a backup before the
/// new cluster starts. The StatefulSet takes a claim of that name as the member's.
pub fn member_claim(cc: &ConsensusCluster, member: &str) -> Result<PersistentVolumeClaim, BuildError> {
    let cluster = Cluster::new(cc)?;
    let mut claim = volume_claim(&cluster);
    claim.metadata.name = Some(volume_claim_name(member));
    claim.metadata.namespace = Some(cluster.namespace.to_owned());
    Ok(claim)
}

fn volume_claim(cluster: &Cluster<'_>) -> PersistentVolumeClaim {
    let storage = &cluster.spec.storage;
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.to_owned()),
            labels: Some(labels::selector(cluster.name)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), Quantity(storage.size.clone()))])),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

fn pod_template(cluster: &Cluster<'_>) -> PodTemplateSpec {
    let spec = cluster.spec;
    let overrides = &spec.pod_template;
    let placement = &spec.placement;
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels::pod(cluster.name, spec.version.as_deref(), &overrides.labels)),
            annotations: (!overrides.annotations.is_empty()).then(|| overrides.annotations.clone()),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container(cluster)],
            // Members find each other through DNS; Service variables only add noise that
            // grows with the namespace.
            enable_service_links: Some(false),
            security_context: Some(pod_security_context()),
            topology_spread_constraints: Some(vec![
                spread(&placement.zone_topology_key, placement.zone_spread, cluster.name),
                spread(HOSTNAME_KEY, placement.zone_spread, cluster.name),
            ]),
            node_selector: (!placement.node_selector.is_empty()).then(|| placement.node_selector.clone()),
            tolerations: (!placement.tolerations.is_empty()).then(|| placement.tolerations.clone()),
            affinity: placement.affinity.clone(),
            priority_class_name: overrides.priority_class_name.clone(),
            volumes: Some(vec![Volume {
                name: "tmp".to_owned(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            }]),
            ..PodSpec::default()
        }),
    }
}

/// maxSkew 1: losing any one zone (or node) takes at most a balanced share of members.
fn spread(key: &str, how: ZoneSpread, cluster: &str) -> TopologySpreadConstraint {
    TopologySpreadConstraint {
        max_skew: 1,
        topology_key: key.to_owned(),
        when_unsatisfiable: match how {
            ZoneSpread::Required => "DoNotSchedule",
            ZoneSpread::Preferred => "ScheduleAnyway",
        }
        .to_owned(),
        label_selector: Some(LabelSelector {
            match_labels: Some(labels::selector(cluster)),
            ..LabelSelector::default()
        }),
        ..TopologySpreadConstraint::default()
    }
}

/// The image's user, as the restricted Pod Security Standard asks: member pods and backup
/// runs alike.
pub(super) fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(USER_ID),
        run_as_group: Some(USER_ID),
        fs_group: Some(USER_ID),
        fs_group_change_policy: Some("OnRootMismatch".to_owned()),
        seccomp_profile: Some(runtime_default()),
        ..PodSecurityContext::default()
    }
}

pub(super) fn container_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { add: None, drop: Some(vec!["ALL".to_owned()]) }),
        seccomp_profile: Some(runtime_default()),
        ..SecurityContext::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile { type_: "RuntimeDefault".to_owned(), localhost_profile: None }
}

fn container(cluster: &Cluster<'_>) -> Container {
    let spec = cluster.spec;
    // Kubernetes expands $(POD_NAME) in arguments, so one template serves every member.
    let own_host = cluster.member_host("$(POD_NAME)");
    let args = [
        "run".to_owned(),
        "--name=$(POD_NAME)".to_owned(),
        // A subdirectory: a fresh volume's root may already hold lost+found.
        format!("--data-dir={DATA_MOUNT}/data"),
        format!("--listen-client-urls=http://0.0.0.0:{CLIENT_PORT}"),
        format!("--advertise-client-urls=http://{own_host}:{CLIENT_PORT}"),
        format!("--listen-peer-urls=http://0.0.0.0:{PEER_PORT}"),
        format!("--initial-advertise-peer-urls=http://{own_host}:{PEER_PORT}"),
        format!("--listen-metrics-urls=http://0.0.0.0:{METRICS_PORT}"),
        "--initial-cluster=$(INITIAL_CLUSTER)".to_owned(),
        "--initial-cluster-state=$(INITIAL_CLUSTER_STATE)".to_owned(),
        // The uid differs between two clusters of the same name, so members of a deleted
        // cluster's kept volumes are never taken for members of its successor.
        format!("--initial-cluster-token={}", cluster.uid),
    ];
    Container {
        name: CONTAINER.to_owned(),
        image: Some(spec.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        command: Some(vec!["consensus-node".to_owned()]),
        args: Some(args.into()),
        env: Some(vec![
            EnvVar {
                name: "POD_NAME".to_owned(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.name".to_owned(),
                        api_version: None,
                    }),
                    ..EnvVarSource::default()
                }),
                value: None,
            },
            config_env(cluster, "INITIAL_CLUSTER", INITIAL_CLUSTER_KEY),
            config_env(cluster, "INITIAL_CLUSTER_STATE", INITIAL_CLUSTER_STATE_KEY),
        ]),
        ports: Some(vec![
            container_port("client", CLIENT_PORT),
            container_port("peer", PEER_PORT),
            container_port("metrics", METRICS_PORT),
        ]),
        // Ready means "part of a cluster with a leader": only then may clients be sent here.
        readiness_probe: Some(probe("/readyz", 5, 3)),
        // Alive while it serves HTTP; a member without a leader must not be restarted for it.
        liveness_probe: Some(probe("/livez", 10, 6)),
        // Replaying a long log before the health port opens must not count as dead.
        startup_probe: Some(probe("/livez", 5, 60)),
        resources: spec.resources.clone(),
        security_context: Some(container_security_context()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: DATA_VOLUME.to_owned(),
                mount_path: DATA_MOUNT.to_owned(),
                ..VolumeMount::default()
            },
            VolumeMount { name: "tmp".to_owned(), mount_path: "/tmp".to_owned(), ..VolumeMount::default() },
        ]),
        ..Container::default()
    }
}

fn config_env(cluster: &Cluster<'_>, name: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            config_map_key_ref: Some(ConfigMapKeySelector {
                name: cluster.config_map_name(),
                key: key.to_owned(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        value: None,
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

fn probe(path: &str, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("metrics".to_owned()),
            scheme: Some("HTTP".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}
