//! The boundary between the planner and what it drives: Kubernetes (`k8s`) and member
//! processes on this machine (`local`) each observe the cluster and carry out one step,
//! and [`round`] is the one order in which both do it. The members are observed the same
//! way on both (`membership::observe`), and leader-only changes go to the leader's own URL
//! on both, so the same planner decides from the same facts and its steps land in the same
//! place.

use std::future::Future;

use crate::membership::MemberView;
use crate::plan::{Observed, Step};

pub trait Platform {
    /// What the platform saw in one reconcile: the planner's input and whatever acting on
    /// it takes (on both, the leader's URL).
    type Observation: AsRef<Observed>;
    type Error;

    fn observe(&mut self) -> impl Future<Output = Result<Self::Observation, Self::Error>> + Send;
    /// Carries out `step`, decided from `observation`; retried on a later round when it
    /// fails, so it must be idempotent.
    fn act(
        &mut self,
        observation: &Self::Observation,
        step: &Step,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// One round's outcome: the status is written from it whether the step succeeded or not.
pub struct Round<P: Platform> {
    pub observation: P::Observation,
    pub step: Step,
    pub acted: Result<(), P::Error>,
}

/// Observe, `decide` the single next step, carry it out. Only a failed observation ends
/// the round early: there is nothing to decide from.
pub async fn round<P: Platform>(
    platform: &mut P,
    decide: impl FnOnce(&Observed) -> Step,
) -> Result<Round<P>, P::Error> {
    let observation = platform.observe().await?;
    let step = decide(observation.as_ref());
    let acted = platform.act(&observation, &step).await;
    Ok(Round { observation, step, acted })
}

/// Folds the members' view into the planner's input.
pub fn fill(observed: &mut Observed, view: &MemberView) {
    observed.members.clone_from(&view.members);
    observed.leader = view.leader;
    observed.leader_raft_index = view.leader_raft_index;
    observed.cluster_id = view.cluster_id;
}
