//! The PodDisruptionBudget, derived from the voters rather than the pods: a learner's pod
//! (a member that exists but does not vote) can be evicted without touching quorum, a
//! voter's cannot, and the budget cannot tell them apart by label. So it is written as
//! `minAvailable = pods - (voters - quorum)`: with every pod Ready that allows exactly
//! `voters - quorum` evictions whatever the number of learners, and each pod that is not
//! Ready (a voter or not) takes one away, so an eviction never leaves fewer Ready voters
//! than a quorum.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Cluster, labels};
use crate::plan::{Observed, Step, quorum};

/// A not-Ready pod may be evicted only while the budget is whole (currentHealthy at least
/// desiredHealthy). `AlwaysAllow` would let a drain evict every pod that is not Ready, and
/// during an election (right after the leader's node was drained, say) no member knows a
/// leader, so none is Ready: the drain could then take caught-up voters and the quorum with
/// them. The cost: a crash-looping member holds up a drain only while another member is
/// down too, when the budget has nothing left to give anyway.
const UNHEALTHY_POD_EVICTION_POLICY: &str = "IfHealthyBudget";

/// What a budget guards while it is in force, from this reconcile's apply to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guarded {
    /// The most member pods that can exist meanwhile. The budget's arithmetic is only safe
    /// for at most this many: a pod more adds a disruption the voters cannot spare.
    pub pods: i32,
    /// The fewest voters the membership has meanwhile; `None` while no member answers, when
    /// nothing says any disruption can be spared.
    pub voters: Option<usize>,
}

impl Guarded {
    /// For the objects applied before `step` is carried out, from what the reconcile
    /// observed: `existing_pods` member pods (terminating ones included) and a StatefulSet
    /// about to run `replicas`.
    ///
    /// The voters are the fewer of now and after the step, so a change that shrinks them
    /// (ChangeVoters to fewer, removing a voter) is covered before it is made, and one that
    /// grows them counts only once a later observation lists the new voters. The pods are
    /// the most of the StatefulSet before and after and the pods that exist, so pods that
    /// the StatefulSet controller has yet to start or stop are covered either way.
    pub fn for_step(observed: &Observed, existing_pods: usize, replicas: i32, step: &Step) -> Self {
        let voters = observed.members.as_deref().map(|members| {
            let now = members.iter().filter(|m| !m.is_learner).count();
            let after = match step {
                Step::ChangeVoters { voters } => voters.len(),
                Step::RemoveMember { id, .. } if members.iter().any(|m| m.id == *id && !m.is_learner) => {
                    now - 1
                }
                // A voter restarted on purpose is a disruption the budget must already count
                // when a drain asks at the same moment: one voter fewer spares one fewer.
                Step::UpdateMember { name } if members.iter().any(|m| &m.name == name && !m.is_learner) => {
                    now - 1
                }
                _ => now,
            };
            now.min(after)
        });
        let existing = i32::try_from(existing_pods).unwrap_or(i32::MAX);
        let pods = replicas.max(observed.workload_replicas.unwrap_or(0)).max(existing);
        Self { pods, voters }
    }

    /// Voters a disruption may take without costing quorum. A single voter has none to
    /// spare, so draining its node waits for the user to decide.
    pub fn spare(&self) -> usize {
        self.voters.map_or(0, |voters| voters.saturating_sub(quorum(voters)))
    }

    /// `spec.minAvailable`: the disruption controller allows `Ready pods - minAvailable`
    /// evictions, at most [`Guarded::spare`] while no more than [`Guarded::pods`] exist.
    pub fn min_available(&self) -> i32 {
        (self.pods - i32::try_from(self.spare()).unwrap_or(i32::MAX)).max(0)
    }
}

