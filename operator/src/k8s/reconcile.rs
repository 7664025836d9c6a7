//! One reconcile: observe -> plan -> act, then status. Level-triggered: every reconcile
//! starts from what it observes, so a crash between two steps is harmless.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use consensus_crds::{ConsensusCluster, ConsensusClusterSpec, ConsensusClusterStatus, VolumeReclaimPolicy};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use super::apply::{Applied, Change, apply, apply_status};
use super::events::Events;
use super::metrics::Metrics;
use super::observe::{Observation, observe};
use super::{Error, backups, recovery, requests};
use crate::fault;
use crate::membership::{self, MembershipError};
use crate::plan::backup::{self, backup_name, outcome_event};
use crate::plan::recovery::{quorum_event, quorum_lost_since, recovery_event};
use crate::plan::{self, Observed, Step};
use crate::platform::{self, Platform, Round};
use crate::resources::backup::{BackupJob, run_selector};
use crate::resources::storage::StorageChange;
use crate::resources::{self, BuildError, Guarded, InitialClusterState, Members, labels};

/// Held on every ConsensusCluster until its deletion has been handled (volumes kept or
/// deleted as `spec.storage.reclaimPolicy` says, and reported).
pub const FINALIZER: &str = "consensus.dev/finalizer";

/// Members' health is not watched through the API server, so a steady cluster is looked
/// at again this often to keep its status true.
const STEADY_RECHECK: Duration = Duration::from_secs(60);
const PROGRESS_RECHECK: Duration = Duration::from_secs(10);
const ERROR_RETRY: Duration = Duration::from_secs(15);
const STEP_RECHECK: Duration = Duration::from_secs(2);

pub struct Context<M> {
    pub client: Client,
    pub recorder: Events,
    /// The members of every cluster, over connections kept between reconciles.
    pub members: M,
    pub metrics: Arc<Metrics>,
}

pub async fn reconcile<M: membership::Members>(
    cc: Arc<ConsensusCluster>,
    ctx: Arc<Context<M>>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_with_finalizer(cc, &ctx).await;
    ctx.metrics.reconciled(started.elapsed(), result.as_ref().err().map(Error::metric_label));
    result
}

pub fn error_policy<M>(cc: Arc<ConsensusCluster>, error: &Error, _ctx: Arc<Context<M>>) -> Action {
    warn!(cluster = %cc.name_any(), %error, "reconcile failed; retrying");
    Action::requeue(ERROR_RETRY)
}

async fn reconcile_with_finalizer<M: membership::Members>(
    cc: Arc<ConsensusCluster>,
    ctx: &Context<M>,
) -> Result<Action, Error> {
    let namespace = cc.namespace().ok_or(BuildError::MissingMetadata("namespace"))?;
    let api = Api::<ConsensusCluster>::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, cc, |event| async {
        match event {
            Finalizer::Apply(cc) => converge_with(&cc, ctx, |observed| plan::plan(&cc.spec, observed)).await,
            Finalizer::Cleanup(cc) => clean_up(&cc, ctx).await,
        }
    })
    .await
    .map_err(|error| Error::Finalizer(Box::new(error)))
}

