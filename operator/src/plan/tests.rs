use k8s_openapi::jiff::Timestamp;
use proptest::prelude::*;

use super::*;

fn spec(replicas: i32) -> ConsensusClusterSpec {
    serde_json::from_value(serde_json::json!({ "replicas": replicas })).expect("spec parses")
}

fn spec_with_schedule(replicas: i32, schedule: &str) -> ConsensusClusterSpec {
    serde_json::from_value(serde_json::json!({
        "replicas": replicas,
        "backup": { "schedule": schedule, "destination": { "volume": { "claimName": "b", "path": "/" } } },
    }))
    .expect("spec parses")
}

fn at(seconds: i64) -> Time {
    Time(Timestamp::from_second(seconds).expect("valid timestamp"))
}

fn member(id: u64, healthy: bool, zone: Option<&str>) -> ObservedMember {
    ObservedMember {
        id,
        name: format!("demo-{}", id - 1),
        is_learner: false,
        healthy,
        zone: zone.map(str::to_owned),
        applied_index: Some(10),
        outdated: Some(false),
    }
}

fn running(n: u64) -> Observed {
    Observed {
        generation: Some(1),
        workload_replicas: Some(n as i32),
        members: Some((1..=n).map(|id| member(id, true, None)).collect()),
        leader: Some(1),
        cluster_id: Some(0xabc),
        leader_raft_index: Some(10),
        volumes: (0..n).map(|i| format!("demo-{i}")).collect(),
        established: true,
        ..Observed::default()
    }
}

fn find<'a>(status: &'a ConsensusClusterStatus, type_: &str) -> &'a Condition {
    status.conditions.iter().find(|c| c.type_ == type_).expect("condition present")
}

fn status_now(spec: &ConsensusClusterSpec, observed: &Observed) -> ConsensusClusterStatus {
    status(spec, observed, &plan(spec, observed), None, None, at(1000))
}

#[test]
fn creates_the_declared_members_when_nothing_exists() {
    let observed = Observed { generation: Some(1), ..Observed::default() };
    let step = plan(&spec(3), &observed);
    assert_eq!(step, Step::CreateWorkload { replicas: 3, bootstrap: true });
    let status = status(&spec(3), &observed, &step, None, None, at(1000));
    assert_eq!(status.phase, Some(Phase::Pending));
    assert_eq!(find(&status, condition::PROGRESSING).status, "True");
    assert_eq!(find(&status, condition::AVAILABLE).reason, "NotCreated");
}

#[test]
fn a_healthy_cluster_at_its_size_is_steady_and_running() {
    let observed = running(3);
    assert_eq!(plan(&spec(3), &observed), Step::Steady);
    let status = status_now(&spec(3), &observed);
    assert_eq!(status.phase, Some(Phase::Running));
    assert_eq!(status.replicas, 3);
    assert_eq!(status.ready_replicas, 3);
    assert_eq!(status.leader.as_deref(), Some("demo-0"));
    assert_eq!(status.cluster_id.as_deref(), Some("abc"));
    assert_eq!(status.members[0].role, MemberRole::Leader);
    assert_eq!(status.members[1].role, MemberRole::Follower);
    assert_eq!(status.members[0].id, "1");
    assert_eq!(find(&status, condition::AVAILABLE).status, "True");
    assert_eq!(find(&status, condition::DEGRADED).status, "False");
    assert_eq!(find(&status, condition::QUORUM_LOST).status, "False");
    assert_eq!(find(&status, condition::PROGRESSING).status, "False");
    // Every member on one machine (no zone) cannot survive losing it.
    assert_eq!(find(&status, condition::ZONE_FAULT_TOLERANT).status, "False");
}

