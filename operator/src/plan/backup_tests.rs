use consensus_crds::ConsensusClusterSpec;
use proptest::prelude::*;

use super::super::tests::{arb_observed, arb_valid_spec};
use super::super::{plan, status};
use super::*;

fn t(text: &str) -> Timestamp {
    text.parse().expect("a timestamp")
}

fn spec(replicas: i32, schedule: &str) -> ConsensusClusterSpec {
    serde_json::from_value(serde_json::json!({
        "replicas": replicas,
        "backup": { "schedule": schedule, "destination": { "volume": { "claimName": "keep" } } },
    }))
    .expect("spec parses")
}

fn backup(schedule: &str) -> BackupSpec {
    spec(3, schedule).backup.expect("a backup")
}

fn member(ordinal: u64, healthy: bool) -> ObservedMember {
    ObservedMember {
        id: ordinal + 1,
        name: format!("demo-{ordinal}"),
        is_learner: false,
        healthy,
        zone: None,
        applied_index: Some(1000),
        outdated: Some(false),
    }
}

/// A steady three-member cluster, demo-0 leading, looked at `now`.
fn steady(now: &str) -> Observed {
    Observed {
        generation: Some(1),
        workload_replicas: Some(3),
        members: Some((0..3).map(|i| member(i, true)).collect()),
        leader: Some(1),
        cluster_id: Some(0xabc),
        leader_raft_index: Some(1000),
        volumes: (0..3).map(|i| format!("demo-{i}")).collect(),
        established: true,
        now: t(now),
        ..Observed::default()
    }
}

fn run(slot: &str, attempt: u32, outcome: RunOutcome) -> BackupRun {
    BackupRun {
        request: None,
        backup: backup_name("demo", t(slot), None),
        slot: t(slot),
        attempt,
        member: "demo-1".to_owned(),
        started: t(slot),
        outcome,
    }
}

fn failed(at: &str, reason: &str) -> RunOutcome {
    RunOutcome::Failed { at: t(at), reason: reason.to_owned() }
}

fn succeeded(taken: &str, revision: i64) -> RunOutcome {
    RunOutcome::Succeeded(Box::new(Taken {
        location: format!("file:///keep/demo-{revision}.snapshot"),
        sha256: "ab".repeat(32),
        size_bytes: 20480,
        revision,
        taken: t(taken),
        pruned: Vec::new(),
        verified: Some(true),
        finished: t(taken),
    }))
}

fn due_at(schedule: &str, last: Option<&str>, runs: &[BackupRun], now: &str) -> Option<Due> {
    due(&backup(schedule), last.map(t), runs, t(now))
}

#[test]
fn the_newest_slot_is_run_at_once_and_then_each_slot_once() {
    // A schedule with nothing run yet: its newest slot, now.
    let first = due_at("0 */6 * * *", None, &[], "2026-12-01T10:05:00Z");
    assert_eq!(first, Some(Due { slot: t("2026-12-01T06:00:00Z"), attempt: 1 }));
    // Started (status says so, or only the run does): not again.
    assert_eq!(due_at("0 */6 * * *", Some("2026-12-01T06:00:00Z"), &[], "2026-12-01T11:59:59Z"), None);
    let done = [run("2026-12-01T06:00:00Z", 1, succeeded("2026-12-01T06:00:03Z", 10))];
    assert_eq!(due_at("0 */6 * * *", None, &done, "2026-12-01T11:59:59Z"), None);
    // The next slot when it comes.
    let next = due_at("0 */6 * * *", Some("2026-12-01T06:00:00Z"), &done, "2026-12-01T12:00:00Z");
    assert_eq!(next, Some(Due { slot: t("2026-12-01T12:00:00Z"), attempt: 1 }));
    assert_eq!(next_slot(&backup("0 */6 * * *"), t("2026-12-01T12:00:00Z")), Some(t("2026-12-01T18:00:00Z")));
}

#[test]
fn slots_missed_while_no_operator_ran_are_caught_up_once() {
    // Last run 02:00; the operator was down until 09:30: one backup, for 09:00.
    let back = due_at("@hourly", Some("2026-12-01T02:00:00Z"), &[], "2026-12-01T09:30:00Z");
    assert_eq!(back, Some(Due { slot: t("2026-12-01T09:00:00Z"), attempt: 1 }));
    assert_eq!(due_at("@hourly", Some("2026-12-01T09:00:00Z"), &[], "2026-12-01T09:31:00Z"), None);
}

