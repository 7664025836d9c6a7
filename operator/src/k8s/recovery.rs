//! Recovery from quorum loss on Kubernetes: the `Recover` step carried out one part per
//! reconcile, each decided ([`next`]) from what is observed, so an operator that stops
//! half-way resumes where things stand:
//! 1. the `snapshot` Job: a survivor's own snapshot taken while it runs, or the backup fetched;
//! 2. the StatefulSet scaled to 0, until every member pod is gone;
//! 3. the `restore` Job: the first member's data replaced by a one-member cluster under the
//!    recovery's token (the old data kept aside on its volume);
//! 4. the other members' claims deleted: they hold the old cluster, whose id the new one
//!    refuses (a StorageClass with `reclaimPolicy: Retain` keeps the volumes themselves);
//! 5. the StatefulSet scaled to 1: the first member starts the new cluster alone, and the
//!    others are added back by the usual steps of a scale-up (learners, then their pods, on
//!    new volumes placed around it, then one joint change).
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
use crate::resources::recovery::{
    Part, TOKEN_ANNOTATION, first_member, restore_job, run_selector, snapshot_job,
};
use crate::resources::{labels, volume_claim_name};

/// Where one of the recovery's Jobs stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Absent,
    /// Left by an earlier recovery (another token): deleted before this one's is made.
    Stale,
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
    /// The claims of the members other than the first, each with whether it is being deleted.
    pub other_claims: Vec<(String, bool)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    DeleteStale(Part),
    Create(Part),
    /// A part is under way; what it is.
    Await(String),
    /// The StatefulSet to 0 replicas.
    Stop,
    DeleteClaims(Vec<String>),
    /// The StatefulSet to the first member alone.
    Start,
    /// A part failed: its Job is deleted to be made again on the next reconcile.
    Failed(Part, String),
}

/// The next part of a recovery, from where things stand.
pub fn next(facts: &Facts) -> Next {
    for (part, state) in [(Part::Snapshot, &facts.snapshot), (Part::Restore, &facts.restore)] {
        if *state == JobState::Stale {
            return Next::DeleteStale(part);
        }
    }
    let stopped = facts.replicas == Some(0);
    match &facts.restore {
        JobState::Succeeded if !stopped => {
            Next::Await("the first member to start the new cluster from its restored data".to_owned())
        }
        JobState::Succeeded => {
            let deleting: Vec<String> =
                facts.other_claims.iter().filter(|(_, deleting)| !deleting).map(|(c, _)| c.clone()).collect();
            if !deleting.is_empty() {
                Next::DeleteClaims(deleting)
            } else if !facts.other_claims.is_empty() {
                Next::Await("the other members' claims to be deleted".to_owned())
            } else {
                Next::Start
            }
        }
        JobState::Running => {
            Next::Await("the restore Job to make the first member of the new cluster".to_owned())
        }
        JobState::Failed(why) => Next::Failed(Part::Restore, why.clone()),
        JobState::Absent | JobState::Stale => match &facts.snapshot {
            JobState::Succeeded if !stopped => Next::Stop,
            JobState::Succeeded if facts.member_pods > 0 => {
                Next::Await(format!("{} member pods to stop", facts.member_pods))
            }
            JobState::Succeeded => Next::Create(Part::Restore),
            JobState::Running => Next::Await("the snapshot Job to store the recovery's source".to_owned()),
            JobState::Failed(why) => Next::Failed(Part::Snapshot, why.clone()),
            // A survivor's snapshot is taken from it running: its members are started again
            // should they have been stopped without one (its Job deleted by hand, say).
            JobState::Absent | JobState::Stale if stopped && facts.source == RecoverySource::Survivor => {
                Next::Start
            }
            JobState::Absent | JobState::Stale => Next::Create(Part::Snapshot),
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
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &namespace);
    let selector = ListParams::default().labels(&run_selector(&cluster));
    let listed = jobs.list(&selector).await?.items;
    let run_pods = pods.list(&selector).await?.items;
    let first = first_member(&cluster);
    let first_claim = volume_claim_name(&first);
    let other_claims = claims
        .list(&ListParams::default().labels(&labels::selector_string(&cluster)))
        .await?
        .items
        .into_iter()
        .filter(|c| c.name_any() != first_claim)
        .map(|c| (c.name_any(), c.metadata.deletion_timestamp.is_some()))
        .collect();
    let state = |part: Part| job_state(&listed, &run_pods, &part.job_name(&cluster), &record.cluster_token);
    let facts = Facts {
        source: record.source,
        snapshot: state(Part::Snapshot),
        restore: state(Part::Restore),
        replicas: observation.observed.workload_replicas,
        member_pods: observation.pods.len(),
        other_claims,
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
        Next::DeleteClaims(names) => {
            for name in &names {
                match claims.delete(name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.is_not_found() => {}
                    Err(error) => return Err(error.into()),
                }
            }
            let note = format!(
                "deleted {}: they hold the old cluster; those members start empty and join the new one",
                names.join(", ")
            );
            done("RecoveryReplacedVolumes", note, None)
        }
        Next::Start => {
            scale(client, &namespace, &cluster, 1).await?;
            let note = format!(
                "starting {first} (StatefulSet {cluster} to 1 replica): it runs the new cluster alone, and the \
                 others are added to it as in a scale-up"
            );
            done("RecoveryStartedMembers", note, None)
        }
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

/// Where the Job `name` of the recovery under `token` stands, with why its last pod failed.
fn job_state(jobs: &[Job], pods: &[Pod], name: &str, token: &str) -> JobState {
    let Some(job) = jobs.iter().find(|j| j.name_any() == name) else { return JobState::Absent };
    if job.annotations().get(TOKEN_ANNOTATION).map(String::as_str) != Some(token) {
        return JobState::Stale;
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
            other_claims: vec![("data-demo-1".to_owned(), false), ("data-demo-2".to_owned(), false)],
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
        // The old members' claims go before anything starts, then the members start.
        let restored = facts(Succeeded, Succeeded, 0, 0);
        assert_eq!(next(&restored), Next::DeleteClaims(vec!["data-demo-1".into(), "data-demo-2".into()]));
        let deleting = Facts { other_claims: vec![("data-demo-1".to_owned(), true)], ..restored.clone() };
        assert!(matches!(next(&deleting), Next::Await(_)), "started only once they are gone");
        let gone = Facts { other_claims: Vec::new(), ..restored };
        assert_eq!(next(&gone), Next::Start);
        // Started: the new empty claims the StatefulSet makes are never deleted.
        let started = facts(Succeeded, Succeeded, 3, 3);
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
    }

    #[test]
    fn a_survivor_stopped_without_its_snapshot_is_started_again_while_a_backup_is_fetched_anyway() {
        use JobState::*;
        assert_eq!(next(&facts(Absent, Absent, 0, 0)), Next::Start);
        let backup = Facts { source: RecoverySource::Backup, ..facts(Absent, Absent, 0, 0) };
        assert_eq!(next(&backup), Next::Create(Part::Snapshot));
    }
}