#[test]
fn status_stays_the_same_under_steady_writes_and_says_who_lags() {
    // The same cluster a few seconds and thousands of writes later: every index moved, the
    // followers a few entries behind the leader, as they are under load.
    let before = status_now(&spec(3), &running(3));
    let mut busy = running(3);
    busy.leader_raft_index = Some(48_210);
    for (member, applied) in busy.members.iter_mut().flatten().zip([48_209, 48_190, 48_130]) {
        member.applied_index = Some(applied);
    }
    let after = status(&spec(3), &busy, &plan(&spec(3), &busy), None, Some(&before), at(1030));
    assert_eq!(after, before, "nothing but the indexes changed, so status must not");
    assert!(after.members.iter().all(|m| m.caught_up == Some(true)), "{:?}", after.members);

    // A member replaying its log is told apart, and one that does not answer is unknown.
    let mut lagging = busy.clone();
    let members = lagging.members.as_mut().expect("members");
    members[1].applied_index = Some(48_210 - LEARNER_CAUGHT_UP_ENTRIES - 1);
    members[2].applied_index = None;
    let lagging = status(&spec(3), &lagging, &Step::Steady, None, Some(&before), at(1030));
    let caught_up: Vec<Option<bool>> = lagging.members.iter().map(|m| m.caught_up).collect();
    assert_eq!(caught_up, [Some(true), Some(false), None]);
}

#[test]
fn a_failed_step_is_reported_with_its_cause_and_progress_resumes_after() {
    let mut observed = running(3);
    observed.members.as_mut().expect("members")[2].is_learner = true;
    observed.workload_replicas = Some(3);
    let step = Step::ChangeVoters { voters: vec![1, 2, 3] };
    let failed = status(&spec(3), &observed, &step, Some("connection refused"), None, at(1000));
    let progressing = find(&failed, condition::PROGRESSING);
    assert_eq!((progressing.status.as_str(), progressing.reason.as_str()), ("False", "StepFailed"));
    assert_eq!(progressing.message, "ChangeVoters failed and is retried: connection refused");
    // Everything else is still what was observed.
    assert_eq!(failed.leader.as_deref(), Some("demo-0"));
    assert_eq!(find(&failed, condition::AVAILABLE).status, "True");

    let retried = status(&spec(3), &observed, &step, None, Some(&failed), at(1010));
    let progressing = find(&retried, condition::PROGRESSING);
    assert_eq!((progressing.status.as_str(), progressing.reason.as_str()), ("True", "ChangeVoters"));
}

#[test]
fn an_even_replica_count_on_a_running_cluster_changes_nothing_and_says_why() {
    let observed = running(3);
    let step = plan(&spec(4), &observed);
    assert!(matches!(&step, Step::RefuseSpec { reason } if reason.contains("odd number")), "{step:?}");
    assert!(!step.changes_cluster());
    let status = status(&spec(4), &observed, &step, None, None, at(1000));
    let degraded = find(&status, condition::DEGRADED);
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "InvalidSpec"));
    assert_eq!(status.phase, Some(Phase::Degraded));
    // The cluster is still reported as it is: serving, with its leader.
    assert_eq!(find(&status, condition::AVAILABLE).status, "True");
    assert_eq!(status.leader.as_deref(), Some("demo-0"));
}

#[test]
fn a_bad_schedule_is_refused_even_before_anything_exists() {
    let step = plan(&spec_with_schedule(3, "every day"), &Observed::default());
    assert!(matches!(&step, Step::RefuseSpec { reason } if reason.contains("backup.schedule")), "{step:?}");
}

#[test]
fn members_without_a_leader_are_bootstrapping_the_first_time_and_lost_quorum_after() {
    let mut observed = running(3);
    observed.leader = None;
    let step = plan(&spec(3), &observed);
    assert!(matches!(step, Step::Wait { .. }));
    let first = status(&spec(3), &observed, &step, None, None, at(1000));
    assert_eq!(first.phase, Some(Phase::Bootstrapping));
    assert_eq!(find(&first, condition::QUORUM_LOST).status, "False");

    // Members answer with their cluster id before they elect anyone: still the first time.
    let with_id = ConsensusClusterStatus { cluster_id: Some("abc".to_owned()), ..first.clone() };
    let again = status(&spec(3), &observed, &step, None, Some(&with_id), at(1500));
    assert_eq!(find(&again, condition::QUORUM_LOST).status, "False");

    let was_running = status_now(&spec(3), &running(3));
    let later = status(&spec(3), &observed, &step, None, Some(&was_running), at(2000));
    assert_eq!(later.phase, Some(Phase::QuorumLost));
    assert_eq!(find(&later, condition::QUORUM_LOST).status, "True");
    assert_eq!(find(&later, condition::DEGRADED).reason, "QuorumLost");
    // Lost stays lost, whatever the phase said (a cluster made from a backup is Restoring
    // until it is at its size), until a quorum is back.
    let restoring = ConsensusClusterStatus { phase: Some(Phase::Restoring), leader: None, ..later.clone() };
    let still = status(&spec(3), &observed, &step, None, Some(&restoring), at(3000));
    assert_eq!(find(&still, condition::QUORUM_LOST).status, "True");
}

