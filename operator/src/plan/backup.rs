//! Scheduled backups: when one is due, from which member, when a failed one is tried again,
//! and what status says about them. Pure like the rest of the planner: the platform reports
//! the backup runs it has (Jobs on Kubernetes, processes locally) and the time it looked.
//!
//! The schedule's memory is `status.lastScheduledBackup`, the slot (an occurrence of the
//! cron expression) the last scheduled backup was started for, together with the runs the
//! platform still has: a slot is started once, so an operator that restarts, or a standby
//! that takes over, never runs it twice. Slots missed while no operator ran are not run one
//! by one: only the newest, once. A schedule with no slot run yet runs its newest slot at
//! once, so a cluster that gets a schedule has a backup as soon as it serves.
//!
//! A backup asked for now (a `ConsensusBackup`, a request file locally) is taken the same
//! way, before the schedule's next one, and tried as often; its outcome is its own status.
//!
//! A backup is taken only when nothing changes the membership, and a change waits while a
//! backup is being taken: a member restarted or removed mid-stream would cut its snapshot
//! off. It is taken from a healthy follower that is caught up (the leader only when it is
//! alone), so the leader's work is not slowed by the stream.

use std::time::Duration;

use consensus_crds::{
    BackupDestination, BackupPhase, BackupRecord, BackupSpec, ConsensusBackupStatus, ConsensusClusterSpec,
    ConsensusClusterStatus, condition,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::{NewCondition, Observed, ObservedMember, Step, log_caught_up};

/// Tries of one slot before it is given up until the next slot.
pub const MAX_ATTEMPTS: u32 = 5;
/// Wait before the second try; doubled for each further try, up to `MAX_RETRY_DELAY`.
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(10);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);
/// A run still going after this long is stopped and counts as failed: it would otherwise
/// hold every membership change, and a backup of the store we serve takes seconds.
pub const RUN_DEADLINE: Duration = Duration::from_secs(600);

/// A backup run the platform has: a Job on Kubernetes, a process locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRun {
    /// The backup it writes: the object `<backup>.snapshot` and its manifest `<backup>.json`.
    pub backup: String,
    /// The schedule's slot it is for; for a request, when the request was made.
    pub slot: Timestamp,
    /// The request it is for (a ConsensusBackup's name); `None` for the schedule's.
    pub request: Option<String>,
    /// 1 for a slot's first try.
    pub attempt: u32,
    /// The member it takes the snapshot from.
    pub member: String,
    pub started: Timestamp,
    pub outcome: RunOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    Running,
    Succeeded(Box<Taken>),
    /// `reason` is what the run reported (its last error), for a person to act on.
    Failed {
        at: Timestamp,
        reason: String,
    },
}

/// What a run that succeeded reported: its manifest, and what retention deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub location: String,
    pub sha256: String,
    pub size_bytes: u64,
    pub revision: i64,
    pub taken: Timestamp,
    pub pruned: Vec<String>,
    /// Whether it was verified (restored into a scratch member and hashed as the cluster
    /// did); `None` when not asked.
    pub verified: Option<bool>,
    /// When the run ended.
    pub finished: Timestamp,
}

/// A backup asked for now: a ConsensusBackup on Kubernetes, a request file locally.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupRequest {
    pub name: String,
    pub created: Timestamp,
    /// Its own destination; the cluster's `spec.backup.destination` when `None`.
    pub destination: Option<BackupDestination>,
    /// Its status as written before.
    pub status: ConsensusBackupStatus,
}

/// The backup to start now: a new slot, or the next try of the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub slot: Timestamp,
    pub attempt: u32,
}

/// The name of the backup for `slot`, or of the request made at `slot`: sorts by time,
/// and names the cluster it is of (and the request).
pub fn backup_name(cluster: &str, slot: Timestamp, request: Option<&str>) -> String {
    let at = slot.strftime("%Y%m%dT%H%M%SZ");
    match request {
        None => format!("{cluster}-{at}"),
        Some(request) => format!("{cluster}-{at}-{request}"),
    }
}

/// Where the backup for `request` (the schedule's for `None`) is stored.
pub fn destination<'a>(
    spec: &'a ConsensusClusterSpec,
    request: Option<&'a BackupRequest>,
) -> Option<&'a BackupDestination> {
    request.and_then(|r| r.destination.as_ref()).or(spec.backup.as_ref().map(|b| &b.destination))
}