/// One reconcile of a cluster that is not being deleted, with the decision passed in:
/// observe, `decide` the step, act on it, report status. The planner is the only caller
/// outside tests; tests pass the step they want acted on, so each step's effect on the API
/// server is checked whatever the planner would choose.
pub async fn converge_with<M: membership::Members>(
    cc: &ConsensusCluster,
    ctx: &Context<M>,
    decide: impl FnOnce(&Observed) -> Step,
) -> Result<Action, Error> {
    let mut kubernetes = Kubernetes { cc, ctx, events: EventLog::about(&ctx.recorder, cc) };
    let Round { observation, step, acted } = platform::round(&mut kubernetes, decide).await?;
    let events = kubernetes.events;
    if let Err(Error::Membership(cause)) = &acted {
        let note = format!("{step:?} failed, retried on the next reconcile: {cause}");
        events.publish(EventType::Warning, "MembershipChangeFailed", "ChangeMembership", note, None).await;
    }
    // Status is written whatever became of the step, and says so when it failed: a reconcile
    // that stopped half-way must not leave the status of the one before in place.
    let failure = acted.as_ref().err().map(ToString::to_string);
    let status = update_status(ctx, cc, &observation, &step, failure.as_deref()).await?;
    if let Some(event) = outcome_event(cc.status.as_ref(), &status) {
        if let Some(run) =
            backup::latest_run(&observation.observed.backup_runs, None).filter(|_| event.run_ended)
        {
            ctx.metrics.backup_ended(&metrics_key(cc), run);
        }
        let type_ = if event.warning { EventType::Warning } else { EventType::Normal };
        events.publish(type_, event.reason, "Backup", event.message, None).await;
    }
    let quorum = quorum_event(cc.status.as_ref(), &status);
    for event in quorum.into_iter().chain(recovery_event(cc.status.as_ref(), &status)) {
        let type_ = if event.warning { EventType::Warning } else { EventType::Normal };
        events.publish(type_, event.reason, "Observe", event.message, None).await;
    }
    ctx.metrics.set_phase(&metrics_key(cc), status.phase);
    ctx.metrics.set_quorum_lost(&metrics_key(cc), quorum_lost_since(Some(&status)));
    ctx.metrics.set_last_backup(&metrics_key(cc), status.last_backup.as_ref());
    // After everything about the cluster is told: a request that cannot be written to (one
    // deleted meanwhile) fails the reconcile, to be written by the next, and keeps nothing
    // about the cluster from being said.
    let requests = update_requests(ctx, cc, &observation, &step, failure.as_deref()).await;
    events.die_at_fault_points();
    acted?;
    requests?;
    events.finish()?;
    let planned = match step {
        Step::Steady => STEADY_RECHECK,
        // A refused spec changes only when the resource does, which triggers a reconcile.
        Step::RefuseSpec { .. } => STEADY_RECHECK * 5,
        // A backup's end comes through the watch on its Job; the recheck bounds a missed one.
        Step::CreateWorkload { .. }
        | Step::ResizeWorkload { .. }
        | Step::Wait { .. }
        | Step::TakeBackup { .. } => PROGRESS_RECHECK,
        // The next step of a membership change can usually follow at once.
        Step::AddLearner { .. }
        | Step::ChangeVoters { .. }
        | Step::TransferLeadership { .. }
        | Step::RemoveMember { .. }
        | Step::DeleteVolume { .. }
        | Step::UpdateMember { .. }
        | Step::BeginRecovery { .. }
        | Step::Recover { .. } => STEP_RECHECK,
    };
    // Nothing on the API server changes when a backup slot comes or a failed one is due again.
    let schedule = backup::wake_in(&cc.spec, &observation.observed).unwrap_or(planned);
    Ok(Action::requeue(planned.min(schedule)))
}

/// The Kubernetes platform, for one reconcile of one cluster: observed through the API
/// server and the members, acted on by server-side apply, the members and Events.
struct Kubernetes<'a, M> {
    cc: &'a ConsensusCluster,
    ctx: &'a Context<M>,
    events: EventLog<'a>,
}

