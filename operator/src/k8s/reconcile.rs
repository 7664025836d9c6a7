//! One reconcile: observe -> plan -> act, then status. Level-triggered: every reconcile
//! starts from what it observes, so a crash between two steps is harmless.

use std::sync::Arc;
use std::time::{Duration, Instant};

use consensus_crds::{ConsensusCluster, ConsensusClusterStatus, STATUS_FIELD_MANAGER, VolumeReclaimPolicy};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use super::Error;
use super::apply::{Applied, Change, apply};
use super::members::MemberProbe;
use super::metrics::Metrics;
use super::observe::{Observation, observe};
use crate::plan::{self, Step};
use crate::resources::{self, BuildError, InitialClusterState, Members, labels};

/// Held on every ConsensusCluster until its deletion has been handled (volumes kept or
/// deleted as `spec.storage.reclaimPolicy` says, and reported).
pub const FINALIZER: &str = "consensus.dev/finalizer";

/// Members' health is not watched through the API server, so a steady cluster is looked
/// at again this often to keep its status true.
const STEADY_RECHECK: Duration = Duration::from_secs(60);
const PROGRESS_RECHECK: Duration = Duration::from_secs(10);
const ERROR_RETRY: Duration = Duration::from_secs(15);

pub struct Context<P> {
    pub client: Client,
    pub recorder: Recorder,
    pub probe: P,
    pub metrics: Arc<Metrics>,
}

pub async fn reconcile<P: MemberProbe>(
    cc: Arc<ConsensusCluster>,
    ctx: Arc<Context<P>>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_with_finalizer(cc, &ctx).await;
    ctx.metrics.reconciled(started.elapsed(), result.as_ref().err().map(Error::metric_label));
    result
}

pub fn error_policy<P>(cc: Arc<ConsensusCluster>, error: &Error, _ctx: Arc<Context<P>>) -> Action {
    warn!(cluster = %cc.name_any(), %error, "reconcile failed; retrying");
    Action::requeue(ERROR_RETRY)
}

async fn reconcile_with_finalizer<P: MemberProbe>(
    cc: Arc<ConsensusCluster>,
    ctx: &Context<P>,
) -> Result<Action, Error> {
    let namespace = cc.namespace().ok_or(BuildError::MissingMetadata("namespace"))?;
    let api = Api::<ConsensusCluster>::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, cc, |event| async {
        match event {
            Finalizer::Apply(cc) => converge(&cc, ctx).await,
            Finalizer::Cleanup(cc) => clean_up(&cc, ctx).await,
        }
    })
    .await
    .map_err(|error| Error::Finalizer(Box::new(error)))
}

async fn converge<P: MemberProbe>(cc: &ConsensusCluster, ctx: &Context<P>) -> Result<Action, Error> {
    let name = cc.name_any();
    let observation = observe(&ctx.client, &ctx.probe, cc).await?;
    let step = plan::plan(&cc.spec, &observation.observed);
    info!(cluster = %name, ?step, "planned");

    let members = match &step {
        Step::RefuseSpec { reason } => {
            // The cluster keeps running as it is: nothing is applied, only reported.
            publish(ctx, cc, EventType::Warning, "InvalidSpec", "Refuse", reason.clone()).await?;
            None
        }
        Step::CreateWorkload { replicas } => {
            Some(Members { replicas: *replicas, state: InitialClusterState::New })
        }
        // Everything but the member count is kept converged with the spec; the count is
        // the planner's to change, one step at a time.
        // Membership steps are carried out on branch scale-k8s; until then they change nothing here.
        Step::Wait { .. }
        | Step::Steady
        | Step::AddLearner { .. }
        | Step::ResizeWorkload { .. }
        | Step::ChangeVoters { .. }
        | Step::TransferLeadership { .. }
        | Step::RemoveMember { .. }
        | Step::DeleteVolume { .. } => observation.observed.workload_replicas.map(|replicas| Members {
            replicas,
            state: if observation.bootstrapped {
                InitialClusterState::Existing
            } else {
                InitialClusterState::New
            },
        }),
    };
    if let Some(members) = members {
        // Configuration and Services first, so members started by the StatefulSet find
        // their configuration and their peers' names in place. Each change is reported as
        // it happens, so a failure half-way still leaves a true record.
        let desired = resources::desired(cc, members)?;
        let seen = &observation;
        report(ctx, cc, apply(&ctx.client, &desired.config_map, seen).await?).await?;
        report(ctx, cc, apply(&ctx.client, &desired.peer_service, seen).await?).await?;
        report(ctx, cc, apply(&ctx.client, &desired.client_service, seen).await?).await?;
        report(ctx, cc, apply(&ctx.client, &desired.pod_disruption_budget, seen).await?).await?;
        report(ctx, cc, apply(&ctx.client, &desired.stateful_set, seen).await?).await?;
    }

    let status = patch_status(ctx, cc, &observation, &step).await?;
    ctx.metrics.set_phase(&metrics_key(cc), status.phase);
    Ok(Action::requeue(match step {
        Step::Steady => STEADY_RECHECK,
        // A refused spec changes only when the resource does, which triggers a reconcile.
        Step::RefuseSpec { .. } => STEADY_RECHECK * 5,
        _ => PROGRESS_RECHECK,
    }))
}