#[test]
fn one_member_down_is_degraded_but_available() {
    let mut observed = running(3);
    if let Some(members) = observed.members.as_mut() {
        members[2].healthy = false;
    }
    let step = plan(&spec(3), &observed);
    assert!(matches!(&step, Step::Wait { reason } if reason.contains("demo-2")), "{step:?}");
    let status = status(&spec(3), &observed, &step, None, None, at(1000));
    assert_eq!(status.phase, Some(Phase::Degraded));
    assert_eq!(status.ready_replicas, 2);
    assert_eq!(find(&status, condition::AVAILABLE).status, "True");
    assert_eq!(find(&status, condition::DEGRADED).reason, "MembersUnhealthy");
}

/// Three members under a leader, two of them not healthy (down, or not ready yet).
fn two_of_three_unhealthy() -> Observed {
    let mut observed = running(3);
    if let Some(members) = observed.members.as_mut() {
        members[1].healthy = false;
        members[2].healthy = false;
    }
    observed
}

#[test]
fn a_leader_elected_before_the_others_are_ready_is_the_cluster_bootstrapping_not_a_loss() {
    let observed = two_of_three_unhealthy();
    let step = plan(&spec(3), &observed);
    let first = status(&spec(3), &observed, &step, None, None, at(1000));
    assert_eq!(first.phase, Some(Phase::Bootstrapping));
    assert!(first.leader.is_some());
    let next = status(&spec(3), &observed, &step, None, Some(&first), at(1005));
    assert_eq!(next.phase, Some(Phase::Bootstrapping));
    assert_eq!(find(&next, condition::QUORUM_LOST).status, "False", "no loss before a quorum was had");
}

#[test]
fn two_of_three_down_is_quorum_lost() {
    let observed = two_of_three_unhealthy();
    // After it ran: with no status before, it would be a cluster bootstrapping.
    let was_running = status_now(&spec(3), &running(3));
    let step = plan(&spec(3), &observed);
    let status = status(&spec(3), &observed, &step, None, Some(&was_running), at(1000));
    assert_eq!(status.phase, Some(Phase::QuorumLost));
    assert_eq!(find(&status, condition::AVAILABLE).status, "False");
}

#[test]
fn zone_fault_tolerance_needs_a_quorum_outside_every_zone() {
    let zones = |zs: &[Option<&str>]| -> Vec<ObservedMember> {
        zs.iter().enumerate().map(|(i, z)| member(i as u64 + 1, true, *z)).collect()
    };
    assert!(zone_fault_tolerant(&zones(&[Some("a"), Some("b"), Some("c")])));
    assert!(!zone_fault_tolerant(&zones(&[Some("a"), Some("a"), Some("b")])));
    assert!(zone_fault_tolerant(&zones(&[Some("a"), Some("a"), Some("b"), Some("b"), Some("c")])));
    assert!(!zone_fault_tolerant(&zones(&[None, None, None])));
    assert!(!zone_fault_tolerant(&[]));
    let mut one_down = zones(&[Some("a"), Some("b"), Some("c")]);
    one_down[0].healthy = false;
    assert!(!zone_fault_tolerant(&one_down));
}

