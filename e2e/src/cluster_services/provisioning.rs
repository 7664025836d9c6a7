//! What the directory volume provisioner does, decided purely from the claims, volumes and
//! StorageClasses it sees; `provisioner` carries the decisions out.
//!
//! The protocol is the external provisioner's, between the real kube-scheduler and the real
//! kube-controller-manager's PV controller:
//! 1. A pod uses a claim of a WaitForFirstConsumer class: the scheduler picks a node and
//!    writes it into the claim's `volume.kubernetes.io/selected-node` annotation.
//! 2. The PV controller sees that the class's provisioner is not one of its own and hands the
//!    claim over by annotating it `volume.kubernetes.io/storage-provisioner: <provisioner>`.
//! 3. We create the directory and a PV pre-bound to the claim (claimRef with its uid), local
//!    to the selected node by node affinity. The PV controller binds the pair; the scheduler
//!    then binds the pod.
//! 4. When the claim is deleted the PV controller marks the PV Released and, for a PV a
//!    provisioner made (annotation `pv.kubernetes.io/provisioned-by`), leaves the deletion to
//!    that provisioner: with reclaim policy Delete we remove the directory, then the PV.
//! 5. Expansion: a bound claim whose request grows past its PV's capacity, in a class that
//!    allows expansion, gets its PV's capacity raised, then its own status capacity.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    LocalVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectReference,
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeSpec, VolumeNodeAffinity,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use consensus_crds::quantity;

pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
pub const STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
/// The annotation's name before Kubernetes 1.23; the PV controller still writes both.
pub const BETA_STORAGE_PROVISIONER: &str = "volume.beta.kubernetes.io/storage-provisioner";
pub const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// Who we are and where the directories go.
#[derive(Clone, Debug)]
pub struct Settings {
    pub provisioner: String,
    pub volumes_dir: PathBuf,
}

/// A claim, by what its events and API calls need.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// For events about the claim.
    pub reference: ObjectReference,
}

/// One thing to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Make `directory`, then create `volume` (pre-bound to `claim`).
    Provision { claim: ClaimRef, class: String, directory: PathBuf, volume: Box<PersistentVolume> },
    /// The claim is ours but cannot be provisioned: a ProvisioningFailed event says why.
    Refuse { claim: ClaimRef, class: String, reason: String },
    /// Remove the directory of a released volume, then the volume (only if its uid is still
    /// `uid`).
    Delete { volume: String, uid: String, directory: PathBuf },
    /// A released volume of ours that we will not delete: its path is not the directory we
    /// made for it, so removing it could destroy something else.
    KeepStrange { volume: String, reason: String },
    /// Raise the recorded capacity to `capacity`: the PV's first when `volume_too_small`,
    /// then the claim's status.
    Expand { claim: ClaimRef, volume: String, capacity: Quantity, volume_too_small: bool },
}

impl Action {
    /// A key for the action's subject, for back-off after failures.
    pub fn subject(&self) -> String {
        match self {
            Action::Provision { claim, .. } | Action::Refuse { claim, .. } | Action::Expand { claim, .. } => {
                format!("claim/{}", claim.uid)
            }
            Action::Delete { volume, .. } | Action::KeepStrange { volume, .. } => format!("volume/{volume}"),
        }
    }
}

/// The PV name for a claim, as external provisioners name theirs.
pub fn volume_name(claim_uid: &str) -> String {
    format!("pvc-{claim_uid}")
}

