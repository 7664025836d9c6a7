//! Recovery from quorum loss on Kubernetes: the `Recover` step carried out one part per
//! reconcile, each decided ([`next`]) from what is observed, so an operator that stops
//! half-way resumes where things stand:
//! 1. the `snapshot` Job: a survivor's own snapshot taken while it runs, or the backup fetched;
//! 2. the StatefulSet scaled to 0, until every member pod is gone;
//! 3. the `restore` Job: the first member's data replaced by a one-member cluster under the
//!    recovery's token (the old data kept aside on its volume);
//! 4. the StatefulSet scaled to 1: the first member starts the new cluster alone, and the
//!    others are added back by the usual steps of a scale-up: the planner first deletes the
//!    other members' claims (`DeleteVolume`: they hold the old cluster, and no member runs on
//!    them), only once the new cluster serves, then adds learners, their pods on new volumes
//!    placed around the first, then one joint change.
//!
//! The Jobs stay once done (their logs say what happened) and are deleted by the next
//! recovery, or with the cluster.

use consensus_crds::{ConsensusCluster, FIELD_MANAGER, RecoveryRecord, RecoverySource};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::{Api, Client, ResourceExt};

use super::Error;
use super::observe::Observation;
use crate::resources::labels;
use crate::resources::member_claim;
use crate::resources::recovery::{
    Part, TOKEN_ANNOTATION, first_member, restore_job, run_selector, snapshot_job,
};

/// Where one of the recovery's Jobs stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Absent,
    /// Left by an earlier recovery (another token, made before this one started): deleted
    /// before this one's is made.
    Stale,
    /// Made for a recovery that started after the one this reconcile knows of: this
    /// reconcile's copy of the resource is stale, and does nothing.
    Newer,
    Running,
    Succeeded,
    /// Failed after its retries: why, as its last pod said.
    Failed(String),
}

/// What the next part of a recovery is decided from.
#[derive(Debug, Clone)]
pub struct Facts {
    pub source: RecoverySource,
    pub snapshot: JobState,
    pub restore: JobState,
    /// The StatefulSet's replicas.
    pub replicas: Option<i32>,
    /// Member pods that exist, running or not.
    pub member_pods: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    DeleteStale(Part),
    Create(Part),
    /// A part is under way; what it is.
    Await(String),
    /// The StatefulSet to 0 replicas.
    Stop,
    /// The StatefulSet to the first member alone.
    Start,
    /// The StatefulSet back to the declared size: members stopped before their survivor's
    /// snapshot was stored, which only a running survivor gives.
    Restart,
    /// A part failed: its Job is deleted to be made again on the next reconcile.
    Failed(Part, String),
}

/// The next part of a recovery, from where things stand.
pub fn next(facts: &Facts) -> Next {
    let parts = [(Part::Snapshot, &facts.snapshot), (Part::Restore, &facts.restore)];
    if parts.iter().any(|(_, state)| **state == JobState::Newer) {
        return Next::Await("a newer copy of the resource (a Job of a later recovery exists)".to_owned());
    }
    for (part, state) in parts {
        if *state == JobState::Stale {
            return Next::DeleteStale(part);
        }
    }
    let stopped = facts.replicas == Some(0);
    match &facts.restore {
        JobState::Succeeded if !stopped => {
            Next::Await("the first member to start the new cluster from its restored data".to_owned())
        }
        JobState::Succeeded => Next::Start,
        JobState::Running => {
            Next::Await("the restore Job to make the first member of the new cluster".to_owned())
        }
        JobState::Failed(why) => Next::Failed(Part::Restore, why.clone()),
        JobState::Absent | JobState::Stale | JobState::Newer => match &facts.snapshot {
            JobState::Succeeded if !stopped => Next::Stop,
            JobState::Succeeded if facts.member_pods > 0 => {
                Next::Await(format!("{} member pods to stop", facts.member_pods))
            }
            JobState::Succeeded => Next::Create(Part::Restore),
            JobState::Running => Next::Await("the snapshot Job to store the recovery's source".to_owned()),
            JobState::Failed(why) => Next::Failed(Part::Snapshot, why.clone()),
            // A survivor's snapshot is taken from it running: its members are started again
            // should they have been stopped without one (its Job deleted by hand, say).
            JobState::Absent | JobState::Stale | JobState::Newer
                if stopped && facts.source == RecoverySource::Survivor =>
            {
                Next::Restart
            }
            JobState::Absent | JobState::Stale | JobState::Newer => Next::Create(Part::Snapshot),
        },
    }
}

/// What a part that changed something did, for its Event.
pub struct Done {
    /// One per part: the recorder folds events of one reason about one object into one.
    pub reason: &'static str,
    pub note: String,
    pub job: Option<String>,
}