impl<M: membership::Members> Platform for Kubernetes<'_, M> {
    type Observation = Observation;
    type Error = Error;

    async fn observe(&mut self) -> Result<Observation, Error> {
        observe(&self.ctx.client, &self.ctx.members, self.cc).await
    }

    /// Applies the objects and carries out `step`, each change reported as an Event as it
    /// happens, so a failure half-way still leaves a true record.
    async fn act(&mut self, observation: &Observation, step: &Step) -> Result<(), Error> {
        let (cc, ctx, events) = (self.cc, self.ctx, &self.events);
        info!(cluster = %cc.name_any(), ?step, "planned");
        if let Step::RefuseSpec { reason } = step {
            // The cluster keeps running as it is: nothing is applied, only reported.
            events.publish(EventType::Warning, "InvalidSpec", "Refuse", reason.clone(), None).await;
        }
        if let Some(members) = workload_members(&cc.spec, step, observation) {
            // Configuration and Services first, so members started by the StatefulSet find
            // their configuration and their peers' names in place.
            let carried_out = storage_as_carried_out(cc, observation, step);
            let (desired, seen) = (resources::desired(&carried_out, members)?, observation);
            events.applied(apply(&ctx.client, &desired.config_map, seen).await?).await;
            events.applied(apply(&ctx.client, &desired.peer_service, seen).await?).await;
            events.applied(apply(&ctx.client, &desired.client_service, seen).await?).await;
            events.applied(apply(&ctx.client, &desired.pod_disruption_budget, seen).await?).await;
            if observation.stateful_set_deleting {
                // Applied again once it is gone; its pods run on meanwhile.
                info!(cluster = %cc.name_any(), "the StatefulSet is being deleted; re-created when it is gone");
                return Ok(());
            }
            if matches!(step, Step::Steady)
                && change_volume_template(cc, ctx, events, &observation.storage).await?
            {
                // The step is planned again from what the next round sees.
                return Ok(());
            }
            events.applied(apply(&ctx.client, &desired.stateful_set, seen).await?).await;
        }
        act(cc, ctx, events, observation, step).await
    }
}

/// The resource with `spec.storage` as the StatefulSet can have it now: its volume template
/// stays as it is (the API server refuses any change of it) while a change is refused, and
/// while one waits for the cluster to be steady: re-creating the StatefulSet takes its
/// replica count from the pods, which a step under way (a member restarting) makes too few.
/// The rest of the spec still applies.
fn storage_as_carried_out(cc: &ConsensusCluster, observation: &Observation, step: &Step) -> ConsensusCluster {
    let mut cc = cc.clone();
    let keep = match observation.storage {
        StorageChange::None => false,
        StorageChange::Refuse(_) => true,
        StorageChange::Expand { .. } | StorageChange::Recreate => !matches!(step, Step::Steady),
    };
    if let (true, Some(template)) = (keep, &observation.volume_template) {
        if let Some(size) = &template.size {
            cc.spec.storage.size.clone_from(size);
        }
        cc.spec.storage.storage_class_name.clone_from(&template.class);
    }
    cc
}

/// The member set the objects are applied for in this reconcile, `None` to apply nothing.
fn workload_members(spec: &ConsensusClusterSpec, step: &Step, observation: &Observation) -> Option<Members> {
    if plan::refuses_kept_volumes(spec, &observation.observed) {
        // Objects applied now would start members on another cluster's volumes.
        return None;
    }
    let (replicas, state) = match step {
        // The members are what is being made again.
        Step::RefuseSpec { .. } | Step::BeginRecovery { .. } | Step::Recover { .. } => return None,
        // The configuration may still say a leader was seen before status had a cluster id.
        Step::CreateWorkload { replicas, bootstrap: true } if !observation.bootstrapped => {
            (*replicas, InitialClusterState::New)
        }
        // A cluster has run here: members on kept volumes resume it, and a member without
        // one must join them, never found a cluster of its own.
        Step::CreateWorkload { replicas, .. } => (*replicas, InitialClusterState::Existing),
        // The ConfigMap lists every member the StatefulSet will run, and a member started
        // now joins the running cluster: with `new` and an empty volume it would found a
        // second one.
        Step::ResizeWorkload { replicas } => (*replicas, InitialClusterState::Existing),
        // Everything but the member count is kept converged with the spec; the count is
        // the planner's to change, one step at a time.
        Step::Wait { .. }
        | Step::Steady
        | Step::AddLearner { .. }
        | Step::ChangeVoters { .. }
        | Step::TransferLeadership { .. }
        | Step::RemoveMember { .. }
        | Step::DeleteVolume { .. }
        | Step::UpdateMember { .. }
        | Step::TakeBackup { .. } => (
            observation.observed.workload_replicas?,
            if observation.bootstrapped { InitialClusterState::Existing } else { InitialClusterState::New },
        ),
    };
    // Applied before the step is carried out, so the budget already covers its outcome. An
    // eviction is refused while the disruption controller has not caught up with a changed
    // budget (status.observedGeneration behind), so a lowered one holds from the apply on.
    let guarded = Guarded::for_step(&observation.observed, observation.pods.len(), replicas, step);
    Some(Members { replicas, state, guarded })
}