#[test]
fn nothing_starts_while_suspended_or_while_a_run_is_going() {
    let mut suspended = backup("@hourly");
    suspended.suspend = true;
    assert_eq!(due(&suspended, None, &[], t("2026-12-01T09:30:00Z")), None);
    assert_eq!(next_slot(&suspended, t("2026-12-01T09:30:00Z")), None);
    // Still running from the last slot when the next comes: one at a time.
    let going = [run("2026-12-01T08:00:00Z", 1, RunOutcome::Running)];
    assert_eq!(due_at("@hourly", Some("2026-12-01T08:00:00Z"), &going, "2026-12-01T09:00:10Z"), None);
}

#[test]
fn a_failed_backup_is_tried_again_with_growing_delays_then_given_up_until_the_next_slot() {
    let slot = "2026-12-01T09:00:00Z";
    let after = |attempt: u32, at: &str, now: &str| {
        due_at("@hourly", Some(slot), &[run(slot, attempt, failed(at, "connection refused"))], now)
    };
    assert_eq!(after(1, "2026-12-01T09:00:05Z", "2026-12-01T09:00:14Z"), None);
    assert_eq!(
        after(1, "2026-12-01T09:00:05Z", "2026-12-01T09:00:15Z"),
        Some(Due { slot: t(slot), attempt: 2 })
    );
    assert_eq!(after(2, "2026-12-01T09:00:20Z", "2026-12-01T09:00:39Z"), None);
    assert_eq!(
        after(2, "2026-12-01T09:00:20Z", "2026-12-01T09:00:40Z"),
        Some(Due { slot: t(slot), attempt: 3 })
    );
    assert_eq!(retry_delay(4), Duration::from_secs(80));
    assert_eq!(retry_delay(30), MAX_RETRY_DELAY);
    assert_eq!(after(MAX_ATTEMPTS, "2026-12-01T09:05:00Z", "2026-12-01T09:59:59Z"), None);
    // The next slot starts afresh.
    let next = after(MAX_ATTEMPTS, "2026-12-01T09:05:00Z", "2026-12-01T10:00:00Z");
    assert_eq!(next, Some(Due { slot: t("2026-12-01T10:00:00Z"), attempt: 1 }));
}

#[test]
fn the_operator_looks_again_when_a_try_or_a_slot_is_due() {
    let spec = spec(3, "@hourly");
    let mut observed = steady("2026-12-01T10:00:02Z");
    observed.last_scheduled_backup = Some(t("2026-12-01T10:00:00Z"));
    assert_eq!(wake_in(&spec, &observed), Some(Duration::from_secs(3598)));
    observed.backup_runs = vec![run("2026-12-01T10:00:00Z", 1, failed("2026-12-01T10:00:01Z", "refused"))];
    assert_eq!(wake_in(&spec, &observed), Some(Duration::from_secs(9)));
    // Past due already (it could not start): again at the pace of a first retry, not in a
    // busy loop.
    observed.now = t("2026-12-01T10:00:30Z");
    assert_eq!(wake_in(&spec, &observed), Some(FIRST_RETRY_DELAY));
    let mut suspended = spec.clone();
    suspended.backup.as_mut().expect("a backup").suspend = true;
    assert_eq!(wake_in(&suspended, &observed), None);
}

#[test]
fn a_steady_cluster_takes_its_backup_from_a_caught_up_follower() {
    let observed = steady("2026-12-01T10:05:00Z");
    let step = plan(&spec(3, "@hourly"), &observed);
    assert_eq!(
        step,
        Step::TakeBackup {
            slot: t("2026-12-01T10:00:00Z"),
            attempt: 1,
            from: "demo-1".to_owned(),
            request: None
        }
    );
    // demo-1 behind the leader: demo-2 takes it.
    let mut lagging = observed.clone();
    lagging.members.as_mut().expect("members")[1].applied_index = Some(500);
    let step = plan(&spec(3, "@hourly"), &lagging);
    assert!(matches!(&step, Step::TakeBackup { from, .. } if from == "demo-2"), "{step:?}");
    // No follower fit: the backup waits rather than load the leader of three.
    for m in lagging.members.as_mut().expect("members").iter_mut().skip(1) {
        m.applied_index = Some(500);
    }
    assert_eq!(plan(&spec(3, "@hourly"), &lagging), Step::Steady);
    // A single member is its own leader and the only one to take it from.
    let mut single = steady("2026-12-01T10:05:00Z");
    single.workload_replicas = Some(1);
    single.members.as_mut().expect("members").truncate(1);
    single.volumes.truncate(1);
    let step = plan(&spec(1, "@hourly"), &single);
    assert!(matches!(&step, Step::TakeBackup { from, .. } if from == "demo-0"), "{step:?}");
}

