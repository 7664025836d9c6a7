use consensus_crds::{BackupRecord, ConsensusClusterSpec, Phase, RecoverySource};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::super::{Observed, ObservedMember, Step, plan, status};
use super::*;

fn t(text: &str) -> Timestamp {
    text.parse().expect("a timestamp")
}

fn spec(auto_restore: bool) -> ConsensusClusterSpec {
    serde_json::from_value(serde_json::json!({
        "replicas": 3,
        "recovery": { "autoRestore": auto_restore, "quorumLossTimeout": "2m" },
    }))
    .expect("spec parses")
}

fn member(ordinal: u64, applied: Option<u64>) -> ObservedMember {
    ObservedMember {
        id: ordinal + 1,
        name: format!("demo-{ordinal}"),
        is_learner: false,
        healthy: false,
        zone: None,
        applied_index: applied,
        outdated: Some(false),
    }
}

/// Three members, no leader: demo-0 and demo-2 answer (with what they applied), demo-1
/// does not; the quorum was lost at 10:00, looked at `now`.
fn lost(now: &str) -> Observed {
    Observed {
        generation: Some(1),
        workload_replicas: Some(3),
        members: Some(vec![member(0, Some(90)), member(1, None), member(2, Some(120))]),
        cluster_id: Some(0xabc),
        volumes: (0..3).map(|i| format!("demo-{i}")).collect(),
        established: true,
        now: t(now),
        quorum_lost_since: Some(t("2026-12-01T10:00:00Z")),
        ..Observed::default()
    }
}

/// What status said while the cluster served.
fn served() -> ConsensusClusterStatus {
    ConsensusClusterStatus {
        leader: Some("demo-0".to_owned()),
        phase: Some(Phase::Running),
        ..ConsensusClusterStatus::default()
    }
}

fn begun(step: &Step) -> RecoveryRecord {
    match step {
        Step::BeginRecovery { record } => (**record).clone(),
        other => panic!("no recovery begun: {other:?}"),
    }
}

#[test]
fn a_loss_shorter_than_the_timeout_is_waited_out() {
    let observed = lost("2026-12-01T10:01:59Z");
    let step = plan(&spec(true), &observed);
    assert!(!matches!(step, Step::BeginRecovery { .. } | Step::Recover { .. }), "{step:?}");
    let status = status(&spec(true), &observed, &step, None, Some(&served()), Time(observed.now));
    assert_eq!(status.phase, Some(Phase::QuorumLost));
    let lost = status.conditions.iter().find(|c| c.type_ == condition::QUORUM_LOST).expect("QuorumLost");
    assert!(lost.message.contains("recovery from demo-2 starts 2m after the loss"), "{}", lost.message);
}

#[test]
fn without_auto_restore_nothing_is_done_and_the_condition_says_why() {
    let observed = lost("2026-12-01T11:00:00Z");
    let step = plan(&spec(false), &observed);
    assert!(!matches!(step, Step::BeginRecovery { .. }), "{step:?}");
    let status = status(&spec(false), &observed, &step, None, Some(&served()), Time(observed.now));
    let lost = status.conditions.iter().find(|c| c.type_ == condition::QUORUM_LOST).expect("QuorumLost");
    assert!(lost.message.contains("spec.recovery.autoRestore is off"), "{}", lost.message);
}

#[test]
fn past_the_timeout_the_member_that_applied_most_is_the_survivor() {
    let observed = lost("2026-12-01T10:02:00Z");
    let step = plan(&spec(true), &observed);
    let record = begun(&step);
    assert_eq!(
        (record.source, record.from.as_str(), record.applied_index),
        (RecoverySource::Survivor, "demo-2", Some(120))
    );
    assert_eq!(record.previous_cluster_id.as_deref(), Some("abc"));
    assert_eq!(record.quorum_lost, Some(Time(t("2026-12-01T10:00:00Z"))));
    // Recorded in status before anything is changed, and said.
    let status = status(&spec(true), &observed, &step, None, None, Time(observed.now));
    assert_eq!(status.recovery.as_ref(), Some(&record));
    assert_eq!(status.phase, Some(Phase::Restoring));
    let event = recovery_event(None, &status).expect("an event");
    assert_eq!((event.warning, event.reason), (true, "RecoveryStarted"));
}

