//! Backup runs as Jobs: observed (each Job and its pod turned into a `BackupRun`) and
//! started (a Job from `resources::backup::job`). The operator never reads the Secret the
//! credentials are in and never sees the data: the Job's pod gets both.

use consensus_crds::{ConsensusBackup, ConsensusCluster};
use k8s_openapi::api::batch::v1::Job;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStateWaiting, PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, PostParams, PropagationPolicy};
use kube::{Api, Client, Resource, ResourceExt};

use super::Error;
use crate::plan::backup::{BackupRun, RUN_DEADLINE, RunOutcome};
use crate::resources::backup::{
    ATTEMPT_ANNOTATION, BACKUP_ANNOTATION, BackupJob, CONTAINER, MEMBER_ANNOTATION, REQUEST_ANNOTATION,
    SLOT_ANNOTATION, job, outcome, run_selector,
};

/// Waiting reasons of a backup pod that no amount of waiting mends: a missing Secret or key,
/// an image that cannot be pulled. The run has failed; the next try starts from scratch.
const STUCK: [&str; 4] =
    ["CreateContainerConfigError", "ErrImagePull", "ImagePullBackOff", "InvalidImageName"];

/// A backup Job that exists: the run it is, and its name to delete it by once it has ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunJob {
    pub name: String,
    pub run: BackupRun,
}

/// A run the Job controller has not ended this long after its deadline (its pod stuck on a
/// node that is gone, say) is taken as failed: it would otherwise hold every membership
/// change.
const DEADLINE_GRACE: Duration = Duration::from_secs(60);

/// The cluster's backup Jobs with their pods, as runs, at `now`.
pub async fn observe(
    client: &Client,
    namespace: &str,
    cluster: &str,
    now: Timestamp,
) -> Result<Vec<RunJob>, Error> {
    let selector = ListParams::default().labels(&run_selector(cluster));
    let jobs = Api::<Job>::namespaced(client.clone(), namespace).list(&selector).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), namespace).list(&selector).await?;
    Ok(jobs.items.iter().filter_map(|job| run_of(job, &pods.items, now)).collect())
}

/// The run a Job is at `now`, `None` for a Job not made by us (annotations missing).
pub fn run_of(job: &Job, pods: &[Pod], now: Timestamp) -> Option<RunJob> {
    let annotations = job.metadata.annotations.as_ref()?;
    let slot: Timestamp = annotations.get(SLOT_ANNOTATION)?.parse().ok()?;
    let started = job.metadata.creation_timestamp.as_ref().map_or(slot, |t| t.0);
    let name = job.name_any();
    let pod = pods
        .iter()
        .filter(|p| p.labels().get("job-name") == Some(&name))
        .max_by_key(|p| p.creation_timestamp());
    let container = pod
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.iter().find(|c| c.name == CONTAINER));
    let terminated = container.and_then(|c| c.state.as_ref()).and_then(|s| s.terminated.as_ref());
    let finished = job.status.as_ref().and_then(|s| s.conditions.as_ref()).and_then(|c| {
        c.iter().find(|c| c.status == "True" && matches!(c.type_.as_str(), "Complete" | "Failed"))
    });
    let outcome = match (finished, terminated) {
        (_, Some(terminated)) if terminated.message.is_some() => {
            let at = terminated.finished_at.as_ref().map_or(started, |t| t.0);
            outcome(terminated.message.as_deref().unwrap_or_default(), at)
        }
        (Some(condition), _) => RunOutcome::Failed {
            at: condition.last_transition_time.as_ref().map_or(started, |t| t.0),
            reason: format!(
                "{} without a report: {}",
                condition.reason.as_deref().unwrap_or(&condition.type_),
                condition.message.as_deref().unwrap_or("no message")
            ),
        },
        (None, _) => {
            let waiting = container.and_then(|c| c.state.as_ref()).and_then(|s| s.waiting.as_ref());
            let overdue =
                started.checked_add(RUN_DEADLINE + DEADLINE_GRACE).is_ok_and(|given_up| now >= given_up);
            match waiting.filter(|w| w.reason.as_deref().is_some_and(|r| STUCK.contains(&r))) {
                Some(waiting) => RunOutcome::Failed {
                    at: pod.and_then(|p| p.creation_timestamp()).map_or(started, |t| t.0),
                    reason: stuck_reason(waiting),
                },
                None if overdue => RunOutcome::Failed {
                    at: now,
                    reason: format!(
                        "still running {} s after it started, past its deadline; given up",
                        (RUN_DEADLINE + DEADLINE_GRACE).as_secs()
                    ),
                },
                None => RunOutcome::Running,
            }
        }
    };
    let run = BackupRun {
        backup: annotations.get(BACKUP_ANNOTATION)?.clone(),
        slot,
        request: annotations.get(REQUEST_ANNOTATION).cloned(),
        attempt: annotations.get(ATTEMPT_ANNOTATION)?.parse().ok()?,
        member: annotations.get(MEMBER_ANNOTATION)?.clone(),
        started,
        outcome,
    };
    Some(RunJob { name, run })
}