/// What a step does beyond applying the objects: membership changes through the members,
/// volume deletion through the API server, and the Event that reports each.
async fn act<M: membership::Members>(
    cc: &ConsensusCluster,
    ctx: &Context<M>,
    events: &EventLog<'_>,
    observation: &Observation,
    step: &Step,
) -> Result<(), Error> {
    let cluster = cc.name_any();
    let namespace = cc.namespace().unwrap_or_default();
    // Leader-only changes go to the leader's own address: the client Service would hand
    // them to any ready member, and MoveLeader is refused anywhere but on the leader.
    let leader = || observation.leader_url.as_deref().ok_or(MembershipError::NoLeader);
    let observed = &observation.observed;
    // The recorder folds an Event with the same reason and related object into a series of
    // the first, note and all: events about one member name its pod, so two members' events
    // stay two. Cluster-wide ones (voters, size) differ by the cluster's resourceVersion,
    // which every spec and status change moves.
    let normal =
        |reason: &'static str, action: &'static str, note: String, related: Option<ObjectReference>| {
            events.publish(EventType::Normal, reason, action, note, related)
        };
    let pod = |member: &str| Some(reference::<Pod>(&namespace, member));
    match step {
        Step::AddLearner { name } => {
            let peer_url = resources::peer_url(&cluster, &namespace, name);
            let id = ctx.members.add_learner(leader()?, &peer_url).await?;
            let mut note =
                format!("added {name} (id {id:x}) as a learner at {peer_url}; it catches up before it votes");
            if let Some(uid) = observation.lost_data_pods.get(name) {
                restart_pod(&ctx.client, &namespace, name, uid).await?;
                note.push_str(
                    "; its pod, held in back-off after the lost-data exit, was deleted to start now",
                );
            }
            normal("MemberAdded", "AddLearner", note, pod(name)).await;
        }
        Step::ChangeVoters { voters } => {
            ctx.members.change_voters(leader()?, voters).await?;
            let members = observed.members.as_deref().unwrap_or_default();
            for learner in members.iter().filter(|m| m.is_learner && voters.contains(&m.id)) {
                let applied = learner.applied_index.map_or_else(|| "unknown".to_owned(), |i| i.to_string());
                let leader =
                    observed.leader_raft_index.map_or_else(|| "unknown".to_owned(), |i| i.to_string());
                let note = format!(
                    "learner {} caught up (applied index {applied}, leader at {leader}) and now votes",
                    learner.name
                );
                normal("LearnerCaughtUp", "ChangeVoters", note, pod(&learner.name)).await;
            }
            let names: Vec<String> = voters.iter().map(|id| observed.member_name(*id)).collect();
            let note = format!(
                "the {} voters are now {}, changed in one joint-consensus step",
                voters.len(),
                names.join(", ")
            );
            normal("VotersChanged", "ChangeVoters", note, None).await;
        }
        Step::TransferLeadership { to } => {
            ctx.members.move_leader(leader()?, *to).await?;
            let from = observed.leader.map_or_else(|| "the leader".to_owned(), |id| observed.member_name(id));
            let to = observed.member_name(*to);
            let note = format!("moved leadership from {from} to {to}");
            normal("LeadershipTransferred", "TransferLeadership", note, pod(&to)).await;
        }
        Step::RemoveMember { id, name } => {
            ctx.members.remove(leader()?, *id).await?;
            let note = format!("removed {name} (id {id:x}) from the membership");
            normal("MemberRemoved", "RemoveMember", note, pod(name)).await;
        }
        Step::ResizeWorkload { replicas } => match observed.workload_replicas {
            // Applied above; a repeat after a crash changes nothing and says nothing.
            Some(before) if before == *replicas => {}
            before => {
                let before = before.map_or_else(|| "no".to_owned(), |b| b.to_string());
                let note = format!("StatefulSet {cluster}: {before} -> {replicas} replicas");
                normal("Resized", "Resize", note, Some(reference::<StatefulSet>(&namespace, &cluster))).await;
            }
        },
        Step::DeleteVolume { name } => {
            if let Some(why) = volume_in_use(&cluster, name, observation) {
                info!(cluster = %cluster, member = %name, "volume kept for now: {why}");
                return Ok(());
            }
            let claim = resources::volume_claim_name(name);
            let claims = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &namespace);
            match claims.delete(&claim, &DeleteParams::default()).await {
                Ok(_) => {}
                // Deleted by an earlier reconcile that died before reporting it.
                Err(kube::Error::Api(status)) if status.is_not_found() => return Ok(()),
                Err(error) => return Err(error.into()),
            }
            let note = format!("deleted {claim}, the volume of removed member {name}");
            let related = Some(reference::<PersistentVolumeClaim>(&namespace, &claim));
            normal("VolumeDeleted", "DeleteVolume", note, related).await;
        }
        Step::UpdateMember { name } => {
            let Some(uid) = observation.pods.get(name) else {
                // Gone already: the StatefulSet creates it from the current template.
                return Ok(());
            };
            restart_pod(&ctx.client, &namespace, name, uid).await?;
            let note = format!(
                "restarted {name} onto the StatefulSet's new template, on its own volume; the next member \
                 follows once it has caught up"
            );
            normal("MemberUpdated", "UpdateMember", note, pod(name)).await;
        }
        Step::TakeBackup { slot, attempt, from, request } => {
            let backup = backup_name(&cluster, *slot, request.as_deref());
            let asked = request
                .as_ref()
                .and_then(|r| observation.backup_requests.iter().find(|b| &b.name_any() == r));
            let planned = asked.map(requests::request_of);
            let run = BackupJob::planned(&cc.spec, &backup, (*slot, *attempt, from), planned.as_ref())
                .ok_or(BuildError::NoBackupDestination)?;
            backups::start(&ctx.client, cc, &run, asked, &observation.ended_backup_jobs).await?;
            let job = run.job_name(&cluster);
            let asked_by = request.as_ref().map_or_else(String::new, |r| format!(" for ConsensusBackup {r}"));
            let note = format!(
                "backup {backup}{asked_by} (attempt {attempt}) is being taken from {from} by Job {job}"
            );
            normal("BackupStarted", "Backup", note, Some(reference::<Job>(&namespace, &job))).await;
        }
        Step::Recover { record } => {
            if let Some(done) = recovery::advance(&ctx.client, cc, observation, record).await? {
                let related = match done.job {
                    Some(job) => reference::<Job>(&namespace, &job),
                    None => reference::<StatefulSet>(&namespace, &cluster),
                };
                normal(done.reason, "Recover", done.note, Some(related)).await;
            }
        }
        // Recorded in status by this reconcile, before anything is changed.
        Step::BeginRecovery { .. }
        | Step::RefuseSpec { .. }
        | Step::CreateWorkload { .. }
        | Step::Wait { .. }
        | Step::Steady => {}
    }
    Ok(())
}