/// The runs of `request`, or of the schedule for `None`. A request's are those made for it
/// (its name and the time it was made): an earlier request of the same name, deleted and
/// made again, has runs of its own.
fn runs_of<'a>(
    runs: &'a [BackupRun],
    request: Option<&'a BackupRequest>,
) -> impl Iterator<Item = &'a BackupRun> + Clone {
    runs.iter().filter(move |r| match request {
        None => r.request.is_none(),
        Some(q) => r.request.as_deref() == Some(q.name.as_str()) && r.slot == q.created,
    })
}

/// The requests still to be carried out (their status has not ended), oldest first.
fn pending(observed: &Observed) -> impl Iterator<Item = &BackupRequest> {
    let mut pending: Vec<&BackupRequest> =
        observed.backup_requests.iter().filter(|r| !r.status.ended()).collect();
    pending.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    pending.into_iter()
}

/// Whether a run that has ended may be deleted: status keeps what the schedule's runs
/// said, and a request's status what its runs said once it has ended (or the request is
/// gone).
pub fn removable(run: &BackupRun, requests: &[BackupRequest]) -> bool {
    let made_for = |q: &&BackupRequest| run.request.as_ref() == Some(&q.name) && q.created == run.slot;
    run.outcome != RunOutcome::Running
        && (run.request.is_none() || requests.iter().find(made_for).is_none_or(|q| q.status.ended()))
}

fn chrono_utc(at: Timestamp) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(at.as_second(), at.subsec_nanosecond().try_into().ok()?)
}

fn from_chrono(at: chrono::DateTime<chrono::Utc>) -> Option<Timestamp> {
    Timestamp::from_second(at.timestamp()).ok()
}

/// The newest slot of `schedule` at or before `now`, and the first after it.
fn slots(schedule: &str, now: Timestamp) -> (Option<Timestamp>, Option<Timestamp>) {
    let (Ok(cron), Some(now)) = (consensus_crds::parse_schedule(schedule), chrono_utc(now)) else {
        return (None, None);
    };
    let newest = cron.find_previous_occurrence(&now, true).ok().and_then(from_chrono);
    let next = cron.find_next_occurrence(&now, false).ok().and_then(from_chrono);
    (newest, next)
}

/// The slot started last: the one status records, or a newer one a scheduled run shows
/// (status is written after the run is started, and an operator can stop in between).
fn last_slot(last_scheduled: Option<Timestamp>, runs: &[BackupRun]) -> Option<Timestamp> {
    runs_of(runs, None).map(|r| r.slot).chain(last_scheduled).max()
}

/// `status.lastScheduledBackup` of the status written before: what the platform observes as
/// `Observed::last_scheduled_backup`.
pub fn last_scheduled(status: Option<&ConsensusClusterStatus>) -> Option<Timestamp> {
    status.and_then(|s| s.last_scheduled_backup.as_ref()).map(|t| t.0)
}

/// How long after the `attempt`-th try failed the next one may start.
pub fn retry_delay(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(16);
    FIRST_RETRY_DELAY.saturating_mul(1 << doublings).min(MAX_RETRY_DELAY)
}

/// What the schedule asks for at `now`: nothing while suspended or while a run is going
/// (one at a time); the newest slot when it has not been started; otherwise another try of
/// the last slot once the previous try failed and its delay is over.
pub fn due(
    backup: &BackupSpec,
    last_scheduled: Option<Timestamp>,
    runs: &[BackupRun],
    now: Timestamp,
) -> Option<Due> {
    if backup.suspend || runs.iter().any(|r| r.outcome == RunOutcome::Running) {
        return None;
    }
    let (newest, _) = slots(&backup.schedule, now);
    let newest = newest?;
    if last_slot(last_scheduled, runs).is_none_or(|last| newest > last) {
        return Some(Due { slot: newest, attempt: 1 });
    }
    retry(last_scheduled, runs).filter(|(ready, _)| now >= *ready).map(|(_, due)| due)
}

