//! The directory volume provisioner: reflectors of claims, volumes and StorageClasses, and a
//! loop that plans with `provisioning::plan` after every change (and every few seconds) and
//! carries the actions out. Level-triggered: a lost or failed step is planned again.
//!
//! A directory has no size: a volume's capacity is what the PV and the claim record, and an
//! expansion only raises those numbers; nothing limits what a pod writes.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use serde_json::json;
use tokio::sync::Notify;

use super::provisioning::{self, Action, ClaimRef, Settings};
use super::reflect;

/// A plan is made at least this often, so that back-offs run out without a change.
const RESYNC: Duration = Duration::from_secs(5);
/// An action that succeeded is not repeated for this long: the stores may not show its
/// effect yet, and doing it again would only repeat its event.
const DONE_MEMORY: Duration = Duration::from_secs(15);
const FIRST_RETRY: Duration = Duration::from_secs(5);
const LAST_RETRY: Duration = Duration::from_secs(300);

struct Provisioner {
    client: Client,
    settings: Settings,
    recorder: Recorder,
}

/// Watches and provisions until the future is dropped; returns only on a fatal error.
pub async fn run(client: Client, settings: Settings) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let (claims, claims_writer) = reflector::store::<PersistentVolumeClaim>();
    let (volumes, volumes_writer) = reflector::store::<PersistentVolume>();
    let (classes, classes_writer) = reflector::store::<StorageClass>();
    let reporter =
        Reporter { controller: settings.provisioner.clone(), instance: Some("cluster-services".into()) };
    let provisioner =
        Provisioner { recorder: Recorder::new(client.clone(), reporter), client: client.clone(), settings };
    tokio::select! {
        () = reflect(Api::all(client.clone()), claims_writer, Some(changed.clone())) => {}
        () = reflect(Api::all(client.clone()), volumes_writer, Some(changed.clone())) => {}
        () = reflect(Api::all(client.clone()), classes_writer, Some(changed.clone())) => {}
        result = provisioner.work(&claims, &volumes, &classes, &changed) => return result,
    }
    anyhow::bail!("a watch of the provisioner ended")
}

impl Provisioner {
    async fn work(
        &self,
        claims: &Store<PersistentVolumeClaim>,
        volumes: &Store<PersistentVolume>,
        classes: &Store<StorageClass>,
        changed: &Notify,
    ) -> anyhow::Result<()> {
        // A plan from a store that has not listed yet would see claims without their volumes.
        claims.wait_until_ready().await?;
        volumes.wait_until_ready().await?;
        classes.wait_until_ready().await?;
        tracing::info!(
            provisioner = %self.settings.provisioner,
            volumes_dir = %self.settings.volumes_dir.display(),
            "volume provisioner watching claims and volumes"
        );
        let mut failures: HashMap<String, (u32, Instant)> = HashMap::new();
        let mut done: HashMap<String, (Action, Instant)> = HashMap::new();
        loop {
            let actions =
                provisioning::plan(&self.settings, &claims.state(), &volumes.state(), &classes.state());
            let now = Instant::now();
            done.retain(|_, (_, at)| now.duration_since(*at) < DONE_MEMORY);
            failures.retain(|subject, _| actions.iter().any(|a| &a.subject() == subject));
            for action in actions {
                let subject = action.subject();
                if failures.get(&subject).is_some_and(|(_, not_before)| Instant::now() < *not_before) {
                    continue;
                }
                if done.get(&subject).is_some_and(|(previous, _)| same_effect(previous, &action)) {
                    continue;
                }
                match self.execute(&action).await {
                    Ok(()) => {
                        failures.remove(&subject);
                        done.insert(subject, (action, Instant::now()));
                    }
                    Err(error) => {
                        let attempts = failures.get(&subject).map_or(0, |(n, _)| *n) + 1;
                        let delay = FIRST_RETRY.saturating_mul(1 << (attempts - 1).min(10)).min(LAST_RETRY);
                        tracing::warn!(%subject, attempts, retry_in = ?delay, error = format!("{error:#}"), "volume action failed");
                        failures.insert(subject, (attempts, Instant::now() + delay));
                    }
                }
            }
            tokio::select! {
                () = changed.notified() => {}
                () = tokio::time::sleep(RESYNC) => {}
            }
        }
    }

    async fn execute(&self, action: &Action) -> anyhow::Result<()> {
        match action {
            Action::Provision { claim, class, directory, volume } => {
                self.provision(claim, class, directory, volume).await
            }
            Action::Refuse { claim, class, reason } => {
                let note = format!("failed to provision volume with StorageClass \"{class}\": {reason}");
                self.event(&claim.reference, EventType::Warning, "ProvisioningFailed", "Provisioning", note)
                    .await;
                anyhow::bail!("claim {}/{} refused: {reason}", claim.namespace, claim.name)
            }
            Action::Delete { volume, uid, directory } => self.delete(volume, uid, directory).await,
            Action::KeepStrange { volume, reason } => {
                anyhow::bail!("released volume {volume} is kept: {reason}")
            }
            Action::Expand { claim, volume, capacity, volume_too_small } => {
                self.expand(claim, volume, capacity, *volume_too_small).await
            }
        }
    }