/// Carries out a change of the StatefulSet's volume template: the claims raised first,
/// then the StatefulSet deleted with its pods orphaned, to be applied again (with the new
/// template) once it is gone. True when the StatefulSet is being re-created, so nothing
/// more is done this round. A refused change is reported here and applied as kept.
async fn change_volume_template<M>(
    cc: &ConsensusCluster,
    ctx: &Context<M>,
    events: &EventLog<'_>,
    storage: &StorageChange,
) -> Result<bool, Error> {
    let (name, namespace) = (cc.name_any(), cc.namespace().unwrap_or_default());
    let stateful_set = Some(reference::<StatefulSet>(&namespace, &name));
    let mut note = match storage {
        StorageChange::None => return Ok(false),
        StorageChange::Refuse(why) => {
            events
                .publish(
                    EventType::Warning,
                    "StorageChangeRefused",
                    "ChangeStorage",
                    why.clone(),
                    stateful_set,
                )
                .await;
            return Ok(false);
        }
        StorageChange::Recreate => "the volumes already are as spec.storage says".to_owned(),
        StorageChange::Expand { claims, size } => {
            let api = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &namespace);
            let patch = serde_json::json!({"spec": {"resources": {"requests": {"storage": size}}}});
            for claim in claims {
                api.patch(claim, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            }
            format!("requested {size} for {}; their StorageClass expands them", claims.join(", "))
        }
    };
    let orphan =
        DeleteParams { propagation_policy: Some(PropagationPolicy::Orphan), ..DeleteParams::default() };
    match Api::<StatefulSet>::namespaced(ctx.client.clone(), &namespace).delete(&name, &orphan).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_not_found() => {}
        Err(error) => return Err(error.into()),
    }
    note.push_str(&format!(
        "; StatefulSet {name} is re-created with the new volume template, its pods running on meanwhile"
    ));
    events.publish(EventType::Normal, "VolumesResized", "ChangeStorage", note, stateful_set).await;
    Ok(true)
}