/// The next try of the last slot, when its latest try failed and it has tries left: when it
/// may start, and what it is.
fn retry(last_scheduled: Option<Timestamp>, runs: &[BackupRun]) -> Option<(Timestamp, Due)> {
    let last = last_slot(last_scheduled, runs);
    next_try(runs_of(runs, None).filter(|r| Some(r.slot) == last))
}

/// The next try after the latest of `tries` (the runs of one slot or request), when it
/// failed and tries are left: when it may start, and what it is.
fn next_try<'a>(tries: impl Iterator<Item = &'a BackupRun>) -> Option<(Timestamp, Due)> {
    let latest = tries.max_by_key(|r| r.attempt)?;
    match &latest.outcome {
        RunOutcome::Failed { at, .. } if latest.attempt < MAX_ATTEMPTS => {
            let ready = at.checked_add(retry_delay(latest.attempt)).ok()?;
            Some((ready, Due { slot: latest.slot, attempt: latest.attempt + 1 }))
        }
        _ => None,
    }
}

/// The request to take a backup for now, oldest first: one not tried yet, or whose failed
/// try's delay is over. One without a destination is never taken (its status says why).
fn requested<'a>(spec: &ConsensusClusterSpec, observed: &'a Observed) -> Option<(&'a BackupRequest, Due)> {
    pending(observed).filter(|r| destination(spec, Some(r)).is_some()).find_map(|request| {
        let mut tries = runs_of(&observed.backup_runs, Some(request)).peekable();
        if tries.peek().is_none() {
            return Some((request, Due { slot: request.created, attempt: 1 }));
        }
        next_try(tries).filter(|(ready, _)| observed.now >= *ready).map(|(_, due)| (request, due))
    })
}

/// How long until the schedule asks for something: the next try of a failed run or the next
/// slot, whichever comes first. A platform that looks again only when something changes
/// (Kubernetes) looks again then; `None` while suspended or nothing is declared.
pub fn wake_in(spec: &ConsensusClusterSpec, observed: &Observed) -> Option<Duration> {
    let schedule = spec.backup.as_ref().filter(|b| !b.suspend).map(|backup| {
        let retry = retry(observed.last_scheduled_backup, &observed.backup_runs).map(|(ready, _)| ready);
        retry.into_iter().chain(next_slot(backup, observed.now)).min()
    });
    // A request not tried yet is due now (it waits for the cluster); a failed one at its
    // next try; one being taken ends through the platform's own notice.
    let requests = pending(observed).filter_map(|request| {
        let mut tries = runs_of(&observed.backup_runs, Some(request)).peekable();
        match tries.peek() {
            None => Some(observed.now),
            Some(_) => next_try(tries).map(|(ready, _)| ready),
        }
    });
    let at = schedule.flatten().into_iter().chain(requests).min()?;
    let seconds = at.duration_since(observed.now).as_secs_f64();
    // Overdue means it could not start (no fit member, a change under way): looked at again
    // at the pace of a first retry, not in a busy loop.
    let floor = if seconds <= 0.0 { FIRST_RETRY_DELAY.as_secs_f64() } else { 1.0 };
    Some(Duration::from_secs_f64(seconds.max(floor)))
}

/// When the next slot comes, for `status.nextBackup`; none while suspended.
pub fn next_slot(backup: &BackupSpec, now: Timestamp) -> Option<Timestamp> {
    if backup.suspend {
        return None;
    }
    slots(&backup.schedule, now).1
}

/// The member to take a backup from: a healthy, caught-up follower that stays under the
/// declared size (the lowest ordinal first, the one a scale-down removes last), else the
/// leader when it is the only voter. `None`: nobody is fit, the backup waits.
fn source<'a>(spec: &ConsensusClusterSpec, observed: &'a Observed) -> Option<&'a ObservedMember> {
    let members = observed.members.as_deref()?;
    let fit = |m: &&ObservedMember| {
        !m.is_learner && m.healthy && log_caught_up(m, observed.leader_raft_index) == Some(true)
    };
    let stays = |m: &&ObservedMember| {
        super::ordinal(&m.name).is_some_and(|(_, n)| i64::from(n) < i64::from(spec.replicas))
    };
    let followers = members.iter().filter(|m| Some(m.id) != observed.leader).filter(fit).filter(stays);
    if let Some(follower) = followers.min_by_key(|m| super::ordinal(&m.name).map(|(_, n)| n)) {
        return Some(follower);
    }
    let voters = members.iter().filter(|m| !m.is_learner).count();
    members.iter().find(|m| Some(m.id) == observed.leader && voters == 1).filter(fit)
}