#[test]
fn a_degraded_cluster_still_takes_its_backup() {
    let mut observed = steady("2026-12-01T10:05:00Z");
    observed.members.as_mut().expect("members")[1].healthy = false;
    let step = plan(&spec(3, "@hourly"), &observed);
    assert!(matches!(&step, Step::TakeBackup { from, .. } if from == "demo-2"), "{step:?}");
}

#[test]
fn a_backup_waits_for_a_scale_and_a_scale_waits_for_a_backup() {
    // Scaling 3 -> 5: the membership's step comes first.
    let observed = steady("2026-12-01T10:05:00Z");
    let add = Step::AddLearner { name: "demo-3".to_owned() };
    assert_eq!(plan(&spec(5, "@hourly"), &observed), add);
    // A backup being taken holds the scale until it ends.
    let mut taking = observed.clone();
    taking.backup_runs = vec![run("2026-12-01T10:00:00Z", 1, RunOutcome::Running)];
    taking.last_scheduled_backup = Some(t("2026-12-01T10:00:00Z"));
    let step = plan(&spec(5, "@hourly"), &taking);
    let Step::Wait { reason } = &step else { panic!("{step:?}") };
    assert!(reason.contains("AddLearner waits for backup demo-20261201T100000Z"), "{reason}");
    let status = status(&spec(5, "@hourly"), &taking, &step, None, None, Time(taking.now));
    let progressing =
        status.conditions.iter().find(|c| c.type_ == condition::PROGRESSING).expect("Progressing");
    assert_eq!(progressing.reason, "WaitingForBackup");
    assert_eq!(status.phase, Some(consensus_crds::Phase::Scaling));
    // Once it has ended, the scale goes on.
    taking.backup_runs[0].outcome = succeeded("2026-12-01T10:00:04Z", 20);
    assert_eq!(plan(&spec(5, "@hourly"), &taking), add);
}

fn backup_condition(
    status: &ConsensusClusterStatus,
) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    status.conditions.iter().find(|c| c.type_ == condition::BACKUP_SUCCEEDED).expect("BackupSucceeded")
}