#[test]
fn with_no_member_answering_the_newest_verified_backup_is_the_source() {
    let mut observed = lost("2026-12-01T10:05:00Z");
    for m in observed.members.as_mut().expect("members") {
        m.applied_index = None;
    }
    // Nothing to recover from yet.
    assert!(!matches!(plan(&spec(true), &observed), Step::BeginRecovery { .. }));
    observed.last_backup = Some(BackupRecord {
        name: "demo-20261201T090000Z".to_owned(),
        time: Time(t("2026-12-01T09:00:02Z")),
        location: "file:///keep/demo-20261201T090000Z.snapshot".to_owned(),
        revision: 4711,
        size_bytes: 1024,
        sha256: "ab".repeat(32),
        verified: Some(true),
    });
    let record = begun(&plan(&spec(true), &observed));
    assert_eq!(record.source, RecoverySource::Backup);
    assert_eq!(record.from, "file:///keep/demo-20261201T090000Z.snapshot");
    assert!(record.lost_writes.contains("after revision 4711"), "{}", record.lost_writes);
    // An unverified backup is no source.
    observed.last_backup.as_mut().expect("a backup").verified = None;
    assert!(!matches!(plan(&spec(true), &observed), Step::BeginRecovery { .. }));
}

#[test]
fn a_recovery_under_way_is_carried_on_until_the_new_cluster_answers_then_grows_back() {
    let mut observed = lost("2026-12-01T10:02:00Z");
    let record = begun(&plan(&spec(true), &observed));
    observed.recovery = Some(record.clone());
    // Resumed by any operator that looks, whatever the members say meanwhile.
    assert_eq!(plan(&spec(true), &observed), Step::Recover { record: Box::new(record.clone()) });
    observed.cluster_id = None;
    assert_eq!(plan(&spec(true), &observed), Step::Recover { record: Box::new(record.clone()) });
    // demo-0 answers as the one member of a new cluster: it grows back by the usual steps.
    observed.cluster_id = Some(0xdef);
    observed.workload_replicas = Some(1);
    observed.members =
        Some(vec![ObservedMember { healthy: true, applied_index: Some(3), ..member(0, None) }]);
    observed.leader = Some(1);
    observed.leader_raft_index = Some(3);
    observed.volumes = vec!["demo-0".to_owned()];
    observed.quorum_lost_since = None;
    let step = plan(&spec(true), &observed);
    assert_eq!(step, Step::AddLearner { name: "demo-1".to_owned() });
    let growing = status(&spec(true), &observed, &step, None, None, Time(observed.now));
    assert_eq!((growing.phase, growing.recovery.as_ref()), (Some(Phase::Restoring), Some(&record)));
    // Back at three healthy voters: done, and moved to lastRecovery.
    observed.workload_replicas = Some(3);
    observed.members = Some(
        (0..3).map(|i| ObservedMember { healthy: true, applied_index: Some(9), ..member(i, None) }).collect(),
    );
    observed.leader_raft_index = Some(9);
    let step = plan(&spec(true), &observed);
    let done = status(&spec(true), &observed, &step, None, None, Time(observed.now));
    assert_eq!(done.recovery, None);
    let last = done.last_recovery.clone().expect("lastRecovery");
    assert_eq!((last.from.as_str(), last.finished.clone()), ("demo-2", Some(Time(observed.now))));
    assert_eq!(done.phase, Some(Phase::Running));
    let previous = ConsensusClusterStatus { recovery: Some(record), ..ConsensusClusterStatus::default() };
    assert_eq!(recovery_event(Some(&previous), &done).map(|e| e.reason), Some("Recovered"));
}

#[test]
fn a_recovery_asked_for_by_hand_starts_at_once_but_only_for_the_loss_under_way() {
    let mut observed = lost("2026-12-01T10:00:30Z");
    // Made before the loss began: left over from an earlier one, ignored, and said.
    observed.recovery_request = Some("2026-12-01T09:59:00Z".to_owned());
    assert!(!matches!(plan(&spec(false), &observed), Step::BeginRecovery { .. }));
    let why = not_recovering(&spec(false), &observed);
    assert!(why.contains("made before the quorum was lost at 2026-12-01T10:00:00Z; annotate again"), "{why}");
    observed.recovery_request = Some("soon".to_owned());
    assert!(not_recovering(&spec(false), &observed).contains("is not a time"));
    // Made during it: at once, though autoRestore is off and the timeout has not passed.
    observed.recovery_request = Some("2026-12-01T10:00:20Z".to_owned());
    let record = begun(&plan(&spec(false), &observed));
    assert_eq!(record.requested, Some(Time(t("2026-12-01T10:00:20Z"))));
    assert_eq!(record.from, "demo-2");
    // Without a request, autoRestore off says how to ask.
    observed.recovery_request = None;
    assert!(
        not_recovering(&spec(false), &observed).contains("annotate the cluster with consensus.dev/recover=")
    );
}