/// Why a pod that cannot start failed, the same however the kubelet words it from one look
/// to the next (an image pull alternates between ErrImagePull and ImagePullBackOff), so
/// one stuck run is one failure reported once.
fn stuck_reason(waiting: &ContainerStateWaiting) -> String {
    match waiting.reason.as_deref() {
        Some("ErrImagePull" | "ImagePullBackOff") => "the node image cannot be pulled".to_owned(),
        reason => {
            format!("{}: {}", reason.unwrap_or_default(), waiting.message.as_deref().unwrap_or("no message"))
        }
    }
}

/// Starts `run` (for the ConsensusBackup `request`, which then owns its Job): the volume
/// destination checked first (a Job waiting for a claim that does not exist would hang
/// until its deadline), then the Job, then the Jobs of runs that have ended are deleted
/// (status keeps the newest backup). In that order, a Job that cannot be created leaves the
/// failed try before it in place, to count and back off from. A Job of that name already
/// there is this run when its annotations say so, started by a reconcile that stopped
/// before it could record it; any other is refused.
pub async fn start(
    client: &Client,
    cc: &ConsensusCluster,
    run: &BackupJob<'_>,
    request: Option<&ConsensusBackup>,
    ended: &[String],
) -> Result<(), Error> {
    let namespace = cc.namespace().unwrap_or_default();
    if let Some(volume) = &run.destination.volume {
        let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &namespace);
        if claims.get_opt(&volume.claim_name).await?.is_none() {
            return Err(Error::Backup(format!(
                "the destination PersistentVolumeClaim {namespace}/{} does not exist",
                volume.claim_name
            )));
        }
    }
    let jobs = Api::<Job>::namespaced(client.clone(), &namespace);
    let owner = request.and_then(|r| r.controller_owner_ref(&()));
    let name = run.job_name(&cc.name_any());
    match jobs.create(&PostParams::default(), &job(cc, run, owner)?).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_already_exists() => {
            let theirs = jobs.get_opt(&name).await?;
            let annotation = |key| theirs.as_ref().and_then(|j| j.annotations().get(key).cloned());
            let ours = annotation(BACKUP_ANNOTATION).as_deref() == Some(run.backup)
                && annotation(ATTEMPT_ANNOTATION) == Some(run.attempt.to_string());
            if !ours {
                return Err(Error::Backup(format!(
                    "a Job named {namespace}/{name} exists that is not this backup's run: rename or delete it"
                )));
            }
        }
        Err(error) => return Err(error.into()),
    }
    let background =
        DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..DeleteParams::default() };
    for name in ended {
        match jobs.delete(name, &background).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated, ContainerStatus, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    use super::*;

    fn t(text: &str) -> Timestamp {
        text.parse().expect("time")
    }

    fn backup_job(conditions: Option<(&str, &str)>) -> Job {
        Job {
            metadata: ObjectMeta {
                name: Some("demo-backup-20261201100000-1".to_owned()),
                creation_timestamp: Some(Time(t("2026-12-01T10:00:02Z"))),
                annotations: Some(
                    [
                        (BACKUP_ANNOTATION, "demo-20261201T100000Z"),
                        (SLOT_ANNOTATION, "2026-12-01T10:00:00Z"),
                        (ATTEMPT_ANNOTATION, "1"),
                        (MEMBER_ANNOTATION, "demo-1"),
                    ]
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            spec: None,
            status: Some(JobStatus {
                conditions: conditions.map(|(type_, reason)| {
                    vec![JobCondition {
                        type_: type_.to_owned(),
                        status: "True".to_owned(),
                        reason: Some(reason.to_owned()),
                        message: Some("Job was active longer than specified deadline".to_owned()),
                        last_transition_time: Some(Time(t("2026-12-01T10:10:02Z"))),
                        ..JobCondition::default()
                    }]
                }),
                ..JobStatus::default()
            }),
        }
    }

    fn pod(state: ContainerState) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("demo-backup-20261201100000-1-x7k2p".to_owned()),
                labels: Some([("job-name".to_owned(), "demo-backup-20261201100000-1".to_owned())].into()),
                creation_timestamp: Some(Time(t("2026-12-01T10:00:03Z"))),
                ..ObjectMeta::default()
            },
            status: Some(PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    name: CONTAINER.to_owned(),
                    state: Some(state),
                    ..ContainerStatus::default()
                }]),
                ..PodStatus::default()
            }),
            spec: None,
        }
    }

    fn outcome_of(job: &Job, pods: &[Pod]) -> RunOutcome {
        run_of(job, pods, t("2026-12-01T10:01:00Z")).expect("a run").run.outcome
    }

    #[test]
    fn a_job_is_the_run_its_annotations_name() {
        let run = run_of(&backup_job(None), &[], t("2026-12-01T10:01:00Z")).expect("a run").run;
        assert_eq!(
            (run.backup.as_str(), run.attempt, run.member.as_str()),
            ("demo-20261201T100000Z", 1, "demo-1")
        );
        assert_eq!((run.slot, run.started), (t("2026-12-01T10:00:00Z"), t("2026-12-01T10:00:02Z")));
        assert_eq!(run.outcome, RunOutcome::Running);
        let mut foreign = backup_job(None);
        foreign.metadata.annotations = None;
        assert_eq!(run_of(&foreign, &[], t("2026-12-01T10:01:00Z")), None);
    }

    #[test]
    fn a_finished_run_reports_through_its_termination_message() {
        let terminated = |message: &str| ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: 1,
                message: Some(message.to_owned()),
                finished_at: Some(Time(t("2026-12-01T10:00:09Z"))),
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        };
        let failed = pod(terminated(r#"{"failed":{"error":"s3://b/p cannot be listed: 403 Forbidden"}}"#));
        assert_eq!(
            outcome_of(&backup_job(Some(("Failed", "BackoffLimitExceeded"))), &[failed]),
            RunOutcome::Failed {
                at: t("2026-12-01T10:00:09Z"),
                reason: "s3://b/p cannot be listed: 403 Forbidden".to_owned()
            }
        );
        // A Job stopped at its deadline has no report: its condition says why.
        let RunOutcome::Failed { reason, at } =
            outcome_of(&backup_job(Some(("Failed", "DeadlineExceeded"))), &[])
        else {
            panic!("not a failure")
        };
        assert!(reason.starts_with("DeadlineExceeded without a report"), "{reason}");
        assert_eq!(at, t("2026-12-01T10:10:02Z"));
    }

    #[test]
    fn a_pod_that_cannot_start_is_a_failed_run_naming_the_cause() {
        let waiting = |reason: &str| {
            pod(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.to_owned()),
                    message: Some("secret \"s3-credentials\" not found".to_owned()),
                }),
                ..ContainerState::default()
            })
        };
        let stuck = outcome_of(&backup_job(None), &[waiting("CreateContainerConfigError")]);
        assert_eq!(
            stuck,
            RunOutcome::Failed {
                at: t("2026-12-01T10:00:03Z"),
                reason: "CreateContainerConfigError: secret \"s3-credentials\" not found".to_owned()
            }
        );
        // Starting up is not stuck.
        assert_eq!(outcome_of(&backup_job(None), &[waiting("ContainerCreating")]), RunOutcome::Running);
        // An image that cannot be pulled is one cause, however the kubelet words it.
        let pulling = |reason| outcome_of(&backup_job(None), &[waiting(reason)]);
        assert_eq!(pulling("ErrImagePull"), pulling("ImagePullBackOff"));
        // Never ended by the Job controller (its pod on a node that is gone): given up
        // after the deadline and a grace, instead of holding every change for ever.
        let late = t("2026-12-01T10:11:03Z");
        let RunOutcome::Failed { reason, .. } =
            run_of(&backup_job(None), &[], late).expect("a run").run.outcome
        else {
            panic!("still running")
        };
        assert!(reason.contains("past its deadline"), "{reason}");
    }
}