async fn patch_status<P>(
    ctx: &Context<P>,
    cc: &ConsensusCluster,
    observation: &Observation,
    step: &Step,
) -> Result<ConsensusClusterStatus, Error> {
    let name = cc.name_any();
    let now = Time(Timestamp::now());
    let mut status = plan::status(&cc.spec, &observation.observed, step, cc.status.as_ref(), now);
    status.selector = Some(labels::selector_string(&name));
    let body = serde_json::json!({
        "apiVersion": ConsensusCluster::api_version(&()),
        "kind": ConsensusCluster::kind(&()),
        "status": status,
    });
    Api::<ConsensusCluster>::namespaced(ctx.client.clone(), &cc.namespace().unwrap_or_default())
        .patch_status(&name, &PatchParams::apply(STATUS_FIELD_MANAGER).force(), &Patch::Apply(body))
        .await?;
    Ok(status)
}

/// On deletion: owned objects go by cascade; volumes go only if the spec says so, because
/// the StatefulSet's own retention policy does not cover volumes it no longer tracks
/// (those of members removed by a scale-down).
async fn clean_up<P>(cc: &ConsensusCluster, ctx: &Context<P>) -> Result<Action, Error> {
    let name = cc.name_any();
    let namespace = cc.namespace().unwrap_or_default();
    let selector = labels::selector_string(&name);
    let claims = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &namespace);
    let names: Vec<String> = claims
        .list(&ListParams::default().labels(&selector))
        .await?
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    if !names.is_empty() {
        let (reason, note) = match cc.spec.storage.reclaim_policy {
            VolumeReclaimPolicy::Retain => (
                "VolumesRetained",
                format!(
                    "kept {} ({}): reclaimPolicy is Retain; remove them with kubectl delete pvc -n {namespace} -l {selector}",
                    names.len(),
                    names.join(", ")
                ),
            ),
            VolumeReclaimPolicy::Delete => {
                for claim in &names {
                    claims.delete(claim, &DeleteParams::default()).await?;
                }
                ("VolumesDeleted", format!("deleted {} ({})", names.len(), names.join(", ")))
            }
        };
        publish(ctx, cc, EventType::Normal, reason, "Delete", note).await?;
    }
    ctx.metrics.set_phase(&metrics_key(cc), None);
    Ok(Action::await_change())
}

async fn report<P>(ctx: &Context<P>, cc: &ConsensusCluster, applied: Option<Applied>) -> Result<(), Error> {
    let Some(applied) = applied else { return Ok(()) };
    let (reason, action, verb) = match applied.change {
        Change::Created => ("Created", "Create", "created"),
        Change::Updated => ("Updated", "Update", "updated"),
    };
    let note = format!("{verb} {} {}", applied.kind, applied.name);
    publish_about(ctx, cc, EventType::Normal, reason, action, note, Some(applied.reference)).await
}

fn metrics_key(cc: &ConsensusCluster) -> String {
    format!("{}/{}", cc.namespace().unwrap_or_default(), cc.name_any())
}

async fn publish<P>(
    ctx: &Context<P>,
    cc: &ConsensusCluster,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) -> Result<(), Error> {
    publish_about(ctx, cc, type_, reason, action, note, None).await
}

async fn publish_about<P>(
    ctx: &Context<P>,
    cc: &ConsensusCluster,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
    related: Option<k8s_openapi::api::core::v1::ObjectReference>,
) -> Result<(), Error> {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(truncate(note, 1024)),
        action: action.to_owned(),
        secondary: related,
    };
    ctx.recorder.publish(&event, &cc.object_ref(&())).await.map_err(Error::Event)
}

/// Events carry at most 1 kB of note; cut on a character boundary.
fn truncate(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}
