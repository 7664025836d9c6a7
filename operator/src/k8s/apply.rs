//! Act: server-side apply of the desired objects, reporting what each apply did.

use std::fmt::Debug;

use consensus_crds::FIELD_MANAGER;
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
    // The API server does not write an apply that changes nothing, so an unchanged
    // resourceVersion means there is nothing to report.
    let change = match seen.versions.get(&object_key(kind, &name)) {
        None => Change::Created,
        Some(before) if after.resource_version().as_ref() != Some(before) => Change::Updated,
        Some(_) => return Ok(None),
    };
    Ok(Some(Applied { change, kind, name, reference: after.object_ref(&()) }))
}
