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
//! A backup is taken only when nothing changes the membership, and a change waits while a
//! backup is being taken: a member restarted or removed mid-stream would cut its snapshot
//! off. It is taken from a healthy follower that is caught up (the leader only when it is
//! alone), so the leader's work is not slowed by the stream.

use std::time::Duration;

use consensus_crds::{BackupRecord, BackupSpec, ConsensusClusterSpec, ConsensusClusterStatus, condition};
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
    /// The schedule's slot it is for.
    pub slot: Timestamp,
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

/// The backup to start now: a new slot, or the next try of the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub slot: Timestamp,
    pub attempt: u32,
}

/// The name of the backup for `slot`: sorts by time, and names the cluster it is of.
pub fn backup_name(cluster: &str, slot: Timestamp) -> String {
    format!("{cluster}-{}", slot.strftime("%Y%m%dT%H%M%SZ"))
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

/// The slot started last: the one status records, or a newer one a run shows (status is
/// written after the run is started, and an operator can stop in between).
fn last_slot(last_scheduled: Option<Timestamp>, runs: &[BackupRun]) -> Option<Timestamp> {
    runs.iter().map(|r| r.slot).chain(last_scheduled).max()
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
    let latest = runs.iter().filter(|r| Some(r.slot) == last).max_by_key(|r| r.attempt)?;
    match &latest.outcome {
        RunOutcome::Failed { at, .. } if latest.attempt < MAX_ATTEMPTS => {
            let ready = at.checked_add(retry_delay(latest.attempt)).ok()?;
            Some((ready, Due { slot: latest.slot, attempt: latest.attempt + 1 }))
        }
        _ => None,
    }
}

/// How long until the schedule asks for something: the next try of a failed run or the next
/// slot, whichever comes first. A platform that looks again only when something changes
/// (Kubernetes) looks again then; `None` while suspended or nothing is declared.
pub fn wake_in(spec: &ConsensusClusterSpec, observed: &Observed) -> Option<Duration> {
    let backup = spec.backup.as_ref().filter(|b| !b.suspend)?;
    let retry = retry(observed.last_scheduled_backup, &observed.backup_runs).map(|(ready, _)| ready);
    let at = retry.into_iter().chain(next_slot(backup, observed.now)).min()?;
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
    let Some(backup) = &spec.backup else { return membership };
    if !quiet {
        return membership;
    }
    let (Some(due), Some(from)) = (
        due(backup, observed.last_scheduled_backup, &observed.backup_runs, observed.now),
        source(spec, observed),
    ) else {
        return membership;
    };
    Step::TakeBackup { slot: due.slot, attempt: due.attempt, from: from.name.clone() }
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
        Step::TakeBackup { slot, .. } if failure.is_none() => Some(*slot),
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
    if let (Step::TakeBackup { slot, attempt, from }, Some(failure)) = (step, failure) {
        let message = format!(
            "starting the backup for {slot} (attempt {attempt}) from {from} failed: {failure}; tried again \
             at the next reconcile"
        );
        return Some(super::condition(TYPE, false, "StartFailed", message));
    }
    match latest_run(&observed.backup_runs).map(|r| (r, &r.outcome)) {
        Some((run, RunOutcome::Succeeded(taken))) => {
            let pruned = if taken.pruned.is_empty() {
                String::new()
            } else {
                format!("; retention deleted {}", taken.pruned.join(", "))
            };
            let verified = if taken.verified == Some(true) { ", verified by a restore" } else { "" };
            let message = format!(
                "backup {} holds revision {} ({} bytes, sha256 {}) at {}{verified}{pruned}",
                run.backup, taken.revision, taken.size_bytes, taken.sha256, taken.location,
            );
            Some(super::condition(TYPE, true, "BackupTaken", message))
        }
        Some((run, RunOutcome::Failed { at, reason })) => {
            let then = if run.attempt < MAX_ATTEMPTS {
                let retry = at
                    .checked_add(retry_delay(run.attempt))
                    .map_or_else(|_| "later".to_owned(), |t| t.to_string());
                format!("tried again at {retry} (attempt {} of {MAX_ATTEMPTS})", run.attempt + 1)
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

/// The run started last: the one the backup's status and events speak of.
pub fn latest_run(runs: &[BackupRun]) -> Option<&BackupRun> {
    runs.iter().max_by_key(|r| (r.started, r.attempt))
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