#[test]
fn members_back_after_the_timeout_end_the_loss_and_nothing_is_recovered() {
    // Status still says the quorum was lost long ago; the members answer with a leader now.
    let mut observed = lost("2026-12-01T11:00:00Z");
    observed.members = Some(
        (0..3).map(|i| ObservedMember { healthy: true, applied_index: Some(9), ..member(i, None) }).collect(),
    );
    observed.leader = Some(1);
    observed.leader_raft_index = Some(9);
    let step = plan(&spec(true), &observed);
    assert!(!matches!(step, Step::BeginRecovery { .. }), "{step:?}");
    // Nor by hand.
    observed.recovery_request = Some("2026-12-01T10:59:00Z".to_owned());
    assert!(!matches!(plan(&spec(false), &observed), Step::BeginRecovery { .. }));
}

#[test]
fn a_recovery_needs_the_old_cluster_id_and_takes_it_from_status_when_nobody_answers() {
    let mut observed = lost("2026-12-01T10:05:00Z");
    observed.members = None;
    observed.cluster_id = None;
    observed.last_backup = Some(BackupRecord {
        name: "b".to_owned(),
        time: Time(t("2026-12-01T09:00:02Z")),
        location: "file:///keep/b.snapshot".to_owned(),
        revision: 7,
        size_bytes: 1,
        sha256: String::new(),
        verified: Some(true),
    });
    // Without it a restored cluster could not be told from the old one: nothing begins.
    assert!(!matches!(plan(&spec(true), &observed), Step::BeginRecovery { .. }));
    observed.status_cluster_id = Some("abc".to_owned());
    let record = begun(&plan(&spec(true), &observed));
    assert_eq!(record.previous_cluster_id.as_deref(), Some("abc"));
    // An old member back under the old id does not count as restored.
    observed.recovery = Some(record.clone());
    observed.cluster_id = Some(0xabc);
    observed.members = Some(vec![ObservedMember { applied_index: Some(3), ..member(1, None) }]);
    assert_eq!(plan(&spec(true), &observed), Step::Recover { record: Box::new(record) });
}

#[test]
fn the_old_cluster_serving_again_drops_a_recovery_that_replaced_nothing() {
    let mut observed = lost("2026-12-01T10:02:00Z");
    let record = begun(&plan(&spec(true), &observed));
    observed.recovery = Some(record.clone());
    observed.members = Some(
        (0..3)
            .map(|i| ObservedMember { healthy: true, applied_index: Some(130), ..member(i, None) })
            .collect(),
    );
    observed.leader = Some(3);
    observed.leader_raft_index = Some(130);
    let step = plan(&spec(true), &observed);
    assert!(!matches!(step, Step::Recover { .. } | Step::BeginRecovery { .. }), "{step:?}");
    let now = status(&spec(true), &observed, &step, None, None, Time(observed.now));
    assert_eq!((now.recovery.as_ref(), now.last_recovery.as_ref()), (None, None));
    let before = ConsensusClusterStatus { recovery: Some(record), ..ConsensusClusterStatus::default() };
    assert_eq!(recovery_event(Some(&before), &now).map(|e| e.reason), Some("RecoveryDropped"));
}

fn from_backup(location: Option<&str>) -> ConsensusClusterSpec {
    serde_json::from_value(serde_json::json!({
        "replicas": 3,
        "backup": { "schedule": "@daily", "destination": { "volume": { "claimName": "backups" } } },
        "bootstrap": { "fromBackup": { "location": location } },
    }))
    .expect("spec parses")
}

/// A resource just created: nothing of it exists yet.
fn new_resource(now: &str) -> Observed {
    Observed {
        generation: Some(1),
        now: t(now),
        backup_destination: Some("file:///backup/demo".to_owned()),
        ..Observed::default()
    }
}

