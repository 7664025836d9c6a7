//! Observe: what exists on the API server and what the members report, turned into the
//! planner's `Observed`.

use std::collections::BTreeMap;

use consensus_crds::{ConsensusBackup, ConsensusCluster, RECOVER_ANNOTATION};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, ContainerStateTerminated, Node, PersistentVolumeClaim, Pod, Service,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use tracing::debug;

use super::apply::managed_content;
use super::{Error, backups, requests};
use crate::membership::observe::combine;
use crate::membership::{Members, Target};
use crate::plan::backup::{BackupRequest, last_scheduled, removable};
use crate::plan::recovery::{quorum_lost_since, recovery_in};
use crate::plan::{Observed, ObservedMember, ordinal};
use crate::platform;
use crate::resources::backup::{VOLUME_MOUNT, destination_url};
use crate::resources::storage::{self, StorageChange, Volume};
use crate::resources::{
    self, INITIAL_CLUSTER_STATE_KEY, InitialClusterState, LOST_DATA_EXIT_CODE, LOST_DATA_MESSAGE,
    client_service_name, config_map_name, labels, peer_service_name, volume_claim_name,
};

/// What one reconcile saw.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub observed: Observed,
    /// `apply::managed_content` of each owned object that exists, by `Kind/name`: an apply
    /// that changes it created or changed something worth an Event.
    pub managed: BTreeMap<String, u64>,
    /// The first members have formed the cluster; members started from now on join it.
    pub bootstrapped: bool,
    /// Uid by name of the member pods that exist, running or not: a volume is in use until
    /// its pod is gone.
    pub pods: BTreeMap<String, String>,
    /// The client URL the leader answered on, where leader-only changes go.
    pub leader_url: Option<String>,
    /// Uid by name of the member pods whose node is down after its lost-data exit: the
    /// kubelet holds such a pod in back-off (up to five minutes), so once the member is
    /// added again it is deleted to start at once.
    pub lost_data_pods: BTreeMap<String, String>,
    /// The StatefulSet's volume template, and what it needs for `spec.storage`.
    pub volume_template: Option<Volume>,
    pub storage: StorageChange,
    /// The StatefulSet is being deleted (re-created for a new volume template, or by a
    /// person): it is applied again only once it is gone.
    pub stateful_set_deleting: bool,
    /// Names of the backup Jobs whose run has ended, deleted when the next run starts.
    pub ended_backup_jobs: Vec<String>,
    /// The ConsensusBackups of this cluster, whose status the reconcile writes.
    pub backup_requests: Vec<ConsensusBackup>,
}

impl AsRef<Observed> for Observation {
    fn as_ref(&self) -> &Observed {
        &self.observed
    }
}

pub fn object_key(kind: &str, name: &str) -> String {
    format!("{kind}/{name}")
}

fn managed_entry<K: k8s_openapi::Resource + ResourceExt + Serialize>(object: &K) -> (String, u64) {
    (object_key(K::KIND, &object.name_any()), managed_content(object))
}