/// Every action due, for every claim and volume.
pub fn plan(
    settings: &Settings,
    claims: &[Arc<PersistentVolumeClaim>],
    volumes: &[Arc<PersistentVolume>],
    classes: &[Arc<StorageClass>],
) -> Vec<Action> {
    let volumes_by_name: HashMap<&str, &PersistentVolume> =
        volumes.iter().filter_map(|v| Some((v.metadata.name.as_deref()?, v.as_ref()))).collect();
    let classes_by_name: HashMap<&str, &StorageClass> =
        classes.iter().filter_map(|c| Some((c.metadata.name.as_deref()?, c.as_ref()))).collect();
    let for_claims = claims.iter().filter_map(|claim| {
        let class =
            claim.spec.as_ref()?.storage_class_name.as_deref().and_then(|n| classes_by_name.get(n))?;
        claim_action(settings, claim, class, &volumes_by_name)
    });
    let for_volumes = volumes.iter().filter_map(|volume| volume_action(settings, volume));
    for_claims.chain(for_volumes).collect()
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

fn claim_ref(claim: &PersistentVolumeClaim) -> Option<ClaimRef> {
    Some(ClaimRef {
        namespace: claim.metadata.namespace.clone()?,
        name: claim.metadata.name.clone()?,
        uid: claim.metadata.uid.clone()?,
        reference: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("PersistentVolumeClaim".into()),
            namespace: claim.metadata.namespace.clone(),
            name: claim.metadata.name.clone(),
            uid: claim.metadata.uid.clone(),
            resource_version: claim.metadata.resource_version.clone(),
            field_path: None,
        },
    })
}

/// What to do for one claim of `class`.
pub fn claim_action(
    settings: &Settings,
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    volumes: &HashMap<&str, &PersistentVolume>,
) -> Option<Action> {
    if class.provisioner != settings.provisioner || claim.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let spec = claim.spec.as_ref()?;
    match spec.volume_name.as_deref() {
        Some(bound) if !bound.is_empty() => expand_action(claim, class, volumes.get(bound).copied()?),
        _ => provision_action(settings, claim, class, volumes),
    }
}

fn provision_action(
    settings: &Settings,
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    volumes: &HashMap<&str, &PersistentVolume>,
) -> Option<Action> {
    let phase = claim.status.as_ref().and_then(|s| s.phase.as_deref());
    if !matches!(phase, None | Some("Pending")) {
        return None;
    }
    // Until the PV controller hands the claim over, it is not ours to act on.
    let handed_over = [STORAGE_PROVISIONER, BETA_STORAGE_PROVISIONER]
        .iter()
        .any(|key| annotation(&claim.metadata, key) == Some(settings.provisioner.as_str()));
    if !handed_over {
        return None;
    }
    let reference = claim_ref(claim)?;
    let name = volume_name(&reference.uid);
    // Made already (perhaps by us a moment ago): the PV controller binds it.
    if volumes.contains_key(name.as_str()) {
        return None;
    }
    let class_name = class.metadata.name.clone()?;
    let refuse =
        |reason: String| Some(Action::Refuse { claim: reference.clone(), class: class_name.clone(), reason });
    let Some(node) = annotation(&claim.metadata, SELECTED_NODE).filter(|n| !n.is_empty()) else {
        if class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer") {
            // The scheduler has not chosen a node yet.
            return None;
        }
        return refuse(format!(
            "a directory volume lives on one node: StorageClass {class_name} must use volumeBindingMode WaitForFirstConsumer"
        ));
    };
    let spec = claim.spec.as_ref()?;
    if spec.selector.is_some() {
        return refuse("claim selector is not supported".into());
    }
    if spec.data_source.is_some() || spec.data_source_ref.is_some() {
        return refuse("volume data sources (cloning, snapshots) are not supported".into());
    }
    if spec.volume_mode.as_deref() == Some("Block") {
        return refuse("a directory cannot be a block volume".into());
    }
    let Some(request) =
        spec.resources.as_ref().and_then(|r| r.requests.as_ref()).and_then(|r| r.get("storage"))
    else {
        return refuse("the claim requests no storage".into());
    };
    let directory = settings.volumes_dir.join(&name);
    let volume = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name),
            annotations: Some([(PROVISIONED_BY.to_string(), settings.provisioner.clone())].into()),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some([("storage".to_string(), request.clone())].into()),
            access_modes: spec.access_modes.clone(),
            volume_mode: Some(spec.volume_mode.clone().unwrap_or_else(|| "Filesystem".into())),
            storage_class_name: Some(class_name.clone()),
            persistent_volume_reclaim_policy: Some(
                class.reclaim_policy.clone().unwrap_or_else(|| "Delete".into()),
            ),
            mount_options: class.mount_options.clone(),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: Some(reference.namespace.clone()),
                name: Some(reference.name.clone()),
                uid: Some(reference.uid.clone()),
                ..Default::default()
            }),
            local: Some(LocalVolumeSource { path: directory.display().to_string(), fs_type: None }),
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: HOSTNAME_LABEL.into(),
                            operator: "In".into(),
                            values: Some(vec![node.to_string()]),
                        }]),
                        match_fields: None,
                    }],
                }),
            }),
            ..Default::default()
        }),
        status: None,
    };
    Some(Action::Provision { claim: reference, class: class_name, directory, volume: Box::new(volume) })
}