#[test]
fn status_tells_each_backup_as_it_starts_fails_and_succeeds() {
    let spec = spec(3, "@hourly");
    let mut observed = steady("2026-12-01T10:05:00Z");
    // Nothing yet.
    let before = status(&spec, &observed, &Step::Steady, None, None, Time(observed.now));
    assert_eq!(backup_condition(&before).reason, "NoBackupYet");
    assert_eq!(before.next_backup, Some(Time(t("2026-12-01T11:00:00Z"))));
    // Started: the slot is recorded, the condition keeps what it said.
    let step = plan(&spec, &observed);
    let started = status(&spec, &observed, &step, None, Some(&before), Time(observed.now));
    assert_eq!(started.last_scheduled_backup, Some(Time(t("2026-12-01T10:00:00Z"))));
    assert_eq!(started.phase, Some(consensus_crds::Phase::Running), "a backup is no change of the cluster");
    assert_eq!(outcome_event(Some(&before), &started), None);
    // Failed: said with its cause and the next try.
    observed.last_scheduled_backup = Some(t("2026-12-01T10:00:00Z"));
    observed.backup_runs =
        vec![run("2026-12-01T10:00:00Z", 1, failed("2026-12-01T10:05:03Z", "AccessDenied"))];
    let failed = status(&spec, &observed, &Step::Steady, None, Some(&started), Time(observed.now));
    let condition = backup_condition(&failed);
    assert_eq!((condition.status.as_str(), condition.reason.as_str()), ("False", "BackupFailed"));
    assert!(
        condition.message.contains("AccessDenied; tried again at 2026-12-01T10:05:13Z (attempt 2 of 5)"),
        "{}",
        condition.message
    );
    let event = outcome_event(Some(&started), &failed).expect("an event");
    assert!(event.warning && event.reason == "BackupFailed", "{event:?}");
    assert_eq!(outcome_event(Some(&failed), &failed), None, "one event per failure");
    // The second try succeeds: the record, the condition, an event.
    observed.backup_runs.push(run("2026-12-01T10:00:00Z", 2, succeeded("2026-12-01T10:05:20Z", 42)));
    observed.backup_runs[1].started = t("2026-12-01T10:05:15Z");
    let taken = status(&spec, &observed, &Step::Steady, None, Some(&failed), Time(observed.now));
    let record = taken.last_backup.clone().expect("a record");
    assert_eq!(
        (record.name.as_str(), record.revision, record.size_bytes),
        ("demo-20261201T100000Z", 42, 20480)
    );
    assert_eq!(backup_condition(&taken).status, "True");
    assert_eq!(
        outcome_event(Some(&failed), &taken).map(|e| (e.warning, e.reason)),
        Some((false, "BackupSucceeded"))
    );
    // The runs cleaned up: status keeps the record and the word on it.
    observed.backup_runs.clear();
    let later = status(&spec, &observed, &Step::Steady, None, Some(&taken), Time(observed.now));
    assert_eq!(
        (later.last_backup.as_ref(), backup_condition(&later)),
        (Some(&record), backup_condition(&taken))
    );
    assert_eq!(later.last_scheduled_backup, Some(Time(t("2026-12-01T10:00:00Z"))));
}

#[test]
fn a_backup_that_could_not_be_started_says_why() {
    let spec = spec(3, "@hourly");
    let observed = steady("2026-12-01T10:05:00Z");
    let step = plan(&spec, &observed);
    let why = "the destination PersistentVolumeClaim default/keep does not exist";
    let status = status(&spec, &observed, &step, Some(why), None, Time(observed.now));
    let condition = backup_condition(&status);
    assert_eq!(condition.reason, "StartFailed");
    assert!(condition.message.contains(why), "{}", condition.message);
    assert_eq!(status.last_scheduled_backup, None, "not started, so tried again");
    let progressing =
        status.conditions.iter().find(|c| c.type_ == condition::PROGRESSING).expect("Progressing");
    assert_eq!(progressing.reason, "Reconciled", "the membership is as declared");
}

/// What an operator keeps between visits: status (the slot last started) and the runs.
#[derive(Default)]
struct Kept {
    last: Option<Timestamp>,
    runs: Vec<BackupRun>,
}

proptest! {
    /// Visits at arbitrary times, with any gap (an operator down for hours): every slot is
    /// started at most once, only once it has come, and at each visit the newest slot so far
    /// has been started.
    #[test]
    fn every_slot_at_most_once_and_the_newest_never_missed(
        schedule in prop::sample::select(vec!["@hourly", "*/15 * * * *", "0 */6 * * *", "30 2 * * 1"]),
        gaps in prop::collection::vec(1i64..20_000, 1..60),
    ) {
        let backup = backup(schedule);
        let mut kept = Kept::default();
        let mut now = t("2026-12-01T00:00:00Z");
        for gap in gaps {
            now = now.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(gap)).expect("time");
            if let Some(due) = due(&backup, kept.last, &kept.runs, now) {
                prop_assert!(due.slot <= now);
                prop_assert!(kept.runs.iter().all(|r| r.slot != due.slot), "{} started twice", due.slot);
                prop_assert_eq!(due.attempt, 1);
                kept.last = Some(due.slot);
                kept.runs.push(BackupRun {
                    request: None,
                    backup: backup_name("demo", due.slot, None),
                    slot: due.slot,
                    attempt: 1,
                    member: "demo-1".to_owned(),
                    started: now,
                    outcome: succeeded(&now.to_string(), 1),
                });
            }
            let (newest, _) = slots(&backup.schedule, now);
            prop_assert_eq!(kept.last, newest);
        }
    }

    /// A backup starts only from a healthy, caught-up voter of a cluster with quorum, and
    /// never while the membership is being changed.
    #[test]
    fn a_backup_starts_only_from_a_fit_voter_of_a_quiet_cluster(spec in arb_valid_spec(), observed in arb_observed()) {
        if let Step::TakeBackup { from, .. } = plan(&spec, &observed) {
            let members = observed.members.as_deref().unwrap_or_default();
            let source = members.iter().find(|m| m.name == from).expect("a listed member");
            prop_assert!(!source.is_learner && source.healthy);
            prop_assert_eq!(log_caught_up(source, observed.leader_raft_index), Some(true));
            let voters = members.iter().filter(|m| !m.is_learner).count();
            prop_assert!(Some(source.id) != observed.leader || voters == 1);
            let mut without = spec.clone();
            without.backup = None;
            let membership = plan(&without, &observed);
            prop_assert!(!membership.changes_cluster(), "{:?} was due", membership);
        }
    }
}