pub(super) fn budget(cluster: &Cluster<'_>, guarded: Guarded) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: cluster.metadata(cluster.name.to_owned()),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(guarded.min_available())),
            selector: Some(LabelSelector {
                match_labels: Some(labels::selector(cluster.name)),
                ..LabelSelector::default()
            }),
            unhealthy_pod_eviction_policy: Some(UNHEALTHY_POD_EVICTION_POLICY.to_owned()),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::plan::ObservedMember;

    fn observed(voters: u64, learners: u64, workload: i32) -> Observed {
        let member = |i: u64| ObservedMember {
            id: i,
            name: format!("demo-{i}"),
            is_learner: i >= voters,
            healthy: true,
            zone: None,
            applied_index: Some(1),
            outdated: Some(false),
        };
        Observed {
            workload_replicas: Some(workload),
            members: Some((0..voters + learners).map(member).collect()),
            ..Observed::default()
        }
    }

    /// `status.disruptionsAllowed` for `min_available` with `ready` pods Ready.
    fn allowed(min_available: i32, ready: i32) -> i32 {
        (ready - min_available).max(0)
    }

    #[test]
    fn a_steady_cluster_spares_voters_minus_quorum() {
        let spared = [1, 3, 5, 7, 9].map(|n| {
            let guarded = Guarded::for_step(&observed(n, 0, n as i32), n as usize, n as i32, &Step::Steady);
            allowed(guarded.min_available(), n as i32)
        });
        assert_eq!(spared, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn learners_pods_do_not_add_disruptions() {
        // 3 -> 5 with the new members running as learners: two more pods, still one to spare.
        let guarded = Guarded::for_step(&observed(3, 2, 5), 5, 5, &Step::Steady);
        assert_eq!(guarded, Guarded { pods: 5, voters: Some(3) });
        assert_eq!(allowed(guarded.min_available(), 5), 1);
        // One pod not Ready, learner or voter: none to spare, so a drain waits.
        assert_eq!(allowed(guarded.min_available(), 4), 0);
    }

    #[test]
    fn the_budget_is_lowered_before_the_voters_shrink_and_raised_only_once_they_grew() {
        let five: Vec<u64> = (0..5).collect();
        let three: Vec<u64> = (0..3).collect();
        // Promoting two caught-up learners: still guarded as three voters.
        let promoting = Guarded::for_step(&observed(3, 2, 5), 5, 5, &Step::ChangeVoters { voters: five });
        assert_eq!(promoting.voters, Some(3));
        // The next observation lists five voters: two to spare.
        assert_eq!(Guarded::for_step(&observed(5, 0, 5), 5, 5, &Step::Steady).spare(), 2);
        // Demoting two of five: guarded as three before the change is made.
        let demoting = Guarded::for_step(&observed(5, 0, 5), 5, 5, &Step::ChangeVoters { voters: three });
        assert_eq!((demoting.voters, demoting.spare()), (Some(3), 1));
        // Removing a voter (one that lost its data) leaves two of three: none to spare.
        let removing = Step::RemoveMember { id: 2, name: "demo-2".into() };
        assert_eq!(Guarded::for_step(&observed(3, 0, 3), 3, 3, &removing).spare(), 0);
        // Removing a learner leaves the voters as they are.
        let learner = Step::RemoveMember { id: 3, name: "demo-3".into() };
        assert_eq!(Guarded::for_step(&observed(3, 1, 4), 4, 4, &learner).spare(), 1);
    }

    #[test]
    fn a_voter_about_to_be_restarted_counts_as_disrupted_already() {
        // Three voters, all Ready, demo-1 about to be restarted onto a new template: a drain
        // asking at that moment gets nothing, since the restart takes the one to spare.
        let restarting = Step::UpdateMember { name: "demo-1".into() };
        let guarded = Guarded::for_step(&observed(3, 0, 3), 3, 3, &restarting);
        assert_eq!(allowed(guarded.min_available(), 3), 0);
        // Five voters: one of the two is left.
        let guarded = Guarded::for_step(&observed(5, 0, 5), 5, 5, &restarting);
        assert_eq!(allowed(guarded.min_available(), 5), 1);
    }

    #[test]
    fn pods_the_statefulset_has_yet_to_start_or_stop_are_counted() {
        // Growing 3 -> 5: the two new pods count before they exist.
        assert_eq!(
            Guarded::for_step(&observed(3, 2, 3), 3, 5, &Step::ResizeWorkload { replicas: 5 }).pods,
            5
        );
        // Shrinking 5 -> 3: the leaving pods count while the StatefulSet still runs them ...
        assert_eq!(
            Guarded::for_step(&observed(3, 0, 5), 5, 3, &Step::ResizeWorkload { replicas: 3 }).pods,
            5
        );
        // ... and while they are still terminating after it shrank.
        assert_eq!(Guarded::for_step(&observed(3, 0, 3), 5, 3, &Step::Steady).pods, 5);
    }

    #[test]
    fn without_an_answer_from_the_members_nothing_is_spared() {
        let unknown = Observed { workload_replicas: Some(3), ..Observed::default() };
        let guarded = Guarded::for_step(&unknown, 3, 3, &Step::Wait { reason: String::new() });
        assert_eq!((guarded.voters, guarded.min_available()), (None, 3));
    }

    fn any_step(members: u64) -> impl Strategy<Value = Step> {
        prop_oneof![
            Just(Step::Steady),
            (0..=members as usize).prop_map(|n| Step::ChangeVoters { voters: (0..n as u64).collect() }),
            (0..members.max(1)).prop_map(|id| Step::RemoveMember { id, name: format!("demo-{id}") }),
            (1..=9i32).prop_map(|replicas| Step::ResizeWorkload { replicas }),
            Just(Step::AddLearner { name: "demo-9".into() }),
            (0..members.max(1)).prop_map(|id| Step::UpdateMember { name: format!("demo-{id}") }),
        ]
    }

    proptest! {
        /// Whatever the membership, pods and step, and whichever pods are Ready, the budget
        /// allows no more evictions than the Ready voters can spare, both before the step's
        /// change is made and after it, as long as no more pods exist than it guards.
        #[test]
        fn never_more_disruptions_than_the_ready_voters_can_spare(
            (voters, learners, step) in (0..=9u64, 0..=4u64)
                .prop_flat_map(|(v, l)| (Just(v), Just(l), any_step(v + l))),
            workload in 0..=9i32,
            existing in 0..=9usize,
            replicas in 1..=9i32,
            not_ready_voters in 0..=9usize,
            not_ready_others in 0..=9usize,
        ) {
            let before = observed(voters, learners, workload);
            let guarded = Guarded::for_step(&before, existing, replicas, &step);
            let members = before.members.as_deref().unwrap_or_default();
            let voters_now = members.iter().filter(|m| !m.is_learner).count();
            let voters_after = match &step {
                Step::ChangeVoters { voters } => voters.len(),
                Step::RemoveMember { id, .. } => {
                    members.iter().filter(|m| !m.is_learner && m.id != *id).count()
                }
                _ => voters_now,
            };
            // Each voter has its pod among those guarded; the rest of the pods are not voters.
            let pods = usize::try_from(guarded.pods).expect("not negative");
            for voting in [voters_now, voters_after] {
                prop_assume!(voting <= pods);
                let down = not_ready_voters.min(voting);
                let ready = pods - down - not_ready_others.min(pods - voting);
                let ready_voters = voting - down;
                let allowed = allowed(guarded.min_available(), i32::try_from(ready).expect("small"));
                let spare = ready_voters.saturating_sub(quorum(voting));
                prop_assert!(
                    usize::try_from(allowed).expect("not negative") <= spare,
                    "{guarded:?} allows {allowed} with {ready_voters} of {voting} voters Ready ({step:?})"
                );
            }
        }
    }
}