/// `membership`, the step the membership asks for, with backups folded in: a due backup is
/// started when the membership is `quiet` (nothing to change), and a change waits for a
/// backup that is being taken.
pub fn with_backups(spec: &ConsensusClusterSpec, observed: &Observed, membership: Step, quiet: bool) -> Step {
    if let Some(run) = observed.backup_runs.iter().find(|r| r.outcome == RunOutcome::Running) {
        return match membership {
            step if step.changes_cluster() && !matches!(step, Step::CreateWorkload { .. }) => Step::Wait {
                reason: format!(
                    "{} waits for backup {} being taken from {} (at most {} s)",
                    step.name(),
                    run.backup,
                    run.member,
                    RUN_DEADLINE.as_secs()
                ),
            },
            step => step,
        };
    }
    let Some(from) = source(spec, observed).filter(|_| quiet) else { return membership };
    let from = from.name.clone();
    if let Some((request, due)) = requested(spec, observed) {
        let request = Some(request.name.clone());
        return Step::TakeBackup { slot: due.slot, attempt: due.attempt, from, request };
    }
    let Some(backup) = &spec.backup else { return membership };
    match due(backup, observed.last_scheduled_backup, &observed.backup_runs, observed.now) {
        Some(due) => Step::TakeBackup { slot: due.slot, attempt: due.attempt, from, request: None },
        None => membership,
    }
}

/// The backup part of status.
pub(super) struct BackupStatus {
    pub last_scheduled: Option<Time>,
    pub last_backup: Option<BackupRecord>,
    pub next_backup: Option<Time>,
    /// `BackupSucceeded` as it is now; `None` keeps the one written before (a backup is
    /// being taken and nothing new is known).
    pub condition: Option<NewCondition>,
}

/// `lastScheduledBackup`, `lastBackup`, `nextBackup` and `BackupSucceeded`, from the runs
/// the platform has and what status said before (runs are cleaned up; status keeps the
/// newest backup). `failure` is why starting a backup (`step`) failed, when it did.
pub(super) fn backup_status(
    spec: &ConsensusClusterSpec,
    observed: &Observed,
    step: &Step,
    failure: Option<&str>,
    previous: Option<&ConsensusClusterStatus>,
) -> BackupStatus {
    let started_now = match step {
        Step::TakeBackup { slot, request: None, .. } if failure.is_none() => Some(*slot),
        _ => None,
    };
    let previous_slot = previous.and_then(|p| p.last_scheduled_backup.as_ref()).map(|t| t.0);
    let last_scheduled = last_slot(previous_slot.max(started_now), &observed.backup_runs).map(Time);
    let newest_taken = observed
        .backup_runs
        .iter()
        .filter_map(|r| match &r.outcome {
            RunOutcome::Succeeded(taken) => Some((r, taken)),
            _ => None,
        })
        .max_by_key(|(_, taken)| taken.taken);
    let previous_backup = previous.and_then(|p| p.last_backup.clone());
    let last_backup = match newest_taken {
        Some((run, taken)) if previous_backup.as_ref().is_none_or(|p| p.time.0 < taken.taken) => {
            Some(record(run, taken))
        }
        _ => previous_backup,
    };
    let Some(backup) = &spec.backup else {
        return BackupStatus { last_scheduled, last_backup, next_backup: None, condition: None };
    };
    let next_backup = next_slot(backup, observed.now).map(Time);
    let had_condition = previous.is_some_and(|p| {
        p.conditions.iter().any(|c| {
            c.type_ == condition::BACKUP_SUCCEEDED
                && matches!(c.reason.as_str(), "BackupTaken" | "BackupFailed" | "StartFailed")
        })
    });
    let condition = succeeded_condition(backup, observed, step, failure, next_backup.as_ref(), had_condition);
    BackupStatus { last_scheduled, last_backup, next_backup, condition }
}