pub async fn observe(
    client: &Client,
    members: &impl Members,
    cc: &ConsensusCluster,
) -> Result<Observation, Error> {
    let name = cc.name_any();
    let namespace = cc.namespace().unwrap_or_default();
    let mut observation = Observation {
        observed: Observed {
            generation: cc.meta().generation,
            // Once a cluster id is reported, a cluster has run here, whatever is deleted later.
            established: cc.status.as_ref().is_some_and(|s| s.cluster_id.is_some()),
            now: Timestamp::now(),
            last_scheduled_backup: last_scheduled(cc.status.as_ref()),
            last_backup: cc.status.as_ref().and_then(|s| s.last_backup.clone()),
            quorum_lost_since: quorum_lost_since(cc.status.as_ref()),
            recovery: recovery_in(cc.status.as_ref()),
            status_cluster_id: cc.status.as_ref().and_then(|s| s.cluster_id.clone()),
            recovery_request: cc.annotations().get(RECOVER_ANNOTATION).cloned(),
            // As the Jobs that reach it see it (a claim mounted at VOLUME_MOUNT).
            backup_destination: (cc.spec.backup.as_ref()).map(|b| {
                destination_url(&b.destination, &namespace, &name, std::path::Path::new(VOLUME_MOUNT))
            }),
            ..Observed::default()
        },
        ..Observation::default()
    };
    // Also without spec.backup: a run still going when it was removed holds membership
    // changes until it ends.
    let runs = backups::observe(client, &namespace, &name, observation.observed.now).await?;
    observation.backup_requests = requests::of_cluster(client, &namespace, &name).await?;
    let requests: Vec<BackupRequest> = observation.backup_requests.iter().map(requests::request_of).collect();
    observation.ended_backup_jobs =
        runs.iter().filter(|r| removable(&r.run, &requests)).map(|r| r.name.clone()).collect();
    observation.observed.backup_runs = runs.into_iter().map(|r| r.run).collect();
    observation.observed.backup_requests = requests;

    let stateful_set = Api::<StatefulSet>::namespaced(client.clone(), &namespace).get_opt(&name).await?;
    let config_map =
        Api::<ConfigMap>::namespaced(client.clone(), &namespace).get_opt(&config_map_name(&name)).await?;
    let services = Api::<Service>::namespaced(client.clone(), &namespace);
    let peer = services.get_opt(&peer_service_name(&name)).await?;
    let client_service = services.get_opt(&client_service_name(&name)).await?;
    let budget = Api::<PodDisruptionBudget>::namespaced(client.clone(), &namespace).get_opt(&name).await?;

    observation.bootstrapped = observation.observed.established
        || config_map
            .as_ref()
            .and_then(|cm| cm.data.as_ref()?.get(INITIAL_CLUSTER_STATE_KEY))
            .is_some_and(|state| state == InitialClusterState::Existing.as_str());
    observation.managed.extend(
        [
            stateful_set.as_ref().map(managed_entry),
            config_map.as_ref().map(managed_entry),
            peer.as_ref().map(managed_entry),
            client_service.as_ref().map(managed_entry),
            budget.as_ref().map(managed_entry),
        ]
        .into_iter()
        .flatten(),
    );

    let claims = member_claims(client, &namespace, &name).await?;
    observation.observed.volumes = claims.iter().map(|c| c.member.clone()).collect();
    let created = cc.meta().creation_timestamp.as_ref().map(|t| t.0);
    observation.observed.kept_volumes = claims
        .iter()
        .filter(|c| c.created.is_some_and(|claim| created.is_some_and(|cluster| claim < cluster)))
        .map(|c| c.name.clone())
        .collect();
    let pods = member_pods(client, &namespace, &name, &cc.spec.placement.zone_topology_key).await?;
    observation.pods = pods.iter().map(|(name, pod)| (name.clone(), pod.uid.clone())).collect();
    observation.lost_data_pods = pods
        .iter()
        .filter(|(_, pod)| pod.lost_data)
        .map(|(name, pod)| (name.clone(), pod.uid.clone()))
        .collect();
    observation.observed.workload_replicas = match &stateful_set {
        Some(sts) => sts.spec.as_ref().and_then(|s| s.replicas),
        // Deleted around its running pods (orphaned, to change its volume template): as many
        // members as the pods say, so the StatefulSet applied again runs the same ones. Pods
        // being deleted are not running on: they went with the StatefulSet.
        None => pods
            .iter()
            .filter(|(_, pod)| !pod.terminating)
            .filter_map(|(pod, _)| ordinal(pod).filter(|(prefix, _)| *prefix == name))
            .map(|(_, last)| i32::try_from(last).unwrap_or(i32::MAX).saturating_add(1))
            .max(),
    };
    let Some(workload) = observation.observed.workload_replicas else {
        // Nothing runs yet: no members to ask.
        return Ok(observation);
    };
    let version = labels::pod(&name, cc.spec.version.as_deref(), &cc.spec.pod_template.labels)
        .get(labels::VERSION)
        .cloned();
    let revision = stateful_set.as_ref().and_then(|sts| current_revision(sts, version.as_deref()));
    if let Some(sts) = &stateful_set {
        observation.stateful_set_deleting = sts.metadata.deletion_timestamp.is_some();
        let template = volume_template(sts);
        observation.storage = storage_change(client, cc, &template, &claims).await?;
        observation.volume_template = Some(template);
        if let StorageChange::Refuse(why) = &observation.storage {
            observation.observed.refused_changes.push(why.clone());
        }
    }
    // Every member the StatefulSet runs, each on its own name under the peer Service, which
    // publishes members before they are ready: the client Service has no endpoint during
    // bootstrap and quorum loss, exactly when the members' own word matters most.
    let targets: Vec<Target> = (0..workload)
        .map(|ordinal| {
            let member = format!("{name}-{ordinal}");
            Target { client_url: resources::member_client_url(&name, &namespace, &member), name: member }
        })
        .collect();
    let answers = members.ask(&targets).await;
    if answers.is_empty() {
        // Normal while members start; the planner reads "unknown", not "no members".
        debug!(cluster = %name, "no member answered");
    }
    let mut view = combine(&answers, |peer_url| resources::member_of_peer_url(&name, &namespace, peer_url));
    view.members = view.members.map(|listed| join(listed, &pods, revision.as_deref()));
    observation.observed.lost_data = lost_voters(view.members.as_deref().unwrap_or_default(), &pods);
    observation.bootstrapped |= view.leader.is_some();
    platform::fill(&mut observation.observed, &view);
    observation.leader_url = view.leader_url;
    Ok(observation)
}