fn storage(map: Option<&std::collections::BTreeMap<String, Quantity>>) -> Option<&Quantity> {
    map?.get("storage")
}

fn expand_action(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    volume: &PersistentVolume,
) -> Option<Action> {
    if claim.status.as_ref()?.phase.as_deref() != Some("Bound") || class.allow_volume_expansion != Some(true)
    {
        return None;
    }
    // Only volumes we made: another provisioner's are its own business.
    if annotation(&volume.metadata, PROVISIONED_BY) != Some(class.provisioner.as_str()) {
        return None;
    }
    let request = storage(claim.spec.as_ref()?.resources.as_ref()?.requests.as_ref())?;
    let capacity = storage(volume.spec.as_ref()?.capacity.as_ref())?;
    // The PV controller sets the status capacity when it binds; without it the binding is
    // still under way and not ours to touch.
    let recorded = storage(claim.status.as_ref()?.capacity.as_ref())?;
    let reference = claim_ref(claim)?;
    let volume_name = volume.metadata.name.clone()?;
    if quantity::compare(&request.0, &capacity.0)? == Ordering::Greater {
        return Some(Action::Expand {
            claim: reference,
            volume: volume_name,
            capacity: request.clone(),
            volume_too_small: true,
        });
    }
    // The PV is large enough but the claim's status has not caught up (the second half of an
    // expansion, also after a restart between the two writes).
    if quantity::compare(&recorded.0, &request.0)? == Ordering::Less {
        return Some(Action::Expand {
            claim: reference,
            volume: volume_name,
            capacity: capacity.clone(),
            volume_too_small: false,
        });
    }
    None
}