fn record(run: &BackupRun, taken: &Taken) -> BackupRecord {
    BackupRecord {
        name: run.backup.clone(),
        time: Time(taken.taken),
        location: taken.location.clone(),
        revision: taken.revision,
        size_bytes: i64::try_from(taken.size_bytes).unwrap_or(i64::MAX),
        sha256: taken.sha256.clone(),
        verified: taken.verified,
    }
}

fn succeeded_condition(
    backup: &BackupSpec,
    observed: &Observed,
    step: &Step,
    failure: Option<&str>,
    next: Option<&Time>,
    had_condition: bool,
) -> Option<NewCondition> {
    const TYPE: &str = condition::BACKUP_SUCCEEDED;
    let next_words =
        || next.map_or_else(|| "none is scheduled".to_owned(), |t| format!("the next is due at {}", t.0));
    if let (Step::TakeBackup { slot, attempt, from, request: None }, Some(failure)) = (step, failure) {
        let message = format!(
            "starting the backup for {slot} (attempt {attempt}) from {from} failed: {failure}; tried again \
             at the next reconcile"
        );
        return Some(super::condition(TYPE, false, "StartFailed", message));
    }
    match latest_run(&observed.backup_runs, None).map(|r| (r, &r.outcome)) {
        Some((run, RunOutcome::Succeeded(taken))) => {
            Some(super::condition(TYPE, true, "BackupTaken", taken_words(run, taken)))
        }
        Some((run, RunOutcome::Failed { at, reason })) => {
            let then = if run.attempt < MAX_ATTEMPTS {
                retry_words(run, *at)
            } else {
                format!("given up after {MAX_ATTEMPTS} attempts until the next slot (status.nextBackup)")
            };
            let message = format!("backup {} from {} failed: {reason}; {then}", run.backup, run.member);
            Some(super::condition(TYPE, false, "BackupFailed", message))
        }
        // Being taken: what was known before still holds until it ends.
        Some((_, RunOutcome::Running)) => None,
        None if backup.suspend => Some(super::condition(
            TYPE,
            false,
            "Suspended",
            "spec.backup.suspend is set: no scheduled backup is started; the ones taken are kept",
        )),
        // The runs were cleaned up: the condition written from the last of them still holds.
        None if had_condition => None,
        None => Some(super::condition(
            TYPE,
            false,
            "NoBackupYet",
            format!(
                "no backup has been taken yet: the first is taken as soon as the cluster is healthy and \
                 its membership is not changing; {}",
                next_words()
            ),
        )),
    }
}

fn taken_words(run: &BackupRun, taken: &Taken) -> String {
    let pruned = if taken.pruned.is_empty() {
        String::new()
    } else {
        format!("; retention deleted {}", taken.pruned.join(", "))
    };
    let verified = if taken.verified == Some(true) { ", verified by a restore" } else { "" };
    format!(
        "backup {} holds revision {} ({} bytes, sha256 {}) at {}{verified}{pruned}",
        run.backup, taken.revision, taken.size_bytes, taken.sha256, taken.location,
    )
}

/// When the try after `run`, which failed `at`, comes.
fn retry_words(run: &BackupRun, at: Timestamp) -> String {
    let retry =
        at.checked_add(retry_delay(run.attempt)).map_or_else(|_| "later".to_owned(), |t| t.to_string());
    format!("tried again at {retry} (attempt {} of {MAX_ATTEMPTS})", run.attempt + 1)
}

/// The run of `request` (of the schedule for `None`) started last: for the schedule, the
/// one `BackupSucceeded` and the cluster's backup events speak of (a request's runs are
/// reported in the request's own status).
pub fn latest_run<'a>(runs: &'a [BackupRun], request: Option<&'a BackupRequest>) -> Option<&'a BackupRun> {
    runs_of(runs, request).max_by_key(|r| (r.started, r.attempt))
}