/// Deletes the pod `name` that was observed with `uid`, for the StatefulSet to create it
/// again on the same volume. The uid precondition spares a pod created since: it already
/// started after the change this restart is for.
async fn restart_pod(client: &Client, namespace: &str, name: &str, uid: &str) -> Result<(), Error> {
    let params = DeleteParams {
        preconditions: Some(Preconditions { uid: Some(uid.to_owned()), resource_version: None }),
        ..DeleteParams::default()
    };
    match Api::<Pod>::namespaced(client.clone(), namespace).delete(name, &params).await {
        Ok(_) => Ok(()),
        // Gone or replaced meanwhile: either way it starts afresh.
        Err(kube::Error::Api(status)) if status.is_not_found() || status.is_conflict() => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Why `member`'s volume must not be deleted yet, if it must not: a volume deleted under a
/// member that still runs, or that the StatefulSet would start again, takes its data with it.
fn volume_in_use(cluster: &str, member: &str, observation: &Observation) -> Option<String> {
    let observed = &observation.observed;
    let Some(members) = observed.members.as_deref() else {
        return Some("no member answered, so its removal is not confirmed".to_owned());
    };
    if members.iter().any(|m| m.name == member) {
        return Some(format!("{member} is still in the membership"));
    }
    if observation.pods.contains_key(member) {
        return Some(format!("the pod {member} still exists"));
    }
    let ordinal = member.strip_prefix(cluster).and_then(|rest| rest.strip_prefix('-'))?.parse::<i32>();
    match (ordinal, observed.workload_replicas) {
        (Ok(ordinal), Some(replicas)) if ordinal < replicas => {
            Some(format!("the StatefulSet runs {replicas} members, {member} among them"))
        }
        (Ok(_), _) => None,
        (Err(_), _) => Some(format!("{member} is not a member name of {cluster}")),
    }
}

fn reference<K: k8s_openapi::Resource>(namespace: &str, name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some(K::API_VERSION.to_owned()),
        kind: Some(K::KIND.to_owned()),
        namespace: Some(namespace.to_owned()),
        name: Some(name.to_owned()),
        ..ObjectReference::default()
    }
}

/// Writes the status of this reconcile unless the cluster already shows it: a write that
/// changes nothing still wakes every watcher of the resource.
async fn update_status<M>(
    ctx: &Context<M>,
    cc: &ConsensusCluster,
    observation: &Observation,
    step: &Step,
    failure: Option<&str>,
) -> Result<ConsensusClusterStatus, Error> {
    let name = cc.name_any();
    let now = Time(observation.observed.now);
    let mut status = plan::status(&cc.spec, &observation.observed, step, failure, cc.status.as_ref(), now);
    status.selector = Some(labels::selector_string(&name));
    if cc.status.as_ref() == Some(&status) {
        return Ok(status);
    }
    apply_status(&ctx.client, cc, &status).await?;
    Ok(status)
}

/// Writes the status of each ConsensusBackup of the cluster that moved on, with an Event on
/// it for each try started, each backup taken and each failure.
async fn update_requests<M>(
    ctx: &Context<M>,
    cc: &ConsensusCluster,
    observation: &Observation,
    step: &Step,
    failure: Option<&str>,
) -> Result<(), Error> {
    for update in backup::request_updates(&cc.spec, &observation.observed, step, failure) {
        let Some(asked) = observation.backup_requests.iter().find(|b| b.name_any() == update.request.name)
        else {
            continue;
        };
        apply_status(&ctx.client, asked, &update.status).await?;
        if let Some(run) = update.ended_run {
            ctx.metrics.backup_ended(&metrics_key(cc), run);
        }
        if let Some(event) = update.event {
            let events = EventLog::about(&ctx.recorder, asked);
            let type_ = if event.warning { EventType::Warning } else { EventType::Normal };
            events.publish(type_, event.reason, "Backup", event.message, None).await;
            events.finish()?;
        }
    }
    Ok(())
}

/// On deletion: owned objects go by cascade; volumes go only if the spec says so, because
/// the StatefulSet's own retention policy does not cover volumes it no longer tracks
/// (those of members removed by a scale-down).
async fn clean_up<M>(cc: &ConsensusCluster, ctx: &Context<M>) -> Result<Action, Error> {
    let name = cc.name_any();
    let namespace = cc.namespace().unwrap_or_default();
    let selector = labels::selector_string(&name);
    let claims = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &namespace);
    // The runs of its ConsensusBackups, which they own: the cluster they take is gone.
    let jobs = Api::<Job>::namespaced(ctx.client.clone(), &namespace);
    let background =
        DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..DeleteParams::default() };
    for job in jobs.list(&ListParams::default().labels(&run_selector(&name))).await? {
        match jobs.delete(&job.name_any(), &background).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(error) => return Err(error.into()),
        }
    }
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
        let events = EventLog::about(&ctx.recorder, cc);
        events.publish(EventType::Normal, reason, "Delete", note, None).await;
        // Retried before the finalizer goes: the record of what became of the volumes is
        // the one thing left of the cluster.
        events.finish()?;
    }
    ctx.metrics.set_phase(&metrics_key(cc), None);
    ctx.metrics.set_quorum_lost(&metrics_key(cc), None);
    Ok(Action::await_change())
}