#[test]
fn a_failure_is_counted_under_its_cause() {
    for (reason, kind) in [
        (
            "stored at s3://b/p/n.snapshot but it failed verification: restored, it hashes to 1",
            "verification",
        ),
        ("CreateContainerConfigError: secret \"s3\" not found", "pod"),
        ("DeadlineExceeded without a report: Job was active longer than specified deadline", "deadline"),
        ("s3://b/p cannot be listed (is the bucket there, and the credentials right?): 403", "destination"),
        ("the destination PersistentVolumeClaim ns/keep does not exist", "destination"),
        ("connecting to http://demo-1.demo-peer.ns.svc:2379: transport error", "member"),
        ("something nobody foresaw", "other"),
    ] {
        assert_eq!(failure_kind(reason), kind, "{reason}");
    }
}

fn request(name: &str, created: &str) -> BackupRequest {
    BackupRequest {
        name: name.to_owned(),
        created: t(created),
        destination: None,
        status: ConsensusBackupStatus::default(),
    }
}

fn request_run(name: &str, created: &str, attempt: u32, outcome: RunOutcome) -> BackupRun {
    BackupRun {
        request: Some(name.to_owned()),
        backup: backup_name("demo", t(created), Some(name)),
        ..run(created, attempt, outcome)
    }
}

/// What this reconcile writes for the only request, and the event it reports.
fn only_update(
    spec: &ConsensusClusterSpec,
    observed: &Observed,
) -> (ConsensusBackupStatus, Option<BackupEvent>) {
    let step = plan(spec, observed);
    let mut updates = request_updates(spec, observed, &step, None);
    assert_eq!(updates.len(), 1, "one request moved on");
    let update = updates.remove(0);
    (update.status, update.event)
}

#[test]
fn a_request_goes_before_the_schedule_and_its_status_follows_its_run() {
    // The schedule's 10:00 slot is due too: the request, asked for now, goes first.
    let spec = spec(3, "@hourly");
    let mut observed = steady("2026-12-01T10:05:00Z");
    observed.backup_requests = vec![request("before-upgrade", "2026-12-01T10:04:00Z")];
    let step = plan(&spec, &observed);
    assert_eq!(
        step,
        Step::TakeBackup {
            slot: t("2026-12-01T10:04:00Z"),
            attempt: 1,
            from: "demo-1".to_owned(),
            request: Some("before-upgrade".to_owned())
        }
    );
    let (started, event) = only_update(&spec, &observed);
    assert_eq!((started.phase, started.attempts), (Some(BackupPhase::Running), 1));
    assert_eq!(started.member.as_deref(), Some("demo-1"));
    assert_eq!(event.map(|e| (e.reason, e.warning)), Some(("BackupStarted", false)));
    // The request's backup does not use up the schedule's slot.
    let cluster = status(&spec, &observed, &step, None, None, Time(observed.now));
    assert_eq!(cluster.last_scheduled_backup, None);

    // Being taken: nothing new to say; the schedule waits for it (one at a time).
    observed.backup_requests[0].status = started;
    observed.backup_runs =
        vec![request_run("before-upgrade", "2026-12-01T10:04:00Z", 1, RunOutcome::Running)];
    observed.backup_runs[0].started = observed.now;
    assert!(request_updates(&spec, &observed, &plan(&spec, &observed), None).is_empty());
    assert_eq!(plan(&spec, &observed), Step::Steady);

    // Taken: the request says what it holds, once; then the schedule's slot goes.
    observed.backup_runs[0].outcome = succeeded("2026-12-01T10:05:02Z", 42);
    let (taken, event) = only_update(&spec, &observed);
    assert_eq!(taken.phase, Some(BackupPhase::Succeeded));
    let record = taken.backup.clone().expect("the backup");
    assert_eq!((record.name.as_str(), record.revision), ("demo-20261201T100400Z-before-upgrade", 42));
    assert_eq!(taken.completed_at, Some(Time(t("2026-12-01T10:05:02Z"))));
    let event = event.expect("an event");
    assert_eq!((event.reason, event.run_ended), ("BackupSucceeded", true));
    observed.backup_requests[0].status = taken;
    assert!(request_updates(&spec, &observed, &plan(&spec, &observed), None).is_empty());
    let next = plan(&spec, &observed);
    assert!(
        matches!(&next, Step::TakeBackup { request: None, slot, .. } if *slot == t("2026-12-01T10:00:00Z"))
    );
    // It is the cluster's newest backup too, though not the schedule's.
    let cluster = status(&spec, &observed, &next, None, None, Time(observed.now));
    assert_eq!(cluster.last_backup.map(|b| b.revision), Some(42));
}

