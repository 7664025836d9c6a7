//! Act: server-side apply of the desired objects, reporting what each apply did.

use std::fmt::Debug;
use std::hash::{DefaultHasher, Hash, Hasher};

use consensus_crds::{FIELD_MANAGER, STATUS_FIELD_MANAGER};
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::observe::{Observation, object_key};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Updated,
}

/// One object an apply created or changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub change: Change,
    pub kind: &'static str,
    pub name: String,
    pub reference: k8s_openapi::api::core::v1::ObjectReference,
}

/// Forced: these objects are ours, and a field someone else set on them (a `kubectl edit`
/// of replicas, say) must not keep the cluster from its planned shape.
pub async fn apply<K>(client: &Client, object: &K, seen: &Observation) -> Result<Option<Applied>, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let name = object.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), &object.namespace().unwrap_or_default());
    let after = api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(object)).await?;
    let kind = <K as k8s_openapi::Resource>::KIND;
    let change = match seen.managed.get(&object_key(kind, &name)) {
        None => Change::Created,
        Some(before) if *before != managed_content(&after) => Change::Updated,
        Some(_) => return Ok(None),
    };
    Ok(Some(Applied { change, kind, name, reference: after.object_ref(&()) }))
}

/// A digest of what an apply of ours can change: the object without its status and the
/// server's bookkeeping. Not the resourceVersion: other controllers move it too (the
/// StatefulSet controller with every status write), and an apply that changed nothing of
/// ours is not an update. Not the managedFields either: their timestamps have a one-second
/// resolution, so two changes within a second would look like none.
pub fn managed_content<T: Serialize>(object: &T) -> u64 {
    let mut value = serde_json::to_value(object).unwrap_or_default();
    if let Some(fields) = value.as_object_mut() {
        fields.remove("status");
    }
    if let Some(meta) = value.get_mut("metadata").and_then(serde_json::Value::as_object_mut) {
        meta.remove("resourceVersion");
        meta.remove("managedFields");
    }
    let mut hasher = DefaultHasher::new();
    // serde_json's maps are ordered by key, so equal objects hash equally.
    value.to_string().hash(&mut hasher);
    hasher.finish()
}

/// Applies `status` to `object`'s status subresource under the status field manager,
/// forced: status is the operator's alone. Only onto the version of `object` it was decided
/// from (its resourceVersion a precondition): status is what the operator remembers (a
/// recovery under way, the last scheduled backup), and a reconcile of a cached copy older
/// than the last write would otherwise write it back, starting a second recovery or taking
/// a slot again. Refused (409), the reconcile is retried on the newer copy.
pub async fn apply_status<K>(client: &Client, object: &K, status: &impl Serialize) -> Result<(), kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + DeserializeOwned + Clone + Debug,
{
    let mut body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    if let Some(version) = object.resource_version() {
        body["metadata"] = serde_json::json!({"resourceVersion": version});
    }
    Api::<K>::namespaced(client.clone(), &object.namespace().unwrap_or_default())
        .patch_status(
            &object.name_any(),
            &PatchParams::apply(STATUS_FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};

    use super::*;

    fn stateful_set(replicas: i32) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                name: Some("demo".into()),
                resource_version: Some("7".into()),
                ..ObjectMeta::default()
            },
            spec: Some(StatefulSetSpec { replicas: Some(replicas), ..StatefulSetSpec::default() }),
            status: None,
        }
    }

    #[test]
    fn only_what_an_apply_sets_counts_as_a_change() {
        let before = stateful_set(3);
        let mut controller_wrote = before.clone();
        controller_wrote.metadata.resource_version = Some("9".into());
        controller_wrote.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some("kube-controller-manager".into()),
            subresource: Some("status".into()),
            ..ManagedFieldsEntry::default()
        }]);
        controller_wrote.status =
            Some(StatefulSetStatus { ready_replicas: Some(2), ..StatefulSetStatus::default() });
        assert_eq!(managed_content(&controller_wrote), managed_content(&before));
        assert_ne!(managed_content(&stateful_set(5)), managed_content(&before));
        let mut labelled = before.clone();
        labelled.metadata.labels = Some([("team".to_owned(), "db".to_owned())].into());
        assert_ne!(managed_content(&labelled), managed_content(&before));
    }
}
