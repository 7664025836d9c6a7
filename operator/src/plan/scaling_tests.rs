//! The membership planner against a model cluster that carries out each step as the
//! platforms do, checking at every step the rules that keep the cluster safe.

use std::collections::BTreeSet;

use k8s_openapi::jiff::Timestamp;
use proptest::prelude::*;

use super::super::*;
use super::*;

fn spec(replicas: i32) -> ConsensusClusterSpec {
    serde_json::from_value(serde_json::json!({ "replicas": replicas })).expect("spec parses")
}

/// A cluster as the platform would observe it, and what each step does to it.
#[derive(Debug, Clone)]
struct Model {
    /// (id, name, is_learner)
    members: Vec<(u64, String, bool)>,
    leader: u64,
    workload: i32,
    volumes: BTreeSet<String>,
    lost: BTreeSet<String>,
    /// Members whose process never starts.
    broken: BTreeSet<String>,
    next_id: u64,
}

impl Model {
    fn running(n: i32) -> Self {
        let members: Vec<(u64, String, bool)> =
            (0..n).map(|i| (100 + i as u64, format!("demo-{i}"), false)).collect();
        Self {
            leader: members[0].0,
            volumes: members.iter().map(|m| m.1.clone()).collect(),
            members,
            workload: n,
            lost: BTreeSet::new(),
            broken: BTreeSet::new(),
            next_id: 200,
        }
    }

    fn runs(&self, name: &str) -> bool {
        ordinal(name).is_some_and(|(_, n)| (n as i32) < self.workload)
            && !self.lost.contains(name)
            && !self.broken.contains(name)
            && self.volumes.contains(name)
    }

    fn observe(&self) -> Observed {
        Observed {
            generation: Some(1),
            workload_replicas: Some(self.workload),
            members: Some(
                self.members
                    .iter()
                    .map(|(id, name, learner)| {
                        // Of two ids under one name (a replacement under way), the process
                        // there runs the newer; the old one never answers again.
                        let runs = self.runs(name) && Some(*id) == self.newest_id(name);
                        ObservedMember {
                            id: *id,
                            name: name.clone(),
                            is_learner: *learner,
                            healthy: runs,
                            zone: None,
                            applied_index: runs.then_some(1000),
                            outdated: Some(false),
                        }
                    })
                    .collect(),
            ),
            leader: Some(self.leader),
            cluster_id: Some(7),
            leader_raft_index: Some(1000),
            volumes: self.volumes.iter().cloned().collect(),
            lost_data: self.lost.iter().cloned().collect(),
            established: true,
            ..Observed::default()
        }
    }

    fn newest_id(&self, name: &str) -> Option<u64> {
        self.members.iter().filter(|m| m.1 == name).map(|m| m.0).max()
    }

    fn voters(&self) -> usize {
        self.members.iter().filter(|m| !m.2).count()
    }