#[test]
fn a_request_waits_while_the_membership_changes_or_another_backup_runs_and_says_so() {
    let mut observed = steady("2026-12-01T10:05:00Z");
    observed.backup_requests = vec![request("b", "2026-12-01T10:04:00Z")];
    // Scaling 3 -> 5: the scale first.
    let (waiting, event) = only_update(&spec(5, "@hourly"), &observed);
    assert_eq!(waiting.phase, Some(BackupPhase::Pending));
    let message = waiting.message.expect("a message");
    assert!(message.contains("never taken while the membership changes (AddLearner"), "{message}");
    assert_eq!(event, None);
    // The schedule's backup being taken.
    observed.backup_runs = vec![run("2026-12-01T10:00:00Z", 1, RunOutcome::Running)];
    observed.last_scheduled_backup = Some(t("2026-12-01T10:00:00Z"));
    let (waiting, _) = only_update(&spec(3, "@hourly"), &observed);
    let message = waiting.message.expect("a message");
    assert!(message.contains("demo-20261201T100000Z is being taken from demo-1"), "{message}");
    // No member to take it from.
    observed.backup_runs.clear();
    for m in observed.members.as_mut().expect("members") {
        m.healthy = false;
    }
    let (waiting, _) = only_update(&spec(3, "@hourly"), &observed);
    assert!(waiting.message.expect("a message").contains("no healthy, caught-up member"));
}

#[test]
fn a_failed_request_is_tried_again_then_given_up() {
    let spec = spec(3, "@hourly");
    let mut observed = steady("2026-12-01T10:04:35Z");
    observed.last_scheduled_backup = Some(t("2026-12-01T10:00:00Z"));
    observed.backup_requests = vec![request("b", "2026-12-01T10:04:00Z")];
    observed.backup_requests[0].status.phase = Some(BackupPhase::Running);
    observed.backup_requests[0].status.attempts = 1;
    observed.backup_runs =
        vec![request_run("b", "2026-12-01T10:04:00Z", 1, failed("2026-12-01T10:04:30Z", "403 Forbidden"))];
    let (retrying, event) = only_update(&spec, &observed);
    assert_eq!(retrying.phase, Some(BackupPhase::Retrying));
    assert!(retrying.message.as_deref().is_some_and(|m| m.contains("403 Forbidden; tried again at")));
    let event = event.expect("an event");
    assert_eq!((event.reason, event.warning, event.run_ended), ("BackupFailed", true, true));
    // Its next try is what the operator wakes for.
    assert_eq!(wake_in(&spec, &observed), Some(Duration::from_secs(5)));
    observed.now = t("2026-12-01T10:04:41Z");
    let step = plan(&spec, &observed);
    assert!(matches!(&step, Step::TakeBackup { attempt: 2, request: Some(r), .. } if r == "b"), "{step:?}");
    // The last try failed: given up, for good.
    observed.backup_runs[0].attempt = MAX_ATTEMPTS;
    let (given_up, _) = only_update(&spec, &observed);
    assert_eq!(given_up.phase, Some(BackupPhase::Failed));
    assert_eq!(given_up.completed_at, Some(Time(t("2026-12-01T10:04:30Z"))));
    observed.backup_requests[0].status = given_up;
    assert!(!matches!(plan(&spec, &observed), Step::TakeBackup { request: Some(_), .. }));
}