#[test]
fn a_cluster_made_from_a_backup_starts_without_members_and_restores_the_first() {
    let spec = from_backup(None);
    let mut observed = new_resource("2026-12-01T10:00:00Z");
    // No member may start on an empty volume: the workload is made without any.
    assert_eq!(plan(&spec, &observed), Step::CreateWorkload { replicas: 0, bootstrap: false });
    observed.workload_replicas = Some(0);
    let record = begun(&plan(&spec, &observed));
    assert_eq!(record.source, RecoverySource::Backup);
    assert_eq!(record.from, "file:///backup/demo", "the newest verified backup there");
    assert_eq!((&record.previous_cluster_id, &record.quorum_lost), (&None, &None));
    let status = status(
        &spec,
        &observed,
        &Step::BeginRecovery { record: Box::new(record.clone()) },
        None,
        None,
        Time(observed.now),
    );
    let progressing =
        status.conditions.iter().find(|c| c.type_ == condition::PROGRESSING).expect("Progressing");
    assert!(
        progressing.message.contains("the newest verified backup in file:///backup/demo"),
        "{}",
        progressing.message
    );
    let event = recovery_event(None, &status).expect("an event");
    assert!(!event.warning, "nothing was lost: {}", event.message);

    // Carried on until the restored member answers under its new id, then grown as usual.
    observed.recovery = Some(record.clone());
    assert_eq!(plan(&spec, &observed), Step::Recover { record: Box::new(record) });
    observed.workload_replicas = Some(1);
    observed.members = Some(vec![ObservedMember { healthy: true, ..member(0, Some(5)) }]);
    observed.leader = Some(1);
    observed.cluster_id = Some(0xdef);
    observed.volumes = vec!["demo-0".to_owned()];
    let step = plan(&spec, &observed);
    assert!(matches!(step, Step::AddLearner { .. } | Step::ResizeWorkload { .. }), "{step:?}");
}

#[test]
fn a_named_backup_is_the_source_and_a_cluster_that_ran_is_never_made_from_one() {
    let location = "file:///backup/demo/demo-20261201.snapshot";
    let spec = from_backup(Some(location));
    let observed = Observed { workload_replicas: Some(0), ..new_resource("2026-12-01T10:00:00Z") };
    assert_eq!(begun(&plan(&spec, &observed)).from, location);
    // Once the cluster has had an id, fromBackup is history: its members rejoin it.
    for ran in [
        Observed { established: true, ..observed.clone() },
        Observed { status_cluster_id: Some("abc".to_owned()), ..observed.clone() },
    ] {
        let step = plan(&spec, &ran);
        assert!(!matches!(step, Step::BeginRecovery { .. }), "{step:?}");
    }
    let ran = Observed { established: true, workload_replicas: None, ..observed.clone() };
    assert_eq!(plan(&spec, &ran), Step::CreateWorkload { replicas: 3, bootstrap: false });
}

#[test]
fn volumes_an_earlier_cluster_left_hold_a_cluster_from_a_backup_back_and_are_named() {
    let spec = from_backup(None);
    let observed =
        Observed { kept_volumes: vec!["data-demo-0".to_owned()], ..new_resource("2026-12-01T10:00:00Z") };
    let step = plan(&spec, &observed);
    let Step::Wait { reason } = &step else { panic!("{step:?}") };
    assert!(reason.contains("data-demo-0") && reason.contains("never starts on them"), "{reason}");
    assert!(!reason.contains("Adopt"), "{reason}");
}

#[test]
fn a_bootstrap_whose_source_is_changed_starts_again_from_the_new_one_until_it_serves() {
    let observed = Observed { workload_replicas: Some(0), ..new_resource("2026-12-01T10:00:00Z") };
    let first = begun(&plan(&from_backup(None), &observed));
    let mut observed = Observed { recovery: Some(first.clone()), workload_replicas: Some(1), ..observed };
    // The same source: carried on.
    assert_eq!(plan(&from_backup(None), &observed), Step::Recover { record: Box::new(first.clone()) });
    // Another: begun again from it, under a new token.
    let location = "file:///backup/demo/demo-1.snapshot";
    observed.now = t("2026-12-01T10:01:00Z");
    let again = begun(&plan(&from_backup(Some(location)), &observed));
    assert_eq!(again.from, location);
    assert_ne!(again.cluster_token, first.cluster_token);
    // Once the new cluster answers, the source is history.
    observed.members = Some(vec![ObservedMember { healthy: true, ..member(0, Some(5)) }]);
    observed.leader = Some(1);
    observed.cluster_id = Some(0xdef);
    let step = plan(&from_backup(Some(location)), &observed);
    assert!(!matches!(step, Step::BeginRecovery { .. }), "{step:?}");
}