/// Takes the next part of the recovery `record` of `cc`; `None` while one is under way.
pub async fn advance(
    client: &Client,
    cc: &ConsensusCluster,
    observation: &Observation,
    record: &RecoveryRecord,
) -> Result<Option<Done>, Error> {
    let (cluster, namespace) = (cc.name_any(), cc.namespace().unwrap_or_default());
    let jobs = Api::<Job>::namespaced(client.clone(), &namespace);
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let selector = ListParams::default().labels(&run_selector(&cluster));
    let listed = jobs.list(&selector).await?.items;
    let run_pods = pods.list(&selector).await?.items;
    let first = first_member(&cluster);
    let state = |part: Part| job_state(&listed, &run_pods, &part.job_name(&cluster), record);
    let facts = Facts {
        source: record.source,
        snapshot: state(Part::Snapshot),
        restore: state(Part::Restore),
        replicas: observation.observed.workload_replicas,
        member_pods: observation.pods.len(),
    };
    let background =
        DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..DeleteParams::default() };
    let delete_job = |part: Part| {
        let (jobs, params, name) = (jobs.clone(), background.clone(), part.job_name(&cluster));
        async move {
            match jobs.delete(&name, &params).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
                Err(error) => Err(Error::from(error)),
            }
        }
    };
    let done = |reason: &'static str, note: String, job: Option<String>| Ok(Some(Done { reason, note, job }));
    match next(&facts) {
        Next::Await(what) => {
            tracing::info!(cluster = %cluster, "recovery: waiting for {what}");
            Ok(None)
        }
        Next::DeleteStale(part) => {
            delete_job(part).await?;
            let note = format!("deleted {}, left by an earlier recovery", part.job_name(&cluster));
            done("RecoveryJobReplaced", note, None)
        }
        Next::Failed(part, why) => {
            delete_job(part).await?;
            Err(Error::Recovery(format!(
                "{} failed ({why}); it is made again on the next reconcile",
                part.job_name(&cluster)
            )))
        }
        Next::Create(part) => {
            if part == Part::Snapshot && !observation.observed.volumes.contains(&first) {
                // A new cluster made from a backup: no member has run, so no claim exists.
                create_claim(client, cc, &first).await?;
            }
            let job = match part {
                Part::Snapshot => {
                    let members = ListParams::default().labels(&labels::selector_string(&cluster));
                    let node = pods.list(&members).await?.items.into_iter().find(|p| p.name_any() == first);
                    let node = node.and_then(|p| p.spec).and_then(|s| s.node_name);
                    snapshot_job(cc, record, node.as_deref())?
                }
                Part::Restore => restore_job(cc, record)?,
            };
            match jobs.create(&PostParams::default(), &job).await {
                Ok(_) => {}
                // Made by an earlier reconcile that died before it was observed.
                Err(kube::Error::Api(status)) if status.is_already_exists() => return Ok(None),
                Err(error) => return Err(error.into()),
            }
            let name = part.job_name(&cluster);
            let note = match (part, record.source) {
                (Part::Snapshot, RecoverySource::Survivor) => format!(
                    "Job {name} streams the snapshot of {} onto the volume of {first}, while it still runs",
                    record.from
                ),
                (Part::Snapshot, RecoverySource::Backup) => {
                    format!("Job {name} fetches the backup {} onto the volume of {first}", record.from)
                }
                (Part::Restore, _) => format!(
                    "Job {name} replaces the data of {first} with a new one-member cluster restored from the \
                     snapshot (its old data kept in replaced/{} on its volume)",
                    record.cluster_token
                ),
            };
            let reason = match part {
                Part::Snapshot => "RecoverySnapshot",
                Part::Restore => "RecoveryRestore",
            };
            done(reason, note, Some(name))
        }
        Next::Stop => {
            scale(client, &namespace, &cluster, 0).await?;
            let note = format!(
                "stopping every member (StatefulSet {cluster} to 0 replicas) for {first} to be restored"
            );
            done("RecoveryStoppedMembers", note, None)
        }
        Next::Start => {
            scale(client, &namespace, &cluster, 1).await?;
            let note = format!(
                "starting {first} (StatefulSet {cluster} to 1 replica): it runs the new cluster alone, and the \
                 others are added to it as in a scale-up"
            );
            done("RecoveryStartedMembers", note, None)
        }
        Next::Restart => {
            scale(client, &namespace, &cluster, cc.spec.replicas).await?;
            let note = format!(
                "starting the members again (StatefulSet {cluster} to {} replicas): the snapshot of {} is \
                 taken from it running",
                cc.spec.replicas, record.from
            );
            done("RecoveryRestartedMembers", note, None)
        }
    }
}

/// The claim of `member`, made before its pod as the StatefulSet would make it.
async fn create_claim(client: &Client, cc: &ConsensusCluster, member: &str) -> Result<(), Error> {
    let claim = member_claim(cc, member)?;
    let claims =
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), &cc.namespace().unwrap_or_default());
    match claims.create(&PostParams::default(), &claim).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// The StatefulSet's replica count through its scale subresource; the operator's next apply
