//! What wakes the controller. A reconcile writes status and the members' pods change the
//! status of the objects it owns, so reacting to every watch event makes each reconcile
//! trigger the next: only a change of a ConsensusCluster's spec (its generation) or
//! finalizers, and for owned objects a change of what we apply, a change in the number of
//! ready members, or a deletion, starts one. The periodic requeue covers the rest (member
//! health is not watched through the API server anyway).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use consensus_crds::{ConsensusBackup, ConsensusCluster};
use futures::{Stream, StreamExt, future};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{Predicate, WatchStreamExt, predicates};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::apply::managed_content;
use super::http::{Health, WatchOutcome};
use crate::resources::labels;

/// The ConsensusClusters, cached, and the ones whose spec or finalizers changed. The
/// finalizers count because the finalizer helper waits for the watch event of its own
/// addition before it goes on.
pub fn clusters(
    api: Api<ConsensusCluster>,
    health: Arc<Health>,
) -> (Store<ConsensusCluster>, impl Stream<Item = Result<ConsensusCluster, watcher::Error>>) {
    let (reader, writer) = reflector::store();
    let changed = watched("ConsensusCluster", api, watcher::Config::default(), health)
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation.combine(predicates::finalizers), Default::default());
    (reader, changed)
}

/// The ConsensusBackups created or whose spec changed (it cannot, once made): each wakes
/// the reconcile of the cluster it names. Their status is ours, and wakes nothing.
pub fn requests(
    api: Api<ConsensusBackup>,
    health: Arc<Health>,
) -> impl Stream<Item = Result<ConsensusBackup, watcher::Error>> {
    watched("ConsensusBackup", api, watcher::Config::default(), health)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default())
}

/// The cluster an object of ours belongs to, by its `app.kubernetes.io/instance` label.
pub fn cluster_of<K: Resource<DynamicType = ()>>(object: &K) -> Option<ObjectRef<ConsensusCluster>> {
    let cluster = object.labels().get(labels::INSTANCE)?;
    Some(ObjectRef::new(cluster).within(&object.namespace()?))
}

/// Owned objects of kind `K` whose `fingerprint` changed, or that were deleted. For most
/// kinds the fingerprint is what the operator applies (`managed_content`); for StatefulSets
/// and Jobs it includes the status the planner waits on.
pub fn owned<K>(
    api: Api<K>,
    config: watcher::Config,
    health: Arc<Health>,
    fingerprint: impl Fn(&K) -> u64,
) -> impl Stream<Item = Result<K, watcher::Error>>
where
    K: Resource + k8s_openapi::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    changes_that_matter(watched(K::KIND, api, config, health), fingerprint)
}

/// A backup Job's progress: whenever one starts, ends or is deleted, for the end of a backup
/// is what its status and the next try wait for.
pub fn job_fingerprint(job: &Job) -> u64 {
    let progress = job.status.as_ref().map(|s| (s.active, s.succeeded, s.failed, s.ready));
    let mut hasher = DefaultHasher::new();
    progress.hash(&mut hasher);
    hasher.finish()
}

/// A StatefulSet's applied content, count of ready members and current template revision:
/// members becoming ready is what a starting cluster or a scale waits for, and a new
/// revision what starts a rolling update.
pub fn stateful_set_fingerprint(sts: &StatefulSet) -> u64 {
    let ready = sts.status.as_ref().map(|s| (s.replicas, s.ready_replicas, &s.update_revision));
    let mut hasher = DefaultHasher::new();
    (managed_content(sts), ready).hash(&mut hasher);
    hasher.finish()
}

/// A watch with the default backoff, its every outcome reported to the probes.
fn watched<K>(
    name: &'static str,
    api: Api<K>,
    config: watcher::Config,
    health: Arc<Health>,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, config).default_backoff().inspect(move |event| {
        let outcome = match event {
            Ok(Event::InitDone) => WatchOutcome::Synced,
            Ok(_) => WatchOutcome::Delivered,
            Err(_) => WatchOutcome::Failed,
        };
        health.watch(name, outcome, Instant::now());
    })
}

/// Which object an event is about; the uid tells a re-created object from the old one.
type Key = (Option<String>, String, Option<String>);

fn key_of<K: Resource>(object: &K) -> Key {
    (object.namespace(), object.name_any(), object.uid())
}