fn metrics_key(cc: &ConsensusCluster) -> String {
    format!("{}/{}", cc.namespace().unwrap_or_default(), cc.name_any())
}

/// The Events of one reconcile. A failed publish does not stop the reconcile: what it
/// reports has happened, and the status written after must say so. The first failure is
/// kept and returned by `finish`, so the reconcile is retried and counted as failed.
struct EventLog<'a> {
    recorder: &'a Events,
    regarding: ObjectReference,
    failed: Mutex<Option<kube::Error>>,
    /// The reasons of the Events told, in order.
    told: Mutex<Vec<String>>,
}

impl<'a> EventLog<'a> {
    fn about<K: Resource<DynamicType = ()>>(recorder: &'a Events, object: &K) -> Self {
        Self { recorder, regarding: object.object_ref(&()), failed: Mutex::default(), told: Mutex::default() }
    }

    async fn publish(
        &self,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
        related: Option<ObjectReference>,
    ) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(truncate(note, 1024)),
            action: action.to_owned(),
            secondary: related,
        };
        match self.recorder.publish(&event, &self.regarding).await {
            Ok(()) => self.told.lock().unwrap_or_else(PoisonError::into_inner).push(reason.to_owned()),
            Err(error) => {
                warn!(%error, reason, "publishing an event failed");
                let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
                failed.get_or_insert(error);
            }
        }
    }

    /// The Event for an object an apply created or changed.
    async fn applied(&self, applied: Option<Applied>) {
        let Some(applied) = applied else { return };
        let (reason, action, verb) = match applied.change {
            Change::Created => ("Created", "Create", "created"),
            Change::Updated => ("Updated", "Update", "updated"),
        };
        let note = format!("{verb} {} {}", applied.kind, applied.name);
        self.publish(EventType::Normal, reason, action, note, Some(applied.reference)).await;
    }

    /// Dies at a fault point (`crate::fault`) this reconcile reached: an Event it told.
    fn die_at_fault_points(&self) {
        for reason in self.told.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            fault::reached(reason);
        }
    }

    fn finish(self) -> Result<(), Error> {
        match self.failed.into_inner().unwrap_or_else(PoisonError::into_inner) {
            Some(error) => Err(Error::Event(error)),
            None => Ok(()),
        }
    }
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