    /// Carries out `step`, asserting what the real cluster and platform would refuse.
    fn apply(&mut self, step: &Step) {
        match step {
            Step::AddLearner { name } => {
                assert!(
                    self.members.iter().filter(|m| &m.1 == name).all(|m| !m.2 && self.lost.contains(name)),
                    "adding {name} while it is listed and has not lost its data: {:?}",
                    self.members
                );
                if !self.members.iter().any(|m| &m.1 == name && m.2) {
                    self.members.push((self.next_id, name.clone(), true));
                    self.next_id += 1;
                }
                // The platform gives a replaced member a fresh volume.
                if self.lost.remove(name) || (ordinal(name).is_some_and(|(_, n)| (n as i32) < self.workload))
                {
                    self.volumes.insert(name.clone());
                }
            }
            Step::ResizeWorkload { replicas } => {
                for n in self.workload..*replicas {
                    self.volumes.insert(format!("demo-{n}"));
                }
                self.workload = *replicas;
            }
            Step::ChangeVoters { voters } => {
                assert!(!voters.len().is_multiple_of(2), "even voter set {voters:?}");
                assert!(voters.contains(&self.leader), "leader left out of {voters:?}");
                let observed = self.observe();
                for id in voters {
                    let m =
                        observed.members.iter().flatten().find(|m| m.id == *id).expect("voter is a member");
                    assert!(!m.is_learner || caught_up(m, observed.leader_raft_index), "{m:?} not caught up");
                }
                for m in &mut self.members {
                    m.2 = !voters.contains(&m.0);
                }
            }
            Step::TransferLeadership { to } => {
                assert!(self.members.iter().any(|m| m.0 == *to && !m.2), "leadership to a non-voter");
                self.leader = *to;
            }
            Step::RemoveMember { id, name } => {
                assert_ne!(*id, self.leader, "removing the leader");
                let m = self.members.iter().find(|m| m.0 == *id).expect("removing a listed member");
                assert!(m.2, "removing voter {name}: the voters would be even until it is replaced");
                self.members.retain(|m| m.0 != *id);
            }
            Step::DeleteVolume { name } => {
                assert!(
                    !self.runs(name) || self.lost.contains(name),
                    "deleting the volume of running {name}"
                );
                assert!(!self.members.iter().any(|m| &m.1 == name), "deleting the volume of member {name}");
                self.volumes.remove(name);
            }
            Step::UpdateMember { name } => {
                panic!("restarting {name}, though every member runs the current template")
            }
            Step::TakeBackup { .. } => panic!("a backup taken, though the spec declares none"),
            Step::BeginRecovery { .. } | Step::Recover { .. } => {
                panic!("a recovery, though the spec does not ask for one")
            }
            Step::RefuseSpec { .. } | Step::CreateWorkload { .. } | Step::Wait { .. } | Step::Steady => {}
        }
        assert!(!self.voters().is_multiple_of(2), "{} voters after {step:?}", self.voters());
    }

    /// Plans and applies steps until Steady or a Wait; the steps taken, and the last one.
    fn drive(&mut self, replicas: i32) -> (Vec<Step>, Step) {
        let mut steps = Vec::new();
        for _ in 0..40 {
            let step = plan(&spec(replicas), &self.observe());
            if !step.changes_cluster() {
                return (steps, step);
            }
            self.apply(&step);
            steps.push(step);
        }
        panic!("no end after 40 steps: {steps:?}");
    }
}

fn names(steps: &[Step]) -> Vec<String> {
    steps
        .iter()
        .map(|s| match s {
            Step::AddLearner { name } => format!("AddLearner {name}"),
            Step::ResizeWorkload { replicas } => format!("ResizeWorkload {replicas}"),
            Step::ChangeVoters { voters } => format!("ChangeVoters {}", voters.len()),
            Step::TransferLeadership { to } => format!("TransferLeadership {to}"),
            Step::RemoveMember { name, .. } => format!("RemoveMember {name}"),
            Step::DeleteVolume { name } => format!("DeleteVolume {name}"),
            other => other.name().to_owned(),
        })
        .collect()
}

#[test]
fn scale_up_adds_learners_grows_then_changes_all_voters_at_once() {
    let mut model = Model::running(3);
    let (steps, last) = model.drive(5);
    assert_eq!(
        names(&steps),
        ["AddLearner demo-3", "AddLearner demo-4", "ResizeWorkload 5", "ChangeVoters 5"],
    );
    assert_eq!(last, Step::Steady);
}

#[test]
fn scale_down_moves_leadership_first_then_shrinks_the_voters_then_removes() {
    let mut model = Model::running(5);
    model.leader = model.members[4].0;
    let (steps, last) = model.drive(3);
    assert_eq!(
        names(&steps),
        [
            "TransferLeadership 100",
            "ChangeVoters 3",
            "RemoveMember demo-3",
            "RemoveMember demo-4",
            "ResizeWorkload 3",
            "DeleteVolume demo-3",
            "DeleteVolume demo-4",
        ],
    );
    assert_eq!(last, Step::Steady);
}