#[test]
fn transition_times_are_kept_while_a_condition_keeps_its_status() {
    let observed = running(3);
    let first = status(&spec(3), &observed, &Step::Steady, None, None, at(1000));
    let again = status(&spec(3), &observed, &Step::Steady, None, Some(&first), at(2000));
    assert_eq!(first, again);
    let mut down = running(3);
    if let Some(members) = down.members.as_mut() {
        members[2].healthy = false;
    }
    let step = plan(&spec(3), &down);
    let changed = status(&spec(3), &down, &step, None, Some(&first), at(3000));
    assert_eq!(find(&changed, condition::DEGRADED).last_transition_time, at(3000));
    assert_eq!(find(&changed, condition::AVAILABLE).last_transition_time, at(1000));
}

#[test]
fn conditions_other_parts_own_are_kept() {
    let mut previous = status_now(&spec(3), &running(3));
    previous.selector = Some("app=demo".to_owned());
    // A condition another controller (or a person's tooling) keeps on the resource.
    previous.conditions.push(Condition {
        type_: "example.com/Audited".to_owned(),
        status: "True".to_owned(),
        reason: "Reviewed".to_owned(),
        message: String::new(),
        observed_generation: Some(1),
        last_transition_time: at(5),
    });
    let next = status(&spec(3), &running(3), &Step::Steady, None, Some(&previous), at(9000));
    assert_eq!(next.selector.as_deref(), Some("app=demo"));
    assert_eq!(find(&next, "example.com/Audited").last_transition_time, at(5));
}

#[test]
fn a_cluster_that_ran_is_created_again_to_rejoin_never_to_bootstrap() {
    // The StatefulSet was deleted while the status still shows the cluster id: members
    // started with `new` on empty volumes would found a second cluster under the old name.
    let observed = Observed { generation: Some(4), established: true, ..Observed::default() };
    let step = plan(&spec(3), &observed);
    assert_eq!(step, Step::CreateWorkload { replicas: 3, bootstrap: false });
    let status = status(&spec(3), &observed, &step, None, None, at(1000));
    assert_eq!(find(&status, condition::PROGRESSING).reason, "Recreating");
}

#[test]
fn volumes_an_earlier_cluster_left_are_refused_by_name_unless_the_spec_adopts_them() {
    let kept = vec!["data-demo-0".to_owned(), "data-demo-1".to_owned()];
    let observed = Observed { generation: Some(1), kept_volumes: kept, ..Observed::default() };
    let step = plan(&spec(3), &observed);
    assert!(matches!(&step, Step::Wait { .. }), "{step:?}");
    assert!(!step.changes_cluster());
    let status = status(&spec(3), &observed, &step, None, None, at(1000));
    let degraded = find(&status, condition::DEGRADED);
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "KeptVolumes"));
    assert!(degraded.message.contains("data-demo-0, data-demo-1"), "{}", degraded.message);
    assert!(degraded.message.contains("existingVolumes"), "{}", degraded.message);
    assert_eq!(find(&status, condition::PROGRESSING).status, "False");

    let mut adopting = spec(3);
    adopting.storage.existing_volumes = ExistingVolumePolicy::Adopt;
    // Adopted: the members resume the earlier cluster, and a member without a volume joins it.
    assert_eq!(plan(&adopting, &observed), Step::CreateWorkload { replicas: 3, bootstrap: false });
}

#[test]
fn a_refused_spec_change_is_reported_while_the_rest_of_the_spec_converges() {
    let mut observed = running(3);
    observed.refused_changes.push("spec.storage.size 1Gi is smaller than the volumes' 2Gi".to_owned());
    assert_eq!(plan(&spec(3), &observed), Step::Steady);
    let status = status_now(&spec(3), &observed);
    let degraded = find(&status, condition::DEGRADED);
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "ChangeRefused"));
    assert!(degraded.message.contains("smaller than"), "{}", degraded.message);
    assert_eq!((status.phase, status.observed_generation), (Some(Phase::Degraded), Some(1)));
}

/// `running(n)` with the members listed in `outdated` on the old template.
fn updating(n: u64, outdated: &[u64]) -> Observed {
    let mut observed = running(n);
    for member in observed.members.iter_mut().flatten() {
        member.outdated = Some(outdated.contains(&member.id));
    }
    observed
}