/// What to do for one volume: delete it when it is ours, Released, and reclaimed by Delete.
pub fn volume_action(settings: &Settings, volume: &PersistentVolume) -> Option<Action> {
    if annotation(&volume.metadata, PROVISIONED_BY) != Some(settings.provisioner.as_str()) {
        return None;
    }
    if volume.status.as_ref()?.phase.as_deref() != Some("Released") {
        return None;
    }
    let spec = volume.spec.as_ref()?;
    // Retain (or the deprecated Recycle): the directory and the PV stay for an administrator.
    if spec.persistent_volume_reclaim_policy.as_deref() != Some("Delete") {
        return None;
    }
    let name = volume.metadata.name.clone()?;
    let uid = volume.metadata.uid.clone()?;
    let expected = settings.volumes_dir.join(&name);
    let path = spec.local.as_ref().map(|l| Path::new(&l.path));
    if path != Some(expected.as_path()) {
        return Some(Action::KeepStrange {
            volume: name,
            reason: format!(
                "its path {:?} is not {} (the directory this provisioner makes): neither is deleted",
                path,
                expected.display()
            ),
        });
    }
    Some(Action::Delete { volume: name, uid, directory: expected })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        PersistentVolumeClaimSpec, PersistentVolumeClaimStatus, PersistentVolumeStatus,
        VolumeResourceRequirements,
    };

    const OURS: &str = "consensus.dev/local-directory";

    fn settings() -> Settings {
        Settings { provisioner: OURS.into(), volumes_dir: "/state/volumes".into() }
    }

    fn class(provisioner: &str, mode: &str, reclaim: &str, expansion: bool) -> Arc<StorageClass> {
        Arc::new(StorageClass {
            metadata: ObjectMeta { name: Some("local-directory".into()), ..Default::default() },
            provisioner: provisioner.into(),
            volume_binding_mode: Some(mode.into()),
            reclaim_policy: Some(reclaim.into()),
            allow_volume_expansion: Some(expansion),
            ..Default::default()
        })
    }

    fn ours() -> Arc<StorageClass> {
        class(OURS, "WaitForFirstConsumer", "Delete", true)
    }

    /// A Pending claim for 1Gi, with the given annotations.
    fn claim(annotations: &[(&str, &str)]) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                namespace: Some("ns1".into()),
                name: Some("data-db-0".into()),
                uid: Some("1234-abcd".into()),
                annotations: Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: Some("local-directory".into()),
                resources: Some(VolumeResourceRequirements {
                    requests: Some([("storage".to_string(), Quantity("1Gi".into()))].into()),
                    limits: None,
                }),
                ..Default::default()
            }),
            status: Some(PersistentVolumeClaimStatus { phase: Some("Pending".into()), ..Default::default() }),
        }
    }

    fn handed_over() -> PersistentVolumeClaim {
        claim(&[(SELECTED_NODE, "node-2"), (STORAGE_PROVISIONER, OURS)])
    }

    fn decide(
        claim: &PersistentVolumeClaim,
        class: &StorageClass,
        volumes: &[&PersistentVolume],
    ) -> Option<Action> {
        let volumes = volumes.iter().map(|v| (v.metadata.name.as_deref().unwrap(), *v)).collect();
        claim_action(&settings(), claim, class, &volumes)
    }

    #[test]
    fn a_handed_over_claim_gets_a_volume_on_the_selected_node() {
        let Some(Action::Provision { claim, directory, volume, class }) =
            decide(&handed_over(), &ours(), &[])
        else {
            panic!("expected provisioning");
        };
        assert_eq!((claim.namespace.as_str(), claim.name.as_str()), ("ns1", "data-db-0"));
        assert_eq!(class, "local-directory");
        assert_eq!(directory, Path::new("/state/volumes/pvc-1234-abcd"));
        assert_eq!(volume.metadata.name.as_deref(), Some("pvc-1234-abcd"));
        assert_eq!(annotation(&volume.metadata, PROVISIONED_BY), Some(OURS));
        let spec = volume.spec.unwrap();
        assert_eq!(spec.capacity.unwrap()["storage"], Quantity("1Gi".into()));
        assert_eq!(spec.access_modes, Some(vec!["ReadWriteOnce".to_string()]));
        assert_eq!(spec.volume_mode.as_deref(), Some("Filesystem"));
        assert_eq!(spec.storage_class_name.as_deref(), Some("local-directory"));
        assert_eq!(spec.persistent_volume_reclaim_policy.as_deref(), Some("Delete"));
        let claim_ref = spec.claim_ref.unwrap();
        assert_eq!(
            (claim_ref.namespace.as_deref(), claim_ref.name.as_deref(), claim_ref.uid.as_deref()),
            (Some("ns1"), Some("data-db-0"), Some("1234-abcd"))
        );
        assert_eq!(spec.local.unwrap().path, "/state/volumes/pvc-1234-abcd");
        let term = &spec.node_affinity.unwrap().required.unwrap().node_selector_terms[0];
        let requirement = &term.match_expressions.as_ref().unwrap()[0];
        assert_eq!(
            (requirement.key.as_str(), requirement.operator.as_str(), requirement.values.as_deref()),
            (HOSTNAME_LABEL, "In", Some(&["node-2".to_string()][..]))
        );
    }

    #[test]
    fn the_reclaim_policy_comes_from_the_class() {
        let retain = class(OURS, "WaitForFirstConsumer", "Retain", false);
        let Some(Action::Provision { volume, .. }) = decide(&handed_over(), &retain, &[]) else { panic!() };
        assert_eq!(volume.spec.unwrap().persistent_volume_reclaim_policy.as_deref(), Some("Retain"));
    }

    #[test]
    fn no_action_before_the_scheduler_and_the_pv_controller_hand_the_claim_over() {
        // Neither annotation yet.
        assert_eq!(decide(&claim(&[]), &ours(), &[]), None);
        // A node chosen, but the PV controller has not named the provisioner.
        assert_eq!(decide(&claim(&[(SELECTED_NODE, "node-2")]), &ours(), &[]), None);
        // Handed over to another provisioner.
        assert_eq!(
            decide(&claim(&[(SELECTED_NODE, "n"), (STORAGE_PROVISIONER, "other")]), &ours(), &[]),
            None
        );
        // Handed over, waiting for a node.
        assert_eq!(decide(&claim(&[(STORAGE_PROVISIONER, OURS)]), &ours(), &[]), None);
        // The beta annotation counts too.
        let beta = claim(&[(SELECTED_NODE, "n"), (BETA_STORAGE_PROVISIONER, OURS)]);
        assert!(matches!(decide(&beta, &ours(), &[]), Some(Action::Provision { .. })));
    }

    #[test]
    fn another_provisioners_class_is_left_alone() {
        let theirs = class("rancher.io/local-path", "WaitForFirstConsumer", "Delete", true);
        assert_eq!(decide(&handed_over(), &theirs, &[]), None);
    }

    #[test]
    fn an_existing_volume_is_not_made_twice() {
        let Some(Action::Provision { volume, .. }) = decide(&handed_over(), &ours(), &[]) else { panic!() };
        assert_eq!(decide(&handed_over(), &ours(), &[&volume]), None);
    }

    #[test]
    fn a_claim_that_cannot_be_provisioned_is_refused_with_a_reason() {
        let immediate = class(OURS, "Immediate", "Delete", true);
        let waiting = claim(&[(STORAGE_PROVISIONER, OURS)]);
        assert!(
            matches!(decide(&waiting, &immediate, &[]), Some(Action::Refuse { reason, .. }) if reason.contains("WaitForFirstConsumer"))
        );
        let mut block = handed_over();
        block.spec.as_mut().unwrap().volume_mode = Some("Block".into());
        assert!(
            matches!(decide(&block, &ours(), &[]), Some(Action::Refuse { reason, .. }) if reason.contains("block"))
        );
        let mut no_request = handed_over();
        no_request.spec.as_mut().unwrap().resources = None;
        assert!(matches!(decide(&no_request, &ours(), &[]), Some(Action::Refuse { .. })));
    }

    #[test]
    fn deleted_or_bound_claims_are_not_provisioned() {
        let mut deleting = handed_over();
        deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert_eq!(decide(&deleting, &ours(), &[]), None);
        let mut lost = handed_over();
        lost.status.as_mut().unwrap().phase = Some("Lost".into());
        assert_eq!(decide(&lost, &ours(), &[]), None);
    }

    /// A claim bound to `volume`, requesting `request`, its status recording `recorded`.
    fn bound(request: &str, recorded: &str) -> PersistentVolumeClaim {
        let mut claim = handed_over();
        let spec = claim.spec.as_mut().unwrap();
        spec.volume_name = Some("pvc-1234-abcd".into());
        spec.resources.as_mut().unwrap().requests =
            Some([("storage".to_string(), Quantity(request.into()))].into());
        claim.status = Some(PersistentVolumeClaimStatus {
            phase: Some("Bound".into()),
            capacity: Some([("storage".to_string(), Quantity(recorded.into()))].into()),
            ..Default::default()
        });
        claim
    }

    fn provisioned(capacity: &str, phase: &str, reclaim: &str) -> PersistentVolume {
        let Some(Action::Provision { volume, .. }) = decide(&handed_over(), &ours(), &[]) else { panic!() };
        let mut volume = *volume;
        volume.metadata.uid = Some("pv-uid".into());
        let spec = volume.spec.as_mut().unwrap();
        spec.capacity = Some([("storage".to_string(), Quantity(capacity.into()))].into());
        spec.persistent_volume_reclaim_policy = Some(reclaim.into());
        volume.status = Some(PersistentVolumeStatus { phase: Some(phase.into()), ..Default::default() });
        volume
    }

    #[test]
    fn a_grown_request_expands_the_volume_then_the_claim_status() {
        let volume = provisioned("1Gi", "Bound", "Delete");
        let Some(Action::Expand { capacity, volume_too_small, volume: name, .. }) =
            decide(&bound("2Gi", "1Gi"), &ours(), &[&volume])
        else {
            panic!("expected expansion")
        };
        assert_eq!((capacity.0.as_str(), volume_too_small, name.as_str()), ("2Gi", true, "pvc-1234-abcd"));
        // The PV raised already: only the claim's status is left.
        let raised = provisioned("2Gi", "Bound", "Delete");
        let Some(Action::Expand { capacity, volume_too_small, .. }) =
            decide(&bound("2Gi", "1Gi"), &ours(), &[&raised])
        else {
            panic!("expected the status half")
        };
        assert_eq!((capacity.0.as_str(), volume_too_small), ("2Gi", false));
        // Done: nothing more.
        assert_eq!(decide(&bound("2Gi", "2Gi"), &ours(), &[&raised]), None);
        // Same value in other units is no growth.
        assert_eq!(decide(&bound("1024Mi", "1Gi"), &ours(), &[&volume]), None);
    }

    #[test]
    fn no_expansion_when_the_class_forbids_it_or_the_volume_is_not_ours() {
        let volume = provisioned("1Gi", "Bound", "Delete");
        let fixed = class(OURS, "WaitForFirstConsumer", "Delete", false);
        assert_eq!(decide(&bound("2Gi", "1Gi"), &fixed, &[&volume]), None);
        let mut foreign = volume.clone();
        foreign.metadata.annotations = None;
        assert_eq!(decide(&bound("2Gi", "1Gi"), &ours(), &[&foreign]), None);
    }

    #[test]
    fn a_released_volume_is_deleted_only_under_delete() {
        let released = provisioned("1Gi", "Released", "Delete");
        assert_eq!(
            volume_action(&settings(), &released),
            Some(Action::Delete {
                volume: "pvc-1234-abcd".into(),
                uid: "pv-uid".into(),
                directory: "/state/volumes/pvc-1234-abcd".into()
            })
        );
        assert_eq!(volume_action(&settings(), &provisioned("1Gi", "Released", "Retain")), None);
        assert_eq!(volume_action(&settings(), &provisioned("1Gi", "Bound", "Delete")), None);
        let mut foreign = released.clone();
        foreign.metadata.annotations = None;
        assert_eq!(volume_action(&settings(), &foreign), None);
    }

    #[test]
    fn a_released_volume_with_a_foreign_path_is_kept() {
        let mut strange = provisioned("1Gi", "Released", "Delete");
        strange.spec.as_mut().unwrap().local.as_mut().unwrap().path = "/".into();
        assert!(matches!(volume_action(&settings(), &strange), Some(Action::KeepStrange { .. })));
    }

    #[test]
    fn plan_covers_claims_and_volumes() {
        let mut released = provisioned("1Gi", "Released", "Delete");
        released.metadata.name = Some("pvc-other".into());
        released.spec.as_mut().unwrap().local.as_mut().unwrap().path = "/state/volumes/pvc-other".into();
        let actions = plan(&settings(), &[Arc::new(handed_over())], &[Arc::new(released)], &[ours()]);
        assert_eq!(actions.len(), 2);
        assert!(matches!(actions[0], Action::Provision { .. }));
        assert!(matches!(&actions[1], Action::Delete { volume, .. } if volume == "pvc-other"));
    }
}