/// carries it on as the workload's size.
async fn scale(client: &Client, namespace: &str, cluster: &str, replicas: i32) -> Result<(), Error> {
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..PatchParams::default() };
    let patch = serde_json::json!({"spec": {"replicas": replicas}});
    Api::<StatefulSet>::namespaced(client.clone(), namespace)
        .patch_scale(cluster, &params, &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Where the Job `name` of `record`'s recovery stands, with why its last pod failed.
fn job_state(jobs: &[Job], pods: &[Pod], name: &str, record: &RecoveryRecord) -> JobState {
    let Some(job) = jobs.iter().find(|j| j.name_any() == name) else { return JobState::Absent };
    if job.annotations().get(TOKEN_ANNOTATION) != Some(&record.cluster_token) {
        // Status is written before a recovery's first Job is made, so a Job of another token
        // made since this recovery started belongs to a later one this copy does not show.
        let made = job.creation_timestamp().map(|t| t.0);
        return if made.is_some_and(|made| made >= record.started.0) {
            JobState::Newer
        } else {
            JobState::Stale
        };
    }
    let status = job.status.as_ref();
    if status.and_then(|s| s.succeeded).unwrap_or(0) > 0 {
        return JobState::Succeeded;
    }
    let failed = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Failed" && c.status == "True"));
    let Some(failed) = failed else { return JobState::Running };
    let said = pods
        .iter()
        .filter(|p| p.labels().get("job-name").map(String::as_str) == Some(name))
        .max_by_key(|p| p.creation_timestamp())
        .and_then(|p| {
            p.status.as_ref()?.container_statuses.as_ref()?.first()?.state.as_ref()?.terminated.clone()
        })
        .and_then(|t| t.message)
        .and_then(|m| m.lines().rfind(|l| !l.trim().is_empty()).map(str::to_owned));
    JobState::Failed(said.unwrap_or_else(|| {
        format!(
            "{}: {}",
            failed.reason.as_deref().unwrap_or("Failed"),
            failed.message.as_deref().unwrap_or("no message")
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(snapshot: JobState, restore: JobState, replicas: i32, pods: usize) -> Facts {
        Facts {
            source: RecoverySource::Survivor,
            snapshot,
            restore,
            replicas: Some(replicas),
            member_pods: pods,
        }
    }

    #[test]
    fn a_recovery_takes_its_parts_in_order_and_each_again_after_a_crash() {
        use JobState::*;
        // The survivor's snapshot first, while its members run.
        assert_eq!(next(&facts(Absent, Absent, 3, 3)), Next::Create(Part::Snapshot));
        assert!(matches!(next(&facts(Running, Absent, 3, 3)), Next::Await(_)));
        // Then every member stopped, and gone, before the restore.
        assert_eq!(next(&facts(Succeeded, Absent, 3, 3)), Next::Stop);
        assert!(matches!(next(&facts(Succeeded, Absent, 0, 1)), Next::Await(_)));
        assert_eq!(next(&facts(Succeeded, Absent, 0, 0)), Next::Create(Part::Restore));
        assert!(matches!(next(&facts(Succeeded, Running, 0, 0)), Next::Await(_)));
        // Restored: the first member starts alone.
        assert_eq!(next(&facts(Succeeded, Succeeded, 0, 0)), Next::Start);
        // Started: nothing more for the recovery to do.
        let started = facts(Succeeded, Succeeded, 1, 1);
        assert!(matches!(next(&started), Next::Await(_)));
    }

    #[test]
    fn a_failed_part_is_made_again_and_an_earlier_recoverys_jobs_go_first() {
        use JobState::*;
        let why = "connection refused".to_owned();
        assert_eq!(
            next(&facts(Failed(why.clone()), Absent, 3, 3)),
            Next::Failed(Part::Snapshot, why.clone())
        );
        assert_eq!(next(&facts(Succeeded, Failed(why.clone()), 0, 0)), Next::Failed(Part::Restore, why));
        assert_eq!(next(&facts(Stale, Absent, 3, 3)), Next::DeleteStale(Part::Snapshot));
        assert_eq!(next(&facts(Succeeded, Stale, 3, 3)), Next::DeleteStale(Part::Restore));
        // A later recovery's Job: this copy of the resource is stale and touches nothing.
        assert!(matches!(next(&facts(Newer, Absent, 3, 3)), Next::Await(_)));
        assert!(matches!(next(&facts(Succeeded, Newer, 0, 0)), Next::Await(_)));
    }

    #[test]
    fn a_survivor_stopped_without_its_snapshot_is_started_again_while_a_backup_is_fetched_anyway() {
        use JobState::*;
        assert_eq!(next(&facts(Absent, Absent, 0, 0)), Next::Restart);
        let backup = Facts { source: RecoverySource::Backup, ..facts(Absent, Absent, 0, 0) };
        assert_eq!(next(&backup), Next::Create(Part::Snapshot));
    }
}