/// The status of `request` after this reconcile: what its runs say, or why it waits. Once
/// it has ended it stays as it is.
fn request_status(
    spec: &ConsensusClusterSpec,
    observed: &Observed,
    request: &BackupRequest,
    step: &Step,
    failure: Option<&str>,
) -> ConsensusBackupStatus {
    if request.status.ended() {
        return request.status.clone();
    }
    let now = Time(observed.now);
    let tries: Vec<&BackupRun> = runs_of(&observed.backup_runs, Some(request)).collect();
    let first_started = tries.iter().map(|r| r.started).min().map(Time);
    let latest = tries.iter().max_by_key(|r| r.attempt).copied();
    let this = match step {
        Step::TakeBackup { attempt, from, request: Some(name), .. } if *name == request.name => {
            Some((*attempt, from.as_str()))
        }
        _ => None,
    };
    let status = |phase, message: String| ConsensusBackupStatus {
        phase: Some(phase),
        message: Some(message),
        attempts: latest.map_or(0, |r| r.attempt),
        member: latest.map(|r| r.member.clone()),
        started_at: first_started.clone(),
        completed_at: None,
        backup: None,
    };
    if destination(spec, Some(request)).is_none() {
        let message = "no destination: spec.destination is unset and the cluster declares no \
                       spec.backup.destination; create another ConsensusBackup that names one"
            .to_owned();
        return ConsensusBackupStatus { completed_at: Some(now), ..status(BackupPhase::Failed, message) };
    }
    match (this, failure) {
        (Some((attempt, from)), None) => {
            let message = format!("being taken from {from} (attempt {attempt} of {MAX_ATTEMPTS})");
            return ConsensusBackupStatus {
                attempts: attempt,
                member: Some(from.to_owned()),
                started_at: first_started.clone().or(Some(now)),
                ..status(BackupPhase::Running, message)
            };
        }
        // What keeps a run from starting (a claim that is not there, a Job in the way) is
        // for a person to mend: given up, so it never holds the schedule or later requests.
        (Some((attempt, from)), Some(failure)) => {
            let message = format!(
                "starting attempt {attempt} from {from} failed: {failure}; nothing was stored: create another \
                 ConsensusBackup once that is mended"
            );
            return ConsensusBackupStatus { completed_at: Some(now), ..status(BackupPhase::Failed, message) };
        }
        (None, _) => {}
    }
    match latest.map(|r| (r, &r.outcome)) {
        Some((run, RunOutcome::Succeeded(taken))) => ConsensusBackupStatus {
            completed_at: Some(Time(taken.finished)),
            backup: Some(record(run, taken)),
            ..status(BackupPhase::Succeeded, taken_words(run, taken))
        },
        Some((run, RunOutcome::Failed { at, reason })) if run.attempt >= MAX_ATTEMPTS => {
            let message =
                format!("backup {} failed: {reason}; given up after {MAX_ATTEMPTS} attempts", run.backup);
            ConsensusBackupStatus { completed_at: Some(Time(*at)), ..status(BackupPhase::Failed, message) }
        }
        Some((run, RunOutcome::Failed { at, reason })) => {
            let message = format!(
                "backup {} from {} failed: {reason}; {}",
                run.backup,
                run.member,
                retry_words(run, *at)
            );
            status(BackupPhase::Retrying, message)
        }
        Some((run, RunOutcome::Running)) => {
            let message =
                format!("being taken from {} (attempt {} of {MAX_ATTEMPTS})", run.member, run.attempt);
            status(BackupPhase::Running, message)
        }
        None => status(BackupPhase::Pending, format!("waits: {}", waiting_for(spec, observed, step))),
    }
}

/// A request whose status moved on in this reconcile: the status to write, and the event
/// to report it by, if any.
pub struct RequestUpdate<'a> {
    pub request: &'a BackupRequest,
    pub status: ConsensusBackupStatus,
    pub event: Option<BackupEvent>,
    /// The run the event is about, when one ended.
    pub ended_run: Option<&'a BackupRun>,
}

/// The requests whose status this reconcile changes.
pub fn request_updates<'a>(
    spec: &ConsensusClusterSpec,
    observed: &'a Observed,
    step: &Step,
    failure: Option<&str>,
) -> Vec<RequestUpdate<'a>> {
    observed
        .backup_requests
        .iter()
        .filter_map(|request| {
            let status = request_status(spec, observed, request, step, failure);
            if status == request.status {
                return None;
            }
            let event = request_event(&request.status, &status);
            let ended_run = latest_run(&observed.backup_runs, Some(request))
                .filter(|_| event.as_ref().is_some_and(|e| e.run_ended));
            Some(RequestUpdate { request, status, event, ended_run })
        })
        .collect()
}