#[test]
fn a_member_that_lost_its_data_is_replaced_by_a_new_id_without_an_even_voter_count() {
    let mut model = Model::running(3);
    model.lost.insert("demo-1".to_owned());
    model.volumes.remove("demo-1");
    let (steps, last) = model.drive(3);
    // The new learner first, then it takes the old vote in one step (3 -> 3), and the old
    // id, left a learner by that step, goes last.
    assert_eq!(names(&steps), ["AddLearner demo-1", "ChangeVoters 3", "RemoveMember demo-1"]);
    let Step::ChangeVoters { voters } = &steps[1] else { unreachable!() };
    assert!(!voters.contains(&101), "the old id keeps no vote: {voters:?}");
    assert_eq!(last, Step::Steady);
    let replaced = model.members.iter().find(|m| m.1 == "demo-1").expect("demo-1 is back");
    assert_ne!(replaced.0, 101, "a replaced member never keeps its old id");
}

#[test]
fn a_new_member_that_never_starts_stops_the_change_and_scaling_back_cancels_it() {
    let mut model = Model::running(3);
    model.broken.insert("demo-4".to_owned());
    let (steps, last) = model.drive(5);
    assert_eq!(names(&steps), ["AddLearner demo-3", "AddLearner demo-4", "ResizeWorkload 5"]);
    assert!(matches!(&last, Step::Wait { reason } if reason.contains("demo-4 does not answer")), "{last:?}");
    assert_eq!(model.voters(), 3, "the voter set stays as it was");
    let observed = model.observe();
    let at = |s: i64| Time(Timestamp::from_second(s).expect("time"));
    // Within the grace a member that does not answer yet may just be starting.
    let first = status(&spec(5), &observed, &last, None, None, at(1));
    let progressing =
        first.conditions.iter().find(|c| c.type_ == condition::PROGRESSING).expect("progressing");
    assert_eq!((progressing.status.as_str(), progressing.reason.as_str()), ("True", "WaitingForLearners"));
    let later = at(1 + LEARNER_START_GRACE_SECONDS);
    let status = status(&spec(5), &observed, &last, None, Some(&first), later.clone());
    let find = |t: &str| status.conditions.iter().find(|c| c.type_ == t).expect("condition").clone();
    assert_eq!(status.phase, Some(Phase::Scaling));
    // Once stuck, it stays reported so (no flapping back to progressing).
    let again = super::super::status(&spec(5), &observed, &last, None, Some(&status), at(100));
    assert_eq!(again, status);
    assert_eq!(
        (find(condition::PROGRESSING).status.as_str(), find(condition::PROGRESSING).reason.as_str()),
        ("False", "MemberNotCatchingUp")
    );
    assert_eq!(find(condition::DEGRADED).reason, "MemberNotCatchingUp");

    let (steps, last) = model.drive(3);
    assert_eq!(
        names(&steps),
        [
            "RemoveMember demo-3",
            "RemoveMember demo-4",
            "ResizeWorkload 3",
            "DeleteVolume demo-3",
            "DeleteVolume demo-4"
        ],
    );
    assert_eq!(last, Step::Steady);
}

#[test]
fn a_stale_volume_is_deleted_before_its_member_is_added_again() {
    let mut model = Model::running(3);
    model.volumes.insert("demo-3".to_owned());
    let (steps, _) = model.drive(5);
    assert_eq!(names(&steps)[..2], ["DeleteVolume demo-3", "AddLearner demo-3"]);
}

#[test]
fn the_step_in_progress_is_reported() {
    let model = Model::running(3);
    let observed = model.observe();
    let step = plan(&spec(5), &observed);
    let status =
        status(&spec(5), &observed, &step, None, None, Time(Timestamp::from_second(1).expect("time")));
    let progressing =
        status.conditions.iter().find(|c| c.type_ == condition::PROGRESSING).expect("progressing");
    assert_eq!((progressing.status.as_str(), progressing.reason.as_str()), ("True", "AddLearner"));
    assert_eq!(status.phase, Some(Phase::Scaling));
}

#[test]
fn names_split_into_cluster_and_ordinal() {
    assert_eq!(ordinal("demo-12"), Some(("demo", 12)));
    assert_eq!(ordinal("my-db-0"), Some(("my-db", 0)));
    assert_eq!(ordinal(""), None);
    assert_eq!(ordinal("demo"), None);
    assert_eq!(ordinal("demo-x"), None);
}

