//! Quorum loss: when it started (the `QuorumLost` condition's transition to True, kept
//! across reconciles and operator restarts), the events each platform reports when it
//! starts and ends, and the recovery from it with `spec.recovery.autoRestore`: once the
//! quorum has been lost for `spec.recovery.quorumLossTimeout`, the cluster is made again
//! under a new cluster id from the member that answers with the highest applied index (its
//! own data, so nothing it applied is lost), or, when none answers, from the newest verified
//! backup; then grown back to its declared size by the usual steps (learners, one joint
//! change). Members keep their names.
//!
//! The recovery is recorded in `status.recovery` before anything is changed
//! (`BeginRecovery`), so an operator that stops half-way resumes it (`Recover`, which a
//! platform carries out idempotently); it ends when the new cluster is at its declared size
//! with a quorum, and moves to `status.lastRecovery`.

use std::time::Duration;

use consensus_crds::{
    ConsensusClusterSpec, ConsensusClusterStatus, RECOVER_ANNOTATION, RecoveryRecord, RecoverySource,
    condition, parse_duration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::{Health, Observed, Step};
use crate::resources::backup::stored_backup;

/// When the cluster lost its quorum, while it has not regained it: to the second, as status
/// is written (and as a person writes the time of a request), whether the status was read
/// back or is the one in memory.
pub fn quorum_lost_since(status: Option<&ConsensusClusterStatus>) -> Option<Timestamp> {
    let lost = status?.conditions.iter().find(|c| c.type_ == condition::QUORUM_LOST && c.status == "True")?;
    let at = lost.last_transition_time.0;
    Some(Timestamp::from_second(at.as_second()).unwrap_or(at))
}

/// How the start or end of a quorum loss is reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The event for a quorum lost (a Warning, at once: whatever the timeout, someone should
/// look) or regained between the status before and the one now.
pub fn quorum_event(
    previous: Option<&ConsensusClusterStatus>,
    next: &ConsensusClusterStatus,
) -> Option<QuorumEvent> {
    let lost_before = quorum_lost_since(previous);
    let lost_now = quorum_lost_since(Some(next));
    match (lost_before, lost_now) {
        (None, Some(_)) => {
            let message = next
                .conditions
                .iter()
                .find(|c| c.type_ == condition::QUORUM_LOST)
                .map(|c| c.message.clone())
                .unwrap_or_default();
            Some(QuorumEvent { warning: true, reason: "QuorumLost", message })
        }
        (Some(since), None) => {
            let regained = next
                .conditions
                .iter()
                .find(|c| c.type_ == condition::QUORUM_LOST)
                .map_or(since, |c| c.last_transition_time.0);
            let seconds = regained.duration_since(since).as_secs();
            Some(QuorumEvent {
                warning: false,
                reason: "QuorumRegained",
                message: format!(
                    "a leader and a quorum of healthy voters again, {seconds} s after it was lost at {since}"
                ),
            })
        }
        _ => None,
    }
}

/// How far ahead of this operator's clock a request's time may be (clocks differ).
const REQUEST_SKEW: Duration = Duration::from_secs(300);

/// The recovery under way, as status records it.
pub fn recovery_in(status: Option<&ConsensusClusterStatus>) -> Option<RecoveryRecord> {
    status?.recovery.clone()
}

/// The step recovery asks for, if any: carrying on with one under way until the new
/// cluster answers, or starting one once the quorum, lost now (`lost_now`), has been lost
/// for longer than the timeout and the spec allows it.
pub fn step(spec: &ConsensusClusterSpec, observed: &Observed, lost_now: bool) -> Option<Step> {
    if let Some(record) = &observed.recovery {
        // Restored once a member answers with a cluster id other than the one replaced; from
        // then on the cluster grows back by the usual steps. The old cluster serving again
        // (its members back before theirs were replaced) ends the recovery: `abandoned`.
        let restored = answering_new_cluster(observed, record);
        // A bootstrap whose source the spec has changed since (a mistyped location, say)
        // starts again from the new one, while nothing of it serves yet: nothing is lost.
        if let Some(again) = bootstrap(spec, observed).filter(|b| !restored && b.from != record.from) {
            return Some(Step::BeginRecovery { record: Box::new(again) });
        }
        return (!restored && !abandoned(observed, record))
            .then(|| Step::Recover { record: Box::new(record.clone()) });
    }
    if let Some(record) = bootstrap(spec, observed) {
        return Some(Step::BeginRecovery { record: Box::new(record) });
    }
    if !lost_now {
        return None;
    }
    let since = observed.quorum_lost_since?;
    // Asked for by hand: at once. Automatic: once the loss has lasted the timeout.
    let requested = request(observed).ok().flatten();
    if requested.is_none() {
        let timeout = parse_duration(&spec.recovery.quorum_loss_timeout).unwrap_or(Duration::from_secs(600));
        if !spec.recovery.auto_restore || since.checked_add(timeout).is_ok_and(|due| observed.now < due) {
            return None;
        }
    }
    let record = source(observed, since)?;
    Some(Step::BeginRecovery {
        record: Box::new(RecoveryRecord { requested: requested.map(Time), ..record }),
    })
}

/// Whether the cluster is to be made from a backup (`spec.bootstrap.fromBackup`) and has not
/// been yet: it never ran (no leader ever, no cluster id seen). Its workload is created
/// without members, so no member starts a cluster of its own on an empty volume first.
pub fn from_backup_pending(spec: &ConsensusClusterSpec, observed: &Observed) -> bool {
    spec.bootstrap.as_ref().is_some_and(|b| b.from_backup.is_some())
        && !observed.established
        && observed.cluster_id.is_none()
        && observed.status_cluster_id.is_none()
}

/// A cluster made from a backup starts as a recovery with nothing to replace, once its
/// workload exists without members: the backup restored into the first member, which starts
/// alone, and the others added as in a scale-up. The backup is the one named, or the
/// newest verified one in the destination (`from` is the destination itself then).
fn bootstrap(spec: &ConsensusClusterSpec, observed: &Observed) -> Option<RecoveryRecord> {
    let members_to_start = observed.workload_replicas == Some(0)
        || observed.recovery.as_ref().is_some_and(|r| r.quorum_lost.is_none());
    if !from_backup_pending(spec, observed) || !members_to_start {
        return None;
    }
    let named = spec.bootstrap.as_ref()?.from_backup.as_ref()?.location.clone();
    let from = named.or_else(|| observed.backup_destination.clone())?;
    Some(RecoveryRecord {
        source: RecoverySource::Backup,
        from,
        applied_index: None,
        previous_cluster_id: None,
        cluster_token: format!("restored-{}", observed.now.as_nanosecond()),
        quorum_lost: None,
        started: Time(observed.now),
        finished: None,
        lost_writes: "nothing of this cluster's: it starts with what the backup holds".to_owned(),
        requested: None,
    })
}

/// Where a recovery comes from, in words.
fn source_text(record: &RecoveryRecord) -> String {
    if stored_backup(&record.from).is_some() || record.source == RecoverySource::Survivor {
        format!("{} ({:?})", record.from, record.source)
    } else {
        format!("the newest verified backup in {}", record.from)
    }
}

/// What a recovery does, for its condition and Event.
pub fn describe(record: &RecoveryRecord) -> String {
    let from = source_text(record);
    match &record.quorum_lost {
        Some(lost) => format!(
            "making the cluster again from {from} after its quorum was lost at {}; lost: {}",
            lost.0, record.lost_writes
        ),
        None => format!("making the new cluster from {from}, then growing it to its declared size"),
    }
}

/// The `consensus.dev/recover` request that asks for a recovery of the quorum loss under
/// way, if there is one; an error says why the annotation asks for none.
fn request(observed: &Observed) -> Result<Option<Timestamp>, String> {
    let (Some(value), Some(since)) = (observed.recovery_request.as_deref(), observed.quorum_lost_since)
    else {
        return Ok(None);
    };
    let at: Timestamp = value.parse().map_err(|_| {
        format!("the {RECOVER_ANNOTATION} annotation {value:?} is not a time (RFC 3339, UTC)")
    })?;
    if at > observed.now.checked_add(REQUEST_SKEW).unwrap_or(observed.now) {
        return Err(format!(
            "the {RECOVER_ANNOTATION} request of {at} is in the future; give the time now (RFC 3339, UTC)"
        ));
    }
    if at < since {
        return Err(format!(
            "the {RECOVER_ANNOTATION} request of {at} was made before the quorum was lost at {since}; annotate \
             again to recover from this loss"
        ));
    }
    Ok(Some(at))
}

/// The id of the cluster as it was: what members answer with, or what status last said.
fn old_cluster_id(observed: &Observed) -> Option<String> {
    observed.cluster_id.map(|id| format!("{id:x}")).or_else(|| observed.status_cluster_id.clone())
}

/// A member answers under a cluster id other than the one the recovery replaces.
fn answering_new_cluster(observed: &Observed, record: &RecoveryRecord) -> bool {
    let answering = observed.cluster_id.map(|id| format!("{id:x}"));
    answering.is_some() && answering != record.previous_cluster_id
}

/// The cluster the recovery was to replace has a leader and a quorum again: nothing of it
/// was replaced (a platform replaces all at once, after killing every member), so the
/// recovery is dropped and the cluster serves on.
fn abandoned(observed: &Observed, record: &RecoveryRecord) -> bool {
    let answering = observed.cluster_id.map(|id| format!("{id:x}"));
    answering.is_some()
        && answering == record.previous_cluster_id
        && Health::of(observed).is_some_and(|h| h.has_quorum())
}

/// The recovery under way was dropped: the cluster it was to replace serves again.
pub fn abandoned_now(observed: &Observed) -> bool {
    observed.recovery.as_ref().is_some_and(|record| abandoned(observed, record))
}

/// Where a recovery starting now comes from: the answering member with the highest applied
/// index, else the newest verified backup; `None` when there is neither, or when the id of
/// the cluster it replaces is not known (a restored cluster is told from the old one by it).
fn source(observed: &Observed, quorum_lost: Timestamp) -> Option<RecoveryRecord> {
    let previous_cluster_id = Some(old_cluster_id(observed)?);
    let survivor = observed
        .members
        .iter()
        .flatten()
        .filter_map(|m| Some((m, m.applied_index?)))
        .max_by_key(|(m, index)| (*index, std::cmp::Reverse(m.name.clone())));
    let record = |source, from: String, applied_index: Option<u64>, lost_writes: String| RecoveryRecord {
        source,
        from,
        applied_index: applied_index.and_then(|i| i64::try_from(i).ok()),
        previous_cluster_id: previous_cluster_id.clone(),
        cluster_token: format!("recovered-{}", observed.now.as_nanosecond()),
        quorum_lost: Some(Time(quorum_lost)),
        started: Time(observed.now),
        finished: None,
        lost_writes,
        requested: None,
    };
    if let Some((member, index)) = survivor {
        let lost = format!(
            "none that {} had applied (index {index}); writes a quorum committed that it had not applied",
            member.name
        );
        return Some(record(RecoverySource::Survivor, member.name.clone(), Some(index), lost));
    }
    let backup = observed.last_backup.as_ref().filter(|b| b.verified == Some(true))?;
    let lost =
        format!("every write after revision {} (the backup taken at {})", backup.revision, backup.time.0);
    Some(record(RecoverySource::Backup, backup.location.clone(), None, lost))
}

/// Why nothing recovers a cluster that has lost its quorum, for the `QuorumLost` condition.
pub fn not_recovering(spec: &ConsensusClusterSpec, observed: &Observed) -> String {
    if let Err(why) = request(observed) {
        return why;
    }
    if !spec.recovery.auto_restore {
        return format!(
            "spec.recovery.autoRestore is off: recovering loses the writes the members that are gone had not \
             passed on, so it is your decision; to recover now, annotate the cluster with {RECOVER_ANNOTATION}=\
             <the time now, RFC 3339>"
        );
    }
    match (observed.quorum_lost_since, source(observed, observed.now)) {
        (_, None) => {
            "no member answers with its data and there is no verified backup to recover from".to_owned()
        }
        (since, Some(record)) => format!(
            "recovery from {} starts {} after the loss{} (spec.recovery.quorumLossTimeout)",
            record.from,
            spec.recovery.quorum_loss_timeout,
            since.map_or_else(String::new, |at| format!(" at {at}"))
        ),
    }
}

/// Whether the recovery under way is done: the new cluster at its declared size, all its
/// voters healthy under a leader.
pub fn finished(spec: &ConsensusClusterSpec, observed: &Observed) -> bool {
    let Some(record) = &observed.recovery else { return false };
    let Some(health) = Health::of(observed) else { return false };
    answering_new_cluster(observed, record)
        && health.has_quorum()
        && i64::try_from(health.voters).ok() == Some(i64::from(spec.replicas))
        && health.healthy_voters == health.voters
        && health.members.len() == health.voters
}

/// The event for a recovery that started or finished between two statuses.
pub fn recovery_event(
    previous: Option<&ConsensusClusterStatus>,
    next: &ConsensusClusterStatus,
) -> Option<QuorumEvent> {
    let before = previous.and_then(|p| p.recovery.as_ref());
    if let (None, Some(started)) = (before, next.recovery.as_ref()) {
        // A bootstrap from a backup is news, not a warning: nothing was lost.
        let warning = started.quorum_lost.is_some();
        return Some(QuorumEvent { warning, reason: "RecoveryStarted", message: describe(started) });
    }
    let finished_one = next.last_recovery.as_ref() != previous.and_then(|p| p.last_recovery.as_ref());
    if let (Some(dropped), None, false) = (before, next.recovery.as_ref(), finished_one) {
        let message = format!(
            "the cluster has a leader and a quorum again under its own id {}: nothing was replaced, and the \
             recovery from {} is dropped",
            dropped.previous_cluster_id.as_deref().unwrap_or("unknown"),
            dropped.from
        );
        return Some(QuorumEvent { warning: false, reason: "RecoveryDropped", message });
    }
    let done = next.last_recovery.as_ref().filter(|_| finished_one)?;
    let (made, again) = if done.quorum_lost.is_some() { ("recovered", " again") } else { ("made", "") };
    let message = format!(
        "{made} from {} as cluster {}, at its declared size{again}{}",
        source_text(done),
        next.cluster_id.as_deref().unwrap_or("unknown"),
        done.finished.as_ref().map_or_else(String::new, |t| format!(" at {}", t.0))
    );
    Some(QuorumEvent { warning: false, reason: "Recovered", message })
}

#[cfg(test)]
#[path = "recovery_tests.rs"]
mod decisions;

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    use super::*;

    fn with_quorum_lost(lost: bool, at: &str) -> ConsensusClusterStatus {
        ConsensusClusterStatus {
            conditions: vec![Condition {
                type_: condition::QUORUM_LOST.to_owned(),
                status: if lost { "True" } else { "False" }.to_owned(),
                reason: if lost { "NotEnoughHealthyVoters" } else { "QuorumHealthy" }.to_owned(),
                message: if lost { "1 of 3 voters are healthy" } else { "a leader" }.to_owned(),
                observed_generation: Some(1),
                last_transition_time: Time(at.parse().expect("a time")),
            }],
            ..ConsensusClusterStatus::default()
        }
    }

    #[test]
    fn a_quorum_loss_is_told_when_it_starts_and_when_it_ends_once_each() {
        let healthy = with_quorum_lost(false, "2026-12-01T10:00:00Z");
        let lost = with_quorum_lost(true, "2026-12-01T10:05:00Z");
        assert_eq!(quorum_lost_since(Some(&lost)), Some("2026-12-01T10:05:00Z".parse().expect("a time")));
        assert_eq!(quorum_lost_since(Some(&healthy)), None);
        let started = quorum_event(Some(&healthy), &lost).expect("an event");
        assert_eq!((started.warning, started.reason), (true, "QuorumLost"));
        assert_eq!(started.message, "1 of 3 voters are healthy");
        // Also for an operator that starts on a cluster without quorum.
        assert_eq!(quorum_event(None, &lost).map(|e| e.reason), Some("QuorumLost"));
        assert_eq!(quorum_event(Some(&lost), &lost), None, "told once");
        let back =
            quorum_event(Some(&lost), &with_quorum_lost(false, "2026-12-01T10:06:40Z")).expect("an event");
        assert_eq!((back.warning, back.reason), (false, "QuorumRegained"));
        assert!(back.message.contains("100 s after it was lost at 2026-12-01T10:05:00Z"), "{}", back.message);
        assert_eq!(quorum_event(Some(&healthy), &healthy), None);
    }
}