/// The status of a request naming a cluster that does not exist.
pub fn unclaimed(request: &BackupRequest, cluster: &str, namespace: &str) -> ConsensusBackupStatus {
    ConsensusBackupStatus {
        phase: Some(BackupPhase::Pending),
        message: Some(format!(
            "waits: there is no ConsensusCluster {cluster} in namespace {namespace} (spec.clusterName); it is \
             taken once there is"
        )),
        ..request.status.clone()
    }
}

/// Why a request that is due is not started in this reconcile.
fn waiting_for(spec: &ConsensusClusterSpec, observed: &Observed, step: &Step) -> String {
    if let Some(run) = observed.backup_runs.iter().find(|r| r.outcome == RunOutcome::Running) {
        return format!("backup {} is being taken from {} (one at a time)", run.backup, run.member);
    }
    if source(spec, observed).is_none() {
        return "no healthy, caught-up member to take it from (the cluster has no leader, or its members are \
                down or behind)"
            .to_owned();
    }
    match step {
        Step::Wait { reason } => format!("the cluster waits: {reason}"),
        step if step.changes_cluster() => {
            format!("a backup is never taken while the membership changes ({} under way)", step.name())
        }
        Step::RefuseSpec { reason } => format!("the cluster's spec is refused: {reason}"),
        _ => "the backups asked for before it go first".to_owned(),
    }
}

/// The event for a request whose status moved on: a try started, the backup taken, a try
/// failed or the request given up.
fn request_event(before: &ConsensusBackupStatus, after: &ConsensusBackupStatus) -> Option<BackupEvent> {
    if (before.phase, before.attempts) == (after.phase, after.attempts) {
        return None;
    }
    let (warning, reason, run_ended) = match after.phase? {
        BackupPhase::Running => (false, "BackupStarted", false),
        BackupPhase::Succeeded => (false, "BackupSucceeded", true),
        BackupPhase::Retrying | BackupPhase::Failed => (true, "BackupFailed", after.attempts > 0),
        BackupPhase::Pending => return None,
    };
    Some(BackupEvent { warning, reason, message: after.message.clone().unwrap_or_default(), run_ended })
}

/// What a failed run's cause was, in a few words fit for a metric label. The causes are told
/// apart by what the run reported (`consensus-node backup`'s errors, the pod's waiting
/// reason, the Job's condition), which the tests of each pin down.
pub fn failure_kind(reason: &str) -> &'static str {
    const KINDS: [(&str, &[&str]); 5] = [
        ("verification", &["failed verification"]),
        ("pod", &["CreateContainerConfigError", "ErrImagePull", "ImagePullBackOff", "InvalidImageName"]),
        ("deadline", &["DeadlineExceeded", "still running after"]),
        ("destination", &["cannot be listed", "PersistentVolumeClaim", "completing ", "writing "]),
        ("member", &["connecting to", "Snapshot", "HashKV", "the snapshot stream", "checksum"]),
    ];
    KINDS.iter().find(|(_, marks)| marks.iter().any(|m| reason.contains(m))).map_or("other", |(kind, _)| kind)
}

/// How the end of a backup is reported as an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
    /// A run ended (rather than one failing to start): the latest run is what it says.
    pub run_ended: bool,
}

/// The event for what `BackupSucceeded` says now, when it says something new about a
/// backup: one per backup taken and one per failure.
pub fn outcome_event(
    previous: Option<&ConsensusClusterStatus>,
    next: &ConsensusClusterStatus,
) -> Option<BackupEvent> {
    let find = |s: &ConsensusClusterStatus| {
        s.conditions.iter().find(|c| c.type_ == condition::BACKUP_SUCCEEDED).cloned()
    };
    let new = find(next)?;
    if previous.and_then(find).is_some_and(|old| old.message == new.message) {
        return None;
    }
    let (warning, reason) = match new.reason.as_str() {
        "BackupTaken" => (false, "BackupSucceeded"),
        "BackupFailed" | "StartFailed" => (true, "BackupFailed"),
        _ => return None,
    };
    let run_ended = new.reason != "StartFailed";
    Some(BackupEvent { warning, reason, message: new.message, run_ended })
}

#[cfg(test)]
#[path = "backup_tests.rs"]
mod tests;