/// What may happen between two reconciles: the user edits the size, a member loses its
/// data, or a step is carried out (the operator may die before or after it: stateless).
#[derive(Debug, Clone)]
enum Event {
    Scale(i32),
    LoseData(usize),
    Reconcile,
}

fn arb_events() -> impl Strategy<Value = Vec<Event>> {
    prop::collection::vec(
        prop_oneof![
            1 => prop::sample::select(vec![1, 3, 5, 7]).prop_map(Event::Scale),
            1 => (0usize..7).prop_map(Event::LoseData),
            8 => Just(Event::Reconcile),
        ],
        1..60,
    )
}

fn check_step(step: &Step, observed: &Observed, replicas: i32) -> Result<(), TestCaseError> {
    let members = observed.members.as_deref().unwrap_or_default();
    match step {
        Step::ChangeVoters { voters } => {
            prop_assert!(!voters.len().is_multiple_of(2), "even {:?}", voters);
            prop_assert!(observed.leader.is_some_and(|l| voters.contains(&l)), "leader left out");
            for m in members.iter().filter(|m| voters.contains(&m.id) && m.is_learner) {
                prop_assert!(caught_up(m, observed.leader_raft_index), "{:?} promoted before catching up", m);
            }
        }
        Step::RemoveMember { id, name } => {
            let m = members.iter().find(|m| m.id == *id);
            prop_assert!(m.is_some_and(|m| m.is_learner), "voter {} removed", name);
            prop_assert_ne!(Some(*id), observed.leader);
        }
        Step::AddLearner { name } => {
            // Only a member of the declared size that is not there, or whose only listed
            // identity is a voter that lost its data (replaced before it leaves).
            prop_assert!(ordinal(name).is_some_and(|(_, n)| (n as i32) < replicas));
            let listed: Vec<&ObservedMember> = members.iter().filter(|m| &m.name == name).collect();
            prop_assert!(
                listed.is_empty()
                    || (listed.len() == 1 && !listed[0].is_learner && observed.lost_data.contains(name)),
                "{:?}",
                listed
            );
        }
        Step::DeleteVolume { name } => {
            prop_assert!(!members.iter().any(|m| &m.name == name));
        }
        _ => {}
    }
    Ok(())
}

proptest! {
    #[test]
    fn any_history_of_edits_and_losses_is_safe_and_converges(events in arb_events()) {
        let mut model = Model::running(3);
        let mut replicas = 3;
        for event in events {
            match event {
                Event::Scale(n) => replicas = n,
                Event::LoseData(i) => {
                    // A member replaced while its replacement is not yet alone under its
                    // name is not lost again: a replacement that itself loses its data
                    // waits, reported as MemberNotCatchingUp, for a person to look.
                    if let Some((_, name, _)) = model.members.get(i).cloned()
                        && model.leader != model.members[i].0
                        && model.members.iter().filter(|m| m.1 == name).count() == 1
                    {
                        model.volumes.remove(&name);
                        model.lost.insert(name);
                    }
                }
                Event::Reconcile => {
                    let observed = model.observe();
                    let step = plan(&spec(replicas), &observed);
                    check_step(&step, &observed, replicas)?;
                    model.apply(&step);
                }
            }
        }
        // Left alone, it reaches the declared size unless losses took a quorum.
        let observed = model.observe();
        let healthy = observed.members.iter().flatten().filter(|m| !m.is_learner && m.healthy).count();
        if healthy >= quorum(model.voters()) {
            let (_, last) = model.drive(replicas);
            prop_assert_eq!(&last, &Step::Steady, "{:?}", model);
            prop_assert_eq!(model.voters() as i32, replicas);
        }
    }

    #[test]
    fn planned_membership_steps_are_safe_for_any_observation(
        spec in super::super::tests::arb_valid_spec(),
        observed in super::super::tests::arb_observed(),
    ) {
        let step = plan(&spec, &observed);
        check_step(&step, &observed, spec.replicas)?;
    }
}