/// A member pod's readiness, the zone of its node, and whether its node is down because
/// its data is gone.
#[derive(Debug, Clone, Default, PartialEq)]
struct PodView {
    uid: String,
    ready: bool,
    zone: Option<String>,
    lost_data: bool,
    /// The StatefulSet template revision the pod was made from.
    revision: Option<String>,
    terminating: bool,
}

/// A member's volume claim.
struct MemberClaim {
    name: String,
    member: String,
    created: Option<k8s_openapi::jiff::Timestamp>,
    volume: Volume,
}

/// The members' claims, sorted by member. The claims carry the StatefulSet template's
/// labels, which are the cluster's selector; a claim is a member's only if it has that
/// member's name.
async fn member_claims(client: &Client, namespace: &str, cluster: &str) -> Result<Vec<MemberClaim>, Error> {
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&labels::selector_string(cluster)))
        .await?;
    let prefix = volume_claim_name("");
    let mut members: Vec<MemberClaim> = claims
        .iter()
        .filter_map(|claim| {
            let name = claim.name_any();
            let member = name.strip_prefix(&prefix).filter(|m| !m.is_empty())?.to_owned();
            let spec = claim.spec.as_ref();
            let size = spec
                .and_then(|s| s.resources.as_ref()?.requests.as_ref()?.get("storage"))
                .map(|q| q.0.clone());
            let class = spec.and_then(|s| s.storage_class_name.clone());
            let created = claim.metadata.creation_timestamp.as_ref().map(|t| t.0);
            Some(MemberClaim { name, member, created, volume: Volume { size, class } })
        })
        .collect();
    members.sort_by(|a, b| a.member.cmp(&b.member));
    Ok(members)
}

/// `spec.storage` against the StatefulSet's volume template and the members' claims. The
/// StorageClass is read only when the claims would have to grow.
async fn storage_change(
    client: &Client,
    cc: &ConsensusCluster,
    template: &Volume,
    claims: &[MemberClaim],
) -> Result<StorageChange, Error> {
    let by_name: Vec<(String, Volume)> = claims.iter().map(|c| (c.name.clone(), c.volume.clone())).collect();
    let change = storage::change(&cc.spec.storage, template, &by_name, None);
    if !matches!(&change, StorageChange::Refuse(_)) {
        return Ok(change);
    }
    // Refused without knowing the class: it may allow expansion. Every claim of a cluster
    // comes from one template, so one class decides.
    let Some(class) = claims.iter().find_map(|c| c.volume.class.clone()) else { return Ok(change) };
    let expandable = Api::<StorageClass>::all(client.clone())
        .get_opt(&class)
        .await?
        .and_then(|c| c.allow_volume_expansion);
    Ok(storage::change(&cc.spec.storage, template, &by_name, Some(expandable.unwrap_or(false))))
}

