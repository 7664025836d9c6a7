//! Pure builders of the objects a ConsensusCluster is made of. No I/O: the Kubernetes
//! platform applies what these return, and the golden tests pin them down.

pub mod backup;
mod config;
mod disruption;
pub mod labels;
pub mod recovery;
mod services;
mod statefulset;
pub mod storage;

use consensus_crds::{ConsensusCluster, ConsensusClusterSpec};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

pub use config::{INITIAL_CLUSTER_KEY, INITIAL_CLUSTER_STATE_KEY, InitialClusterState};
pub use disruption::Guarded;
pub use statefulset::{member_claim, volume_claim_name};

pub const CLIENT_PORT: i32 = 2379;
pub const PEER_PORT: i32 = 2380;
pub const METRICS_PORT: i32 = 2381;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("the ConsensusCluster has no {0}; it must come from the API server")]
    MissingMetadata(&'static str),
    #[error(
        "a backup was planned without a destination (neither its ConsensusBackup nor spec.backup names one)"
    )]
    NoBackupDestination,
    #[error("a recovery cannot use its source: {0}")]
    BackupSource(String),
}

/// Everything one cluster is made of, in the order it is applied: configuration and
/// Services before the StatefulSet, so members find their peers' names from their first start.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub config_map: ConfigMap,
    pub peer_service: Service,
    pub client_service: Service,
    pub pod_disruption_budget: PodDisruptionBudget,
    pub stateful_set: StatefulSet,
}

/// The member set the objects are built for. Replicas is a parameter rather than read
/// from the spec because the planner, not the spec, decides when the workload changes size;
/// likewise the voters the disruption budget guards come from the membership, not the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Members {
    pub replicas: i32,
    pub state: InitialClusterState,
    pub guarded: Guarded,
}

pub fn desired(cluster: &ConsensusCluster, members: Members) -> Result<Desired, BuildError> {
    let cluster = Cluster::new(cluster)?;
    Ok(Desired {
        config_map: config::config_map(&cluster, members),
        peer_service: services::peer(&cluster),
        client_service: services::client(&cluster),
        pod_disruption_budget: disruption::budget(&cluster, members.guarded),
        stateful_set: statefulset::stateful_set(&cluster, members.replicas),
    })
}

/// What the builders need to know about the resource, checked once.
pub(crate) struct Cluster<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
    pub spec: &'a ConsensusClusterSpec,
}

impl<'a> Cluster<'a> {
    fn new(cc: &'a ConsensusCluster) -> Result<Self, BuildError> {
        let meta = cc.meta();
        Ok(Self {
            name: meta.name.as_deref().ok_or(BuildError::MissingMetadata("name"))?,
            namespace: meta.namespace.as_deref().ok_or(BuildError::MissingMetadata("namespace"))?,
            uid: meta.uid.as_deref().ok_or(BuildError::MissingMetadata("uid"))?,
            spec: &cc.spec,
        })
    }

    pub fn peer_service_name(&self) -> String {
        peer_service_name(self.name)
    }

    pub fn config_map_name(&self) -> String {
        config_map_name(self.name)
    }

    /// DNS name of one member through the headless Service; stable across restarts and
    /// rescheduling, which is what Raft peer addresses need.
    pub fn member_host(&self, member: &str) -> String {
        member_host(self.name, self.namespace, member)
    }

    pub fn member_name(&self, ordinal: i32) -> String {
        format!("{}-{ordinal}", self.name)
    }

    /// Metadata of an owned object: cascading deletion through a controller reference.
    pub fn metadata(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.to_owned()),
            labels: Some(labels::common(self.name, self.spec.version.as_deref())),
            owner_references: Some(vec![OwnerReference {
                api_version: ConsensusCluster::api_version(&()).into_owned(),
                kind: ConsensusCluster::kind(&()).into_owned(),
                name: self.name.to_owned(),
                uid: self.uid.to_owned(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        }
    }
}

/// `<owner><suffix>` within the 63 characters a Job's name may have (its pods carry it as a
/// label value): a long owner name is cut, the suffix never.
fn job_name(owner: &str, suffix: &str) -> String {
    let mut cut = 63usize.saturating_sub(suffix.len()).min(owner.len());
    while !owner.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", owner[..cut].trim_end_matches('-'))
}

pub fn peer_service_name(cluster: &str) -> String {
    format!("{cluster}-peer")
}

pub fn config_map_name(cluster: &str) -> String {
    format!("{cluster}-config")
}

pub fn client_service_name(cluster: &str) -> String {
    format!("{cluster}-client")
}

fn member_host(cluster: &str, namespace: &str, member: &str) -> String {
    format!("{member}.{}.{namespace}.svc", peer_service_name(cluster))
}

/// One member's own client URL, through the headless peer Service: it resolves to that
/// pod alone, ready or not, where the client Service picks any ready member.
pub fn member_client_url(cluster: &str, namespace: &str, member: &str) -> String {
    format!("http://{}:{CLIENT_PORT}", member_host(cluster, namespace, member))
}

/// The peer URL a member advertises and the others reach it at: what the initial member
/// list names, and what a member is added to the membership with before its pod starts.
pub fn peer_url(cluster: &str, namespace: &str, member: &str) -> String {
    format!("http://{}:{PEER_PORT}", member_host(cluster, namespace, member))
}

/// The member whose peer URL (as [`peer_url`] makes them) is `url`, if it is one of this
/// cluster's: how a member added but not started yet, which etcd lists without a name, is
/// told apart from the others.
pub fn member_of_peer_url(cluster: &str, namespace: &str, url: &str) -> Option<String> {
    let host = url.strip_prefix("http://")?;
    let member = host.split('.').next()?;
    (peer_url(cluster, namespace, member) == url).then(|| member.to_owned())
}

/// The node's exit code when its data directory has lost the data its membership says it
/// holds (a wiped or replaced volume). The node must exit with exactly this code and write
/// [`LOST_DATA_MESSAGE`] to `/dev/termination-log`: the operator finds such members in
/// their pods' last termination and replaces them instead of restarting them forever.
/// 78 is `EX_CONFIG` of sysexits.h: restarting does not help, only a new identity does.
pub const LOST_DATA_EXIT_CODE: i32 = 78;
/// Part of the termination message the node writes when it exits with
/// [`LOST_DATA_EXIT_CODE`]; either one identifies a lost-data exit.
pub const LOST_DATA_MESSAGE: &str = "lost its data";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unstarted_member_is_named_by_its_peer_url_only_when_it_is_ours() {
        let url = peer_url("demo", "ns", "demo-3");
        assert_eq!(url, "http://demo-3.demo-peer.ns.svc:2380");
        assert_eq!(member_of_peer_url("demo", "ns", &url).as_deref(), Some("demo-3"));
        assert_eq!(member_of_peer_url("other", "ns", &url), None);
        assert_eq!(member_of_peer_url("demo", "ns", "http://127.0.0.1:2380"), None);
    }

    #[test]
    fn a_members_own_client_url_is_its_name_under_the_peer_service() {
        assert_eq!(member_client_url("demo", "ns", "demo-0"), "http://demo-0.demo-peer.ns.svc:2379");
    }
}