#[test]
fn a_rolling_update_goes_follower_by_follower_and_the_leader_last_after_handing_over() {
    let mut spec = spec(3);
    spec.version = Some("1.1.0".to_owned());
    let previous =
        ConsensusClusterStatus { version: Some("1.0.0".to_owned()), ..status_now(&spec, &running(3)) };
    // demo-0 (id 1) leads; every member runs the old template. The highest follower first.
    let observed = updating(3, &[1, 2, 3]);
    let step = plan(&spec, &observed);
    assert_eq!(step, Step::UpdateMember { name: "demo-2".into() });
    let first = status(&spec, &observed, &step, None, Some(&previous), at(1000));
    assert_eq!(first.phase, Some(Phase::Updating));
    assert_eq!(first.version.as_deref(), Some("1.0.0"), "not updated until every member is");

    // demo-2 is back and healthy but still replaying its log: the next one waits.
    let mut observed = updating(3, &[1, 2]);
    observed.members.as_mut().unwrap()[2].applied_index = Some(3);
    observed.leader_raft_index = Some(500);
    observed.members.as_mut().unwrap()[0].applied_index = Some(500);
    observed.members.as_mut().unwrap()[1].applied_index = Some(500);
    let step = plan(&spec, &observed);
    let Step::Wait { reason } = &step else { panic!("{step:?}") };
    assert!(reason.contains("demo-2") && reason.contains("catch up"), "{reason}");
    let waiting = status(&spec, &observed, &step, None, Some(&previous), at(1000));
    assert_eq!(
        (waiting.phase, find(&waiting, condition::PROGRESSING).reason.as_str()),
        (Some(Phase::Updating), "WaitingForCatchUp")
    );

    // Caught up: the other follower.
    assert_eq!(plan(&spec, &updating(3, &[1, 2])), Step::UpdateMember { name: "demo-1".into() });
    // Only the leader is left: leadership moves to an updated voter first ...
    assert_eq!(plan(&spec, &updating(3, &[1])), Step::TransferLeadership { to: 2 });
    // ... and once demo-1 leads, demo-0 is a follower like any other.
    let mut handed_over = updating(3, &[1]);
    handed_over.leader = Some(2);
    assert_eq!(plan(&spec, &handed_over), Step::UpdateMember { name: "demo-0".into() });
    // Done: the new version is what the cluster runs.
    let done = updating(3, &[]);
    assert_eq!(plan(&spec, &done), Step::Steady);
    let finished = status(&spec, &done, &Step::Steady, None, Some(&previous), at(1000));
    assert_eq!((finished.phase, finished.version.as_deref()), (Some(Phase::Running), Some("1.1.0")));
}

#[test]
fn a_member_down_stops_the_rolling_update_and_so_does_a_template_not_yet_known() {
    let mut down = updating(3, &[1, 2]);
    down.members.as_mut().unwrap()[2].healthy = false;
    assert!(matches!(plan(&spec(3), &down), Step::Wait { .. }));
    let mut unknown = updating(3, &[2, 3]);
    unknown.members.as_mut().unwrap()[0].outdated = None;
    assert_eq!(plan(&spec(3), &unknown), Step::Steady);
}

#[test]
fn a_member_down_on_an_old_template_is_restarted_first_so_a_bad_version_can_be_rolled_back() {
    // 1.1.0 crash-loops on demo-2, the first restarted; the user sets the version back, so
    // demo-2 is both down and on a template that is no longer current.
    let mut rolled_back = updating(3, &[3]);
    rolled_back.members.as_mut().unwrap()[2].healthy = false;
    assert_eq!(plan(&spec(3), &rolled_back), Step::UpdateMember { name: "demo-2".into() });
    // Down on the current template: nothing to restart it onto; it is waited for.
    let mut down = updating(3, &[]);
    down.members.as_mut().unwrap()[2].healthy = false;
    assert!(matches!(plan(&spec(3), &down), Step::Wait { .. }));
}

#[test]
fn a_single_member_restarts_in_place_having_nobody_to_hand_over_to() {
    assert_eq!(plan(&spec(1), &updating(1, &[1])), Step::UpdateMember { name: "demo-0".into() });
}