/// The size and class the StatefulSet's `data` volume template asks for.
fn volume_template(sts: &StatefulSet) -> Volume {
    let spec = sts.spec.as_ref().and_then(|s| s.volume_claim_templates.as_ref()?.first()?.spec.as_ref());
    Volume {
        size: spec.and_then(|s| s.resources.as_ref()?.requests.as_ref()?.get("storage")).map(|q| q.0.clone()),
        class: spec.and_then(|s| s.storage_class_name.clone()),
    }
}

/// The StatefulSet's current template revision, once its controller has seen its latest
/// spec (before that it reports the revision before the change) and once that spec's pods
/// carry the `version` label the spec asks for (before that the round that applies it is
/// still to come): until then nobody is known to run the new template, nor known not to.
fn current_revision(sts: &StatefulSet, version: Option<&str>) -> Option<String> {
    let template_version = sts
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref()?.labels.as_ref()?.get(labels::VERSION).cloned());
    if template_version.as_deref() != version {
        return None;
    }
    let status = sts.status.as_ref()?;
    (status.observed_generation? >= sts.metadata.generation?).then(|| status.update_revision.clone())?
}

/// Whether the node is down now (terminated, or waiting to be restarted) and its latest
/// exit was the lost-data one. A running container is not lost whatever its last
/// termination says: the kubelet keeps `lastState` after the restart, and the member that
/// runs now is the new one that joined in the lost one's place.
fn lost_data(pod: &Pod) -> bool {
    let is_lost = |t: &ContainerStateTerminated| {
        t.exit_code == LOST_DATA_EXIT_CODE
            || t.message.as_deref().is_some_and(|m| m.contains(LOST_DATA_MESSAGE))
    };
    pod.status.iter().flat_map(|s| s.container_statuses.iter().flatten()).any(|c| {
        let now = c.state.as_ref();
        if now.is_some_and(|s| s.running.is_some()) {
            return false;
        }
        let latest = now
            .and_then(|s| s.terminated.as_ref())
            .or_else(|| c.last_state.as_ref().and_then(|s| s.terminated.as_ref()));
        latest.is_some_and(is_lost)
    })
}

/// The members that lost their data: the pod under the name is down after the lost-data
/// exit and the membership still lists that name as a voter. The node exits so only as a
/// voter that has run before (a learner joins empty by design), so once the name is
/// listed as a learner, the new member the planner added, the old identity is forgotten
/// even while the pod still sits in back-off.
fn lost_voters(members: &[ObservedMember], pods: &BTreeMap<String, PodView>) -> Vec<String> {
    let mut lost: Vec<String> = members
        .iter()
        .filter(|m| !m.is_learner && pods.get(&m.name).is_some_and(|p| p.lost_data))
        .map(|m| m.name.clone())
        .collect();
    lost.sort();
    lost.dedup();
    lost
}

async fn member_pods(
    client: &Client,
    namespace: &str,
    cluster: &str,
    zone_key: &str,
) -> Result<BTreeMap<String, PodView>, Error> {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&labels::selector_string(cluster)))
        .await?;
    let nodes = Api::<Node>::all(client.clone());
    let mut zones: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut views = BTreeMap::new();
    for pod in pods {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let zone = match node {
            Some(node) if !zones.contains_key(&node) => {
                let zone = nodes.get_opt(&node).await?.and_then(|n| n.labels().get(zone_key).cloned());
                zones.insert(node, zone.clone());
                zone
            }
            Some(node) => zones.get(&node).cloned().flatten(),
            None => None,
        };
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let uid = pod.uid().unwrap_or_default();
        let revision = pod.labels().get(REVISION_LABEL).cloned();
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let view = PodView { uid, ready, zone, lost_data: lost_data(&pod), revision, terminating };
        views.insert(pod.name_any(), view);
    }
    Ok(views)
}