/// The objects of `events` whose `fingerprint` changed since they were last seen, and
/// every deleted one. Unlike kube's `predicate_filter`, which sees objects and not events,
/// a deletion always passes: a deleted ConfigMap must be re-created at once, and its last
/// state is the one seen before.
fn changes_that_matter<K, S>(
    events: S,
    fingerprint: impl Fn(&K) -> u64,
) -> impl Stream<Item = Result<K, watcher::Error>>
where
    K: Resource,
    S: Stream<Item = Result<Event<K>, watcher::Error>>,
{
    let mut seen: HashMap<Key, u64> = HashMap::new();
    // A re-list replaces what was seen, so objects deleted while the watch was down are
    // forgotten instead of kept for ever.
    let mut relisted: Option<HashMap<Key, u64>> = None;
    events.filter_map(move |event| {
        let passed = match event {
            Err(error) => Some(Err(error)),
            Ok(Event::Delete(object)) => {
                seen.remove(&key_of(&object));
                Some(Ok(object))
            }
            Ok(Event::Apply(object)) => {
                let print = fingerprint(&object);
                (seen.insert(key_of(&object), print) != Some(print)).then_some(Ok(object))
            }
            Ok(Event::Init) => {
                relisted = Some(HashMap::new());
                None
            }
            Ok(Event::InitApply(object)) => {
                let (key, print) = (key_of(&object), fingerprint(&object));
                let changed = seen.get(&key) != Some(&print);
                relisted.get_or_insert_default().insert(key, print);
                changed.then_some(Ok(object))
            }
            Ok(Event::InitDone) => {
                if let Some(relisted) = relisted.take() {
                    seen = relisted;
                }
                None
            }
        };
        future::ready(passed)
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{StatefulSetSpec, StatefulSetStatus};
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;

    use super::*;

    fn config_map(version: &str, value: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some("demo-config".into()),
                namespace: Some("default".into()),
                uid: Some("u1".into()),
                resource_version: Some(version.into()),
                ..ObjectMeta::default()
            },
            data: Some([("initial-cluster-state".to_owned(), value.to_owned())].into()),
            ..ConfigMap::default()
        }
    }

    fn passed<K: Resource + Clone>(events: Vec<Event<K>>, fingerprint: impl Fn(&K) -> u64) -> Vec<K> {
        let stream = changes_that_matter(futures::stream::iter(events.into_iter().map(Ok)), fingerprint);
        futures::executor::block_on(stream.map(|r| r.expect("no error")).collect())
    }

    #[test]
    fn only_changes_of_what_we_apply_and_deletions_pass() {
        let versions = |objects: Vec<ConfigMap>| -> Vec<String> {
            objects.iter().map(|o| o.resource_version().unwrap_or_default()).collect()
        };
        let events = vec![
            Event::Init,
            Event::InitApply(config_map("1", "new")),
            Event::InitDone,
            // Written again with the same content (an annotation of another tool's would differ).
            Event::Apply(config_map("2", "new")),
            Event::Apply(config_map("3", "existing")),
            Event::Delete(config_map("4", "existing")),
            Event::Apply(config_map("5", "existing")),
            // A re-list after the watch was down: what did not change does not pass again.
            Event::Init,
            Event::InitApply(config_map("5", "existing")),
            Event::InitDone,
        ];
        assert_eq!(versions(passed(events, managed_content::<ConfigMap>)), ["1", "3", "4", "5"]);
    }

    #[test]
    fn a_statefulset_passes_when_members_become_ready_or_its_template_revision_changes() {
        let sts = |version: &str, ready: i32, observed_generation: i64, revision: &str| StatefulSet {
            metadata: ObjectMeta {
                name: Some("demo".into()),
                resource_version: Some(version.into()),
                generation: Some(2),
                ..ObjectMeta::default()
            },
            spec: Some(StatefulSetSpec { replicas: Some(3), ..StatefulSetSpec::default() }),
            status: Some(StatefulSetStatus {
                replicas: 3,
                ready_replicas: Some(ready),
                observed_generation: Some(observed_generation),
                update_revision: Some(revision.into()),
                ..StatefulSetStatus::default()
            }),
        };
        let events = vec![
            Event::Apply(sts("1", 2, 1, "demo-a")),
            Event::Apply(sts("2", 2, 2, "demo-a")),
            Event::Apply(sts("3", 3, 2, "demo-a")),
            // A new template worked out: a rolling update starts.
            Event::Apply(sts("4", 3, 3, "demo-b")),
        ];
        let versions: Vec<String> = passed(events, stateful_set_fingerprint)
            .iter()
            .map(|o| o.resource_version().unwrap_or_default())
            .collect();
        assert_eq!(versions, ["1", "3", "4"]);
    }
}