fn arb_spec() -> impl Strategy<Value = ConsensusClusterSpec> {
    let schedule = prop_oneof![
        Just(None),
        Just(Some("@daily")),
        Just(Some("0 */6 * * *")),
        Just(Some("61 * * * *")),
        Just(Some("every day")),
    ];
    (-2i32..12, schedule).prop_map(|(replicas, schedule)| match schedule {
        None => spec(replicas),
        Some(s) => spec_with_schedule(replicas, s),
    })
}

pub(super) fn arb_valid_spec() -> impl Strategy<Value = ConsensusClusterSpec> {
    (prop::sample::select(vec![1, 3, 5, 7, 9]), any::<bool>()).prop_map(|(replicas, with_backup)| {
        if with_backup { spec_with_schedule(replicas, "@daily") } else { spec(replicas) }
    })
}

fn arb_member(id: u64) -> impl Strategy<Value = ObservedMember> {
    let zone = prop_oneof![Just(None), Just(Some("a")), Just(Some("b")), Just(Some("c")), Just(Some("d"))];
    (
        any::<bool>(),
        prop::bool::weighted(0.8),
        zone,
        prop::option::of(0u64..100),
        prop::option::of(any::<bool>()),
    )
        .prop_map(move |(is_learner, healthy, zone, applied_index, outdated)| ObservedMember {
            id,
            name: format!("m-{id}"),
            is_learner: is_learner && id.is_multiple_of(3),
            healthy,
            zone: zone.map(str::to_owned),
            applied_index,
            outdated,
        })
}

fn arb_members() -> impl Strategy<Value = Vec<ObservedMember>> {
    (0usize..10).prop_flat_map(|n| (1..=n as u64).map(arb_member).collect::<Vec<_>>())
}

pub(super) fn arb_observed() -> impl Strategy<Value = Observed> {
    (
        prop::option::of(1i64..5),
        prop::option::of(0i32..10),
        prop::option::of(arb_members()),
        prop::option::of(0u64..11),
        prop::option::of(any::<u64>()),
        (any::<bool>(), prop::bool::weighted(0.2)),
        prop::option::of(0u64..110),
    )
        .prop_map(
            |(
                generation,
                workload_replicas,
                members,
                leader,
                cluster_id,
                (established, kept),
                leader_raft_index,
            )| {
                Observed {
                    generation,
                    workload_replicas,
                    members,
                    leader,
                    cluster_id,
                    leader_raft_index,
                    established,
                    kept_volumes: if kept { vec!["data-m-0".to_owned()] } else { Vec::new() },
                    ..Observed::default()
                }
            },
        )
}

fn brute_force_zone_fault_tolerant(members: &[ObservedMember]) -> bool {
    let voters: Vec<&ObservedMember> = members.iter().filter(|m| !m.is_learner).collect();
    if voters.is_empty() {
        return false;
    }
    let quorum = voters.len() / 2 + 1;
    members
        .iter()
        .map(|m| &m.zone)
        .all(|lost| voters.iter().filter(|v| v.healthy && &v.zone != lost).count() >= quorum)
}