/// The label the StatefulSet controller gives each pod: the revision it was made from.
const REVISION_LABEL: &str = "controller-revision-hash";

/// Members as Raft reports them, with their pods' word on readiness, zone and template. A
/// member is healthy only if both agree and its pod is not being deleted.
/// `revision` is the StatefulSet's current one, `None` while it is not known.
fn join(
    members: Vec<ObservedMember>,
    pods: &BTreeMap<String, PodView>,
    revision: Option<&str>,
) -> Vec<ObservedMember> {
    members
        .into_iter()
        .map(|member| {
            let pod = pods.get(&member.name).cloned().unwrap_or_default();
            let outdated = match (revision, pod.revision.as_deref()) {
                (Some(current), Some(made_from)) => Some(current != made_from),
                _ => None,
            };
            // A pod being deleted still answers, and may still be Ready, until it stops: it is
            // on its way down, and counting it healthy would let a second member go meanwhile.
            let healthy = member.healthy && pod.ready && !pod.terminating;
            // What it applied goes with it: it is no source to recover from, though it may
            // answer with as much as the members that stay (found by scenario 20, where the
            // member being deleted with its data wiped was named the recovery's source).
            let applied_index = member.applied_index.filter(|_| !pod.terminating);
            ObservedMember { healthy, zone: pod.zone, outdated, applied_index, ..member }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_is_healthy_only_when_raft_and_its_pod_agree() {
        let reported = |id, name: &str, healthy| ObservedMember {
            id,
            name: name.to_owned(),
            is_learner: false,
            healthy,
            zone: None,
            applied_index: Some(7),
            outdated: None,
        };
        let members =
            vec![reported(1, "demo-0", true), reported(2, "demo-1", true), reported(3, "demo-2", false)];
        let pods = BTreeMap::from([
            ("demo-0".to_owned(), PodView { ready: true, zone: Some("a".into()), ..PodView::default() }),
            ("demo-1".to_owned(), PodView { ready: false, zone: Some("b".into()), ..PodView::default() }),
            ("demo-2".to_owned(), PodView { ready: true, zone: None, ..PodView::default() }),
        ]);
        let members = join(members, &pods, None);
        assert_eq!(members.iter().map(|m| m.healthy).collect::<Vec<_>>(), [true, false, false]);
        assert_eq!(members[0].zone.as_deref(), Some("a"));
    }

    #[test]
    fn a_member_is_outdated_when_its_pod_was_made_from_another_revision_than_the_current() {
        let member = |id, name: &str| ObservedMember {
            id,
            name: name.to_owned(),
            is_learner: false,
            healthy: true,
            zone: None,
            applied_index: Some(7),
            outdated: None,
        };
        let pod = |revision: Option<&str>| PodView {
            ready: true,
            revision: revision.map(str::to_owned),
            ..PodView::default()
        };
        let pods = BTreeMap::from([
            ("demo-0".to_owned(), pod(Some("demo-7d9f"))),
            ("demo-1".to_owned(), pod(Some("demo-5c4b"))),
            ("demo-2".to_owned(), pod(None)),
        ]);
        let members = vec![member(1, "demo-0"), member(2, "demo-1"), member(3, "demo-2")];
        let outdated =
            |revision| join(members.clone(), &pods, revision).iter().map(|m| m.outdated).collect::<Vec<_>>();
        assert_eq!(outdated(Some("demo-5c4b")), [Some(true), Some(false), None]);
        // The StatefulSet controller has not worked out the new revision yet: nobody is
        // known to be behind, nor known to be current.
        assert_eq!(outdated(None), [None, None, None]);
    }

    #[test]
    fn a_member_whose_pod_is_being_deleted_is_not_healthy_though_it_still_answers() {
        let member = ObservedMember {
            id: 1,
            name: "demo-0".to_owned(),
            is_learner: false,
            healthy: true,
            zone: None,
            applied_index: Some(7),
            outdated: None,
        };
        let going = PodView { ready: true, terminating: true, ..PodView::default() };
        let pods = BTreeMap::from([("demo-0".to_owned(), going)]);
        let joined = &join(vec![member], &pods, None)[0];
        assert!(!joined.healthy);
        assert_eq!(joined.applied_index, None, "no source for a recovery");
    }

    #[test]
    fn the_revision_is_known_only_once_the_statefulset_carries_the_version_asked_for() {
        let sts = |label: Option<&str>, observed: i64| -> StatefulSet {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "demo", "generation": 2},
                "spec": {"selector": {}, "serviceName": "demo-peer", "template": {
                    "metadata": {"labels": label.map(|v| serde_json::json!({"app.kubernetes.io/version": v}))},
                }},
                "status": {"replicas": 3, "observedGeneration": observed, "updateRevision": "demo-5c4b"},
            }))
            .expect("a StatefulSet")
        };
        assert_eq!(current_revision(&sts(Some("1.1.0"), 2), Some("1.1.0")).as_deref(), Some("demo-5c4b"));
        // The round that changes spec.version sees the StatefulSet from before its apply.
        assert_eq!(current_revision(&sts(Some("1.0.0"), 2), Some("1.1.0")), None);
        // Applied, but its controller has not worked the new revision out yet.
        assert_eq!(current_revision(&sts(Some("1.1.0"), 1), Some("1.1.0")), None);
        assert_eq!(current_revision(&sts(None, 2), None).as_deref(), Some("demo-5c4b"));
    }

    /// A pod whose one container is in `state`, having last stopped as `last`.
    fn pod_in(state: serde_json::Value, last: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "demo-2"},
            "status": {"containerStatuses": [{
                "name": "consensus-node", "image": "node", "imageID": "", "ready": false,
                "restartCount": 4, "state": state, "lastState": last,
            }]},
        }))
        .expect("a pod")
    }

    #[test]
    fn a_member_is_lost_while_it_is_down_after_the_lost_data_exit_not_once_it_runs_again() {
        let exited = |code: i32, message: &str| serde_json::json!({"terminated": {"exitCode": code, "message": message}});
        let back_off = serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}});
        let running = serde_json::json!({"running": {"startedAt": "2026-12-01T10:00:00Z"}});
        assert!(lost_data(&pod_in(back_off.clone(), exited(78, ""))));
        assert!(lost_data(&pod_in(back_off.clone(), exited(1, "member 12 (\"demo-2\") lost its data: ..."))));
        assert!(lost_data(&pod_in(exited(78, ""), serde_json::json!({}))));
        // The kubelet keeps the last termination after the restart: the member running now
        // is the one added in the lost one's place, and must not be removed for it.
        assert!(!lost_data(&pod_in(running, exited(78, ""))));
        // Terminated now for another reason: its latest exit decides, not an older one.
        assert!(!lost_data(&pod_in(exited(1, "panic"), exited(78, ""))));
        assert!(!lost_data(&pod_in(back_off, exited(1, "panic"))));
    }

    #[test]
    fn a_lost_member_is_forgotten_once_its_name_is_listed_as_the_new_learner() {
        let member = |id, is_learner| ObservedMember {
            id,
            name: "demo-2".to_owned(),
            is_learner,
            healthy: false,
            zone: None,
            applied_index: None,
            outdated: None,
        };
        let pods = BTreeMap::from([("demo-2".to_owned(), PodView { lost_data: true, ..PodView::default() })]);
        assert_eq!(lost_voters(&[member(0x12, false)], &pods), ["demo-2"]);
        assert!(lost_voters(&[member(0x99, true)], &pods).is_empty(), "the replacement is not lost");
        assert!(lost_voters(&[], &pods).is_empty(), "a name not listed has nothing to remove");
    }
}