    async fn provision(
        &self,
        claim: &ClaimRef,
        class: &str,
        directory: &Path,
        volume: &PersistentVolume,
    ) -> anyhow::Result<()> {
        let name = volume.metadata.name.as_deref().unwrap_or_default();
        let node = volume
            .spec
            .as_ref()
            .and_then(|s| s.node_affinity.as_ref()?.required.as_ref())
            .and_then(|r| {
                r.node_selector_terms.first()?.match_expressions.as_ref()?.first()?.values.as_ref()?.first()
            })
            .cloned()
            .unwrap_or_default();
        let created = async {
            // Owned by root with 0755: the kubelet gives the directory to the pod's fsGroup.
            std::fs::create_dir_all(directory)?;
            std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o755))?;
            // A failed create leaves the directory: the PV may exist after all (a lost
            // answer), and removing the directory under it would lose the pod's data.
            match Api::<PersistentVolume>::all(self.client.clone())
                .create(&PostParams::default(), volume)
                .await
            {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(false),
                Err(error) => Err(anyhow::Error::from(error)),
            }
        }
        .await;
        match created {
            Ok(true) => {
                tracing::info!(claim = %format!("{}/{}", claim.namespace, claim.name), volume = name, %node, directory = %directory.display(), "provisioned");
                let note = format!("Successfully provisioned volume {name}");
                self.event(
                    &claim.reference,
                    EventType::Normal,
                    "ProvisioningSucceeded",
                    "Provisioning",
                    note,
                )
                .await;
                Ok(())
            }
            Ok(false) => {
                tracing::debug!(volume = name, "volume exists already");
                Ok(())
            }
            Err(error) => {
                let note = format!("failed to provision volume with StorageClass \"{class}\": {error:#}");
                self.event(&claim.reference, EventType::Warning, "ProvisioningFailed", "Provisioning", note)
                    .await;
                Err(error.context(format!("provisioning {name} for {}/{}", claim.namespace, claim.name)))
            }
        }
    }

    async fn delete(&self, volume: &str, uid: &str, directory: &Path) -> anyhow::Result<()> {
        let result = async {
            match std::fs::remove_dir_all(directory) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    return Err(anyhow::Error::from(error));
                }
                _ => {}
            }
            // Only the volume we looked at: a PV re-created under the name is another one.
            let params = DeleteParams {
                preconditions: Some(Preconditions { uid: Some(uid.to_string()), resource_version: None }),
                ..Default::default()
            };
            match Api::<PersistentVolume>::all(self.client.clone()).delete(volume, &params).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
                Err(error) => Err(error.into()),
            }
        }
        .await;
        if let Err(error) = &result {
            let reference = volume_reference(volume, uid);
            let note = format!("failed to delete volume {volume}: {error:#}");
            self.event(&reference, EventType::Warning, "VolumeFailedDelete", "Delete", note).await;
        } else {
            tracing::info!(volume, directory = %directory.display(), "deleted released volume and its directory");
        }
        result
    }

    async fn expand(
        &self,
        claim: &ClaimRef,
        volume: &str,
        capacity: &Quantity,
        volume_too_small: bool,
    ) -> anyhow::Result<()> {
        let result = async {
            if volume_too_small {
                let patch = json!({ "spec": { "capacity": { "storage": capacity } } });
                Api::<PersistentVolume>::all(self.client.clone())
                    .patch(volume, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            let patch = json!({ "status": { "capacity": { "storage": capacity } } });
            Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &claim.namespace)
                .patch_status(&claim.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            anyhow::Ok(())
        }
        .await;
        match &result {
            Ok(()) => {
                tracing::info!(claim = %format!("{}/{}", claim.namespace, claim.name), volume, capacity = %capacity.0, "expanded");
                let note = format!(
                    "resize volume {volume} to {} (a directory has no size: only the recorded capacity changed)",
                    capacity.0
                );
                self.event(&claim.reference, EventType::Normal, "VolumeResizeSuccessful", "Resize", note)
                    .await;
            }
            Err(error) => {
                let note = format!("resize volume {volume} to {} failed: {error:#}", capacity.0);
                self.event(&claim.reference, EventType::Warning, "VolumeResizeFailed", "Resize", note).await;
            }
        }
        result
    }

    /// Publishes an event; one that cannot be published is logged, not a failure of the
    /// action it reports.
    async fn event(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event =
            Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
        if let Err(error) = self.recorder.publish(&event, regarding).await {
            tracing::warn!(%error, reason, "could not publish an event");
        }
    }
}

/// Whether `action` would only repeat `previous`. The two halves of one expansion count as
/// one: after both writes a stale store can still show the first half undone.
fn same_effect(previous: &Action, action: &Action) -> bool {
    match (previous, action) {
        (Action::Expand { capacity: a, .. }, Action::Expand { capacity: b, .. }) => a == b,
        _ => previous == action,
    }
}

fn volume_reference(name: &str, uid: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolume".into()),
        name: Some(name.into()),
        uid: Some(uid.into()),
        ..Default::default()
    }
}