proptest! {
    #[test]
    fn an_invalid_spec_never_yields_a_step_that_changes_anything(spec in arb_spec(), observed in arb_observed()) {
        prop_assume!(!validate_spec(&spec).is_empty());
        let step = plan(&spec, &observed);
        prop_assert!(matches!(step, Step::RefuseSpec { .. }), "{:?}", step);
        prop_assert!(!step.changes_cluster());
        let status = status(&spec, &observed, &step, None, None, at(1));
        let degraded = find(&status, condition::DEGRADED);
        prop_assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "InvalidSpec"));
    }

    #[test]
    fn only_a_missing_workload_is_created_and_at_the_declared_size(spec in arb_spec(), observed in arb_observed()) {
        let step = plan(&spec, &observed);
        if matches!(step, Step::CreateWorkload { .. }) {
            prop_assert_eq!(observed.workload_replicas, None);
            prop_assert!(validate_spec(&spec).is_empty());
            // Founding a cluster only where none has run and no earlier one left volumes.
            let bootstrap = !observed.established && observed.kept_volumes.is_empty();
            prop_assert_eq!(step, Step::CreateWorkload { replicas: spec.replicas, bootstrap });
            prop_assert!(bootstrap || observed.established, "kept volumes are adopted only when asked");
        }
    }

    #[test]
    fn the_workload_is_created_only_when_missing(spec in arb_spec(), observed in arb_observed()) {
        let refused_volumes = !observed.established && !observed.kept_volumes.is_empty();
        if observed.workload_replicas.is_none() && validate_spec(&spec).is_empty() && !refused_volumes {
            let created = matches!(plan(&spec, &observed), Step::CreateWorkload { replicas, .. } if replicas == spec.replicas);
            prop_assert!(created);
        }
    }

    /// A rolling update restarts one member at a time and only while the cluster can spare
    /// it: every member healthy and caught up, and never the leader while a follower is
    /// left to restart or an updated voter could take over.
    #[test]
    fn a_member_is_restarted_only_when_every_member_is_healthy_and_caught_up(
        spec in arb_valid_spec(),
        observed in arb_observed(),
    ) {
        if let Step::UpdateMember { name } = plan(&spec, &observed) {
            let members = observed.members.as_deref().unwrap_or_default();
            prop_assert!(members.iter().all(|m| m.healthy && log_caught_up(m, observed.leader_raft_index) == Some(true)));
            let restarted = members.iter().find(|m| m.name == name).expect("a listed member");
            prop_assert_eq!(restarted.outdated, Some(true));
            prop_assert!(members.iter().all(|m| m.outdated.is_some()), "nothing is restarted on a guess");
            if Some(restarted.id) == observed.leader {
                let voters = members.iter().filter(|m| !m.is_learner).count();
                prop_assert_eq!(voters, 1, "the leader restarts only with nobody to hand over to: {:?}", members);
            }
        }
    }

    #[test]
    fn steady_only_with_a_leader_and_every_member_healthy(spec in arb_spec(), observed in arb_observed()) {
        if plan(&spec, &observed) == Step::Steady {
            let members = observed.members.as_deref().unwrap_or_default();
            prop_assert!(members.iter().all(|m| m.healthy));
            prop_assert!(observed.leader.is_some_and(|l| members.iter().any(|m| m.id == l)));
            prop_assert_eq!(Some(members.len() as i32), observed.workload_replicas);
        }
    }

    #[test]
    fn zone_fault_tolerance_equals_brute_force(members in arb_members()) {
        prop_assert_eq!(zone_fault_tolerant(&members), brute_force_zone_fault_tolerant(&members));
    }

    #[test]
    fn the_zone_condition_agrees_with_brute_force(spec in arb_spec(), observed in arb_observed()) {
        let status = status_now(&spec, &observed);
        let expected = observed.members.as_deref().is_some_and(brute_force_zone_fault_tolerant);
        let expected = if expected { "True" } else { "False" };
        prop_assert_eq!(&find(&status, condition::ZONE_FAULT_TOLERANT).status, expected);
    }

    #[test]
    fn every_condition_once_with_the_observed_generation(spec in arb_spec(), observed in arb_observed()) {
        let status = status_now(&spec, &observed);
        for type_ in [
            condition::AVAILABLE, condition::PROGRESSING, condition::DEGRADED,
            condition::QUORUM_LOST, condition::ZONE_FAULT_TOLERANT,
        ] {
            let matching: Vec<_> = status.conditions.iter().filter(|c| c.type_ == type_).collect();
            prop_assert_eq!(matching.len(), 1, "{}", type_);
            prop_assert_eq!(matching[0].observed_generation, observed.generation);
            prop_assert!(!matching[0].reason.is_empty());
        }
        prop_assert_eq!(status.observed_generation, observed.generation);
    }

    #[test]
    fn an_unchanged_observation_keeps_every_transition_time(spec in arb_spec(), observed in arb_observed()) {
        let step = plan(&spec, &observed);
        let first = status(&spec, &observed, &step, None, None, at(1));
        let second = status(&spec, &observed, &step, None, Some(&first), at(2));
        prop_assert_eq!(first, second);
    }
}