#[test]
fn a_request_needs_a_destination_its_own_or_the_clusters() {
    let mut bare = spec(3, "@hourly");
    bare.backup = None;
    let mut observed = steady("2026-12-01T10:05:00Z");
    observed.backup_requests = vec![request("b", "2026-12-01T10:04:00Z")];
    assert_eq!(plan(&bare, &observed), Step::Steady);
    let (failed, event) = only_update(&bare, &observed);
    assert_eq!(failed.phase, Some(BackupPhase::Failed));
    assert!(failed.message.as_deref().is_some_and(|m| m.starts_with("no destination")));
    assert_eq!(event.map(|e| (e.reason, e.run_ended)), Some(("BackupFailed", false)));
    // Its own destination: taken without a schedule.
    observed.backup_requests[0].destination = spec(3, "@hourly").backup.map(|b| b.destination);
    assert!(matches!(plan(&bare, &observed), Step::TakeBackup { request: Some(_), .. }));
}

#[test]
fn ended_runs_are_removable_once_their_request_has_its_outcome() {
    let scheduled = run("2026-12-01T10:00:00Z", 1, succeeded("2026-12-01T10:00:03Z", 1));
    let asked = request_run("b", "2026-12-01T10:04:00Z", 1, succeeded("2026-12-01T10:04:03Z", 2));
    let mut requests = vec![request("b", "2026-12-01T10:04:00Z")];
    assert!(removable(&scheduled, &requests));
    assert!(!removable(&asked, &requests), "its outcome is not in the request's status yet");
    requests[0].status.phase = Some(BackupPhase::Succeeded);
    assert!(removable(&asked, &requests));
    assert!(removable(&asked, &[]), "its request is gone");
    let going = request_run("b", "2026-12-01T10:04:00Z", 1, RunOutcome::Running);
    assert!(!removable(&going, &[]));
}

#[test]
fn a_request_that_cannot_start_is_given_up_and_holds_nothing_up() {
    let spec = spec(3, "@hourly");
    let mut observed = steady("2026-12-01T10:05:00Z");
    observed.backup_requests = vec![request("b", "2026-12-01T10:04:00Z")];
    let step = plan(&spec, &observed);
    let updates = request_updates(&spec, &observed, &step, Some("the destination claim keep does not exist"));
    let failed = &updates[0].status;
    assert_eq!(failed.phase, Some(BackupPhase::Failed));
    assert!(failed.message.as_deref().is_some_and(|m| m.contains("keep does not exist; nothing was stored")));
    observed.backup_requests[0].status = failed.clone();
    assert!(matches!(plan(&spec, &observed), Step::TakeBackup { request: None, .. }), "the schedule goes on");
}

#[test]
fn a_request_made_again_under_an_old_name_has_runs_of_its_own() {
    let spec = spec(3, "@hourly");
    let mut observed = steady("2026-12-01T10:05:00Z");
    observed.last_scheduled_backup = Some(t("2026-12-01T10:00:00Z"));
    // The first "b" succeeded; its Job lingers while the new "b" is made.
    observed.backup_runs =
        vec![request_run("b", "2026-12-01T09:00:00Z", 1, succeeded("2026-12-01T09:00:05Z", 3))];
    observed.backup_requests = vec![request("b", "2026-12-01T10:04:00Z")];
    let step = plan(&spec, &observed);
    assert!(
        matches!(&step, Step::TakeBackup { request: Some(r), slot, .. } if r == "b" && *slot == t("2026-12-01T10:04:00Z")),
        "{step:?}"
    );
    let updates = request_updates(&spec, &observed, &step, None);
    assert_eq!(updates[0].status.phase, Some(BackupPhase::Running), "not the old run's success");
    assert!(removable(&observed.backup_runs[0], &observed.backup_requests), "the old run can go");
}
